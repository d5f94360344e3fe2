"""``bookcast replay --check`` (``feed.replaycheck.check_captures``) on the three things merged into it:
integrity faults judged at the end of venue bursts, instruments without a snapshot, venue seq faults, and
``bookcast`` stream records beside venue records. In process, on files written here from the venues' real
schemas (the CLI's exit codes on real captures are checked in tests/test_cli.py and test_snapshotless.py)."""
from __future__ import annotations

import io
import json
from pathlib import Path

from feed.replaycheck import check_captures
from tests.viewer.test_capture_check import stream


def write(path: Path, records: list[tuple[str, dict]]) -> Path:
    path.write_text("".join(json.dumps({"recv_ts_ns": 1_000 + n, "venue": venue, "msg": msg}) + "\n"
                            for n, (venue, msg) in enumerate(records)))
    return path


def check(*paths: Path) -> tuple[int, str, dict[str, str]]:
    out = io.StringIO()
    code = check_captures(list(paths), out=out)
    text = out.getvalue()
    return code, text, dict(kv.split("=") for kv in text.splitlines()[0].split())


def pm_book(ts_ms, bids, asks, asset="tok"):
    return {"event_type": "book", "market": "0xm", "asset_id": asset, "timestamp": str(ts_ms),
            "bids": [{"price": p, "size": s} for p, s in bids], "asks": [{"price": p, "size": s} for p, s in asks]}


def pm_change(ts_ms, *changes, best_bid=None, best_ask=None):
    entries = []
    for side, price, size in changes:
        e = {"asset_id": "tok", "price": price, "size": size, "side": side, "hash": "h"}
        if best_bid is not None:
            e |= {"best_bid": best_bid, "best_ask": best_ask}
        entries.append(e)
    return {"event_type": "price_change", "market": "0xm", "timestamp": str(ts_ms), "price_changes": entries}


BOOK = pm_book(1000, [("0.40", "10")], [("0.42", "8"), ("0.44", "5")])


def test_a_crossing_inside_one_burst_is_normal(tmp_path):
    """Polymarket's order: the crossing level first, then the removal of the level it matched, one timestamp."""
    msgs = [BOOK, pm_change(2000, ("BUY", "0.43", "12"), best_bid="0.43", best_ask="0.44"),
            pm_change(2000, ("SELL", "0.42", "0"), best_bid="0.43", best_ask="0.44"),
            pm_change(3000, ("BUY", "0.39", "1"), best_bid="0.43", best_ask="0.44")]
    code, out, summary = check(write(tmp_path / "pm.jsonl", [("polymarket", m) for m in msgs]))
    assert code == 0, out
    assert summary["faults_after_burst"] == "0" and summary["deltas"] == "3", out
    assert "integrity faults" not in out


def test_a_book_left_crossed_after_its_burst_is_counted_and_named(tmp_path):
    """The recorder missed the removal: crossed once the burst is over (and not the venue's own top)."""
    msgs = [BOOK, pm_change(2000, ("BUY", "0.43", "12")),  # crosses 0.42; its removal never recorded
            pm_change(3000, ("BUY", "0.38", "1")),
            pm_change(4000, ("SELL", "0.42", "0"), best_bid="0.43", best_ask="0.44"),
            pm_change(4000, ("BUY", "0.38", "0"), best_bid="0.41", best_ask="0.44")]  # venue top disagrees
    code, out, summary = check(write(tmp_path / "pm.jsonl", [("polymarket", m) for m in msgs]))
    assert code == 0, out  # counted and named, but a capture cannot be resynced: not a failed check
    # each burst that ends crossed counts (2000 and 3000); then the venue's own top disagrees with ours
    assert summary["faults_after_burst"] == "3", out
    assert "integrity faults at the end of venue bursts: crossed=2, top_mismatch=1" in out


def kalshi(kind, seq, **msg):
    return {"type": kind, "sid": 7, "seq": seq, "msg": {"market_ticker": "KX-T", **msg}}


def test_kalshi_seq_gap_duplicate_and_reset_are_counted_by_kind(tmp_path):
    snap = kalshi("orderbook_snapshot", 1, market_id="m", yes_dollars_fp=[["0.5600", "10.00"]],
                  no_dollars_fp=[["0.4000", "5.00"]])
    d = lambda seq, price: kalshi("orderbook_delta", seq, price_dollars=price, delta_fp="1.00", side="yes",  # noqa: E731
                                  ts="2026-02-12T17:26:21.123Z")
    msgs = [snap, d(2, "0.5500"), d(2, "0.5500"),  # exact duplicate: dropped
            d(4, "0.5400"),  # seq 3 lost: gap
            {**snap, "msg": {**snap["msg"], "yes_dollars_fp": [["0.5000", "1.00"]]}}]  # seq 1 again, another
    # message (an identical one is a duplicate): the venue restarted the stream, its new snapshot applies
    code, out, summary = check(write(tmp_path / "k.jsonl", [("kalshi", m) for m in msgs]))
    assert code == 0, out
    assert summary["venue_seq_faults"] == "3", out
    assert "venue seq faults: duplicate=1, reset=1, seq_gap=1" in out
    assert summary["instruments"] == "1"
    assert "seq=3 " in out and "bids=1 " in out  # the reset's snapshot replaced the book (a new seq after 2)


def test_snapshotless_instrument_and_bookcast_records_in_one_run(tmp_path):
    """A venue capture with an instrument that never had a snapshot, beside a clean bookcast stream: exit 1
    naming the instrument and its count, and the stream still checked its own way."""
    other = pm_change(2000, ("BUY", "0.30", "3"))
    other["price_changes"][0]["asset_id"] = "orphan"
    venue = write(tmp_path / "pm.jsonl", [("polymarket", m) for m in [BOOK, other, other]])
    seen = write(tmp_path / "seen.jsonl", [("bookcast", m) for m in stream()])
    code, out, summary = check(venue, seen)
    assert code == 1, out
    assert "1 instruments have no snapshot: polymarket:orphan (2 deltas)" in out
    assert summary["dropped_deltas"] == "2" and summary["instruments"] == "1"
    assert "bookcast stream: messages=15" in out and "faults=0" in out
