"""``bookcast replay --check``: run captures through the parsers and the book engine, no NATS, and summarise.

Prints per venue the messages read, parse errors, ignored messages, instruments, deltas, trades, crossed
books, integrity faults at the end of venue bursts (``feed.integrity``: a crossing inside a burst is normal),
and per instrument the final seq, level counts and checksum. Deltas of an instrument the capture never gave a
snapshot of cannot build a book: they are listed with their count.

Exit 1 if any parse error occurred or any instrument has deltas but no snapshot ("N instruments have no
snapshot"); 0 otherwise.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from feed.capture import read_capture
from feed.errors import RemoteError
from feed.integrity import VENUE_TOPS, BurstChecker, Top
from feed.model import Side, Trade
from feed.sequencer import BookEngine, DeltaBeforeSnapshot, SequencedDelta
from feed.venues import parser_for


def check_captures(paths: list[Path], out=None) -> int:
    import sys

    out = out or sys.stdout
    engine = BookEngine("check")
    counts: Counter[str] = Counter()
    no_snapshot: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    bursts = BurstChecker()

    def top_of(inst: str) -> Top | None:
        st = engine.instruments.get(inst)
        if st is None:
            return None
        bid, ask = st.book.best_bid(), st.book.best_ask()
        return (bid[0] if bid else None, ask[0] if ask else None)

    def judged(end) -> None:
        if end is not None and end.fault_kind is not None:
            faults[end.fault_kind] += 1

    for path in paths:
        for n, record in enumerate(read_capture(path), 1):
            counts["messages"] += 1
            try:
                result = parser_for(record.venue)(record.msg)
            except RemoteError as exc:
                counts["parse_errors"] += 1
                print(f"{path}:{n}: {exc}", file=out)
                continue
            if not result.events:
                counts["ignored"] += 1
            tops_of = VENUE_TOPS.get(record.venue)
            tops = tops_of(record.msg) if tops_of is not None else {}
            for event in result.events:
                inst = event.instrument
                book_event = not isinstance(event, Trade) and inst in engine.instruments
                if book_event:
                    judged(bursts.begin(inst, event.ts_event_ns, top_of(inst)))
                try:
                    outputs = engine.apply(event)
                except DeltaBeforeSnapshot:
                    counts["dropped_deltas"] += 1
                    no_snapshot[inst] += 1
                    continue
                if not isinstance(event, Trade) and inst in engine.instruments:
                    bursts.end_message(inst, event.ts_event_ns, record.recv_ts_ns, tops.get(inst))
                for o in outputs:
                    if isinstance(o, SequencedDelta):
                        counts["deltas"] += 1
                    elif isinstance(o, Trade):
                        counts["trades"] += 1
    for end in bursts.close_all(top_of):
        judged(end)
    counts["crossed_books"] = engine.crossed
    counts["instruments"] = len(engine.instruments)
    counts["faults_after_burst"] = sum(faults.values())
    print(" ".join(f"{k}={counts[k]}" for k in ("messages", "parse_errors", "ignored", "instruments", "deltas",
                                                 "trades", "dropped_deltas", "crossed_books", "faults_after_burst")),
          file=out)
    if faults:
        print("  integrity faults at the end of venue bursts: "
              + ", ".join(f"{k}={v}" for k, v in sorted(faults.items())), file=out)
    for inst, st in sorted(engine.instruments.items()):
        epoch, seq = engine.seq_of(inst)
        print(f"  {inst:<48} seq={seq:<6} bids={st.book.level_count(Side.BID):<5} "
              f"asks={st.book.level_count(Side.ASK):<5} checksum={st.book.checksum()}", file=out)
    missing = {i: c for i, c in no_snapshot.items() if i not in engine.instruments}
    if missing:
        print(f"{len(missing)} instruments have no snapshot (their deltas cannot build a book):", file=out)
        for inst, c in sorted(missing.items()):
            print(f"  {inst:<48} {c} deltas dropped", file=out)
    return 1 if counts["parse_errors"] or missing else 0
