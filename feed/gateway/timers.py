"""A timer wheel for the gateway's per-connection timers (pure: times passed in, no clock, no I/O).

Each connection has one timer: its next heartbeat (PROTOCOL.md section 4: a connection silent for
``heartbeat_interval_s``) or its token's expiry (section 8), whichever is first. The wheel files it under
the first slot (``slot_ns`` wide) that starts at or after its due time, and ``due(now_ns)`` hands back
every timer of the slots that have started. So each connection's heartbeat goes out at its own phase,
at most one slot late, and a ticker that wakes once per slot sends each slot's share of them: no pass
over every connection, and no burst of every connection whose timer fell in a coarse tick (a ticker at a
quarter of the interval sent a quarter of all heartbeats at once; ``python -m loadtest.bench.idlemem``).

A timer is never early: ``due`` returns an item only once ``now_ns`` >= the due time it was added with.
Items are not cancelled: the owner checks, when a timer fires, whether there is anything to do
(something was sent since, the connection is gone) and files the next one (hashed timing wheels,
Varghese & Lauck 1987, with one bucket per slot and lazy cancellation).
"""
from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class TimerWheel(Generic[T]):
    """Items filed by the slot of their due time (ns since the Unix epoch).

    Args:
        slot_ns: slot width, > 0.
        now_ns: the current time: slots before it are never filled (an item due in the past goes into
            the current slot, the first ``due`` hands it back).

    Raises:
        ValueError: ``slot_ns`` <= 0.
    """

    __slots__ = ("slot_ns", "slots", "cursor", "size")

    def __init__(self, slot_ns: int, now_ns: int) -> None:
        if slot_ns <= 0:
            raise ValueError(f"slot_ns must be > 0, got {slot_ns}")
        self.slot_ns = slot_ns
        self.slots: dict[int, list[T]] = {}
        self.cursor = now_ns // slot_ns  # the first slot ``due`` has not handed back yet
        self.size = 0

    def add(self, item: T, due_ns: int) -> None:
        """File ``item`` to come back from the first ``due(now_ns)`` with ``now_ns`` >= ``due_ns``."""
        slot = -(-due_ns // self.slot_ns)  # the first slot starting at or after due_ns
        if slot < self.cursor:
            slot = self.cursor
        bucket = self.slots.get(slot)
        if bucket is None:
            self.slots[slot] = [item]
        else:
            bucket.append(item)
        self.size += 1

    def add_all(self, items: list[T], due_ns: int) -> None:
        """File every one of ``items`` as ``add(item, due_ns)`` would (one slot lookup for all of them)."""
        if not items:
            return
        slot = -(-due_ns // self.slot_ns)
        if slot < self.cursor:
            slot = self.cursor
        bucket = self.slots.get(slot)
        if bucket is None:
            self.slots[slot] = list(items)
        else:
            bucket.extend(items)
        self.size += len(items)

    def due(self, now_ns: int) -> list[T]:
        """Every item of the slots that start at or before ``now_ns``, in slot order (then filing order)."""
        last = now_ns // self.slot_ns
        slots = self.slots
        out: list[T] = []
        slot = self.cursor
        if last - slot > len(slots):  # far behind (a long stall): visit the filled slots, not every slot
            for key in sorted(k for k in slots if k <= last):
                out.extend(slots.pop(key))
        else:
            while slot <= last:
                bucket = slots.pop(slot, None)
                if bucket is not None:
                    out.extend(bucket)
                slot += 1
        if last + 1 > self.cursor:
            self.cursor = last + 1
        self.size -= len(out)
        return out

    def __len__(self) -> int:
        return self.size


def slice_gap_ns(due: int, slice_size: int, slot_ns: int) -> int:
    """The pause between the slices of one timer pass that spreads ``due`` timers, ``slice_size`` at a time,
    over one slot (``slot_ns``), or 0 when they fit in one slice (nothing to spread).

    A pass that hands the loop back only for one iteration between slices (``asyncio.sleep(0)``) still runs
    every slice of the slot within a few milliseconds: a delta that needs several loop iterations (the NATS
    read, the subscription's task, the fan-out) meets a slice at each of them. Spread over the slot, a
    heartbeat goes out at most one more slot late, and each slice's heartbeats are re-filed from the time
    they were sent, so the next interval's load is as even as this one's ended up.

    Raises:
        ValueError: ``slice_size`` or ``slot_ns`` <= 0.
    """
    if slice_size <= 0 or slot_ns <= 0:
        raise ValueError(f"slice_size and slot_ns must be > 0, got {slice_size} and {slot_ns}")
    slices = -(-due // slice_size)
    return slot_ns // slices if slices > 1 else 0
