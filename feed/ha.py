"""Ingest high availability across regions: one ingest per region, exactly one publishes.

Adapter around ``feed.lease`` (who publishes) and ``feed.takeover`` (continue the epoch or not). Hooks in
``feed.ingest``: the ingest asks ``publishing()`` before it publishes trades, announcements and snapshot
replies, and hands every delta to ``on_delta()``, which returns the messages to publish (none on a
standby). Every publish carries ``Bookcast-Ingest`` (the ingest's name) and ``Bookcast-Lease-Revision``.

* **Lease**: key ``ingest`` in the KV bucket ``md_lease``, placed in the cluster ``lease_region``: the
  supercluster's lease cluster (``feed.natsserver.Supercluster``, a witness apart from the data regions, so
  losing any one data region leaves the lease and a JetStream meta quorum; default without one: the last
  region, which then takes the lease down with it). The lease runs on its own thread and NATS connection
  (``feed.lease.LeaseThread``) so a busy ingest loop does not miss renewals; the ingest loop takes the role
  in when the event reaches it (``role``), and publishes only while the lease's fence allows it.
* **Standby in step**: the standby runs its engine on the same upstreams and reads the leader's deltas from
  NATS (``md.v1.<venue>.<symbol>``), feeding both into a ``StepTracker``.
* **Takeover** (on ``BecameLeader``), per instrument: ``Continue`` rebases the engine onto the leader's
  epoch and seq (after republishing the standby's deltas past the leader's last seq), ``WaitFor`` keeps the
  instrument silent until the standby's engine reaches the leader's last seq (at most ``takeover_wait_s``),
  ``NewEpoch`` starts a fresh epoch at seq 0 on the standby's book, so gateways resync with one snapshot.
* **KV books**: the leader writes every changed instrument's snapshot (``snap.<b64url instrument>``) and each
  venue's directory (``dir.<b64url venue>``) every ``snapshot_interval_s`` into ``md_books_<region>``
  of every region (each placed in its region's cluster), so a region holds them locally when the other is
  gone (``read_kv_snapshot``).

Metrics (``feed.catalog``, regions block): ``bookcast_ingest_leader``, ``bookcast_ingest_lease_age_seconds``,
``bookcast_ingest_takeovers_total``.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from feed import metrics as prom
from feed.errors import FeedError, describe_exception
from feed import wire
from feed.lease import (LEASE_BUCKET, LEASE_HOLDER_HEADER, LEASE_KEY,  # the names live in feed.lease
                        LEASE_REVISION_HEADER, BecameLeader, LeaseEvent, LeaseThread, LostLease, Role)
from feed.subjects import PREFIX, delta_subject, unescape_token
from feed.takeover import Continue, NewEpoch, StepTracker, WaitFor, delta_key

if TYPE_CHECKING:
    from feed.sequencer import BookEngine, SequencedDelta


class HaHost(Protocol):
    """What the HA controller needs of the ingest it runs in (``feed.ingest.Ingest`` is one): typed here so
    that ``feed.ha`` does not import the ingest that imports it."""

    config: Any  # has .name (the ingest's name in lease headers)
    registry: Any  # prometheus_client.CollectorRegistry | None
    nc: Any  # nats.NATS | None, connected before the controller starts
    engine: BookEngine

    def snapshot(self, instrument: str) -> dict[str, Any] | None: ...

    def directory(self, venue: str) -> dict[str, Any]: ...

    def announce_all(self) -> None: ...

log = logging.getLogger("bookcast.ha")



def books_bucket(region: str) -> str:
    return f"md_books_{region}"


def kv_key(prefix: str, name: str) -> str:
    """A KV key for an instrument or venue id (ids may hold characters KV keys forbid): base64url, no padding."""
    return f"{prefix}.{base64.urlsafe_b64encode(name.encode()).decode().rstrip('=')}"


@dataclass
class HaConfig:
    """``region``: this ingest's region; ``regions``: every region (KV books go to each);
    ``lease_region``: the cluster the lease bucket lives in (default the last of ``regions``)."""

    region: str
    regions: list[str] = field(default_factory=list)
    lease_region: str | None = None
    lease_ttl_s: float = 1.5
    snapshot_interval_s: float = 1.0
    takeover_wait_s: float = 1.0
    force_lossy: bool = False  # test hook: take over with a new epoch even when in step
    acquire_delay_s: float = 0.0  # do not try to take the lease for this long after start (a designated standby)
    replay_start_at_ns: int | None = None  # replays start at this wall-clock time (ingests in step on one upstream)
    lease_replicas: int = 1  # replicas of the lease bucket: min(3, servers of the lease cluster); R3 in production
    books_replicas: int = 1  # replicas of each region's KV books: min(3, servers per region)
    jetstream_wait_s: float = 45.0  # how long the start waits for JetStream to bind the lease bucket

    def __post_init__(self) -> None:
        if not self.regions:
            self.regions = [self.region]
        if self.region not in self.regions:
            raise ValueError(f"region {self.region!r} not in regions {self.regions}")
        self.lease_region = self.lease_region or self.regions[-1]
        for name in ("lease_replicas", "books_replicas"):
            if not 1 <= getattr(self, name) <= 5:
                raise ValueError(f"{name} must be 1..5 (JetStream's limit), got {getattr(self, name)}")
        if self.jetstream_wait_s < 0:
            raise ValueError(f"jetstream_wait_s must be >= 0, got {self.jetstream_wait_s}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("high availability (regions)")
    g.add_argument("--region", help="this ingest's region: join the publishing lease (one ingest per region "
                                    "publishes at a time); default off (always publish)")
    g.add_argument("--regions", help="comma-separated regions of the supercluster (default: --region only)")
    g.add_argument("--lease-region", help="region whose cluster holds the lease bucket (default: the last)")
    g.add_argument("--lease-ttl-s", type=float, default=HaConfig.lease_ttl_s,
                   help="lease TTL in s: a standby takes over this long after the leader's last renewal "
                        "(default %(default)s)")
    g.add_argument("--lease-acquire-delay-s", type=float, default=0.0,
                   help="do not try to take the lease for this long after start: a designated standby (default 0)")
    g.add_argument("--replay-start-at-ns", type=int,
                   help="start replaying at this Unix time in ns, so every region's ingest reads the same "
                        "upstream position at the same time (default: at once)")
    g.add_argument("--lease-replicas", type=int, default=1,
                   help="replicas of the lease bucket when this ingest creates it: min(3, servers of the lease "
                        "cluster); 3 in the documented production shape (default %(default)s)")
    g.add_argument("--books-replicas", type=int, default=1,
                   help="replicas of each region's KV books bucket: min(3, servers per region) (default %(default)s)")
    g.add_argument("--jetstream-wait-s", type=float, default=HaConfig.jetstream_wait_s,
                   help="at start, keep trying this long to bind the lease bucket while JetStream cannot answer "
                        "(a supercluster just started has no meta leader for a while); then exit 1 "
                        "(default %(default)s)")
    g.add_argument("--test-force-lossy-takeover", action="store_true",
                   help="test hook: on takeover start a new epoch even when in step with the leader")


def config_from_args(args: argparse.Namespace) -> HaConfig | None:
    if not getattr(args, "region", None):
        return None
    regions = [r for r in (args.regions or args.region).split(",") if r]
    return HaConfig(args.region, regions, args.lease_region, args.lease_ttl_s,
                    force_lossy=args.test_force_lossy_takeover, acquire_delay_s=args.lease_acquire_delay_s,
                    replay_start_at_ns=args.replay_start_at_ns, lease_replicas=args.lease_replicas,
                    books_replicas=args.books_replicas, jetstream_wait_s=args.jetstream_wait_s)


BIND_RETRY_S = 0.5  # between tries while JetStream cannot answer yet


class BucketPlacementError(FeedError, RuntimeError):
    """A KV bucket exists, but in another cluster than the one it must live in (never retried): a stale
    store, an operator's matter rather than a peer's malformed input or our bug."""


async def bind_bucket(js: Any, bucket: str, region: str, *, history: int = 1, replicas: int = 1,
                      wait_s: float = 0.0, retry_s: float = BIND_RETRY_S) -> Any:
    """The KV bucket ``bucket``, its stream created in ``region``'s cluster if missing (a race with another
    creator is fine).

    nats-py's ``create_key_value`` drops ``KeyValueConfig.placement`` (nats-py 2.x builds the stream config
    without it), so a bucket would land in the cluster of whoever created it first: the lease and every
    region's books then die with that region. So the KV stream is created here with ``add_stream`` and the
    stream settings a KV bucket has (ADR-8: ``KV_<bucket>``, subjects ``$KV.<bucket>.>``, rollup headers,
    deny delete, discard new, history as max msgs per subject, direct get), plus the placement.

    ``wait_s`` > 0 keeps trying, every ``retry_s``, while JetStream cannot answer yet: a supercluster just
    started or restarted can have no meta leader, or too few current peers for the stream's replicas, for
    some seconds (the JetStream API then times out, or answers 503 or "insufficient resources"). The first
    failure is logged, and so is the bind that follows it.

    Raises:
        BucketPlacementError (a RuntimeError): the bucket exists but in another cluster than ``region`` (a
        stale store from an older layout: remove it, or delete the bucket). Never retried.
        The last JetStream error (``nats.js.errors.APIError``, ``nats.errors.TimeoutError``, ...) when the
        bucket is not bound within ``wait_s``.
    """
    loop = asyncio.get_running_loop()
    deadline_s = loop.time() + wait_s
    tries = 0
    while True:
        tries += 1
        try:
            kv = await _bind_bucket_once(js, bucket, region, history=history, replicas=replicas)
        except BucketPlacementError:
            raise
        except Exception as exc:  # noqa: BLE001 - JetStream not answering yet: tried again until the deadline
            if loop.time() + retry_s >= deadline_s:
                raise
            if tries == 1:
                log.warning("KV bucket %s in %s not bound yet (%s); trying every %g s for up to %g s",
                            bucket, region, describe_exception(exc), retry_s, wait_s)
            await asyncio.sleep(retry_s)
            continue
        if tries > 1:
            log.info("KV bucket %s in %s bound after %d tries", bucket, region, tries)
        return kv


async def _bind_bucket_once(js: Any, bucket: str, region: str, *, history: int, replicas: int) -> Any:
    from nats.js.api import DiscardPolicy, Placement, StreamConfig
    from nats.js.errors import BucketNotFoundError

    stream = f"KV_{bucket}"
    try:
        kv = await js.key_value(bucket)
    except BucketNotFoundError:
        try:
            await js.add_stream(StreamConfig(
                name=stream, subjects=[f"$KV.{bucket}.>"], allow_direct=True, allow_rollup_hdrs=True,
                deny_delete=True, discard=DiscardPolicy.NEW, duplicate_window=120.0, max_consumers=-1,
                max_msgs=-1, max_msgs_per_subject=history, num_replicas=replicas,
                placement=Placement(cluster=region)))
        except Exception as exc:  # noqa: BLE001 - created meanwhile by the other region's ingest
            log.debug("KV bucket %s create: %s (bound as it is)", bucket, exc)
        kv = await js.key_value(bucket)
    info = await js.stream_info(stream)
    placed = getattr(info.cluster, "name", None) if info.cluster is not None else None
    if placed is not None and placed != region:
        raise BucketPlacementError(f"KV bucket {bucket} lives in cluster {placed!r}, not {region!r}")
    return kv


async def read_kv_snapshot(nc: Any, region: str, instrument: str) -> dict[str, Any] | None:
    """The latest snapshot of ``instrument`` kept in ``region``'s KV books, or None."""
    from nats.js.errors import KeyNotFoundError

    kv = await nc.jetstream().key_value(books_bucket(region))
    try:
        return wire.loads((await kv.get(kv_key("snap", instrument))).value)
    except KeyNotFoundError:
        return None


class HaController:
    """The ingest's HA state: lease, step tracker, takeover, KV books. One per ingest."""

    def __init__(self, ingest: HaHost, config: HaConfig) -> None:
        self.ingest = ingest
        self.config = config
        self.name = ingest.config.name
        self.tracker = StepTracker()
        self.lease: LeaseThread | None = None
        self._acquire_after_s = 0.0  # monotonic s from which this ingest may take the lease (set at start)
        self._leading = False  # the ingest loop's view: set when BecameLeader reaches it
        self.books_kv: dict[str, Any] = {}
        self._kv_down_until: dict[str, float] = {}  # region -> monotonic time its KV books are tried again
        self._recent: dict[str, list[tuple[SequencedDelta, dict]]] = {}  # local deltas, for republishing
        self._waiting: dict[str, tuple[int, float]] = {}  # instrument -> (local seq to reach, deadline)
        self._continued: dict[str, tuple[str, int]] = {}  # instrument -> (old epoch, offset) for in-flight deltas
        self._publishing: set[str] = set()  # instruments this leader publishes
        self._takeovers = 0
        self._dirty: set[str] = set()
        self._unwritten: dict[str, set[str]] = {}  # region -> instruments changed since its last successful put
        self._tasks: list[asyncio.Task] = []
        self.last_takeover: dict[str, Any] = {}
        reg = ingest.registry
        self._m_leader = prom.build("bookcast_ingest_leader", reg).labels(config.region)
        self._m_age = prom.build("bookcast_ingest_lease_age_seconds", reg).labels(config.region)
        self._m_takeovers = prom.build("bookcast_ingest_takeovers_total", reg)
        self._m_leader.set(0)

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        from feed import natsauth

        nc = self.ingest.nc
        js = nc.jetstream()
        loop = asyncio.get_running_loop()
        cfg = self.ingest.config

        async def connect():
            return await natsauth.connect(cfg.nats_url, cfg.nats_credentials, name=f"{self.name}-lease",
                                          max_reconnect_attempts=-1, reconnect_time_wait=0.25,
                                          lame_duck_mode_cb=self._on_lame_duck)  # on the lease thread

        async def bind(lease_nc):
            return await bind_bucket(lease_nc.jetstream(), LEASE_BUCKET, self.config.lease_region,
                                     replicas=self.config.lease_replicas, wait_s=self.config.jetstream_wait_s)

        self._acquire_after_s = time.monotonic() + self.config.acquire_delay_s
        self.lease = LeaseThread(connect, bind, LEASE_KEY, self.name, self.config.region, self.config.lease_ttl_s,
                                 on_event=lambda e: loop.call_soon_threadsafe(self._on_lease_event, e),
                                 not_before_s=self._acquire_after_s)
        # every region's books at once: a region that is down (or a JetStream without a meta leader yet)
        # costs one request timeout, not one per region
        bound = await asyncio.gather(*(bind_bucket(js, books_bucket(region), region,
                                                   replicas=self.config.books_replicas)
                                       for region in self.config.regions), return_exceptions=True)
        for region, kv in zip(self.config.regions, bound):
            if isinstance(kv, BaseException):  # that region is down: no KV books there for now
                if not isinstance(kv, Exception):
                    raise kv
                log.warning("KV books of region %s unavailable: %s", region, kv)
            else:
                self.books_kv[region] = kv
        await nc.subscribe(f"{PREFIX}.*.*", cb=self._on_leader_msg)
        # the connection, then the bucket (up to jetstream_wait_s while JetStream cannot answer yet)
        await asyncio.to_thread(self.lease.start, self.config.jetstream_wait_s + 15.0)
        self._tasks += [loop.create_task(self._ticker()), loop.create_task(self._kv_writer())]
        log.info("HA on: region=%s lease bucket %s in %s, ttl %.2f s (lease on its own thread and connection)",
                 self.config.region, LEASE_BUCKET, self.config.lease_region, self.config.lease_ttl_s)

    async def _on_lame_duck(self) -> None:
        """The lease connection's NATS server entered lame-duck mode (INFO ``ldm``: it accepts no client, and
        after its grace period closes every one and exits). With no other server of this region to reconnect
        to, a leader hands the lease over at once (released, not taken again for one TTL) so another region's
        standby, in step, takes over losslessly instead of after the drain and a whole TTL. With another
        server known, the connections move there and the lease stays. Runs on the lease thread."""
        thread = self.lease
        kv_lease = thread.lease if thread is not None else None
        nc = thread.nc if thread is not None else None
        if kv_lease is None or nc is None or len(self.config.regions) < 2:
            return
        current = nc.connected_url.netloc if nc.connected_url is not None else None
        others = sorted({u.netloc for u in nc.servers} - {current})
        if others:
            log.info("NATS server %s is in lame-duck mode: the lease stays (reconnecting to one of %s)",
                     current, ", ".join(others))
            return
        if await kv_lease.hand_over(self.config.lease_ttl_s):
            log.warning("NATS server %s is in lame-duck mode and this region has no other: publishing lease "
                        "handed over (not taken again for %.2f s)", current, self.config.lease_ttl_s)

    async def wait_start(self) -> None:
        """Wait for ``replay_start_at_ns`` (wall clock), if set."""
        if self.config.replay_start_at_ns is not None:
            delay_s = (self.config.replay_start_at_ns - time.time_ns()) / 1e9
            if delay_s > 0:
                log.info("replay starts in %.2f s", delay_s)
                await asyncio.sleep(delay_s)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.lease is not None:
            await asyncio.to_thread(self.lease.stop)

    # -- what the ingest asks ---------------------------------------------------------------------
    @property
    def role(self) -> Role:
        """This ingest's role as the ingest loop has taken it in (the lease thread's role changes first; the
        takeover runs when its event reaches this loop)."""
        return Role.LEADER if self._leading else Role.STANDBY

    def publishing(self) -> bool:
        """True while this ingest holds the lease within its fence time and NATS is connected."""
        nc = self.ingest.nc
        return (self._leading and self.lease is not None and self.lease.may_publish() and nc is not None
                and nc.is_connected)

    def serves(self, instrument: str) -> bool:
        """True when this ingest publishes ``instrument`` now: snapshot replies, directory and KV books
        may name it (a standby's book is in its own numbering; so is one still waiting in a takeover)."""
        return instrument in self._publishing and self.publishing()

    def headers(self, headers: dict[str, str] | None = None) -> dict[str, str]:
        out = dict(headers or {})
        out[LEASE_HOLDER_HEADER] = self.name
        out[LEASE_REVISION_HEADER] = str(self.lease.revision if self.lease else 0)
        return out

    def on_delta(self, out: SequencedDelta, msg: dict[str, Any]) -> list[dict[str, Any]]:
        """A delta from our engine: the messages to publish now (none on a standby)."""
        inst = out.instrument
        recent = self._recent.setdefault(inst, [])
        recent.append((out, msg))
        if len(recent) > 4096:
            del recent[:1024]
        if self.role is not Role.LEADER:
            self.tracker.local(inst, out.seq, delta_key(msg["changes"], out.checksum), out.checksum)
            return []
        if inst in self._waiting:
            self.tracker.local(inst, out.seq, delta_key(msg["changes"], out.checksum), out.checksum)
            target, _ = self._waiting[inst]
            if out.seq >= target:
                del self._waiting[inst]
                self._take_over(inst, republish=False)
            return []
        if inst not in self._publishing:  # first delta since we lead (a new instrument, or a late one)
            self._take_over(inst, republish=True)
            return []
        moved = self._continued.get(inst)
        if moved is not None and msg["epoch"] == moved[0]:  # produced before the rebase
            if moved[1] is None:
                return []  # lossy takeover: the new epoch's snapshot holds it
            msg = dict(msg, epoch=self.ingest.engine.seq_of(inst)[0], seq=msg["seq"] + moved[1],
                       prev_seq=msg["prev_seq"] + moved[1])
        self._dirty.add(inst)
        return [msg] if self.publishing() else []

    # -- leader's stream --------------------------------------------------------------------------
    async def _on_leader_msg(self, msg) -> None:
        hdrs = msg.headers or {}
        if hdrs.get(LEASE_HOLDER_HEADER) == self.name or self.role is Role.LEADER:
            return
        parts = msg.subject.split(".")
        if len(parts) != 4 or parts[2] in ("snap", "meta", "ctl", "trade"):
            return
        try:
            d = wire.loads(msg.data)
        except Exception:  # noqa: BLE001 - not ours to judge
            return
        if not isinstance(d, dict) or d.get("type") != "delta":
            return
        inst = d.get("instrument") or f"{unescape_token(parts[2])}:{unescape_token(parts[3])}"
        self.tracker.leader(inst, d["epoch"], d["seq"], delta_key(d["changes"], d["checksum"]), d["checksum"])

    # -- takeover ---------------------------------------------------------------------------------
    def _on_lease_event(self, event: LeaseEvent) -> None:
        if isinstance(event, BecameLeader):
            if self._leading:
                return
            self._leading = True
            self._m_leader.set(1)
            self._takeovers += 1
            self.last_takeover = {"at_ns": time.time_ns(), "revision": event.revision, "instruments": {}}
            log.warning("took the publishing lease (revision %d): taking over %d instruments", event.revision,
                        len(self.ingest.engine.instruments))
            self._publishing.clear()
            for inst in list(self.ingest.engine.instruments):
                self._take_over(inst, republish=True)
            self.ingest.announce_all()
        elif isinstance(event, LostLease):
            if not self._leading:
                return
            self._leading = False
            self._m_leader.set(0)
            log.warning("lost the publishing lease (%s): standby", event.reason)
            self._publishing.clear()
            self._waiting.clear()
            self._continued.clear()
            self.tracker = StepTracker()

    def _take_over(self, inst: str, *, republish: bool) -> None:
        engine = self.ingest.engine
        epoch, local_seq = engine.seq_of(inst)
        plan = NewEpoch("forced by --test-force-lossy-takeover") if self.config.force_lossy else \
            self.tracker.plan(inst, local_seq)
        if isinstance(plan, WaitFor):
            self._waiting[inst] = (plan.local_seq, time.monotonic() + self.config.takeover_wait_s)
            log.info("takeover %s: waiting for local seq %d (at %d)", inst, plan.local_seq, local_seq)
            return
        if isinstance(plan, Continue):
            to_republish = [(d, m) for d, m in self._recent.get(inst, []) if m["epoch"] == epoch
                            and d.seq > plan.from_local_seq]
            engine.rebase(inst, plan.epoch, local_seq + plan.offset)
            self._continued[inst] = (epoch, plan.offset)
            kind = "lossless"
            if republish and to_republish and self.publishing():
                for _, m in to_republish:
                    m2 = dict(m, epoch=plan.epoch, seq=m["seq"] + plan.offset, prev_seq=m["prev_seq"] + plan.offset,
                              ts_publish_ns=time.time_ns())  # published now, by us
                    asyncio.get_running_loop().create_task(self._publish_raw(inst, m2))
            detail = f"continues epoch {plan.epoch} at seq {local_seq + plan.offset}"
        else:
            self._takeovers_epoch = getattr(self, "_takeovers_epoch", 0) + 1
            new_epoch = f"{engine.sequencer.epoch_base}.t{self._takeovers_epoch}"
            engine.rebase(inst, new_epoch, 0)
            self._continued[inst] = (epoch, None)
            kind = "lossy"
            detail = f"new epoch {new_epoch} ({plan.reason})"
        self._publishing.add(inst)
        self._dirty.add(inst)
        self._m_takeovers.labels(self.config.region, kind).inc()
        self.last_takeover.setdefault("instruments", {})[inst] = kind
        log.info("takeover %s: %s", inst, detail)

    async def _publish_raw(self, inst: str, msg: dict[str, Any]) -> None:
        await self.ingest.nc.publish(delta_subject(inst), wire.dumps(msg), headers=self.headers())

    # -- periodic: waits, metrics, KV books -------------------------------------------------------
    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            for inst, (_, deadline) in list(self._waiting.items()):
                if now >= deadline and self.role is Role.LEADER:
                    del self._waiting[inst]
                    self.tracker.forget(inst)  # plan() now says NewEpoch
                    self._take_over(inst, republish=False)
            if self.lease is not None:
                age = self.lease.machine.age_s(now)
                self._m_age.set(age if age is not None else 0.0)

    async def _kv_writer(self) -> None:
        """Every ``snapshot_interval_s`` while publishing: the changed books and their venues' directories into
        every region's KV books (its own task: a dead region's puts time out without delaying the ticker)."""
        while True:
            await asyncio.sleep(self.config.snapshot_interval_s)
            if self.publishing():
                try:
                    await self._write_kv_books()
                except Exception as exc:  # noqa: BLE001 - a region's KV down: next round retries
                    log.debug("KV books write failed: %s", exc)

    async def _write_kv_books(self) -> None:
        """Puts into each region's bucket; a region whose put fails is skipped for 5 s (and its bucket bound
        again when it was down at start). What a region missed stays owed to it until a put there succeeds (a
        quiet instrument's book is otherwise never written again: a region back from a partition kept the
        previous leader's epoch)."""
        dirty, self._dirty = self._dirty, set()
        for region in self.config.regions:
            self._unwritten.setdefault(region, set()).update(dirty)
        now = time.monotonic()
        regions = [r for r in self.config.regions if self._kv_down_until.get(r, 0.0) <= now]
        for region in regions:
            if region not in self.books_kv:
                try:
                    self.books_kv[region] = await asyncio.wait_for(
                        bind_bucket(self.ingest.nc.jetstream(), books_bucket(region), region,
                                    replicas=self.config.books_replicas), 2.0)
                except Exception as exc:  # noqa: BLE001 - still down
                    self._kv_down_until[region] = now + 5.0
                    log.debug("KV books of region %s still unavailable: %s", region, exc)
        snaps: dict[str, bytes | None] = {}
        for region in regions:
            kv = self.books_kv.get(region)
            if kv is None:
                continue
            owed = set(self._unwritten.get(region, ()))
            entries: list[tuple[str, bytes]] = []
            venues = set()
            for inst in sorted(owed):
                if inst not in snaps:
                    snap = self.ingest.snapshot(inst)
                    snaps[inst] = wire.dumps(snap) if snap is not None else None
                if snaps[inst] is not None:
                    venues.add(inst.split(":", 1)[0])
                    entries.append((kv_key("snap", inst), snaps[inst]))
            entries += [(kv_key("dir", venue), wire.dumps(self.ingest.directory(venue))) for venue in sorted(venues)]
            try:
                for key, data in entries:
                    await asyncio.wait_for(kv.put(key, data), 1.0)
                self._unwritten[region] -= owed
            except Exception as exc:  # noqa: BLE001 - that region is unreachable now
                self._kv_down_until[region] = time.monotonic() + 5.0
                log.debug("KV books put to region %s failed: %s", region, exc)

    def status(self) -> dict[str, Any]:
        return {"region": self.config.region, "role": self.role.value, "lease_revision": self.lease.revision
                if self.lease else None, "publishing": self.publishing(), "takeovers": self._takeovers,
                "in_step": self.tracker.in_step(), "last_takeover": self.last_takeover,
                # s until a designated standby may take the lease at all (--lease-acquire-delay-s); 0 once armed
                "acquire_hold_s": round(max(0.0, self._acquire_after_s - time.monotonic()), 3)}
