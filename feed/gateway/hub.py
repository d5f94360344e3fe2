"""One instrument on one gateway: its NATS subscription, its book copy, its subscribers.

Adapter-side state machine (no sockets of its own; it uses the gateway's NATS connection):

* A hub subscribes to the instrument's delta subject once, however many clients want it.
* It keeps a copy of the book at the exact seq it has fanned out, so every snapshot it serves is
  consistent with the deltas that follow it, and a ring of recent deltas to serve ``resume``.
* Core NATS is at-most-once: the hub checks every delta's ``epoch``/``prev_seq`` against its own seq.
  On a gap (or an epoch change, or a tail loss revealed by the ingest's directory announcements) it
  tells its subscribers ``resync`` and fetches a snapshot from the ingest (NATS request/reply),
  buffering deltas meanwhile; subscribers get the snapshot once the hub is consistent again.
* Each fan-out observes the NATS + gateway hop (``ts_send_ns - ts_publish_ns``) in the hub's venue child
  of ``bookcast_hop_nats_gateway_seconds``, and ends a ``nats_gateway`` span for a traced delta.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from feed.otlp import TRACEPARENT
from feed import wire
from feed.book import L2Book
from feed.gateway.fanout import Item, Kind
from feed.gateway.protocol import ResyncReason
from feed.model import split_instrument
from feed.subjects import delta_subject, snapshot_subject, trade_subject

if TYPE_CHECKING:
    from feed.gateway.app import Connection, Gateway

log = logging.getLogger("bookcast.gateway")


class Hub:
    def __init__(self, gw: Gateway, instrument: str, ring_size: int) -> None:
        self.gw = gw
        self.instrument = instrument
        self.book = L2Book(instrument)
        self.epoch = ""
        self.seq = 0
        self.ts: dict[str, int] = {}  # ts_event_ns / ts_ingest_ns / ts_publish_ns of the book's last update
        self.ready = asyncio.Event()
        self.recovering = False
        self.buffer: list[tuple[dict[str, Any], bytes, str | None]] = []  # delta, payload, traceparent
        self.ring: deque[tuple[str, int, int, bytes]] = deque(maxlen=ring_size)  # epoch, seq, prev_seq, payload
        self.subscribers: dict[Connection, int] = {}  # connection -> conflate_ms
        self.trade_subscribers: set[Connection] = set()
        self.parked: set[Connection] = set()  # waiting for the hub to be ready to get their snapshot
        self.suspect: tuple[str, int] | None = None
        self._delta_sub = None
        self._trade_sub = None
        self._snapshot_cache: tuple[str, int, bytes] | None = None
        self._recovery: asyncio.Task | None = None
        self.gaps = 0
        self.venue = split_instrument(instrument)[0]
        self._hop = gw.metrics.hop_nats_gateway(self.venue)
        self._held: deque[tuple[float, bytes, str | None]] = deque()  # the slow-gateway hook's deltas

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self._delta_sub = await self.gw.nc.subscribe(delta_subject(self.instrument), cb=self._on_delta_msg)
        self.recover(None)

    async def ensure_trades(self) -> None:
        if self._trade_sub is None:
            self._trade_sub = await self.gw.nc.subscribe(trade_subject(self.instrument), cb=self._on_trade_msg)

    async def stop(self) -> None:
        for sub in (self._delta_sub, self._trade_sub):
            if sub is not None:
                try:
                    await sub.unsubscribe()
                except Exception:  # noqa: BLE001 - connection may already be closed
                    pass
        if self._recovery is not None:
            self._recovery.cancel()

    # -- data path ------------------------------------------------------------------------------
    async def _on_delta_msg(self, msg) -> None:
        traceparent = msg.headers.get(TRACEPARENT) if msg.headers else None
        if self.gw.config.fanout_delay_s:
            self._hold(msg.data, traceparent)
        else:
            self.on_delta(msg.data, traceparent)

    def _hold(self, payload: bytes, traceparent: str | None) -> None:
        """Test hook (a slow gateway): handle the delta ``fanout_delay_s`` later, keeping arrival order."""
        loop = asyncio.get_running_loop()
        self._held.append((loop.time() + self.gw.config.fanout_delay_s, payload, traceparent))
        if len(self._held) == 1:
            loop.call_at(self._held[0][0], self._release)

    def _release(self) -> None:
        loop = asyncio.get_running_loop()
        while self._held and self._held[0][0] <= loop.time():
            _, payload, traceparent = self._held.popleft()
            self.on_delta(payload, traceparent)
        if self._held:
            loop.call_at(self._held[0][0], self._release)

    def on_delta(self, payload: bytes, traceparent: str | None = None) -> None:
        try:
            delta = wire.loads(payload)
            if not (isinstance(delta, dict) and isinstance(delta.get("epoch"), str)
                    and isinstance(delta.get("seq"), int) and isinstance(delta.get("prev_seq"), int)
                    and isinstance(delta.get("changes"), list)):
                raise ValueError("not a delta")
        except ValueError:
            self.gw.metrics.bad_upstream.inc()
            log.warning("malformed delta from NATS instrument=%s bytes=%d", self.instrument, len(payload))
            return
        self.gw.metrics.nats_deltas.inc()
        self._handle(delta, payload, traceparent)

    def _handle(self, delta: dict[str, Any], payload: bytes, traceparent: str | None) -> None:
        epoch, seq, prev_seq = delta["epoch"], delta["seq"], delta["prev_seq"]
        if self.recovering:
            self.buffer.append((delta, payload, traceparent))
            return
        if epoch == self.epoch and seq <= self.seq:
            return  # duplicate (e.g. redelivered after a reconnect)
        if epoch != self.epoch or prev_seq != self.seq:
            reason = ResyncReason.EPOCH_CHANGE if epoch != self.epoch else ResyncReason.UPSTREAM_GAP
            log.warning(
                "%s instrument=%s held=%s/%d got=%s/%d->%d: fetching snapshot",
                "epoch change" if epoch != self.epoch else "seq gap",
                self.instrument, self.epoch, self.seq, epoch, prev_seq, seq,
            )
            self.gw.metrics.gaps.inc()
            self.gaps += 1
            self.buffer.append((delta, payload, traceparent))
            self.recover(reason)
            return
        self._apply(delta, payload, traceparent)

    def _apply(self, delta: dict[str, Any], payload: bytes, traceparent: str | None) -> None:
        self.book.apply_wire_changes(delta["changes"])
        self.epoch, self.seq = delta["epoch"], delta["seq"]
        self.ts = {k: delta[k] for k in ("ts_event_ns", "ts_ingest_ns", "ts_publish_ns") if k in delta}
        self.ring.append((self.epoch, self.seq, delta["prev_seq"], payload))
        self.fan_out(delta, payload, traceparent)

    def fan_out(self, delta: dict[str, Any], payload: bytes, traceparent: str | None = None) -> None:
        """Queue one delta for every subscriber: one splice of ts_send_ns, shared bytes, no awaits."""
        if not self.subscribers:
            return
        now_ns = time.time_ns()
        stamped = wire.with_send_ts(payload, now_ns)
        item = Item(Kind.DATA, self.instrument, stamped, delta["epoch"], delta["seq"], delta["prev_seq"])
        ts_publish_ns = delta.get("ts_publish_ns")
        if ts_publish_ns:
            self._hop.observe(max(now_ns - ts_publish_ns, 0) / 1e9)
            if traceparent is not None and self.gw.otlp is not None:
                self.gw.otlp.hop_span("nats_gateway", traceparent, ts_publish_ns, now_ns,
                                      {"instrument": self.instrument, "seq": delta["seq"], "gateway": self.gw.config.name})
        for conn, conflate_ms in self.subscribers.items():
            if conflate_ms:
                conn.conflate(self.instrument, delta, conflate_ms)
            else:
                conn.push(item)

    async def _on_trade_msg(self, msg) -> None:
        self.gw.metrics.nats_trades.inc()
        if not self.trade_subscribers:
            return
        item = Item(Kind.TRADE, self.instrument, wire.with_send_ts(msg.data, time.time_ns()))
        for conn in self.trade_subscribers:
            conn.push(item)

    # -- snapshots ------------------------------------------------------------------------------
    def snapshot_bytes(self) -> bytes:
        """The encoded snapshot at the hub's current seq (cached per seq; ts_send_ns not included)."""
        cache = self._snapshot_cache
        if cache is not None and cache[0] == self.epoch and cache[1] == self.seq:
            return cache[2]
        msg = wire.snapshot_message(
            self.instrument, self.epoch, self.seq, self.book,
            ts_event_ns=self.ts.get("ts_event_ns"),
            ts_ingest_ns=self.ts.get("ts_ingest_ns", 0),
            ts_publish_ns=self.ts.get("ts_publish_ns", 0),
        )
        encoded = wire.dumps(msg)
        self._snapshot_cache = (self.epoch, self.seq, encoded)
        return encoded

    def ring_since(self, epoch: str, seq: int) -> list[tuple[str, int, int, bytes]] | None:
        """Deltas after ``seq`` of ``epoch`` if the ring still holds all of them, else None."""
        if epoch != self.epoch or seq > self.seq:
            return None
        if seq == self.seq:
            return []
        if not self.ring or self.ring[0][2] > seq:
            return None
        return [entry for entry in self.ring if entry[1] > seq]

    # -- recovery -------------------------------------------------------------------------------
    def recover(self, reason: ResyncReason | None) -> None:
        """Tell subscribers to resync (if ``reason``), then fetch a snapshot and rebuild from it."""
        if reason is not None:
            for conn in list(self.subscribers):
                conn.resync(self.instrument, reason)
        if self.recovering:
            return
        self.recovering = True
        self.ready.clear()
        self._recovery = asyncio.get_running_loop().create_task(self._fetch_snapshot())

    async def _fetch_snapshot(self) -> None:
        delay_s = 0.05
        while True:
            try:
                reply = await self.gw.nc.request(snapshot_subject(self.instrument), b"", timeout=self.gw.snapshot_timeout_s)
                snap = wire.loads(reply.data)
                if snap.get("type") != "snapshot":
                    raise ValueError(f"not a snapshot: {str(snap)[:200]}")
                self._load_snapshot(snap)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: log and retry with backoff
                self.gw.metrics.snapshot_failures.inc()
                log.warning("snapshot fetch failed instrument=%s: %s (retry in %.2f s)", self.instrument, exc or type(exc).__name__, delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 2.0)

    def _load_snapshot(self, snap: dict[str, Any]) -> None:
        book = L2Book(self.instrument)
        book.apply_snapshot(
            ((Decimal(p), Decimal(s)) for p, s in snap["bids"]),
            ((Decimal(p), Decimal(s)) for p, s in snap["asks"]),
        )
        if book.checksum() != snap["checksum"]:
            raise ValueError(f"snapshot checksum mismatch instrument={self.instrument} seq={snap['seq']}")
        epoch_changed = bool(self.epoch) and snap["epoch"] != self.epoch
        self.book, self.epoch, self.seq = book, snap["epoch"], snap["seq"]
        self.ts = {k: snap[k] for k in ("ts_event_ns", "ts_ingest_ns", "ts_publish_ns") if k in snap}
        if epoch_changed:
            self.ring.clear()
        self.suspect = None
        buffered, self.buffer = self.buffer, []
        self.recovering = False
        for delta, payload, traceparent in buffered:
            if delta["epoch"] == self.epoch and delta["seq"] <= self.seq:
                continue
            self._handle(delta, payload, traceparent)  # may start another recovery on a new gap; it re-buffers
        if self.recovering:
            return
        self.ready.set()
        parked, self.parked = self.parked, set()
        for conn in parked:
            if self.instrument in conn.subs:
                conn.push(Item(Kind.SNAP, self.instrument))

    def on_directory(self, epoch: str, seq: int) -> None:
        """The ingest says the instrument is at ``(epoch, seq)``: detect a lost tail of deltas.

        A loss is declared when two consecutive announcements are ahead of the hub, the second by a seq
        the first already announced (so a delta still in flight is not mistaken for a loss), and no
        delta is waiting to be handled here (nats-py queues each subscription's messages apart from the
        directory's: an overloaded gateway lagging behind its own queue has lost nothing).
        """
        if self.recovering or not self.ready.is_set():
            return
        if epoch == self.epoch and seq <= self.seq:
            self.suspect = None
            return
        backlog = len(self._held) + (self._delta_sub.pending_msgs if self._delta_sub is not None else 0)
        if backlog:
            return
        if self.suspect is not None and (self.suspect[0] != self.epoch or self.suspect[1] > self.seq):
            log.warning("tail loss instrument=%s held=%s/%d directory=%s/%d: fetching snapshot",
                        self.instrument, self.epoch, self.seq, epoch, seq)
            self.gw.metrics.gaps.inc()
            self.gaps += 1
            self.recover(ResyncReason.UPSTREAM_GAP if epoch == self.epoch else ResyncReason.EPOCH_CHANGE)
            return
        self.suspect = (epoch, seq)
