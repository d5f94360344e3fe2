"""``bookcast latency report``: per-hop tail latency of one run from the probe's samples, and who owns the tail.

Reads the ``latency_samples`` (``exporter.clickhouse``) of one run (default: the current or last ``bookcast up``
run, from its state file, ``feed.runstate``) received in the last ``--since``, optionally one instrument and
one region. Prints the verdict (``exporter.verdict``) in one sentence first, then per hop the count, the
share of clock-skewed samples and the estimated clock offset, p50/p99/p99.9/p99.99/max over the samples
that are latencies (skewed ones are never printed as a latency), the slowest messages with their hop
breakdown, the host's CPU saturation, and what to check next.

Where it reads from, in order: ``--probe URL``; ``--clickhouse TARGET``; else the state file: the running
probe (it holds the embedded chDB store) or, once the stack stopped, the store itself.

Exit codes: 0 report printed, 1 store unreadable or no samples in the window, 2 bad usage or an unknown
instrument.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from exporter.clickhouse import DATABASE, HOST_SAMPLES, LATENCY_SAMPLES, Backend, ClickHouseError, open_backend, sql_string
from exporter.latency import IMPLAUSIBLE_NS, PATH_HOPS, Hop
from feed.runstate import parse_duration_s  # noqa: F401 - re-exported (the probe and tests use it from here)

if TYPE_CHECKING:  # numpy and the verdict load when a report is built, not with the command line
    import numpy as np

    from exporter.verdict import HostContext, Params, Verdict

BUDGET_MS = 100.0  # exporter.verdict.BUDGET_NS, for the command line without importing numpy

EXAMPLES = """examples:
  bookcast why                                              # the current run's verdict, in one command
  bookcast latency report                                   # last 10 minutes of the current (or last) run
  bookcast latency report --since 1h --instrument coinbase:SKL-USD
  bookcast latency report --run all --since 1d              # every run in the store
  bookcast latency report --since 30m --format json --clickhouse clickhouse://127.0.0.1:9000
  bookcast latency report --probe http://127.0.0.1:9475     # ask that probe (it holds its chDB store)

Without --probe or --clickhouse it reads the state file `bookcast up` writes ($BOOKCAST_HOME/run.json,
default <checkout>/.bookcast): the running probe, or the stopped run's store."""

REPORT_QUANTILES: tuple[float, ...] = (0.5, 0.99, 0.999, 0.9999)
HOST_MARGIN_NS = 3 * 10**9  # host samples this far outside the window still describe it
MAX_ROWS = 200_000  # newest samples a report reads from the window (the count of all is reported)
_COLUMNS = ("ts_recv_ns", "region", "instrument", "epoch", "seq", "ts_event_ns", "ts_ingest_ns", "ts_publish_ns",
            "ts_send_ns", "ts_write_ns", "ts_read_ns")
TABLE_HOPS: tuple[Hop, ...] = (*PATH_HOPS, Hop.CLIENT, Hop.E2E)


class UnknownInstrument(Exception):
    """The instrument has no sample in the store at all (nor in the run's listing)."""


@dataclass(frozen=True, slots=True)
class HopStats:
    """``count``: samples carrying the hop; ``skewed``: how many are clock skew (apart from the quantiles,
    which cover the ``count - skewed`` latencies); ``offset_ns``: estimated clock offset (0: none seen)."""

    count: int
    skewed: int
    offset_ns: float
    quantiles_ns: dict[float, int]
    max_ns: int

    @property
    def skew_share(self) -> float:
        return self.skewed / self.count if self.count else 0.0


@dataclass(frozen=True, slots=True)
class Report:
    since_s: float
    from_ns: int
    to_ns: int
    source: str
    run_id: str | None
    instrument: str | None
    region: str | None
    samples: int          # every sample in the window
    read: int             # the newest ones read (at most MAX_ROWS)
    hops: dict[Hop, HopStats]
    slowest: list[dict[str, Any]]
    verdict: Verdict
    newest_ns: int = 0    # the newest sample of the run (and region) in the store, in or after the window

    def to_json(self) -> dict[str, Any]:
        return {
            "since_s": self.since_s, "from_ns": self.from_ns, "to_ns": self.to_ns, "source": self.source,
            "run_id": self.run_id, "instrument": self.instrument, "region": self.region, "samples": self.samples,
            "read": self.read, "newest_ns": self.newest_ns,
            "hops": {h.value: {"count": s.count, "skewed": s.skewed, "skew_share": s.skew_share,
                               "clock_offset_ns": s.offset_ns,
                               **{f"p{q * 100:g}_ns": v for q, v in s.quantiles_ns.items()}, "max_ns": s.max_ns}
                     for h, s in self.hops.items()},
            "slowest": self.slowest,
            "verdict": self.verdict.to_json(),
        }


def hop_arrays(rows: list[tuple]) -> tuple[dict[Hop, np.ndarray], np.ndarray]:
    """Signed hop values (float ns, NaN where absent) of ``latency_samples`` rows in ``_COLUMNS`` order, and
    the receive times (int ns)."""
    import numpy as np

    if not rows:
        empty = np.zeros(0)
        return {h: empty for h in TABLE_HOPS}, np.zeros(0, dtype=np.int64)
    cols = list(zip(*rows))
    a = {name: np.asarray(cols[i], dtype=np.int64) for i, name in enumerate(_COLUMNS)
         if name.startswith("ts_") or name == "seq"}
    recv, event, ingest, publish, send = a["ts_recv_ns"], a["ts_event_ns"], a["ts_ingest_ns"], a["ts_publish_ns"], a["ts_send_ns"]
    write, read = a["ts_write_ns"], a["ts_read_ns"]
    nan = np.nan
    has_event, has_write, has_read = event > 0, write > 0, read > 0
    out = {
        Hop.UPSTREAM: np.where(has_event, (ingest - event).astype(float), nan),
        Hop.INGEST: (publish - ingest).astype(float),
        Hop.NATS_GATEWAY: (send - publish).astype(float),
        Hop.GATEWAY_QUEUE: np.where(has_write, (write - send).astype(float), nan),
        Hop.NETWORK: (recv - np.where(has_write, write, send)).astype(float),
        Hop.READER: np.where(has_read, (read - recv).astype(float), nan),
        Hop.CLIENT: (recv - send).astype(float),
        Hop.E2E: (np.where(has_read, read, recv) - np.where(has_event, event, ingest)).astype(float),
    }
    return out, recv


def hop_stats(values: np.ndarray) -> HopStats:
    import numpy as np

    from exporter.verdict import clock_offset_ns

    present = values[~np.isnan(values)]
    if not present.size:
        return HopStats(0, 0, 0.0, {q: 0 for q in REPORT_QUANTILES}, 0)
    bad = (present < 0) | (present > IMPLAUSIBLE_NS)
    good = present[~bad]
    offset = clock_offset_ns(present)
    if not good.size:
        return HopStats(int(present.size), int(bad.sum()), offset, {q: 0 for q in REPORT_QUANTILES}, 0)
    qs = np.quantile(good, REPORT_QUANTILES, method="inverted_cdf")
    return HopStats(int(present.size), int(bad.sum()), offset, {q: int(v) for q, v in zip(REPORT_QUANTILES, qs)},
                    int(good.max()))


def host_context(backend: Backend, where: str) -> HostContext:
    """CPU saturation over the window from the probe's ``host_samples`` (first and last sample's counters)."""
    from exporter.verdict import HostContext

    table = f"{DATABASE}.{HOST_SAMPLES.name}"
    rows = backend.query(f"SELECT min(ts_recv_ns), max(ts_recv_ns), argMin(cpu_some_us, ts_recv_ns), "
                         f"argMax(cpu_some_us, ts_recv_ns), argMin(runqueue_sum_s, ts_recv_ns), "
                         f"argMax(runqueue_sum_s, ts_recv_ns), argMin(runqueue_count, ts_recv_ns), "
                         f"argMax(runqueue_count, ts_recv_ns), count(), argMin(reader_wait_ns, ts_recv_ns), "
                         f"argMax(reader_wait_ns, ts_recv_ns) FROM {table} WHERE {where}")
    if not rows or int(rows[0][8]) < 2:
        return HostContext()
    t0, t1, s0, s1, q0, q1, c0, c1, _, w0, w1 = rows[0]
    span_us = (int(t1) - int(t0)) / 1e3
    stall = (int(s1) - int(s0)) / span_us if span_us > 0 and int(s1) > 0 else None
    runq = (float(q1) - float(q0)) / (int(c1) - int(c0)) if int(c1) > int(c0) else None
    wait = (int(w1) - int(w0)) / 1e3 / span_us if span_us > 0 and int(w1) > 0 else None
    source = "ebpf" if runq is not None else ("psi" if stall is not None else None)
    clamp = lambda x: None if x is None else min(max(x, 0.0), 1.0)  # noqa: E731
    return HostContext(source, clamp(stall), runq, clamp(wait))


def latest_run(backend: Backend) -> str | None:
    """The newest run id in the store (ids sort by start time), None when the store holds no run."""
    rows = backend.query(f"SELECT max(run_id) FROM {DATABASE}.{LATENCY_SAMPLES.name}")
    return (rows[0][0] or None) if rows else None


def build_report(backend: Backend, *, since_s: float, now_ns: int, run_id: str | None = None,
                 instrument: str | None = None, region: str | None = None, top: int = 10,
                 params: Params | None = None) -> Report:
    """Read the samples of ``run_id`` (None: every run) received in ``[now_ns - since_s, now_ns]`` and judge.

    Raises:
        ClickHouseError: a query failed.
        UnknownInstrument: ``instrument`` has no sample in the store at all.
    """
    from exporter.verdict import Params, judge

    params = params or Params()
    from_ns = now_ns - int(since_s * 1e9)
    scope = ""
    if run_id:
        scope += f" AND run_id = {sql_string(run_id)}"
    if region:
        scope += f" AND region = {sql_string(region)}"
    where = f"ts_recv_ns >= {from_ns} AND ts_recv_ns <= {now_ns}{scope}"
    if instrument:
        where += f" AND instrument = {sql_string(instrument)}"
    table = f"{DATABASE}.{LATENCY_SAMPLES.name}"
    ((samples,),) = backend.query(f"SELECT count() FROM {table} WHERE {where}")
    samples = int(samples)
    ((newest_ns,),) = backend.query(f"SELECT max(ts_recv_ns) FROM {table} WHERE ts_recv_ns >= {from_ns}{scope}")
    if instrument and not samples:
        ((anywhere,),) = backend.query(f"SELECT count() FROM {table} WHERE instrument = {sql_string(instrument)}")
        if not int(anywhere):
            raise UnknownInstrument(instrument)
    rows = backend.query(f"SELECT {', '.join(_COLUMNS)} FROM {table} WHERE {where} "
                         f"ORDER BY ts_recv_ns DESC LIMIT {MAX_ROWS}") if samples else []
    values, recv = hop_arrays(rows)
    hops = {h: hop_stats(values[h]) for h in TABLE_HOPS}
    # the host samples bracketing the window (the probe takes one every few seconds)
    host_where = (f"ts_recv_ns >= {from_ns - HOST_MARGIN_NS} AND ts_recv_ns <= {now_ns + HOST_MARGIN_NS}"
                  + (f" AND run_id = {sql_string(run_id)}" if run_id else ""))
    host = host_context(backend, host_where)
    verdict = judge({h: values[h] for h in PATH_HOPS}, recv // 10**9, host, params)
    slowest = _slowest(rows, values, verdict, top)
    return Report(since_s, from_ns, now_ns, backend.target, run_id, instrument, region, samples, len(rows), hops,
                  slowest, verdict, int(newest_ns or 0))


def _slowest(rows: list[tuple], values: dict[Hop, np.ndarray], verdict: Verdict, top: int) -> list[dict[str, Any]]:
    """The ``top`` messages with the largest measured total (skewed hops shown as null, never as latency)."""
    import numpy as np

    if not rows or top <= 0:
        return []
    measured = [h for h, s in verdict.skew.items() if s.measured] or [Hop.INGEST, Hop.NATS_GATEWAY, Hop.NETWORK]
    total = np.zeros(len(rows))
    for h in measured:
        v = values[h]
        total += np.where(np.isnan(v) | (v < 0) | (v > IMPLAUSIBLE_NS), 0.0, v)
    out = []
    for i in np.argsort(-total, kind="stable")[:top]:
        region, inst, epoch, seq = rows[i][1], rows[i][2], rows[i][3], rows[i][4]
        entry: dict[str, Any] = {"region": region, "instrument": inst, "epoch": epoch, "seq": seq,
                                 "ts_recv_ns": rows[i][0], "measured_ns": int(total[i])}
        for h in TABLE_HOPS:
            v = values[h][i]
            entry[f"{h.value}_ns"] = None if np.isnan(v) or v < 0 or v > IMPLAUSIBLE_NS else int(v)
        out.append(entry)
    return out


def _ms(ns: float | None, width: int = 10) -> str:
    return f"{'-':>{width}}" if ns is None else f"{ns / 1e6:{width}.3f}"


def format_text(report: Report) -> str:
    """For people: the verdict sentence first, then the hop table (ms), skew, the slowest messages, the
    host, and what to check next."""
    v = report.verdict
    scope = (f"run {report.run_id or 'all'}, instrument {report.instrument or 'all'}, "
             f"region {report.region or 'all'}")
    read = f" (newest {report.read} read)" if report.read < report.samples else ""
    lines = [f"verdict: {v.text}", "",
             f"bookcast latency report: last {report.since_s:g} s, {report.samples} samples{read}, {scope}, "
             f"from {report.source}", "",
             f"{'hop (ms)':<14}{'count':>9}{'skewed':>8}{'offset':>9}"
             + "".join(f"{'p' + format(q * 100, 'g'):>11}" for q in REPORT_QUANTILES) + f"{'max':>11}"]
    for hop, s in report.hops.items():
        if not s.count:
            lines.append(f"{hop.value:<14}{0:>9}{'':>8}{'':>9}  (no sample carries this hop)")
            continue
        skew = f"{s.skew_share:.0%}" if s.skewed else "0"
        offset = f"{s.offset_ns / 1e6:.1f}" if s.offset_ns else "-"
        lines.append(f"{hop.value:<14}{s.count:>9}{skew:>8}{offset:>9}"
                     + "".join(f" {_ms(s.quantiles_ns[q])}" for q in REPORT_QUANTILES) + f" {_ms(s.max_ns)}")
    lines.append("  (quantiles cover latencies only; skewed = negative or > 1 h, a clock's doing, counted apart;"
                 " offset = estimated clock offset, ms)")
    if report.slowest:
        shown = PATH_HOPS
        lines += ["", f"slowest {len(report.slowest)} messages (ms; measured = the hops the verdict uses; "
                      f"'-' = not measured or clock skew):",
                  f"  {'measured':>10} " + " ".join(f"{h.value[:10]:>10}" for h in shown) + "  instrument seq region"]
        for r in report.slowest:
            lines.append(f"  {_ms(r['measured_ns'])} " + " ".join(_ms(r[f"{h.value}_ns"]) for h in shown)
                         + f"  {r['instrument']} {r['seq']} {r['region']}")
    lines += ["", v.host.describe()]
    if v.next_steps:
        lines += ["", "check next:"] + [f"  - {step}" for step in v.next_steps]
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------------
def add_report_arguments(r: argparse.ArgumentParser, *, since: str) -> None:
    r.add_argument("--since", default=since, help="window ending now: 30s, 10m, 2h, 1d (default %(default)s)")
    r.add_argument("--run", help="run id, or 'all' (default: the current or last `bookcast up` run)")
    r.add_argument("--instrument", help="only this instrument")
    r.add_argument("--region", help="only this probe region")
    r.add_argument("--top", type=int, default=10, help="slowest messages to list (default %(default)s)")
    r.add_argument("--budget-ms", type=float, default=BUDGET_MS,
                   help="p99 of the measured path a healthy stack stays within (default %(default)s)")
    r.add_argument("--format", choices=["text", "json"], default="text", help="output format (default %(default)s)")
    r.add_argument("--clickhouse", "--clickhouse-url", dest="clickhouse", default=None,
                   help="chDB path, or clickhouse://host:9000 for a server (default: the run's store)")
    r.add_argument("--probe", metavar="URL",
                   help="ask a running probe (http://host:port) for the report from the store it holds")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="latency_command", required=True, metavar="command")
    r = sub.add_parser("report", help="per-hop tail latency and who owns it, from the probe's samples",
                       description=__doc__.splitlines()[0], epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_report_arguments(r, since="10m")


def _fail(msg: str, code: int) -> int:
    print(f"bookcast latency report: {msg}", file=sys.stderr)
    return code


def main(args: argparse.Namespace) -> int:
    try:
        since_s = parse_duration_s(args.since)
    except ValueError as exc:
        return _fail(str(exc), 2)
    if args.top < 0 or args.budget_ms <= 0:
        return _fail("--top must be >= 0 and --budget-ms > 0", 2)
    run_id = None if args.run == "all" else args.run
    target = args.clickhouse
    if not args.probe and not target:
        from feed.runstate import RunStateError, default_store, read_state

        try:
            state = read_state()
        except RunStateError:
            state = None  # no run recorded here: the default store, its newest run
        if state is not None:
            run_id = run_id if args.run else state.run_id
            if state.running and state.probe_url:
                return _from_probe(args, since_s, state.probe_url, run_id)
            target = state.store
        else:
            target = str(default_store())
    elif args.probe:
        return _from_probe(args, since_s, args.probe, run_id)
    from exporter.verdict import Params

    try:
        backend = open_backend(target)
        try:
            if args.run is None and args.clickhouse:
                run_id = latest_run(backend)
            report = build_report(backend, since_s=since_s, now_ns=time.time_ns(), run_id=run_id,
                                  instrument=args.instrument, region=args.region, top=args.top,
                                  params=Params(budget_ns=args.budget_ms * 1e6))
        finally:
            backend.close()
    except UnknownInstrument as exc:
        return _fail(f"unknown instrument {exc} (no sample of it in {target})", 2)
    except ClickHouseError as exc:
        first = str(exc).splitlines()[0][:300]
        hint = "" if "--probe" in first else " (while a probe holds a chDB store, ask it: --probe http://HOST:PORT)"
        return _fail(first + hint, 1)
    return _print(report.to_json() if args.format == "json" else format_text(report), args.format, report.samples)


def _print(body: Any, fmt: str, samples: int) -> int:
    if fmt == "json":
        sys.stdout.buffer.write(orjson.dumps(body, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n")
    else:
        sys.stdout.write(body if body.endswith("\n") else body + "\n")
    sys.stdout.flush()
    return 0 if samples else 1


def _from_probe(args: argparse.Namespace, since_s: float, probe_url: str, run_id: str | None) -> int:
    """The report as computed by a running probe over its own store (``GET /v1/latency/report``)."""
    import urllib.error
    import urllib.parse
    import urllib.request

    params = {"since": f"{since_s:g}s", "top": str(args.top), "format": args.format, "budget_ms": f"{args.budget_ms:g}"}
    params.update({k: v for k, v in (("instrument", args.instrument), ("region", args.region), ("run", run_id)) if v})
    url = f"{probe_url.rstrip('/')}/v1/latency/report?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            body, samples = r.read(), int(r.headers.get("X-Bookcast-Samples", "0"))
    except urllib.error.HTTPError as exc:
        try:
            err = orjson.loads(exc.read())
        except ValueError:
            err = {}
        if err.get("code") == "unknown_instrument":
            return _fail(f"unknown instrument {args.instrument}", 2)
        return _fail(f"the probe at {probe_url} answered {exc.code}: {err.get('error', exc.reason)}", 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return _fail(f"cannot get the report from {probe_url}: {exc}", 1)
    if args.format == "json":
        return _print(orjson.loads(body), "json", samples)
    return _print(body.decode(), "text", samples)
