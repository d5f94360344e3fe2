"""Pure fan-out policy: bounded queue, overflow window, admission of deltas, conflation."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feed.gateway.fanout import Admit, Conflated, Item, Kind, OutQueue, OverflowPolicy, SentState, admit


def data(inst: str, n: int, seq: int = 1) -> Item:
    return Item(Kind.DATA, inst, b"x" * n, "e", seq, seq - 1)


def test_queue_bounds_data_bytes_but_never_control():
    q = OutQueue(100)
    assert q.push(data("a", 60))
    assert q.push(data("b", 40))
    assert not q.push(data("a", 1))  # would exceed the bound
    assert q.push(Item(Kind.CTRL, None, b"y" * 500))  # replies always fit
    assert q.queued_bytes == 600 and len(q) == 3


def test_empty_queue_admits_one_oversized_message():
    q = OutQueue(10)
    assert q.push(data("a", 1000))
    assert not q.push(data("a", 1))


def test_drop_data_keeps_control_and_reports_instruments():
    q = OutQueue(1000)
    q.push(data("a", 10))
    q.push(Item(Kind.CTRL, None, b"ack"))
    q.push(Item(Kind.TRADE, "c", b"t"))
    q.push(data("b", 10))
    q.push(Item(Kind.SNAP, "a"))
    assert q.drop_data() == {"a", "b", "c"}
    assert [i.kind for i in q.items] == [Kind.CTRL, Kind.SNAP]
    assert q.queued_bytes == 3
    assert q.pop().payload == b"ack" and q.queued_bytes == 0


def test_overflow_policy_closes_on_third_overflow_within_window():
    p = OverflowPolicy(max_overflows=3, window_s=60)
    assert not p.record(0.0)
    assert not p.record(30.0)
    assert p.record(59.0)


def test_overflow_policy_forgets_old_overflows():
    p = OverflowPolicy(max_overflows=3, window_s=60)
    assert not p.record(0.0)
    assert not p.record(30.0)
    assert not p.record(61.0)  # the first fell out of the window
    assert p.record(62.0)


@pytest.mark.parametrize(
    "state, epoch, seq, prev_seq, verdict",
    [
        (None, "e", 5, 4, Admit.SKIP),  # awaiting a snapshot
        (SentState("e", 4), "e", 5, 4, Admit.SEND),  # chains on
        (SentState("e", 5), "e", 5, 4, Admit.SKIP),  # already covered by the snapshot
        (SentState("e", 9), "e", 7, 6, Admit.SKIP),
        (SentState("e", 4), "e", 6, 5, Admit.GAP),  # a hole
        (SentState("e", 4), "f", 5, 4, Admit.GAP),  # another epoch
        (SentState("e", 4), "e", 8, 2, Admit.SEND),  # a conflated delta spanning the held seq
    ],
)
def test_admit_table(state, epoch, seq, prev_seq, verdict):
    assert admit(state, epoch, seq, prev_seq) is verdict


def delta(seq: int, changes, epoch: str = "e") -> dict:
    return {"type": "delta", "instrument": "v:x", "epoch": epoch, "seq": seq, "prev_seq": seq - 1,
            "changes": changes, "checksum": seq * 10, "ts_publish_ns": seq}


def test_conflation_merges_to_newest_size_per_level():
    c = Conflated.start(delta(5, [["bid", "1", "2"], ["ask", "3", "1"]]))
    assert c.add(delta(6, [["bid", "1", "0"], ["bid", "0.5", "7"]]))
    assert c.add(delta(7, [["ask", "3", "4"]]))
    assert not c.add(delta(9, [["ask", "3", "5"]]))  # does not chain on
    assert not c.add(delta(8, [], epoch="f"))
    msg = c.message(prev_seq=4)
    assert (msg["prev_seq"], msg["seq"], msg["checksum"], msg["ts_publish_ns"]) == (4, 7, 70, 7)
    assert msg["changes"] == [["bid", "1", "0"], ["ask", "3", "4"], ["bid", "0.5", "7"]]


@given(st.lists(st.lists(st.tuples(st.sampled_from(["bid", "ask"]), st.sampled_from(["1", "2", "3", "4"]),
                                   st.sampled_from(["0", "1", "5"])), min_size=1, max_size=4),
                min_size=2, max_size=20), st.integers(min_value=0, max_value=19))
@settings(max_examples=200, deadline=None)
def test_conflated_delta_applied_inside_its_span_gives_the_final_book(stream, held_at):
    """Applying the merged delta to the book at ANY seq inside its span yields the book at its end."""
    held_at = min(held_at, len(stream) - 1)
    books = [{}]
    for changes in stream:
        book = dict(books[-1])
        for side, price, size in changes:
            if size == "0":
                book.pop((side, price), None)
            else:
                book[(side, price)] = size
        books.append(book)
    c = Conflated.start(delta(1, [list(x) for x in stream[0]]))
    for i, changes in enumerate(stream[1:], start=2):
        assert c.add(delta(i, [list(x) for x in changes]))
    book = dict(books[held_at])
    for side, price, size in c.message(prev_seq=held_at)["changes"]:
        if size == "0":
            book.pop((side, price), None)
        else:
            book[(side, price)] = size
    assert book == books[-1]


@pytest.mark.parametrize("length, header", [
    (0, b"\x81\x00"), (125, b"\x81\x7d"), (126, b"\x81\x7e\x00\x7e"), (65535, b"\x81\x7e\xff\xff"),
    (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
])
def test_text_frame_header_follows_rfc6455(length, header):
    from feed.gateway.framing import frame_payload, text_frame

    payload = b"x" * length
    frame = text_frame(payload)
    assert frame[: len(header)] == header and frame_payload(frame) == payload
