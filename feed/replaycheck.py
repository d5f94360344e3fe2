"""``bookcast replay --check``: run captures through the parsers and the book engine, no NATS, and summarise.

Prints per venue the messages read, parse errors, ignored messages, instruments, deltas, trades, crossed
books, and per instrument the final seq, level counts and checksum. Exit 1 if any parse error occurred, or
if deltas arrived for instruments the capture never gives a snapshot of ("N instruments have no
snapshot: ..."): replayed, those books can never be built (live, the ingest would fetch the venue's REST
book; a capture has no such fallback).

Records of venue ``bookcast`` (bookcast v1 messages a client received, e.g. the book viewer's download)
are verified as a stream instead (``feed.streamcheck``: seq chain, epoch, checksums); any fault there
is printed with its line and also exits 1.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from feed.capture import read_capture
from feed.errors import RemoteError
from feed.sequencer import BookEngine, DeltaBeforeSnapshot, SequencedDelta
from feed.streamcheck import StreamCheck
from feed.model import Side, Trade
from feed.venues import parser_for


def check_captures(paths: list[Path], out=None) -> int:
    import sys

    out = out or sys.stdout
    engine = BookEngine("check")
    counts: Counter[str] = Counter()
    stream: StreamCheck | None = None
    no_snapshot: Counter[str] = Counter()  # instrument -> deltas dropped for want of a snapshot
    for path in paths:
        for n, record in enumerate(read_capture(path), 1):
            counts["messages"] += 1
            if record.venue == "bookcast":
                stream = stream or StreamCheck()
                stream.add(record.msg, record.recv_ts_ns, f"{path}:{n}")
                continue
            try:
                result = parser_for(record.venue)(record.msg)
            except RemoteError as exc:
                counts["parse_errors"] += 1
                print(f"{path}:{n}: {exc}", file=out)
                continue
            if not result.events:
                counts["ignored"] += 1
            for event in result.events:
                try:
                    outputs = engine.apply(event)
                except DeltaBeforeSnapshot as exc:
                    counts["dropped_deltas"] += 1
                    no_snapshot[exc.instrument] += 1
                    continue
                for o in outputs:
                    if isinstance(o, SequencedDelta):
                        counts["deltas"] += 1
                    elif isinstance(o, Trade):
                        counts["trades"] += 1
    counts["crossed_books"] = engine.crossed
    counts["instruments"] = len(engine.instruments)
    print(" ".join(f"{k}={counts[k]}" for k in ("messages", "parse_errors", "ignored", "instruments", "deltas",
                                                 "trades", "dropped_deltas", "crossed_books")), file=out)
    for inst, st in sorted(engine.instruments.items()):
        epoch, seq = engine.seq_of(inst)
        print(f"  {inst:<48} seq={seq:<6} bids={st.book.level_count(Side.BID):<5} "
              f"asks={st.book.level_count(Side.ASK):<5} checksum={st.book.checksum()}", file=out)
    if stream is not None:
        for fault in stream.faults:
            print(fault, file=out)
        for line in stream.summary():
            print(line, file=out)
    never = sorted(inst for inst in no_snapshot if inst not in engine.instruments)
    if never:
        shown = ", ".join(f"{inst} ({no_snapshot[inst]} deltas)" for inst in never[:10])
        more = f" and {len(never) - 10} more" if len(never) > 10 else ""
        print(f"{len(never)} instruments have no snapshot: {shown}{more}", file=out)
    return 1 if counts["parse_errors"] or never or (stream is not None and stream.faults) else 0
