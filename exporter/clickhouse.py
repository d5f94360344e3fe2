"""Raw latency samples and book events (tick history) in ClickHouse (adapter).

Two backends, one schema: chDB, ClickHouse embedded in this process, storing under a local path (the
default, ``DEFAULT_CHDB_PATH``); or a ClickHouse server through clickhouse-driver's native protocol
(``clickhouse://host:9000[/database]``). The schema keeps to types and engine clauses that ClickHouse
18.16 (Debian's server) and today's chDB both accept: no DateTime64 or LowCardinality; every time is a
UInt64 of ns since the Unix epoch; absent times are 0. Every row carries the ``run_id`` of the
``bookcast up`` run (``feed.runstate``) that produced it ("" outside a run).

Retention: ``open_backend(..., retention_s=N)`` sets a table TTL of N seconds on the receive time, where the
backend supports TTL (chDB does; ClickHouse before 19.6 does not, and the server keeps rows until its
operator drops partitions, one per day). Older stores are migrated on open: missing columns are added.

Inserts never block the caller: ``ClickHouseWriter.add`` appends to a bounded per-table buffer that a
writer thread drains in batches. When a buffer is full the row is dropped and counted
(``bookcast_clickhouse_rows_dropped_total``), never silently; ``stop()`` writes everything still buffered.

chDB holds its path exclusively: while a probe writes to a path, no other process can open it (the error
says so). Use a ClickHouse server to query while writing.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson
from prometheus_client import CollectorRegistry

from feed import metrics as prom
from feed.runstate import default_store

log = logging.getLogger("bookcast.clickhouse")

DEFAULT_CHDB_PATH = default_store()  # <bookcast home>/chdb, never the working directory
DATABASE = "bookcast"
_DAY_NS = 86_400 * 10**9


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    columns: tuple[tuple[str, str], ...]  # (name, ClickHouse type)
    order_by: str

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.columns)

    def create_sql(self) -> str:
        cols = ", ".join(f"{c} {t}" for c, t in self.columns)
        return (f"CREATE TABLE IF NOT EXISTS {DATABASE}.{self.name} ({cols}) ENGINE = MergeTree() "
                f"PARTITION BY intDiv(ts_recv_ns, {_DAY_NS}) ORDER BY ({self.order_by})")


# One row per delta the probe measured: its stamps as received (hops are differences, see exporter.latency).
# ts_write_ns: the gateway's socket-write stamp (0 when the gateway gives none); ts_read_ns: when the probe's
# own code got to the message (its reader delay is ts_read_ns - ts_recv_ns).
LATENCY_SAMPLES = Table("latency_samples", (
    ("ts_recv_ns", "UInt64"), ("region", "String"), ("instrument", "String"), ("epoch", "String"),
    ("seq", "UInt64"), ("ts_event_ns", "UInt64"), ("ts_ingest_ns", "UInt64"), ("ts_publish_ns", "UInt64"),
    ("ts_send_ns", "UInt64"), ("run_id", "String"), ("ts_write_ns", "UInt64"), ("ts_read_ns", "UInt64"),
), "ts_recv_ns, instrument")

# One row per book update received (snapshot or delta): the changes as parallel arrays of side, price, size
# (a snapshot lists every level; size "0" removes a level), decimals as canonical strings.
BOOK_EVENTS = Table("book_events", (
    ("ts_recv_ns", "UInt64"), ("region", "String"), ("instrument", "String"), ("epoch", "String"),
    ("seq", "UInt64"), ("prev_seq", "UInt64"), ("kind", "String"), ("checksum", "UInt32"),
    ("ts_event_ns", "UInt64"), ("ts_ingest_ns", "UInt64"), ("side", "Array(String)"), ("price", "Array(String)"),
    ("size", "Array(String)"), ("run_id", "String"),
), "instrument, ts_recv_ns")

# One row per host sample the probe takes (every update interval): CPU saturation, cumulative counters whose
# differences over a window give its share. cpu_some_us: /proc/pressure/cpu "some" total (µs some task
# waited for a CPU); runqueue_sum_s / runqueue_count: the eBPF exporter's bookcast_ebpf_runqueue_latency_seconds
# _sum and _count over every role (0 when it does not run); reader_wait_ns: the probe's event-loop thread's time
# runnable but waiting for a CPU (its /proc schedstat): how starved the reader is.
HOST_SAMPLES = Table("host_samples", (
    ("ts_recv_ns", "UInt64"), ("run_id", "String"), ("cpu_some_us", "UInt64"), ("runqueue_sum_s", "Float64"),
    ("runqueue_count", "UInt64"), ("reader_wait_ns", "UInt64"),
), "ts_recv_ns")

TABLES: dict[str, Table] = {t.name: t for t in (LATENCY_SAMPLES, BOOK_EVENTS, HOST_SAMPLES)}


class ClickHouseError(Exception):
    """A backend could not be opened or a statement failed; the message names the target."""


class Backend(Protocol):
    target: str

    def execute(self, sql: str) -> None: ...

    def insert(self, table: Table, rows: Sequence[tuple]) -> None: ...

    def query(self, sql: str) -> list[tuple]: ...

    def close(self) -> None: ...


def _chdb_holder(path: Path) -> str | None:
    """Who holds the chDB store at ``path`` (its ``status`` file is flock-ed by the holder), or None. Checked
    before opening, so a held store is one clear error rather than chDB's own exception on stderr."""
    import fcntl

    status = path / "status"
    try:
        with open(status, "r+b") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                text = f.read(200).decode(errors="replace")
                pid = next((line.split()[-1] for line in text.splitlines() if line.startswith("PID")), "?")
                return f"pid {pid}"
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError:
        return None
    return None


class ChdbBackend:
    """chDB session on ``path`` (created if missing). Thread-safe (one statement at a time)."""

    def __init__(self, path: str | Path) -> None:
        from chdb.session import Session

        self.target = f"chdb:{path}"
        Path(path).mkdir(parents=True, exist_ok=True)
        holder = _chdb_holder(Path(path))
        if holder is not None:
            raise ClickHouseError(f"the chDB store {path} is held by another process ({holder}); ask the probe "
                                  f"holding it (--probe URL), or wait until it stops")
        try:
            self._session = Session(str(path))
        except RuntimeError as exc:
            raise ClickHouseError(f"cannot open chDB at {path} (is a probe or another process using it?): "
                                  f"{exc}") from None
        self._lock = threading.Lock()

    def execute(self, sql: str) -> None:
        with self._lock:
            self._session.query(sql)

    def insert(self, table: Table, rows: Sequence[tuple]) -> None:
        names = table.column_names
        body = b"\n".join(orjson.dumps(dict(zip(names, row))) for row in rows)
        sql = f"INSERT INTO {DATABASE}.{table.name} ({', '.join(names)}) FORMAT JSONEachRow\n{body.decode()}"
        with self._lock:
            self._session.query(sql)

    def query(self, sql: str) -> list[tuple]:
        with self._lock:
            result = self._session.query(sql, "JSONCompactEachRow")
        text = result.bytes() if hasattr(result, "bytes") else bytes(result)
        return [tuple(orjson.loads(line)) for line in text.splitlines() if line.strip()]

    def close(self) -> None:
        with self._lock:
            self._session.close()


class ServerBackend:
    """A ClickHouse server at ``url`` (``clickhouse://[user[:password]@]host[:port][/database]``)."""

    def __init__(self, url: str) -> None:
        from clickhouse_driver import Client

        self.target = url
        self._client = Client.from_url(url)
        self._lock = threading.Lock()

    def _run(self, sql: str, rows: Sequence[tuple] | None = None) -> Any:
        from clickhouse_driver.errors import Error

        try:
            with self._lock:
                return self._client.execute(sql, rows) if rows is not None else self._client.execute(sql)
        except (Error, OSError, EOFError) as exc:
            raise ClickHouseError(f"ClickHouse at {self.target}: {exc}") from None

    def execute(self, sql: str) -> None:
        self._run(sql)

    def insert(self, table: Table, rows: Sequence[tuple]) -> None:
        self._run(f"INSERT INTO {DATABASE}.{table.name} ({', '.join(table.column_names)}) VALUES", list(rows))

    def query(self, sql: str) -> list[tuple]:
        return [tuple(r) for r in self._run(sql)]

    def close(self) -> None:
        with self._lock:
            self._client.disconnect()


def open_backend(target: str | Path | None, *, retention_s: float | None = None) -> Backend:
    """``clickhouse://...`` opens a server, anything else a chDB path (None: ``DEFAULT_CHDB_PATH``); the
    database and tables are created if missing, missing columns added, and with ``retention_s`` every
    table's TTL set to that many seconds of receive time (where the backend supports TTL).

    Raises:
        ClickHouseError: the path is held by another process, or the server cannot be reached.
    """
    text = str(target) if target is not None else str(default_store())
    backend: Backend = ServerBackend(text) if text.startswith("clickhouse://") else ChdbBackend(text)
    try:
        backend.execute(f"CREATE DATABASE IF NOT EXISTS {DATABASE}")
        for table in TABLES.values():
            backend.execute(table.create_sql())
            _add_missing_columns(backend, table)
            if retention_s:
                set_retention(backend, table, retention_s)
    except Exception:
        backend.close()
        raise
    return backend


def _add_missing_columns(backend: Backend, table: Table) -> None:
    have = {r[0] for r in backend.query(f"SELECT name FROM system.columns WHERE database = {sql_string(DATABASE)} "
                                        f"AND table = {sql_string(table.name)}")}
    for name, kind in table.columns:
        if name not in have:
            backend.execute(f"ALTER TABLE {DATABASE}.{table.name} ADD COLUMN {name} {kind}")


def set_retention(backend: Backend, table: Table, retention_s: float) -> bool:
    """Set ``table``'s TTL to ``retention_s`` seconds after each row's receive time. False (logged) where the
    backend has no TTL (ClickHouse before 19.6)."""
    ttl = f"toDateTime(intDiv(ts_recv_ns, 1000000000)) + toIntervalSecond({int(retention_s)})"
    try:
        backend.execute(f"ALTER TABLE {DATABASE}.{table.name} MODIFY TTL {ttl}")
    except Exception as exc:  # noqa: BLE001 - an old server: retention is its operator's job
        log.warning("no TTL on %s at %s (retention not enforced here): %s", table.name, backend.target,
                    str(exc).splitlines()[0][:200])
        return False
    return True


def sql_string(text: str) -> str:
    """``text`` as a ClickHouse string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class ClickHouseWriter:
    """Buffers rows per table and inserts them in batches from a writer thread.

    ``add`` never blocks: a full buffer (``max_buffer_rows`` per table) drops the row and counts it.
    The thread inserts up to ``batch_rows`` at a time, at least every ``flush_interval_s``. A failed insert
    is logged, counted in ``bookcast_clickhouse_write_errors_total`` (per batch), and its rows dropped and counted.
    ``stop()`` drains every buffer before returning (no data lost on a clean shutdown).
    """

    def __init__(self, backend: Backend, *, registry: CollectorRegistry | None = None,
                 max_buffer_rows: int = 200_000, batch_rows: int = 20_000, flush_interval_s: float = 1.0) -> None:
        self.backend = backend
        self.max_buffer_rows = max_buffer_rows
        self.batch_rows = batch_rows
        self.flush_interval_s = flush_interval_s
        self._buffers: dict[str, deque[tuple]] = {name: deque() for name in TABLES}
        built = {n: prom.build(n, registry) for n in ("bookcast_clickhouse_rows_written_total",
                                                       "bookcast_clickhouse_rows_dropped_total",
                                                       "bookcast_clickhouse_write_errors_total",
                                                       "bookcast_clickhouse_buffer_rows")}
        self._written = {t: built["bookcast_clickhouse_rows_written_total"].labels(t) for t in TABLES}
        self._dropped = {t: built["bookcast_clickhouse_rows_dropped_total"].labels(t) for t in TABLES}
        self._errors = {t: built["bookcast_clickhouse_write_errors_total"].labels(t) for t in TABLES}
        self._buffered = {t: built["bookcast_clickhouse_buffer_rows"].labels(t) for t in TABLES}
        self.dropped_rows = dict.fromkeys(TABLES, 0)
        self.written_rows = dict.fromkeys(TABLES, 0)
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="clickhouse-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, table: str, row: tuple) -> bool:
        """Queue one row (values in the table's column order). False if the buffer was full (dropped)."""
        buf = self._buffers[table]
        if len(buf) >= self.max_buffer_rows:
            self._dropped[table].inc()
            self.dropped_rows[table] += 1
            return False
        buf.append(row)
        if len(buf) >= self.batch_rows:
            self._wake.set()
        return True

    def stop(self) -> None:
        """Write everything buffered, then stop the thread (blocks until done)."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            stopping = self._stopping
            self._drain()
            if stopping:
                return

    def _drain(self) -> None:
        for name, buf in self._buffers.items():
            table = TABLES[name]
            while buf:
                batch = [buf.popleft() for _ in range(min(len(buf), self.batch_rows))]
                try:
                    self.backend.insert(table, batch)
                except Exception as exc:  # noqa: BLE001 - keep writing later batches; the loss is counted
                    self._errors[name].inc()
                    self._dropped[name].inc(len(batch))
                    self.dropped_rows[name] += len(batch)
                    log.error("insert of %d rows into %s failed on %s: %s", len(batch), name, self.backend.target, exc)
                    continue
                self._written[name].inc(len(batch))
                self.written_rows[name] += len(batch)
            self._buffered[name].set(len(buf))
