"""The publishing lease: which ingest publishes, decided through one key in a JetStream key-value bucket.

Pure core (``LeaseMachine``: no I/O, no clock; every call takes ``now_s``, a monotonic time in s) plus the
JetStream KV adapter (``KvLease``). The rules follow the lease pattern of Gray and Cheriton, "Leases: an
efficient fault-tolerant mechanism for distributed file cache consistency" (SOSP 1989), with the KV
revision as the fencing token (Kleppmann, "How to do distributed locking", 2016):

* The lease is the KV entry ``key``; its **revision** (the stream sequence of the last write) changes on
  every write. A write is conditional: ``create`` when there is no entry, ``update(last=revision)``
  otherwise, so of two ingests writing against the same revision exactly one succeeds.
* The holder renews every ``renew_every_s`` (default ``ttl_s / 4``) by an update against its own last
  revision. A failed renewal because someone else wrote (a revision conflict) makes it a standby at once.
* A standby takes the lease when the revision it sees has **not changed for ``ttl_s`` measured on its own
  clock from when it first saw that revision**. No wall clock is compared across processes.
* The holder may publish only until ``sent_at + ttl_s * safety`` where ``sent_at`` is when it *sent* its
  last successful write (``safety`` < 1, default 0.75). A standby's earliest takeover is ``seen_at + ttl_s``
  with ``seen_at`` after that write landed, so the old holder has stopped publishing before a new one can
  start: two leaders never publish at once (as long as clocks run at the same rate, true on one host and
  to within ppm across hosts).
* Every publish carries the revision it was made under (``Bookcast-Lease-Revision`` header), so anything
  downstream can fence a stale holder's late message by revision.

Transition table (role x input -> role):

    role      input                                    next role
    STANDBY   observe(no entry)                        STANDBY, action Acquire(None)
    STANDBY   observe(rev r, released by its holder)   STANDBY, action Acquire(r)
    STANDBY   observe(rev r, unchanged >= ttl_s)       STANDBY, action Acquire(r)
    STANDBY   write_ok(rev)                            LEADER
    LEADER    tick, renew due                          LEADER, action Renew(own rev)
    LEADER    write_ok(rev)                            LEADER (fence moved on)
    LEADER    write_conflict / observe(other holder)   STANDBY
    LEADER    may_publish after fence time             (False; a renewal that succeeds restores it)
    any       release()                                STANDBY
"""
from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

log = logging.getLogger("bookcast.lease")

LEASE_BUCKET = "md_lease"   # the JetStream KV bucket of the lease (in the lease cluster)
LEASE_KEY = "ingest"        # its one key
LEASE_REVISION_HEADER = "Bookcast-Lease-Revision"
LEASE_HOLDER_HEADER = "Bookcast-Ingest"


class Role(enum.StrEnum):
    STANDBY = "standby"
    LEADER = "leader"


class Input(enum.StrEnum):
    OBSERVE = "observe"                   # a read of the entry that names us, nobody, or the same revision
    OBSERVE_TAKEN = "observe_taken"       # a read shows a newer revision written by another holder
    WRITE_OK = "write_ok"                 # our conditional write landed
    WRITE_CONFLICT = "write_conflict"     # our conditional write lost: the revision moved on
    WRITE_UNREACHABLE = "write_unreachable"  # our write got no answer (NATS down, timeout)
    RELEASE = "release"                   # we give the lease up


_R, _IN = Role, Input
TRANSITIONS: dict[tuple[Role, Input], Role] = {
    (_R.STANDBY, _IN.OBSERVE): _R.STANDBY,
    (_R.STANDBY, _IN.OBSERVE_TAKEN): _R.STANDBY,
    (_R.STANDBY, _IN.WRITE_OK): _R.LEADER,
    (_R.STANDBY, _IN.WRITE_CONFLICT): _R.STANDBY,
    (_R.STANDBY, _IN.WRITE_UNREACHABLE): _R.STANDBY,
    (_R.STANDBY, _IN.RELEASE): _R.STANDBY,
    (_R.LEADER, _IN.OBSERVE): _R.LEADER,
    (_R.LEADER, _IN.OBSERVE_TAKEN): _R.STANDBY,
    (_R.LEADER, _IN.WRITE_OK): _R.LEADER,
    (_R.LEADER, _IN.WRITE_CONFLICT): _R.STANDBY,
    (_R.LEADER, _IN.WRITE_UNREACHABLE): _R.LEADER,  # the fence (may_publish) runs out on its own
    (_R.LEADER, _IN.RELEASE): _R.STANDBY,
}
"""Every (role, input) pair and the next role. Writes (``Acquire``/``Renew``) come from ``next_action``."""


@dataclass(frozen=True, slots=True)
class Acquire:
    """Write the lease: ``create`` when ``expected_revision`` is None, else ``update(last=expected_revision)``."""

    expected_revision: int | None


@dataclass(frozen=True, slots=True)
class Renew:
    expected_revision: int


@dataclass(frozen=True, slots=True)
class BecameLeader:
    revision: int


@dataclass(frozen=True, slots=True)
class LostLease:
    reason: str  # "conflict" (someone else wrote) or "taken" (another holder observed) or "released"


LeaseAction = Acquire | Renew
LeaseEvent = BecameLeader | LostLease


class LeaseMachine:
    """One contender's view of the lease. ``holder`` names this contender (the ingest's name).

    Raises:
        ValueError: ``ttl_s`` <= 0, ``renew_every_s`` not in (0, ttl_s), ``safety`` not in (0, 1).
    """

    def __init__(self, holder: str, ttl_s: float, *, renew_every_s: float | None = None, safety: float = 0.75) -> None:
        renew_every_s = ttl_s / 4 if renew_every_s is None else renew_every_s
        if ttl_s <= 0 or not 0 < renew_every_s < ttl_s or not 0 < safety < 1:
            raise ValueError(f"need ttl_s > 0, 0 < renew_every_s < ttl_s, 0 < safety < 1; got "
                             f"ttl_s={ttl_s} renew_every_s={renew_every_s} safety={safety}")
        self.holder = holder
        self.ttl_s = ttl_s
        self.renew_every_s = renew_every_s
        self.safety = safety
        self.role = Role.STANDBY
        self.revision: int | None = None       # last revision seen or written
        self.entry_holder: str | None = None   # holder named by that revision
        self.seen_at_s: float | None = None    # when ``revision`` was first seen (standby's expiry clock)
        self.sent_at_s: float | None = None    # when our last successful write was sent (leader's fence)
        self._in_flight = False

    # -- inputs ----------------------------------------------------------------------------------
    def observe(self, revision: int | None, holder: str | None, now_s: float) -> list[LeaseEvent]:
        """A read of the lease entry: its revision and holder, or (None, None) when there is no entry.
        A revision older than the one known is a stale read and ignored, and so is "no entry" on a leader
        (its renewal finds out: an update of a missing key is a conflict)."""
        events: list[LeaseEvent] = []
        if self.revision is not None and (revision is not None and revision < self.revision
                                          or revision is None and self.role is Role.LEADER):
            return events  # a stale read (revisions only grow; our entry exists): it tells nothing new
        if revision != self.revision or self.seen_at_s is None:
            taken = revision is not None and holder != self.holder
            self.revision, self.entry_holder, self.seen_at_s = revision, holder, now_s
            if self._go(Input.OBSERVE_TAKEN if taken else Input.OBSERVE):
                events.append(LostLease("taken"))
        return events

    def write_sent(self) -> None:
        self._in_flight = True

    def write_ok(self, revision: int, sent_at_s: float) -> list[LeaseEvent]:
        """Our conditional write (sent at ``sent_at_s``) succeeded with ``revision``."""
        self._in_flight = False
        changed = self._go(Input.WRITE_OK)
        self.revision, self.entry_holder, self.sent_at_s = revision, self.holder, sent_at_s
        self.seen_at_s = sent_at_s
        return [BecameLeader(revision)] if changed else []

    def write_failed(self, conflict: bool, now_s: float) -> list[LeaseEvent]:
        """Our write failed: ``conflict`` when the revision moved (someone else wrote), else unreachable."""
        self._in_flight = False
        if self._go(Input.WRITE_CONFLICT if conflict else Input.WRITE_UNREACHABLE):
            return [LostLease("conflict")]
        return []

    def release(self) -> list[LeaseEvent]:
        return [LostLease("released")] if self._go(Input.RELEASE) else []

    def _go(self, event: Input) -> bool:
        """Apply ``TRANSITIONS``; True when the role changed."""
        was = self.role
        self.role = TRANSITIONS[(was, event)]
        return self.role is not was

    # -- outputs ---------------------------------------------------------------------------------
    def next_action(self, now_s: float) -> LeaseAction | None:
        """What to write now, if anything (at most one write in flight)."""
        if self._in_flight:
            return None
        if self.role is Role.LEADER:
            assert self.sent_at_s is not None and self.revision is not None
            if now_s - self.sent_at_s >= self.renew_every_s:
                return Renew(self.revision)
            return None
        if self.seen_at_s is None:
            return None  # nothing read yet
        if self.revision is None:
            return Acquire(None)  # a read said "no entry"
        if self.entry_holder is None:
            return Acquire(self.revision)  # released (deleted) by its holder: no need to wait
        if now_s - self.seen_at_s >= self.ttl_s:
            return Acquire(self.revision)
        return None

    def may_publish(self, now_s: float) -> bool:
        """True while we hold the lease and its fence time (``sent_at + ttl_s * safety``) has not passed."""
        return (self.role is Role.LEADER and self.sent_at_s is not None
                and now_s < self.sent_at_s + self.ttl_s * self.safety)

    def age_s(self, now_s: float) -> float | None:
        """Time since the lease revision we know was written (leader) or first seen (standby)."""
        ref = self.sent_at_s if self.role is Role.LEADER else self.seen_at_s
        return None if ref is None else max(0.0, now_s - ref)


def _lease_value(holder: str, region: str, ttl_s: float) -> bytes:
    return orjson.dumps({"holder": holder, "region": region, "ttl_s": ttl_s, "written_ns": time.time_ns()})


class _LeaseView:
    """What the publish path reads of a lease holder's ``machine`` (``role``, ``revision``, ``may_publish()``
    by ``now_s``), shared by ``KvLease`` and ``LeaseThread``: plain attribute reads, safe from any thread."""

    machine: LeaseMachine
    now_s: Callable[[], float]

    @property
    def role(self) -> Role:
        return self.machine.role

    @property
    def revision(self) -> int | None:
        return self.machine.revision

    def may_publish(self) -> bool:
        return self.machine.may_publish(self.now_s())


class KvLease(_LeaseView):
    """``LeaseMachine`` driven against a JetStream KV bucket (nats-py ``KeyValue``).

    ``run()`` polls the entry every ``poll_s`` and writes when the machine says so; ``on_event`` is called
    with every ``BecameLeader``/``LostLease``. ``may_publish()`` and ``revision`` are read on the publish path.
    A NATS error on read counts as "unknown" (the standby's expiry clock keeps running from what it saw;
    the leader's fence keeps running from its last successful write), never as "no entry".
    """

    def __init__(self, kv: Any, key: str, holder: str, region: str, ttl_s: float, *,
                 poll_s: float | None = None, on_event: Callable[[LeaseEvent], None] = lambda e: None,
                 monotonic_s: Callable[[], float] = time.monotonic) -> None:
        self.kv = kv
        self.key = key
        self.region = region
        self.machine = LeaseMachine(holder, ttl_s)
        self.poll_s = poll_s if poll_s is not None else min(0.1, ttl_s / 10)
        self.on_event = on_event
        self.now_s = monotonic_s
        self.not_before_s = 0.0  # no write before this time (a designated standby waits)

    def _emit(self, events: list[LeaseEvent]) -> None:
        for e in events:
            self.on_event(e)

    async def read(self) -> None:
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self.kv.get(self.key)
        except KeyNotFoundError as exc:  # no entry, or released (deleted): then against the marker's revision
            marker = getattr(exc, "entry", None)
            self._emit(self.machine.observe(getattr(marker, "revision", None), None, self.now_s()))
            return
        holder = None
        try:
            holder = orjson.loads(entry.value or b"{}").get("holder")
        except orjson.JSONDecodeError:
            pass
        if entry.operation is not None and str(entry.operation).upper().endswith(("DEL", "PURGE")):
            holder = None  # a deleted entry still has a revision: take it over against that revision
        self._emit(self.machine.observe(entry.revision, holder, self.now_s()))

    async def step(self) -> None:
        """One poll: read the entry (unless we lead and no write is due), then write if the machine says so."""
        if self.machine.role is Role.STANDBY or self.machine.next_action(self.now_s()) is None:
            try:
                await self.read()
            except Exception as exc:  # noqa: BLE001 - NATS down or slow: the clocks keep running
                log.debug("lease read failed: %s", exc)
        action = self.machine.next_action(self.now_s())
        if action is None or self.now_s() < self.not_before_s:
            return
        from nats.js.errors import APIError, KeyWrongLastSequenceError

        value = _lease_value(self.machine.holder, self.region, self.machine.ttl_s)
        sent_at = self.now_s()
        self.machine.write_sent()
        try:
            if action.expected_revision is None:
                revision = await self.kv.create(self.key, value)
            else:
                revision = await self.kv.update(self.key, value, last=action.expected_revision)
        except (KeyWrongLastSequenceError, APIError) as exc:
            conflict = isinstance(exc, KeyWrongLastSequenceError) or getattr(exc, "err_code", None) in (10071, 10058)
            self._emit(self.machine.write_failed(conflict, self.now_s()))
            log.debug("lease write failed (conflict=%s): %s", conflict, exc)
            return
        except Exception as exc:  # noqa: BLE001 - unreachable: retry next poll
            self._emit(self.machine.write_failed(False, self.now_s()))
            log.debug("lease write failed: %s", exc)
            return
        self._emit(self.machine.write_ok(revision, sent_at))

    async def run(self) -> None:
        while True:
            await self.step()
            await asyncio.sleep(self.poll_s)

    async def hand_over(self, hold_s: float) -> bool:
        """Give the lease up now and take it again no sooner than ``hold_s`` from now (so a standby elsewhere
        wins the race for the released entry): our NATS server is going away (lame-duck mode). True when we
        led."""
        if self.machine.role is not Role.LEADER:
            return False
        self.not_before_s = max(self.not_before_s, self.now_s() + hold_s)
        await self.release()
        return True

    async def release(self) -> None:
        """Give the lease up (clean shutdown): delete the entry so a standby takes over without waiting."""
        was_leader = self.machine.role is Role.LEADER
        rev = self.machine.revision
        self._emit(self.machine.release())
        if was_leader and rev is not None:
            try:
                await self.kv.delete(self.key, last=rev)
            except Exception as exc:  # noqa: BLE001 - best effort: the TTL covers it
                log.debug("lease release failed: %s", exc)


class LeaseThread(_LeaseView):
    """A ``KvLease`` on its own thread, event loop and NATS connection, so renewals are not starved by a busy
    ingest loop (a CPU burst longer than the TTL, e.g. building every book at the start of a replay on a
    loaded host, would otherwise hand the lease to the standby and back).

    ``connect()`` (a coroutine function) returns a connected nats-py client; ``bind(nc)`` returns the KV
    bucket. Both run on the lease thread. ``on_event`` is called **on the lease thread**: hand events to
    another loop with ``loop.call_soon_threadsafe``. ``may_publish()``, ``role``, ``revision`` and
    ``machine`` are read from any thread (plain attribute reads of the machine).

    Raises (from ``start``): whatever ``connect``/``bind`` raise, TimeoutError when they take longer than
    ``timeout_s``.
    """

    def __init__(self, connect: Callable[[], Any], bind: Callable[[Any], Any], key: str, holder: str,
                 region: str, ttl_s: float, *, on_event: Callable[[LeaseEvent], None] = lambda e: None,
                 not_before_s: float = 0.0, poll_s: float | None = None) -> None:
        import threading

        self._connect, self._bind = connect, bind
        self._args = (key, holder, region, ttl_s)
        self._on_event, self._not_before_s, self._poll_s = on_event, not_before_s, poll_s
        self.machine = LeaseMachine(holder, ttl_s)
        self.now_s = time.monotonic
        self.lease: KvLease | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nc: Any = None
        self._task: asyncio.Task | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"lease-{holder}", daemon=True)

    def start(self, timeout_s: float = 15.0) -> LeaseThread:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"lease: NATS connection and bucket not ready within {timeout_s:g} s")
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._setup())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            self._ready.set()
            if self._nc is not None and not self._nc.is_closed:  # connected, the bucket not bound: close it here
                try:
                    loop.run_until_complete(asyncio.wait_for(self._nc.close(), 2.0))
                except Exception as close_exc:  # noqa: BLE001 - closing on the way out
                    log.debug("lease connection close: %s", close_exc)
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        finally:
            loop.close()

    async def _setup(self) -> None:
        self._nc = await self._connect()
        kv = await self._bind(self._nc)
        key, holder, region, ttl_s = self._args
        self.lease = KvLease(kv, key, holder, region, ttl_s, on_event=self._on_event, poll_s=self._poll_s)
        self.lease.machine = self.machine
        self.lease.not_before_s = self._not_before_s
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await self.lease.run()
        except asyncio.CancelledError:
            await self.lease.release()  # clean stop: the standby takes over without waiting for the TTL
            try:
                await asyncio.wait_for(self._nc.close(), 2.0)
            except Exception as exc:  # noqa: BLE001 - closing a dead connection
                log.debug("lease connection close: %s", exc)
            raise

    @property
    def nc(self) -> Any:
        """The lease thread's NATS connection (None before ``start``); use it on the lease thread only."""
        return self._nc

    def stop(self, timeout_s: float = 5.0) -> None:
        """Release the lease (when held), close the connection, end the thread. Safe to call twice."""
        if self._loop is not None and self._task is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._task.cancel)
            except RuntimeError:
                pass  # the loop closed meanwhile
        if self._thread.is_alive():
            self._thread.join(timeout_s)
