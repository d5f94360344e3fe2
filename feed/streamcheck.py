"""Check a recorded bookcast stream: what ``bookcast replay --check`` does with ``venue: "bookcast"`` records.

Those records hold PROTOCOL.md v1 server messages as a client received them, not a venue's (the book
viewer's "download what I saw" file: ``feed/gateway/static/recorder.js``). "bookcast" is not a venue of
``feed.venues`` (no instrument id starts with it), so such records never reach a venue parser. Rebuilding them through the ingest's engine would re-sequence
them; instead they are fed, in file order with their ``recv_ts_ns``, to the client SDK's verifier
(``feed.client.verify.VerifiedBooks``), which holds each book at the stream's own ``(epoch, seq)`` and
checks ``prev_seq``, epoch and the section 6 checksum of every snapshot and delta.

A *fault* is what a client would have had to resync for: a checksum mismatch, a seq gap or epoch change
on a held book, two heartbeats ahead of a book that did not move, a malformed data message. Server
``resync`` messages are not faults (the gateway announced them and a snapshot follows); deltas before an
instrument's first snapshot (a capture that starts mid-stream) are counted and skipped.

Pure: no I/O, no clock (``recv_ts_ns`` comes from the file).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from feed.client.verify import GapDetected, VerifiedBooks
from feed.model import Side


@dataclass
class StreamCheck:
    """Feed records with ``add``; read ``faults`` and ``summary()``."""

    books: VerifiedBooks = field(default_factory=VerifiedBooks)
    records: int = 0
    not_objects: int = 0
    faults: list[str] = field(default_factory=list)  # "<where>: <detail>", in file order

    def add(self, msg: Any, recv_ts_ns: int, where: str) -> None:
        """One record's ``msg`` (a decoded server message) received at ``recv_ts_ns``; ``where`` names the
        line (``path:line``) in fault reports."""
        self.records += 1
        if not isinstance(msg, dict):
            self.not_objects += 1  # e.g. a frame that was not JSON, kept as a JSON string
            self.faults.append(f"{where}: message is not a JSON object: {str(msg)[:80]!r}")
            return
        for out in self.books.on_message(msg, recv_ts_ns):
            if isinstance(out, GapDetected):
                self.faults.append(f"{where}: {out.reason.value}: {out.detail}")

    def summary(self) -> list[str]:
        """Lines: the counters, then per instrument held at the end ``epoch``, ``seq``, levels, checksum."""
        s = self.books.stats
        resyncs = sum(s.resyncs_received.values())
        by_reason = ",".join(f"{r}:{n}" for r, n in sorted(s.resyncs_received.items()))
        lines = [
            f"bookcast stream: messages={self.records} snapshots={s.snapshots} deltas={s.deltas} "
            f"trades={s.trades} heartbeats={s.heartbeats_seen} deltas_before_snapshot={s.deltas_ignored} "
            f"checksum_mismatches={s.checksum_mismatches} gaps={s.gaps} bad_messages={s.bad_messages + self.not_objects} "
            f"resyncs_received={resyncs}{f' ({by_reason})' if by_reason else ''} faults={len(self.faults)}"
        ]
        for inst, local in sorted(self.books.books.items()):
            lines.append(f"  {inst:<48} epoch={local.epoch} seq={local.seq:<6} bids={local.book.level_count(Side.BID):<5} "
                         f"asks={local.book.level_count(Side.ASK):<5} checksum={local.book.checksum()}")
        return lines
