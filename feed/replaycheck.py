"""``bookcast replay --check``: run captures through the parsers and the book engine, no NATS, and summarise.

Prints per venue the messages read, parse errors, ignored messages, instruments, deltas, trades, crossed
books, integrity faults at the end of venue bursts (``feed.integrity``: a crossing inside a burst is normal),
venue seq faults (Kalshi per-``sid`` and Coinbase Advanced ``sequence_num``: gap, duplicate, reset), and per
instrument the final seq, level counts and checksum. Deltas of an instrument the capture never gave a
snapshot of cannot build a book: they are listed with their count.

Exit 1 if any parse error occurred or any instrument has deltas but no snapshot ("N instruments have no
snapshot: ..."): replayed, those books can never be built (live, the ingest would fetch the venue's REST
book; a capture has no such fallback); 0 otherwise.

Records of venue ``bookcast`` (bookcast v1 messages a client received, e.g. the book viewer's download)
are verified as a stream instead (``feed.streamcheck``: seq chain, epoch, checksums); any fault there
is printed with its line and also exits 1.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from feed.capture import read_capture
from feed.errors import RemoteError
from feed.integrity import SEQ_FAULT_KINDS, BurstChecker, Top, book_top, venue_top
from feed.model import VENUE_INFO_EVENTS, Side, Trade, VenueSeqFault
from feed.sequencer import BookEngine, DeltaBeforeSnapshot, SequencedDelta
from feed.streamcheck import StreamCheck
from feed.venues import VenueSession, session_for


def check_captures(paths: list[Path], out=None) -> int:
    """Check ``paths`` (capture files, ``feed.capture`` format) as the ingest would replay them; print the
    summary to ``out`` (default stdout). Returns the exit code: 1 on a parse error, an instrument with
    deltas but no snapshot, or a fault in a ``bookcast`` stream record; 0 otherwise. Integrity faults after
    a burst and venue seq faults (gap, duplicate, reset: ``feed.venues.seqcheck``) are counted and named but
    do not fail the check (a capture cannot be resynced; the ingest announces them to clients)."""
    import sys

    out = sys.stdout if out is None else out  # an empty writer is still the writer
    engine = BookEngine("check")
    counts: Counter[str] = Counter()
    no_snapshot: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    bursts = BurstChecker()
    stream: StreamCheck | None = None

    def top_of(inst: str) -> Top | None:
        st = engine.instruments.get(inst)
        return None if st is None else book_top(st.book)

    def judged(end) -> None:
        if end is not None and end.fault_kind is not None:
            faults[end.fault_kind] += 1

    for path in paths:
        sessions: dict[str, VenueSession] = {}  # per file, as the ingest replays each capture
        for n, record in enumerate(read_capture(path), 1):
            counts["messages"] += 1
            if record.venue == "bookcast":
                stream = stream or StreamCheck()
                stream.add(record.msg, record.recv_ts_ns, f"{path}:{n}")
                continue
            try:
                if record.venue not in sessions:
                    sessions[record.venue] = session_for(record.venue)
                result = sessions[record.venue].parse(record.msg)
            except RemoteError as exc:
                counts["parse_errors"] += 1
                print(f"{path}:{n}: {exc}", file=out)
                continue
            if not result.events:
                counts["ignored"] += 1
            for event in result.events:
                if isinstance(event, VenueSeqFault):
                    faults[SEQ_FAULT_KINDS[event.kind]] += 1
                    continue
                if isinstance(event, VENUE_INFO_EVENTS):
                    continue
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
                except RemoteError as exc:  # e.g. a Kalshi increment below zero
                    counts["book_errors"] += 1
                    print(f"{path}:{n}: {exc}", file=out)
                    continue
                if not isinstance(event, Trade) and inst in engine.instruments:
                    bursts.end_message(inst, event.ts_event_ns, record.recv_ts_ns, venue_top(event))
                for o in outputs:
                    if isinstance(o, SequencedDelta):
                        counts["deltas"] += 1
                    elif isinstance(o, Trade):
                        counts["trades"] += 1
    for end in bursts.close_all(top_of):
        judged(end)
    counts["crossed_books"] = engine.crossed
    counts["instruments"] = len(engine.instruments)
    counts["faults_after_burst"] = sum(v for k, v in faults.items() if k not in SEQ_FAULT_KINDS.values())
    counts["venue_seq_faults"] = sum(v for k, v in faults.items() if k in SEQ_FAULT_KINDS.values())
    print(" ".join(f"{k}={counts[k]}" for k in ("messages", "parse_errors", "ignored", "instruments", "deltas",
                                                 "trades", "dropped_deltas", "crossed_books", "faults_after_burst",
                                                 "venue_seq_faults")),
          file=out)
    burst_faults = {k: v for k, v in faults.items() if k not in SEQ_FAULT_KINDS.values()}
    seq_faults = {k: v for k, v in faults.items() if k in SEQ_FAULT_KINDS.values()}
    if burst_faults:
        print("  integrity faults at the end of venue bursts: "
              + ", ".join(f"{k}={v}" for k, v in sorted(burst_faults.items())), file=out)
    if seq_faults:
        print("  venue seq faults: " + ", ".join(f"{k}={v}" for k, v in sorted(seq_faults.items())), file=out)
    if counts["book_errors"]:
        print(f"  book errors (venue and book disagree): {counts['book_errors']}", file=out)
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
