"""The session state machine fed with requests, deltas and explicit times (no sockets, no clock), and a
property: for any interleaving of deltas, gaps, duplicates, snapshot replies and slow reads, what every
session sends is a stream a PROTOCOL-following client applies with matching checksums."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feed.client.verify import GapDetected, VerifiedBooks
from feed.gateway.instrument import InstrumentMachine
from feed.gateway.protocol import GatewayLimits
from feed.gateway.session import PARKED, TRANSITIONS, Close, SessionInput, SessionState
from feed.wire import Status
from tests.feed.gateway.conftest import INST, Ingest, Links, book_levels, messages
from tests.feed.gateway.reference_client import ReferenceClient

T0 = 1_700_000_000_000_000_000
S = 1_000_000_000


def serving() -> tuple[Links, Ingest]:
    ing = Ingest()
    machine = InstrumentMachine(INST)
    links = Links(machine)
    links.execute(machine.start(), T0)
    links.execute(machine.on_snapshot_reply(ing.snapshot(), T0), T0)
    return links, ing


def subscribe(links: Links, now_ns: int = T0, **kw) -> tuple:
    session = links.new_session(now_ns, **kw.pop("session_kw", {}))
    req = {"op": "subscribe", "id": 1, "instruments": [INST]} | kw
    links.link(session, session.on_text(orjson.dumps(req), now_ns))
    return session


def drain(session, now_ns: int = T0, max_bytes: int = 1 << 30) -> tuple[list[dict], Close | None]:
    frames, close = session.pull(now_ns, max_bytes)
    return messages(frames), close


# -- the connection table ---------------------------------------------------------------------------


def test_every_connection_transition_is_reachable() -> None:
    seen: set[tuple[SessionState, SessionInput]] = set()
    links, _ = serving()
    s = subscribe(links)
    seen.add((SessionState.OPEN, SessionInput.REQUEST))
    s.close(4008, "slow consumer")
    seen.add((SessionState.OPEN, SessionInput.CLOSE))
    assert s.state is SessionState.CLOSING
    _, close = drain(s)
    assert close == Close(4008, b"slow consumer") and s.state is SessionState.CLOSED
    seen.add((SessionState.CLOSING, SessionInput.CLOSE_SENT))
    s.closed()
    seen.add((SessionState.CLOSED, SessionInput.PEER_GONE))
    a, b = subscribe(links), subscribe(links)
    assert [type(x).__name__ for x in a.closed()] == ["Unlink"] and a.state is SessionState.CLOSED
    seen.add((SessionState.OPEN, SessionInput.PEER_GONE))
    b.close(1001, "bye")
    b.closed()
    assert b.state is SessionState.CLOSED
    seen.add((SessionState.CLOSING, SessionInput.PEER_GONE))
    assert seen == set(TRANSITIONS)


# -- requests ---------------------------------------------------------------------------------------


def test_subscribe_replies_then_snapshot_with_status() -> None:
    links, ing = serving()
    s = subscribe(links)
    out, _ = drain(s, T0 + 7)
    assert out[0] == {"type": "subscribed", "id": 1, "instruments": [INST], "recovered": {INST: False}}
    assert out[1]["type"] == "snapshot" and out[1]["ts_send_ns"] == T0 + 7 and out[1]["status"] == "ok"
    assert len(out) == 2  # status ok: no instrument_status after the first snapshot


def test_first_snapshot_is_followed_by_status_when_not_ok() -> None:
    links, ing = serving()
    status = {"type": "instrument_status", "instrument": INST, "status": "crossed", "reason": "venue", "since_ns": 5}
    links.execute(links.machine.on_message(orjson.dumps(status), T0), T0)
    s = subscribe(links)
    out, _ = drain(s)
    assert [m["type"] for m in out] == ["subscribed", "snapshot", "instrument_status"]
    assert out[1]["status"] == "crossed" and out[2]["status"] == "crossed"
    status["status"] = "ok"
    links.execute(links.machine.on_message(orjson.dumps(status), T0 + 1), T0 + 1)
    out, _ = drain(s)
    assert [(m["type"], m["status"]) for m in out] == [("instrument_status", "ok")]
    s.on_text(orjson.dumps({"op": "resync", "instrument": INST}), T0 + 2)
    assert [m["type"] for m in drain(s)[0]] == ["snapshot"]


def test_subscribe_before_the_instrument_serves_parks_until_ready() -> None:
    ing = Ingest()
    machine = InstrumentMachine(INST)
    links = Links(machine)
    links.execute(machine.start(), T0)
    s = subscribe(links)
    out, _ = drain(s)
    assert [m["type"] for m in out] == ["subscribed"] and s.held[INST] == PARKED
    links.execute(machine.on_snapshot_reply(ing.snapshot(), T0), T0)
    out, _ = drain(s)
    assert [m["type"] for m in out] == ["snapshot"]


def test_unknown_and_forbidden_are_atomic() -> None:
    @dataclass
    class Grant:
        allowed: set[str]
        expires_at_ns: int | None = None

        def allows(self, instrument: str) -> bool:
            return instrument in self.allowed

    links, _ = serving()
    links.books.directory.add("test:y")
    s = links.new_session(T0, authorization=Grant({INST}))
    assert s.on_text(orjson.dumps({"op": "subscribe", "id": 2, "instruments": [INST, "test:nope"]}), T0) == []
    assert s.on_text(orjson.dumps({"op": "subscribe", "id": 3, "instruments": [INST, "test:y"]}), T0) == []
    out, _ = drain(s)
    assert [(m["code"], m["id"]) for m in out] == [("unknown_instrument", 2), ("forbidden", 3)]
    assert "'test:nope'" in out[0]["message"] and "'test:y'" in out[1]["message"] and not s.subs
    assert [type(a).__name__ for a in s.on_text(orjson.dumps({"op": "subscribe", "instruments": [INST]}), T0)] == ["Link"]


def test_token_expiry_closes_4001_at_the_tick_after_it() -> None:
    @dataclass
    class Grant:
        expires_at_ns: int | None

        def allows(self, instrument: str) -> bool:
            return True

    links, _ = serving()
    s = links.new_session(T0, authorization=Grant(T0 + 10 * S))
    s.tick(T0 + 9 * S)
    assert s.state is SessionState.OPEN
    s.tick(T0 + 10 * S)
    frames, close = s.pull(T0 + 10 * S, 1 << 20)
    assert close == Close(4001, b"token expired") and s.state is SessionState.CLOSED


def test_heartbeat_only_after_an_idle_interval_and_gives_held_seqs() -> None:
    links, ing = serving()
    s = subscribe(links)
    drain(s)
    s.sent(T0)
    s.tick(T0 + S // 2)
    assert not s.queue.items
    s.tick(T0 + S)
    out, _ = drain(s, T0 + S)
    assert out == [{"type": "heartbeat", "ts_send_ns": T0 + S, "seqs": {INST: ["e1", 0]}}]


def test_rate_limit_then_close_4029() -> None:
    links, _ = serving()
    s = links.new_session(T0)
    for i in range(50 + 99):
        s.on_text(b'{"op":"ping"}', T0)
    out, close = drain(s)
    assert [m["type"] for m in out].count("pong") == 50 and out[-1]["code"] == "rate_limited" and close is None
    s.on_text(b'{"op":"ping"}', T0)
    _, close = drain(s)
    assert close == Close(4029, b"too many rate-limited requests")


def test_slow_consumer_gets_resync_and_snapshot_then_4008() -> None:
    links, ing = serving()
    limits = GatewayLimits(max_queue_bytes=600)
    s = subscribe(links, session_kw={"limits": limits})
    drain(s)
    for i in range(4):  # never read: the queue overflows once
        links.execute(links.machine.on_message(ing.delta(("bid", f"0.{20 + i}", "1")), T0 + i), T0 + i)
    out, _ = drain(s, T0 + 30)
    types = [m["type"] for m in out]
    assert "resync" in types and types[types.index("resync") + 1] == "snapshot"
    assert out[types.index("resync")]["reason"] == "slow_consumer" and s.state is SessionState.OPEN
    for i in range(200):
        links.execute(links.machine.on_message(ing.delta(("ask", f"0.{60 + i % 30}", str(i + 1))), T0 + S), T0 + S)
    _, close = drain(s, T0 + 2 * S)
    assert close == Close(4008, b"slow consumer") and s.tally["slow_closes"] == 1


def test_resume_sends_missed_deltas_when_the_ring_holds_them() -> None:
    links, ing = serving()
    for i in range(3):
        links.execute(links.machine.on_message(ing.delta(("bid", f"0.4{i}", "1")), T0), T0)
    s = subscribe(links, resume={INST: {"epoch": "e1", "seq": 1}})
    out, _ = drain(s)
    assert out[0]["recovered"] == {INST: True} and [(m["type"], m["seq"]) for m in out[1:]] == [("delta", 2), ("delta", 3)]
    t = subscribe(links, resume={INST: {"epoch": "e0", "seq": 1}})
    out, _ = drain(t)
    assert out[0]["recovered"] == {INST: False} and out[1]["type"] == "snapshot"


def test_unsubscribe_unlinks_and_stops_deltas() -> None:
    links, ing = serving()
    s = subscribe(links)
    drain(s)
    links.link(s, s.on_text(b'{"op":"unsubscribe","id":9,"instruments":["test:x"]}', T0))
    links.execute(links.machine.on_message(ing.delta(("bid", "0.51", "1")), T0), T0)
    out, _ = drain(s)
    assert out == [{"type": "unsubscribed", "id": 9, "instruments": [INST]}]


# -- the property -------------------------------------------------------------------------------------

PRICES = ["0.40", "0.45", "0.50", "0.52", "0.55", "0.58", "0.60"]
change = st.tuples(st.sampled_from(["bid", "ask"]), st.sampled_from(PRICES), st.sampled_from(["0", "1", "2.5", "10"]))
step = st.one_of(
    st.tuples(st.just("delta"), st.lists(change, min_size=1, max_size=3)),
    st.tuples(st.just("lost"), st.lists(change, min_size=1, max_size=2)),  # NATS lost it (a gap)
    st.tuples(st.just("duplicate"), st.just(None)),  # NATS redelivered the last one
    st.tuples(st.just("snapshot"), st.just(None)),  # the ingest answers a pending snapshot request
    st.tuples(st.just("read"), st.integers(min_value=0, max_value=3)),  # session i reads a little
    st.tuples(st.just("flush"), st.just(None)),  # conflation windows end
    st.tuples(st.just("restart"), st.just(None)),  # a new epoch
    st.tuples(st.just("status"), st.sampled_from(list(Status))),
    st.tuples(st.just("reconnect"), st.integers(min_value=0, max_value=3)),  # client i comes back with resume
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, max_size=60), st.integers(min_value=0, max_value=10))
def test_every_session_stream_is_applicable(steps, join_at) -> None:
    ing = Ingest()
    machine = InstrumentMachine(INST, ring_size=8)
    links = Links(machine)
    links.execute(machine.start(), T0)
    limits = GatewayLimits(max_queue_bytes=2_000, max_overflows=10_000)
    sessions, clients, references = [], [], []  # per session: our SDK and a PROTOCOL.md-only client
    gone: set[int] = set()  # sessions whose client reconnected (it lives on in a later session)
    last_payload = None
    now = T0

    def join(conflate_ms: int, resume_from: int | None = None) -> None:
        req: dict = {"conflate_ms": conflate_ms}
        client, reference = VerifiedBooks(), ReferenceClient()
        if resume_from is not None:  # the same client reconnecting: it keeps its book and asks to resume
            client = copy.deepcopy(clients[resume_from])
            reference = ReferenceClient(references[resume_from].books)
            req["resume"] = client.resume_map()
        reference.subscribe([INST], req.get("resume"))
        sessions.append(subscribe(links, now, session_kw={"limits": limits}, **req))
        clients.append(client)
        references.append(reference)

    def read(i: int, max_bytes: int) -> None:
        frames, close = sessions[i].pull(now, max_bytes)
        assert close is None
        for msg in messages(frames):
            references[i].on_message(msg)  # raises ProtocolViolation
            for event in clients[i].on_message(msg, now):
                assert not isinstance(event, GapDetected), (i, event, msg)

    join(0)
    join(50)
    for n, (kind, arg) in enumerate(steps):
        now += 1_000_000
        if n == join_at:
            join(0)
        if kind == "delta":
            last_payload = ing.delta(*arg)
            links.execute(machine.on_message(last_payload, now), now)
        elif kind == "lost":
            ing.delta(*arg)
        elif kind == "duplicate" and last_payload is not None:
            links.execute(machine.on_message(last_payload, now), now)
        elif kind == "snapshot" and links.snapshot_requested:
            links.snapshot_requested = False
            links.execute(machine.on_snapshot_reply(ing.snapshot(), now), now)
        elif kind == "read" and arg < len(sessions):
            read(arg, 300)
        elif kind == "flush":
            links.flush_windows(now)
        elif kind == "restart":
            ing.restart(f"r{n}")
        elif kind == "reconnect" and arg < len(sessions) and arg not in gone:
            read(arg, 1 << 30)  # what it had already received, then the old connection is gone
            if INST in clients[arg].books:
                links.link(sessions[arg], sessions[arg].closed())
                gone.add(arg)
                join(0, resume_from=arg)
        elif kind == "status":
            msg = {"type": "instrument_status", "instrument": INST, "status": arg.value, "reason": "", "since_ns": now}
            links.execute(machine.on_message(orjson.dumps(msg), now), now)
    # settle: answer the ingest, flush windows, read everything; every client ends with the ingest's book
    if links.snapshot_requested:
        links.execute(machine.on_snapshot_reply(ing.snapshot(), now), now)
    now += 1
    links.flush_windows(now)
    live = [i for i in range(len(sessions)) if i not in gone]
    for i in live:  # every session has its snapshot now: what follows must reach it as applicable deltas
        read(i, 1 << 30)
    for size in ("7", "8", "0"):  # more deltas so every window/ring is current
        now += 1
        last_payload = ing.delta(("bid", "0.41", size), ("ask", "0.57", size))
        links.execute(machine.on_message(last_payload, now), now)
        if links.snapshot_requested:
            links.execute(machine.on_snapshot_reply(ing.snapshot(), now), now)
    links.flush_windows(now + 1)
    join(0)
    live.append(len(sessions) - 1)
    for i in live:
        read(i, 1 << 30)
    assert machine.serving and (machine.seq, machine.book.checksum()) == (ing.seq, ing.book.checksum())
    for i in live:
        client = clients[i]
        local = client.books.get(INST)
        assert local is not None, f"client {i} holds no book"
        assert (local.epoch, local.seq) == (ing.epoch, ing.seq), i
        assert local.book == ing.book and local.book.checksum() == ing.book.checksum()
    bids, asks = book_levels(ing.book)
    for i in live:
        held = references[i].books.get(INST)
        assert held is not None and INST not in references[i].awaiting, f"reference client {i} holds no book"
        assert (held.epoch, held.seq) == (ing.epoch, ing.seq) and held.levels() == (bids, asks), i
