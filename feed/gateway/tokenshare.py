"""Per-token caps held across the gateway's workers: one table of counts in a shared file (mmap).

With ``--workers N`` every worker admits connections on its own, so a count kept in one worker's memory
lets a token hold N times its cap. Here the supervisor creates one file (``create``), each worker maps it
(``SharedTokenUsage``, the same methods as ``feed.auth.TokenUsage``) and every check-and-take is done under
an exclusive ``flock`` of the file, so two workers never both admit the last connection a cap allows.
The lock is held for one table update (microseconds); connect and subscribe are rare next to fan-out.

Layout (little-endian): a 16-byte header (``b"BCTOKUSE"``, slots u32, workers u32), then ``slots`` rows
of ``key u64`` (the token id's 64 bits, 0 = empty) and, per worker, ``connections u32, subscriptions u32``.
A token's count is the sum over the workers' columns; a row is an open-addressing hash table entry
(linear probing, deleted by backward shift, so no tombstones pile up).

A worker that dies (SIGKILL, OOM) cannot give its counts back: the supervisor calls ``release_worker``
with its column before starting the replacement, which zeroes that column and rebuilds the table. A
worker killed while holding the lock releases it (the kernel drops a dead process's ``flock``).
"""
from __future__ import annotations

import fcntl
import logging
import mmap
import os
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from feed.auth import TokenLimits

log = logging.getLogger("bookcast.gateway.tokens")

MAGIC = b"BCTOKUSE"
_HEADER = struct.Struct("<8sII")
_KEY = struct.Struct("<Q")
_COUNTS = struct.Struct("<II")
DEFAULT_SLOTS = 65536  # distinct tokens connected at once across the workers (~2 MB with 2 workers)


def create(path: Path | str, workers: int, slots: int = DEFAULT_SLOTS) -> Path:
    """Create (or reset) the shared table at ``path`` for ``workers`` columns (mode 0600)."""
    if workers < 1 or slots < 2:
        raise ValueError(f"need workers >= 1 and slots >= 2, got {workers}, {slots}")
    path = Path(path)
    size = _HEADER.size + slots * (_KEY.size + workers * _COUNTS.size)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, _HEADER.pack(MAGIC, slots, workers), 0)
    finally:
        os.close(fd)
    return path


def _key_of(token_id: str) -> int:
    """The table key of a ``feed.auth.token_id_of`` id (16 hex digits); never 0 (the empty mark)."""
    try:
        return int(token_id[:16], 16) or 1
    except ValueError:
        import hashlib

        return int.from_bytes(hashlib.sha256(token_id.encode()).digest()[:8], "little") or 1


class _Table:
    """The mapped file: rows, probing and deletion (callers hold the lock)."""

    def __init__(self, path: Path | str) -> None:
        self.fd = os.open(path, os.O_RDWR)
        try:
            self.mm = mmap.mmap(self.fd, 0)
        except Exception:
            os.close(self.fd)
            raise
        magic, self.slots, self.workers = _HEADER.unpack_from(self.mm, 0)
        if magic != MAGIC:
            self.close()
            raise ValueError(f"{path} is not a token usage table")
        self.row_size = _KEY.size + self.workers * _COUNTS.size

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)

    @contextmanager
    def locked(self) -> Iterator[None]:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _off(self, row: int) -> int:
        return _HEADER.size + row * self.row_size

    def key(self, row: int) -> int:
        return _KEY.unpack_from(self.mm, self._off(row))[0]

    def counts(self, row: int, worker: int) -> tuple[int, int]:
        return _COUNTS.unpack_from(self.mm, self._off(row) + _KEY.size + worker * _COUNTS.size)

    def set_counts(self, row: int, worker: int, connections: int, subscriptions: int) -> None:
        _COUNTS.pack_into(self.mm, self._off(row) + _KEY.size + worker * _COUNTS.size, connections, subscriptions)

    def totals(self, row: int) -> tuple[int, int]:
        conns = subs = 0
        for w in range(self.workers):
            c, s = self.counts(row, w)
            conns += c
            subs += s
        return conns, subs

    def find(self, key: int) -> tuple[int | None, bool]:
        """(row, found): the key's row, or the empty row where it would go (None when the table is full)."""
        row = key % self.slots
        for _ in range(self.slots):
            k = self.key(row)
            if k == key:
                return row, True
            if k == 0:
                return row, False
            row = (row + 1) % self.slots
        return None, False

    def insert(self, row: int, key: int) -> None:
        off = self._off(row)
        self.mm[off:off + self.row_size] = bytes(self.row_size)
        _KEY.pack_into(self.mm, off, key)

    def delete(self, row: int) -> None:
        """Empty ``row`` and shift later rows of its probe run back (Knuth's algorithm R for linear probing)."""
        n = self.slots
        hole = row
        self.mm[self._off(hole):self._off(hole) + self.row_size] = bytes(self.row_size)
        j = hole
        while True:
            j = (j + 1) % n
            k = self.key(j)
            if k == 0:
                return
            home = k % n
            # the entry at j may move into the hole unless its home lies cyclically in (hole, j]
            if (hole < j and hole < home <= j) or (j < hole and (home > hole or home <= j)):
                continue
            src = self._off(j)
            self.mm[self._off(hole):self._off(hole) + self.row_size] = self.mm[src:src + self.row_size]
            self.mm[src:src + self.row_size] = bytes(self.row_size)
            hole = j

    def rows(self) -> list[int]:
        """The rows in use (one C-level pass over the keys)."""
        start = _HEADER.size
        keys = struct.Struct(f"<Q{self.row_size - _KEY.size}x").iter_unpack(
            self.mm[start:start + self.slots * self.row_size])
        return [row for row, (k,) in enumerate(keys) if k]


class SharedTokenUsage:
    """``feed.auth.TokenUsage`` over the shared table: worker ``worker``'s column of the file at ``path``.

    ``try_connect``/``try_subscribe`` return False (and change nothing) when the token's total over all
    workers would pass its cap, or when the table is full (logged once: more distinct tokens connected at
    once than ``slots``); ``disconnect``/``unsubscribe`` give back this worker's share only.

    Raises:
        ValueError: ``path`` is not a table made by ``create``, or ``worker`` is not one of its columns.
        OSError: the file cannot be opened.
    """

    def __init__(self, path: Path | str, worker: int, limits: TokenLimits) -> None:
        self.limits = limits
        self.path = Path(path)
        self._t = _Table(path)
        if not 0 <= worker < self._t.workers:
            self._t.close()
            raise ValueError(f"worker {worker} is not a column of {path} (workers 0..{self._t.workers - 1})")
        self.worker = worker
        self._full_logged = False

    def close(self) -> None:
        self._t.close()

    def _row(self, token_id: str, *, create: bool) -> int | None:
        key = _key_of(token_id)
        row, found = self._t.find(key)
        if found:
            return row
        if row is None:
            if not self._full_logged:
                log.warning("token usage table %s is full (%d tokens): refusing new tokens' connections",
                            self.path, self._t.slots)
                self._full_logged = True
            return None
        if not create:
            return None
        self._t.insert(row, key)
        return row

    def try_connect(self, token_id: str) -> bool:
        cap = self.limits.max_connections_per_token
        with self._t.locked():
            row = self._row(token_id, create=True)
            if row is None:
                return False
            if cap and self._t.totals(row)[0] >= cap:
                self._drop_if_empty(row)
                return False
            c, s = self._t.counts(row, self.worker)
            self._t.set_counts(row, self.worker, c + 1, s)
            return True

    def disconnect(self, token_id: str, subscriptions: int = 0) -> None:
        """One connection of ``token_id`` on this worker closed, holding ``subscriptions``."""
        self._give_back(token_id, 1, subscriptions)

    def try_subscribe(self, token_id: str, new: int) -> bool:
        cap = self.limits.max_subscriptions_per_token
        if not new:
            return True
        with self._t.locked():
            row = self._row(token_id, create=True)
            if row is None:
                return False
            if cap and self._t.totals(row)[1] + new > cap:
                self._drop_if_empty(row)
                return False
            c, s = self._t.counts(row, self.worker)
            self._t.set_counts(row, self.worker, c, s + new)
            return True

    def unsubscribe(self, token_id: str, n: int) -> None:
        self._give_back(token_id, 0, n)

    def _give_back(self, token_id: str, connections: int, subscriptions: int) -> None:
        with self._t.locked():
            row = self._row(token_id, create=False)
            if row is None:
                return
            c, s = self._t.counts(row, self.worker)
            self._t.set_counts(row, self.worker, max(0, c - connections), max(0, s - subscriptions))
            self._drop_if_empty(row)

    def _drop_if_empty(self, row: int) -> None:
        if self._t.totals(row) == (0, 0):
            self._t.delete(row)

    def totals(self, token_id: str) -> tuple[int, int]:
        """(connections, subscriptions) of ``token_id`` over all workers."""
        with self._t.locked():
            row = self._row(token_id, create=False)
            return (0, 0) if row is None else self._t.totals(row)

    @property
    def connections(self) -> dict[str, int]:
        """Open connections per token over all workers, keyed by the token id's 16 hex digits (for status)."""
        with self._t.locked():
            out = {}
            for row in self._t.rows():
                conns = self._t.totals(row)[0]
                if conns:
                    out[f"{self._t.key(row):016x}"] = conns
            return out


def release_worker(path: Path | str, worker: int) -> int:
    """Give back every count of a dead worker's column ``worker`` (the supervisor, before the replacement
    starts); returns how many tokens it held. The table is rebuilt without the rows that drop to zero."""
    t = _Table(path)
    try:
        with t.locked():
            live: list[tuple[int, list[tuple[int, int]]]] = []
            held = 0
            for row in t.rows():
                cols = [t.counts(row, w) for w in range(t.workers)]
                if cols[worker] != (0, 0):
                    held += 1
                cols[worker] = (0, 0)
                if any(c or s for c, s in cols):
                    live.append((t.key(row), cols))
            start = _HEADER.size
            t.mm[start:start + t.slots * t.row_size] = bytes(t.slots * t.row_size)
            for key, cols in live:
                row, _ = t.find(key)
                t.insert(row, key)
                for w, (c, s) in enumerate(cols):
                    t.set_counts(row, w, c, s)
            return held
    finally:
        t.close()
