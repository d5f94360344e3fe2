"""Pure helpers for the gateway's state machines: a simulated ingest and the links an adapter would make."""
from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson

from feed import wire
from feed.book import L2Book
from feed.gateway import instrument as im
from feed.gateway.framing import frame_payload
from feed.gateway.instrument import InstrumentMachine
from feed.gateway.protocol import GatewayLimits
from feed.gateway.session import Link, Session, Unlink
from feed.model import Side, canonical

INST = "test:x"


class Ingest:
    """The ingest side of one instrument: its book of record, epoch and seq, and what it would publish."""

    def __init__(self, instrument: str = INST, epoch: str = "e1") -> None:
        self.instrument, self.epoch, self.seq = instrument, epoch, 0
        self.book = L2Book(instrument)
        self.book.apply_snapshot([(Decimal("0.50"), Decimal(10))], [(Decimal("0.55"), Decimal(7))])
        self.ts_ns = 1_000

    def delta_dict(self, *changes: tuple[str, str, str]) -> dict[str, Any]:
        self.book.apply_wire_changes(changes)
        prev_seq, self.seq = self.seq, self.seq + 1
        self.ts_ns += 1_000
        return {"type": "delta", "instrument": self.instrument, "epoch": self.epoch, "seq": self.seq,
                "prev_seq": prev_seq, "checksum": self.book.checksum(),
                # canonical decimals, as the real ingest publishes them (PROTOCOL.md section 6)
                "changes": [[side, canonical(Decimal(price)), canonical(Decimal(size))] for side, price, size in changes],
                "ts_ingest_ns": self.ts_ns, "ts_publish_ns": self.ts_ns + 10}

    def delta(self, *changes: tuple[str, str, str]) -> bytes:
        return orjson.dumps(self.delta_dict(*changes))

    def snapshot(self, **fields: Any) -> bytes:
        msg = wire.snapshot_message(self.instrument, self.epoch, self.seq, self.book, ts_event_ns=None,
                                    ts_ingest_ns=self.ts_ns, ts_publish_ns=self.ts_ns + 10)
        return orjson.dumps(msg | fields)

    def restart(self, epoch: str) -> None:
        self.epoch, self.seq = epoch, 0


class Books:
    """``feed.gateway.session.Books`` over a dict of machines (plus instruments known from a directory)."""

    def __init__(self, *machines: InstrumentMachine, known: tuple[str, ...] = ()) -> None:
        self.machines = {m.instrument: m for m in machines}
        self.directory = set(known)

    def known(self, instrument: str) -> bool:
        return instrument in self.directory or instrument in self.machines

    def get(self, instrument: str) -> InstrumentMachine | None:
        return self.machines.get(instrument)


class Links:
    """What ``feed.gateway.app.Gateway`` does with the machines' and sessions' actions, without I/O:
    snapshot requests are remembered until the test answers them, conflation windows until it flushes."""

    def __init__(self, machine: InstrumentMachine) -> None:
        self.machine = machine
        self.books = Books(machine)
        self.subscribers: dict[Session, int] = {}
        self.snapshot_requested = False
        self.actions: list[Any] = []
        self.windows: set[Session] = set()

    def execute(self, actions: list[im.Action], now_ns: int) -> None:
        inst = self.machine.instrument
        self.actions += actions
        for action in actions:
            if isinstance(action, im.FanOut):
                for session, conflate_ms in self.subscribers.items():
                    if conflate_ms:
                        if session.conflate(inst, action.delta, conflate_ms, now_ns) is not None:
                            self.windows.add(session)
                    else:
                        session.push(action.item, now_ns)
            elif isinstance(action, im.Resync):
                for session in list(self.subscribers):
                    session.resync(inst, action.reason, now_ns)
            elif isinstance(action, im.RequestSnapshot):
                self.snapshot_requested = True
            elif isinstance(action, im.ReleaseParked):
                for session in list(self.subscribers):
                    session.on_instrument_ready(inst, now_ns)
            elif isinstance(action, im.StatusChanged):
                for session in list(self.subscribers):
                    session.push(action.item, now_ns)

    def link(self, session: Session, actions: list) -> None:
        for action in actions:
            if isinstance(action, Link) and action.book:
                self.subscribers[session] = action.conflate_ms
            elif isinstance(action, Unlink):
                self.subscribers.pop(session, None)

    def flush_windows(self, now_ns: int) -> None:
        for session in list(self.windows):
            session.flush_window(self.machine.instrument, now_ns)
        self.windows.clear()

    def new_session(self, now_ns: int, limits: GatewayLimits | None = None, **kw: Any) -> Session:
        return Session(self.books, limits or GatewayLimits(), now_ns, **kw)


def messages(frames: list[bytes]) -> list[dict[str, Any]]:
    """The JSON objects carried by a session's frames."""
    return [orjson.loads(frame_payload(f)) for f in frames]


def book_levels(book: L2Book) -> tuple[list, list]:
    return book.wire_levels(Side.BID), book.wire_levels(Side.ASK)
