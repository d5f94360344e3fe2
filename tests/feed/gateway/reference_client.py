"""A client written from PROTOCOL.md alone (sections 3, 4, 6, 7 and 11), sharing no code with bookcast: no
``feed`` import, its own book, decimals and checksum. It is strict: whatever the protocol says a gateway never
does (a delta the client cannot apply, a first data message that is not a snapshot, a checksum that does not
match, a non-canonical decimal) raises ``ProtocolViolation`` naming the message."""
from __future__ import annotations

import copy
import zlib
from decimal import Decimal
from typing import Any

RESYNC_REASONS = {"slow_consumer", "upstream_gap", "epoch_change"}  # section 4
DATA = {"snapshot", "delta"}


class ProtocolViolation(AssertionError):
    pass


def canonical(text: object) -> Decimal:
    """Section 6: every price and size is a canonical decimal string."""
    if not isinstance(text, str):
        raise ProtocolViolation(f"decimal must be a string, got {text!r}")
    value = Decimal(text)
    if format(value.normalize(), "f") != text:
        raise ProtocolViolation(f"not canonical: {text!r}")
    return value


def checksum(bids: dict[Decimal, Decimal], asks: dict[Decimal, Decimal]) -> int:
    """Section 6: CRC-32 of the best 10 asks (lowest first) and best 10 bids (highest first)."""
    def side(levels: list[tuple[Decimal, Decimal]]) -> str:
        return ",".join(f"{format(p.normalize(), 'f')}:{format(s.normalize(), 'f')}" for p, s in levels[:10])
    text = side(sorted(asks.items())) + "|" + side(sorted(bids.items(), reverse=True))
    return zlib.crc32(text.encode()) & 0xFFFFFFFF


class Book:
    def __init__(self, epoch: str, seq: int, bids: dict[Decimal, Decimal], asks: dict[Decimal, Decimal]) -> None:
        self.epoch, self.seq, self.bids, self.asks = epoch, seq, bids, asks

    def levels(self) -> tuple[list[list[str]], list[list[str]]]:
        def wire(items: list[tuple[Decimal, Decimal]]) -> list[list[str]]:
            return [[format(p.normalize(), "f"), format(s.normalize(), "f")] for p, s in items]
        return wire(sorted(self.bids.items(), reverse=True)), wire(sorted(self.asks.items()))


class ReferenceClient:
    """One connection's view: ``subscribe`` records what was asked, ``on_message`` applies what came."""

    def __init__(self, books: dict[str, Book] | None = None) -> None:
        self.books: dict[str, Book] = copy.deepcopy(books) if books else {}
        self.awaiting: set[str] = set()  # the next data message for these must be a snapshot
        self.resuming: set[str] = set()
        self.applied = 0

    def subscribe(self, instruments: list[str], resume: dict[str, dict[str, Any]] | None = None) -> None:
        for inst in instruments:
            if resume and inst in resume and inst in self.books:
                self.resuming.add(inst)
            else:
                self.awaiting.add(inst)

    def on_message(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        inst = msg.get("instrument")
        if kind in DATA and not isinstance(msg.get("ts_send_ns"), int):
            raise ProtocolViolation(f"data message without ts_send_ns: {msg}")
        if kind == "subscribed":
            for i in msg["instruments"]:
                if i in self.resuming:
                    self.resuming.discard(i)
                    if not msg.get("recovered", {}).get(i):
                        self.books.pop(i, None)
                        self.awaiting.add(i)
        elif kind == "snapshot":
            bids = {canonical(p): canonical(s) for p, s in msg["bids"]}
            asks = {canonical(p): canonical(s) for p, s in msg["asks"]}
            if [p for p, _ in msg["bids"]] != [format(p, "f") for p in sorted(bids, reverse=True)]:
                raise ProtocolViolation(f"bids not best (highest) first: {msg}")
            if [p for p, _ in msg["asks"]] != [format(p, "f") for p in sorted(asks)]:
                raise ProtocolViolation(f"asks not best (lowest) first: {msg}")
            if checksum(bids, asks) != msg["checksum"]:
                raise ProtocolViolation(f"snapshot checksum {msg['checksum']} != {checksum(bids, asks)}: {msg}")
            self.books[inst] = Book(msg["epoch"], msg["seq"], bids, asks)
            self.awaiting.discard(inst)
            self.applied += 1
        elif kind == "delta":
            book = self.books.get(inst)
            if inst in self.awaiting or book is None:
                raise ProtocolViolation(f"delta before its snapshot: {msg}")
            if msg["epoch"] != book.epoch or msg["prev_seq"] != book.seq or msg["seq"] <= msg["prev_seq"]:
                raise ProtocolViolation(f"delta the client cannot apply (holds {book.epoch}/{book.seq}): {msg}")
            for side, price, size in msg["changes"]:
                levels = {"bid": book.bids, "ask": book.asks}[side]
                p, s = canonical(price), canonical(size)
                if s == 0:
                    levels.pop(p, None)
                else:
                    levels[p] = s
            book.seq = msg["seq"]
            if checksum(book.bids, book.asks) != msg["checksum"]:
                raise ProtocolViolation(f"delta checksum {msg['checksum']} != {checksum(book.bids, book.asks)}: {msg}")
            self.applied += 1
        elif kind == "resync":
            if msg.get("reason") not in RESYNC_REASONS:
                raise ProtocolViolation(f"unknown resync reason: {msg}")
            self.books.pop(inst, None)  # section 4: dropped on receipt, a snapshot follows
            self.awaiting.add(inst)
        elif kind == "heartbeat":
            for i, (epoch, seq) in msg.get("seqs", {}).items():
                book = self.books.get(i)
                if book is not None and i not in self.awaiting and (epoch, seq) != (book.epoch, book.seq):
                    raise ProtocolViolation(f"heartbeat {i} at {epoch}/{seq}, client holds {book.epoch}/{book.seq}")
        # instrument_status, unsubscribed, pong, error, unknown types: nothing to apply (sections 10, 11)
