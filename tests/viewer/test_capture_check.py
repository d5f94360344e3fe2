"""``bookcast replay --check`` on bookcast-protocol captures (venue "bookcast", the viewer's download):
``feed.streamcheck`` fed with streams built by the real wire builders, then ``check_captures`` on files."""
from __future__ import annotations

import io
import json
from decimal import Decimal

from feed import wire
from feed.book import L2Book
from feed.model import LevelChange, Side
from feed.replaycheck import check_captures
from feed.streamcheck import StreamCheck

INST = "coinbase:BAND-GBP"


def stream(corrupt_seq: int | None = None, skip_at: int | None = None) -> list[dict]:
    """subscribed, a snapshot at seq 40, deltas 41..50 (one corrupted or one seq skipped on request), a
    server resync with its snapshot, a heartbeat."""
    book = L2Book(INST)
    book.apply_snapshot([(Decimal("14.75"), Decimal("20"))], [(Decimal("14.806"), Decimal("1.2"))])
    msgs: list[dict] = [{"type": "subscribed", "id": 1, "instruments": [INST], "recovered": {INST: False}}]
    snap = lambda seq: {**wire.snapshot_message(INST, "e7", seq, book, ts_event_ns=1, ts_ingest_ns=2, ts_publish_ns=3),  # noqa: E731
                        "ts_send_ns": 4}
    msgs.append(snap(40))
    seq = 40
    for n in range(10):
        book.apply_changes([LevelChange(Side.BID, Decimal("14.7") - Decimal(n) / 100, Decimal(n + 1))])
        prev, seq = seq, seq + 1
        if skip_at == seq:
            prev -= 1
        checksum = book.checksum() ^ (1 if corrupt_seq == seq else 0)
        msgs.append({"type": "delta", "instrument": INST, "epoch": "e7", "seq": seq, "prev_seq": prev,
                     "changes": [["bid", str(Decimal("14.7") - Decimal(n) / 100), str(n + 1)]], "checksum": checksum,
                     "ts_ingest_ns": 5, "ts_publish_ns": 6, "ts_send_ns": 7})
    msgs.append({"type": "resync", "instrument": INST, "reason": "slow_consumer"})
    msgs.append(snap(seq))
    msgs.append({"type": "heartbeat", "ts_send_ns": 9, "seqs": {INST: ["e7", seq]}})
    return msgs


def run(msgs) -> StreamCheck:
    check = StreamCheck()
    for n, msg in enumerate(msgs, 1):
        check.add(msg, 1_000 + n, f"f:{n}")
    return check


def test_a_clean_stream_has_no_faults_and_ends_at_its_seq():
    check = run(stream())
    assert check.faults == []
    lines = check.summary()
    assert "snapshots=2 deltas=10" in lines[0] and "resyncs_received=1 (slow_consumer:1) faults=0" in lines[0]
    assert INST in lines[1] and "epoch=e7 seq=50" in lines[1]


def test_checksum_mismatch_and_gap_are_faults_naming_the_line():
    check = run(stream(corrupt_seq=44))
    assert len(check.faults) == 1, check.faults
    assert check.faults[0].startswith(f"f:6: checksum_mismatch: checksum mismatch instrument={INST} seq=44 expected=")
    assert "checksum_mismatches=1" in check.summary()[0]
    gap = run(stream(skip_at=47))
    assert len(gap.faults) == 1 and gap.faults[0].startswith("f:9: seq_gap: seq gap") and "expected=46 got=45" in gap.faults[0]


def test_deltas_before_the_first_snapshot_are_skipped_not_faults():
    msgs = stream()
    check = run(msgs[2:6] + msgs[12:])  # starts mid-stream: 4 deltas, then the resync and its snapshot
    assert check.faults == [] and "deltas_before_snapshot=4" in check.summary()[0]


def test_a_frame_that_was_not_json_is_a_fault():
    check = run([*stream()[:2], "garbage{"])
    assert check.faults == ["f:3: message is not a JSON object: 'garbage{'"]


def capture(tmp_path, msgs, name="seen.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"recv_ts_ns": 1_000 + n, "venue": "bookcast", "msg": m}) + "\n"
                            for n, m in enumerate(msgs)))
    return path


def check(*paths) -> tuple[int, str]:
    """``check_captures`` in process (the CLI's own exit codes are checked by the browser tests)."""
    out = io.StringIO()
    return check_captures(list(paths), out=out), out.getvalue()


def test_replay_check_exit_codes(tmp_path, shared_data):
    code, out = check(capture(tmp_path, stream()))
    assert code == 0, out
    assert "bookcast stream: messages=15" in out and "faults=0" in out
    code, out = check(capture(tmp_path, stream(corrupt_seq=42), "bad.jsonl"))
    assert code == 1 and "bad.jsonl:4: checksum_mismatch" in out, out
    # venue captures and a bookcast capture in one run: each checked its own way
    code, out = check(shared_data / "polymarket" / "sol-15m-20251211.jsonl", capture(tmp_path, stream(), "b.jsonl"))
    assert code == 0, out
    assert "messages=758 parse_errors=0" in out and "bookcast stream: messages=15" in out
