"""VerifiedBooks fed hand-built message sequences (checksums computed with feed.book, PROTOCOL.md 4 and 6)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feed.book import L2Book
from feed.client.verify import (
    BookCrossed,
    BookUpdated,
    ErrorReceived,
    GapDetected,
    GapReason,
    Pong,
    ResyncReceived,
    SendResync,
    Shutdown,
    Subscribed,
    TradeEvent,
    Unsubscribed,
    UpdateKind,
    VerifiedBooks,
)
from feed.hops import Hop
from feed.model import AggressorSide, Side

I = "coinbase:BAND-GBP"


class Server:
    """The server side of one instrument: its book, epoch and seq, and the messages it would send."""

    def __init__(self, instrument: str = I, epoch: str = "e1") -> None:
        self.instrument, self.epoch, self.seq = instrument, epoch, 0
        self.book = L2Book(instrument)
        self.book.apply_snapshot([(Decimal("0.50"), Decimal(10))], [(Decimal("0.55"), Decimal(7))])

    def snapshot(self, **fields: Any) -> dict[str, Any]:
        msg = {
            "type": "snapshot", "instrument": self.instrument, "epoch": self.epoch, "seq": self.seq,
            "bids": self.book.wire_levels(Side.BID), "asks": self.book.wire_levels(Side.ASK),
            "checksum": self.book.checksum(),
        }
        return msg | fields

    def delta(self, *changes: tuple[str, str, str], advance: int = 1, **fields: Any) -> dict[str, Any]:
        """Apply ``changes``; ``advance`` > 1 makes a conflated delta standing for that many."""
        self.book.apply_wire_changes(changes)
        prev_seq, self.seq = self.seq, self.seq + advance
        msg = {
            "type": "delta", "instrument": self.instrument, "epoch": self.epoch, "seq": self.seq,
            "prev_seq": prev_seq, "changes": [list(c) for c in changes], "checksum": self.book.checksum(),
        }
        return msg | fields

    def heartbeat(self) -> dict[str, Any]:
        return {"type": "heartbeat", "ts_send_ns": 1, "seqs": {self.instrument: [self.epoch, self.seq]}}

    def restart(self, epoch: str) -> None:
        self.epoch, self.seq = epoch, 0


def feed_all(verified: VerifiedBooks, messages: list[dict[str, Any]]) -> list[Any]:
    out: list[Any] = []
    for n, msg in enumerate(messages):
        out += verified.on_message(msg, recv_ns=1_000 + n)
    return out


# -- table cases: each builds the messages the client receives and says what must happen ---------------


@dataclass
class Case:
    messages: list[dict[str, Any]]
    faults: list[GapReason]  # GapDetected reasons, in order (each with one SendResync)
    held: bool  # the book is held at the end (and then equals the server's)
    detail: str = ""  # expected in the first GapDetected.detail


def contiguous(s: Server) -> Case:
    msgs = [s.snapshot(), s.delta(("bid", "0.51", "3")), s.delta(("ask", "0.55", "0"), ("ask", "0.56", "2"))]
    return Case(msgs, [], True)


def seq_gap(s: Server) -> Case:
    msgs = [s.snapshot(), s.delta(("bid", "0.51", "3"))]
    s.delta(("bid", "0.51", "4"))  # lost
    msgs += [s.delta(("bid", "0.52", "1")), s.delta(("bid", "0.53", "1"))]  # the second is ignored: no 2nd resync
    return Case(msgs, [GapReason.SEQ_GAP], False, f"seq gap instrument={I} expected=1 got=2")


def epoch_change(s: Server) -> Case:
    msgs = [s.snapshot()]
    s.restart("e2")  # same seq 0 held, new history: still a gap
    msgs.append(s.delta(("bid", "0.51", "3")))
    return Case(msgs, [GapReason.EPOCH_CHANGE], False, f"epoch change instrument={I} expected=0 got=0")


def delta_checksum_mismatch(s: Server) -> Case:
    msgs = [s.snapshot(), s.delta(("ask", "0.57", "1"))]
    bad = s.delta(("bid", "0.51", "3"))
    msgs.append(bad | {"checksum": bad["checksum"] ^ 1})
    return Case(msgs, [GapReason.CHECKSUM_MISMATCH], False, f"checksum mismatch instrument={I} seq=2")


def snapshot_checksum_mismatch(s: Server) -> Case:
    snap = s.snapshot()
    return Case([snap | {"checksum": snap["checksum"] ^ 1}], [GapReason.CHECKSUM_MISMATCH], False)


def delta_before_snapshot_ignored(s: Server) -> Case:
    early = [s.delta(("bid", "0.51", "3")), s.delta(("bid", "0.49", "2"))]
    return Case(early + [s.snapshot(), s.delta(("ask", "0.56", "2"))], [], True)


def heartbeat_reveals_tail_loss(s: Server) -> Case:
    msgs = [s.snapshot(), s.delta(("bid", "0.51", "3"))]
    s.delta(("bid", "0.51", "0"))  # lost, and nothing after it to reveal the gap
    return Case(msgs + [s.heartbeat(), s.heartbeat()], [GapReason.STALE_HEARTBEAT], False,
                f"stale book instrument={I} held=e1:1 heartbeat=e1:2")


def heartbeat_behind_once_then_caught_up(s: Server) -> Case:
    msgs = [s.snapshot()]
    in_flight = s.delta(("bid", "0.51", "3"))
    return Case(msgs + [s.heartbeat(), in_flight, s.heartbeat(), s.heartbeat()], [], True)


def heartbeat_behind_but_book_moved(s: Server) -> Case:
    msgs = [s.snapshot()]
    d1, d2 = s.delta(("bid", "0.51", "3")), s.delta(("bid", "0.52", "3"))
    return Case(msgs + [s.heartbeat(), d1, s.heartbeat(), d2], [], True)


def heartbeat_of_other_epoch(s: Server) -> Case:
    msgs = [s.snapshot()]
    s.restart("e2")
    return Case(msgs + [s.heartbeat(), s.heartbeat()], [GapReason.STALE_HEARTBEAT], False)


def conflated_delta(s: Server) -> Case:
    return Case([s.snapshot(), s.delta(("bid", "0.51", "3"), ("ask", "0.56", "1"), advance=4),
                 s.delta(("bid", "0.51", "0"))], [], True)


def resync_drops_book(s: Server) -> Case:
    msgs = [s.snapshot(), s.delta(("bid", "0.51", "3")),
            {"type": "resync", "instrument": I, "reason": "slow_consumer"}]
    msgs.append(s.delta(("bid", "0.52", "1")))  # applicable, but the book was dropped: ignored
    return Case(msgs, [], False)


def malformed_delta(s: Server) -> Case:
    msgs = [s.snapshot()]
    bad = s.delta(("bid", "0.51", "3"))
    return Case(msgs + [bad | {"changes": [["bid", "abc", "1"]]}], [GapReason.BAD_MESSAGE], False)


def unknown_types_and_fields_ignored(s: Server) -> Case:
    msgs = [{"type": "news", "instrument": I, "epoch": "zzz"}, s.snapshot(flags=["new"]),
            s.delta(("bid", "0.51", "3"), venue_extra={"x": 1}), {"no_type": True}]
    return Case(msgs, [], True)


CASES: list[Callable[[Server], Case]] = [
    contiguous, seq_gap, epoch_change, delta_checksum_mismatch, snapshot_checksum_mismatch,
    delta_before_snapshot_ignored, heartbeat_reveals_tail_loss, heartbeat_behind_once_then_caught_up,
    heartbeat_behind_but_book_moved, heartbeat_of_other_epoch, conflated_delta, resync_drops_book,
    malformed_delta, unknown_types_and_fields_ignored,
]


@pytest.mark.parametrize("build", CASES, ids=[c.__name__ for c in CASES])
def test_table(build: Callable[[Server], Case]) -> None:
    server = Server()
    case = build(server)
    verified = VerifiedBooks()
    out = feed_all(verified, case.messages)

    gaps = [e for e in out if isinstance(e, GapDetected)]
    assert [g.reason for g in gaps] == case.faults
    assert [a for a in out if isinstance(a, SendResync)] == [SendResync(I, r) for r in case.faults]
    assert verified.stats.resyncs_requested == len(case.faults)
    if case.detail:
        assert case.detail in gaps[0].detail
    if case.held:
        assert verified.book(I) == server.book
        assert verified.resume_map() == {I: {"epoch": server.epoch, "seq": server.seq}}
    else:
        assert verified.book(I) is None and verified.resume_map() == {}

    # Whatever happened, the next snapshot restores the server's book.
    verified.on_message(server.snapshot(), recv_ns=10**6)
    assert verified.book(I) == server.book
    assert verified.books[I].seq == server.seq and verified.books[I].epoch == server.epoch


def test_counters_name_what_happened() -> None:
    s = Server()
    verified = VerifiedBooks()
    early = s.delta(("bid", "0.51", "1"))
    msgs = [early, s.snapshot(), s.delta(("bid", "0.52", "1"))]
    s.delta(("bid", "0.53", "1"))  # lost
    msgs += [s.delta(("bid", "0.54", "1")), s.snapshot()]
    bad = s.delta(("bid", "0.55", "1"))
    msgs += [bad | {"checksum": bad["checksum"] ^ 1}, s.snapshot(), s.heartbeat()]
    msgs.append({"type": "resync", "instrument": I, "reason": "upstream_gap"})
    s.restart("e2")
    msgs.append(s.snapshot())
    feed_all(verified, msgs)
    stats = verified.stats
    assert (stats.messages, stats.snapshots, stats.deltas, stats.deltas_ignored) == (10, 4, 4, 1)
    assert (stats.gaps, stats.checksum_mismatches, stats.resyncs_requested) == (1, 1, 2)
    assert (stats.heartbeats_seen, stats.epoch_changes, stats.stale_heartbeat_gaps) == (1, 1, 0)
    assert stats.resyncs_received == {"upstream_gap": 1}
    assert verified.books[I].epoch == "e2"


def test_book_updated_carries_latencies() -> None:
    s = Server()
    verified = VerifiedBooks()
    ts = {"ts_event_ns": 1_000, "ts_ingest_ns": 2_000, "ts_publish_ns": 3_000, "ts_send_ns": 4_000}
    [snap] = verified.on_message(s.snapshot(**ts), recv_ns=10_000)
    assert isinstance(snap, BookUpdated) and snap.kind is UpdateKind.SNAPSHOT
    assert (snap.latency_ns, snap.publish_latency_ns, snap.e2e_ns) == (6_000, 7_000, 9_000)
    # the latency fields are views of the one hop vocabulary (feed.hops)
    assert snap.latency_ns == snap.hops[Hop.CLIENT] and snap.e2e_ns == snap.hops[Hop.E2E]
    assert snap.publish_latency_ns == snap.hops[Hop.NATS_GATEWAY] + snap.hops[Hop.CLIENT]
    no_event_time = {k: v for k, v in ts.items() if k != "ts_event_ns"}
    [delta] = verified.on_message(s.delta(("bid", "0.51", "1"), **no_event_time), recv_ns=10_000)
    assert isinstance(delta, BookUpdated) and delta.kind is UpdateKind.DELTA and delta.seq == 1
    assert delta.e2e_ns == 8_000  # falls back to ts_ingest_ns
    [bare] = verified.on_message(s.delta(("bid", "0.51", "2")), recv_ns=10_000)
    assert (bare.latency_ns, bare.publish_latency_ns, bare.e2e_ns) == (None, None, None)
    assert verified.books[I].latency_ns is None and verified.books[I].last_recv_ns == 10_000


def test_crossed_book_after_delta_is_reported_and_kept() -> None:
    s = Server()
    verified = VerifiedBooks()
    verified.on_message(s.snapshot(), recv_ns=1)
    out = verified.on_message(s.delta(("bid", "0.56", "1")), recv_ns=2)
    assert [type(e) for e in out] == [BookUpdated, BookCrossed]
    assert (out[1].best_bid, out[1].best_ask) == (Decimal("0.56"), Decimal("0.55"))
    assert verified.book(I) == s.book and verified.stats.crossed_books == 1


def test_control_messages_become_events() -> None:
    verified = VerifiedBooks()
    msgs = [
        {"type": "subscribed", "id": 1, "instruments": [I], "recovered": {I: False}},
        {"type": "trade", "instrument": I, "price": "0.45", "size": "10", "side": "buy", "ts_ingest_ns": 5},
        {"type": "pong", "id": 4, "ts_send_ns": 7},
        {"type": "error", "id": 3, "code": "unknown_instrument", "message": "no instrument 'coinbase:NOPE'"},
        {"type": "shutdown", "reconnect_after_ms": 500},
        {"type": "unsubscribed", "id": 2, "instruments": [I]},
    ]
    out = [verified.on_message(m, recv_ns=100)[0] for m in msgs]
    assert out == [
        Subscribed(1, [I], {I: False}),
        TradeEvent(I, Decimal("0.45"), Decimal(10), AggressorSide.BUY, None, 100, 95, msgs[1]),
        Pong(4, 7, 100),
        ErrorReceived(3, "unknown_instrument", "no instrument 'coinbase:NOPE'"),
        Shutdown(500),
        Unsubscribed(2, [I]),
    ]
    assert verified.stats.trades == 1


def test_unsubscribed_drops_the_book() -> None:
    s = Server()
    verified = VerifiedBooks()
    verified.on_message(s.snapshot(), recv_ns=1)
    verified.on_message({"type": "unsubscribed", "id": 2, "instruments": [I]}, recv_ns=2)
    assert verified.books == {}


def test_server_resync_is_an_event_not_a_request() -> None:
    s = Server()
    verified = VerifiedBooks()
    verified.on_message(s.snapshot(), recv_ns=1)
    out = verified.on_message({"type": "resync", "instrument": I, "reason": "epoch_change"}, recv_ns=2)
    assert out == [ResyncReceived(I, "epoch_change")]
    assert verified.stats.resyncs_received == {"epoch_change": 1} and verified.stats.resyncs_requested == 0


def test_disconnect_forgets_heartbeat_suspicion() -> None:
    s = Server()
    verified = VerifiedBooks()
    verified.on_message(s.snapshot(), recv_ns=1)
    s.delta(("bid", "0.51", "1"))  # not yet received
    verified.on_message(s.heartbeat(), recv_ns=2)
    verified.on_disconnect()
    assert verified.on_message(s.heartbeat(), recv_ns=3) == []  # first suspicion on the new connection
    assert [type(x) for x in verified.on_message(s.heartbeat(), recv_ns=4)] == [GapDetected, SendResync]


# -- property: a valid stream, however conflated and wherever the client joins, never faults -----------

_bid_prices = st.integers(1, 49).map(lambda n: f"0.{n:02d}")
_ask_prices = st.integers(51, 99).map(lambda n: f"0.{n:02d}")
_sizes = st.sampled_from(["0", "0", "1", "2.5", "10", "0.001", "1000"])
_change = st.one_of(
    st.tuples(st.just("bid"), _bid_prices, _sizes), st.tuples(st.just("ask"), _ask_prices, _sizes)
)
_step = st.one_of(
    st.tuples(st.just("delta"), st.lists(_change, min_size=1, max_size=6), st.integers(1, 3)),
    st.tuples(st.just("heartbeat")),
)


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(_step, max_size=40), join_at=st.integers(0, 40))
def test_valid_streams_never_fault(steps: list[tuple[Any, ...]], join_at: int) -> None:
    server = Server()
    reference = server.book  # the server's book is the reference the client must reproduce
    messages: list[dict[str, Any]] = []
    for n, step in enumerate(steps):
        if n == min(join_at, len(steps) - 1):
            messages.append(server.snapshot())  # the client's subscription starts here
        if step[0] == "delta":
            messages.append(server.delta(*step[1], advance=step[2]))
        else:
            messages.append(server.heartbeat())
    messages.append(server.snapshot() if not steps else server.heartbeat())

    verified = VerifiedBooks()
    out = feed_all(verified, messages)
    assert not [x for x in out if isinstance(x, (GapDetected, SendResync))]
    stats = verified.stats
    assert (stats.gaps, stats.checksum_mismatches, stats.bad_messages) == (0, 0, 0)
    assert verified.book(I) == reference
    assert verified.books[I].seq == server.seq
    applied = [x for x in out if isinstance(x, BookUpdated)]
    assert len(applied) == stats.snapshots + stats.deltas - stats.deltas_ignored
