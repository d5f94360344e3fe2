"""Write-through (``Session.deliver_now``, used by ``feed.gateway.app.Gateway._fan_out`` when a connection
has nothing queued): the client gets exactly the frames, in the order, with the held state and tallies
that queueing then pulling would give; a delta it cannot apply is never written through."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feed.client.verify import VerifiedBooks
from feed.gateway import instrument as im
from feed.client.verify import GapDetected
from feed.gateway.fanout import Item, Kind, SentState
from feed.gateway.framing import frame_payload
from tests.feed.gateway.conftest import INST, messages
from tests.feed.gateway.test_session import T0, S, drain, serving, subscribe


def _fan_out(links, actions, now_ns, through, queued, written):
    """Like ``Links.execute``, with the two ways a connection with nothing queued can take a delta: the
    ``through`` session by write-through, the ``queued`` one by push then an immediate pull (its writer
    woken at once). Connections with something queued push in both cases."""
    for action in actions:
        if isinstance(action, im.FanOut):
            for session in links.subscribers:
                idle = not session.queue.items
                if session is through and idle:
                    frame = session.deliver_now(action.item, now_ns)
                    if frame is not None:
                        written[session].append(frame)
                        session.wrote_through(1, len(frame))
                    continue
                session.push(action.item, now_ns)
                if session is queued and idle:
                    written[session] += session.pull(now_ns, 1 << 30)[0]
        else:
            links.execute([action], now_ns)


def test_deliver_now_skips_until_the_snapshot_then_sends_what_pull_would():
    links, ing = serving()
    s = subscribe(links)
    item = links.machine.on_message(ing.delta(("bid", "0.51", "3")), T0)[0].item
    assert s.deliver_now(item, T0) is None  # snapshot still queued: the client holds nothing yet
    out, _ = drain(s)
    assert [m["type"] for m in out] == ["subscribed", "snapshot"] and out[1]["seq"] == 1
    item = links.machine.on_message(ing.delta(("ask", "0.56", "2")), T0 + 5)[0].item
    frame = s.deliver_now(item, T0 + 5)
    assert frame is item.payload  # the shared frame, not a copy
    assert s.held[INST] == SentState("e1", 2) and s.last_send_ns == T0 + 5
    s.wrote_through(1, len(frame))
    assert s.tally[("sent", "delta")] == 1 and s.tally["socket_writes"] == 2  # the snapshot's pull, then this
    assert s.deliver_now(item, T0 + 6) is None  # a duplicate is skipped


def test_a_delta_that_does_not_chain_is_replaced_by_a_resync_never_written():
    links, ing = serving()
    s = subscribe(links)
    drain(s)  # the client holds seq 1
    # the instrument machine never fans out a delta that does not chain, so reaching the writer with one is a
    # bug: write-through must resync, as the writer does, and never send it
    bad = Item(Kind.DATA, INST, b"x", "e1", 5, 4)
    assert s.deliver_now(bad, T0) is None and s.tally["writer_gaps"] == 1
    out, _ = drain(s, T0 + 1)
    assert [m["type"] for m in out] == ["resync", "snapshot"] and out[0]["reason"] == "upstream_gap"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(["delta", "delta", "delta", "dup", "pull", "resync"]), min_size=1, max_size=40))
def test_write_through_and_queueing_give_the_same_stream(steps):
    links, ing = serving()
    queued, through = subscribe(links), subscribe(links)
    written = {queued: [], through: []}
    now = T0
    last = None
    for step in steps:
        now += 1_000
        if step == "delta":
            last = ing.delta(("bid", f"0.{10 + ing.seq % 40}", str(now % 97 + 1)))
            _fan_out(links, links.machine.on_message(last, now), now, through, queued, written)
        elif step == "dup" and last is not None:
            _fan_out(links, links.machine.on_message(last, now), now, through, queued, written)
        elif step == "resync":
            for s in (queued, through):
                s.on_text(b'{"op":"resync","instrument":"%s"}' % INST.encode(), now)
        elif step == "pull":  # both writers run
            for s in (queued, through):
                written[s] += s.pull(now, 1 << 30)[0]
    for s in (queued, through):
        written[s] += s.pull(now, 1 << 30)[0]
    assert written[through] == written[queued]  # byte for byte, in order
    assert through.held == queued.held and through.last_send_ns >= T0
    for key in (("sent", "delta"), ("sent", "snapshot"), "bytes_sent", "writer_gaps"):
        assert through.tally[key] == queued.tally[key], key
    books = VerifiedBooks()  # and a PROTOCOL-following client applies every message of it
    for m in messages(written[through]):
        assert not any(isinstance(e, GapDetected) for e in books.on_message(m, now)), m
    assert books.books[INST].seq == ing.seq


def test_frames_written_through_are_whole_websocket_frames():
    links, ing = serving()
    s = subscribe(links)
    drain(s)
    item = links.machine.on_message(ing.delta(("ask", "0.57", "9")), T0)[0].item
    frame = s.deliver_now(item, T0)
    assert frame[0] == 0x81 and frame_payload(frame).startswith(b'{"type":"delta"')


def test_heartbeats_of_connections_holding_no_book_share_one_frame_per_tick():
    links, _ = serving()
    a, b = links.new_session(T0), links.new_session(T0)
    for s in (a, b):
        s.tick(T0 + 2 * S)
    (fa,), _ = a.pull(T0 + 2 * S, 1 << 20)
    (fb,), _ = b.pull(T0 + 2 * S, 1 << 20)
    assert fa is fb and messages([fa]) == [{"type": "heartbeat", "ts_send_ns": T0 + 2 * S, "seqs": {}}]
    a.tick(T0 + 4 * S)
    (later,), _ = a.pull(T0 + 4 * S, 1 << 20)
    assert messages([later])[0]["ts_send_ns"] == T0 + 4 * S
    c = subscribe(links)  # holding a book: its own heartbeat with its seqs
    c.pull(T0, 1 << 20)
    c.tick(T0 + 2 * S)
    (fc,), _ = c.pull(T0 + 2 * S, 1 << 20)
    assert messages([fc])[0]["seqs"] == {INST: ["e1", links.machine.seq]}
