"""``bookcast failover-bench``: failover time per fault kind and the ingest's CPU per venue message.

What it measures, in one process (the real ingest, pool, scorer and books; providers are in-process
``MemoryLink``s fed from the bundled real Coinbase recording at its recorded pace; NATS is replaced by a
recorder of publish times, so the figures are the ingest's own decision and publish path, not network):

* **failover**: for each fault kind injected on the selected provider (``disconnect``; ``stall`` = stall while
  alive, heartbeats continue and data stops; ``lag`` = every frame served ``--lag-s`` late), the time from the
  fault's onset to the first delta published after the pool moved to a healthy provider. Targets (issue 16):
  disconnect < 100 ms, stall < 1 s, lag < 2 s. Each kind runs ``--runs`` times; min, median and max are shown.
* **CPU per venue message**: the whole recording as fast as possible with 1 and with 3 providers connected
  (every venue message arrives from each), process CPU time divided by venue messages, against the plain
  capture-replay ingest (no pool) measured in the same run: the ratios are the figures to quote on a shared,
  noisy machine.

Prints a Markdown table; ``--out FILE`` also writes it (and ``FILE.json`` the raw numbers).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson

EXAMPLES = """examples:
  bookcast failover-bench                       # 3 runs per fault kind + CPU, prints a Markdown table
  bookcast failover-bench --runs 5 --out figures/failover.md
  bookcast failover-bench --skip-cpu --kinds disconnect,stall"""

KINDS = ("disconnect", "stall", "lag")
TARGET_S = {"disconnect": 0.1, "stall": 1.0, "lag": 2.0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, default=3, help="runs per fault kind (default %(default)s)")
    p.add_argument("--kinds", default=",".join(KINDS), help="fault kinds, comma-separated (default %(default)s)")
    p.add_argument("--warmup-s", type=float, default=3.0, help="healthy running before the fault (default %(default)s)")
    p.add_argument("--lag-s", type=float, default=3.0, help="how far behind the lag fault serves (default %(default)s)")
    p.add_argument("--cpu-messages", type=int, default=0, help="venue messages for the CPU figure (0 = the whole "
                                                                "recording)")
    p.add_argument("--skip-cpu", action="store_true", help="only the failover figures")
    p.add_argument("--out", type=Path, help="also write the table here (and the raw numbers to OUT.json)")


class _Recorder:
    """Stands in for NATS: remembers when each delta was published, and the first one after a switch."""

    def __init__(self) -> None:
        self.deltas = 0
        self.watch: tuple[Any, str] | None = None  # (pool, faulty provider)
        self.first_healthy_ns: int | None = None

    async def publish(self, subject: str, payload: bytes, headers=None) -> None:
        if b'"type":"delta"' not in payload[:20]:
            return
        self.deltas += 1
        if self.watch is not None and self.first_healthy_ns is None:
            pool, faulty = self.watch
            if pool.scorer.selected not in (None, faulty) and pool.catching_up is None:
                self.first_healthy_ns = time.monotonic_ns()


def _records(limit: int = 0) -> list[Any]:
    from feed.capture import read_capture
    from feed.capture import bundled_capture

    recs = list(read_capture(bundled_capture()))
    return recs[:limit] if limit else recs


def _symbols(recs) -> list[str]:
    return sorted({r.msg["product_id"] for r in recs if isinstance(r.msg, dict) and r.msg.get("type") == "snapshot"})


def _rig(n_providers: int, symbols: list[str]):
    from prometheus_client import CollectorRegistry

    from feed.ingest import Ingest, IngestConfig
    from feed.providers.config import VenueConfig
    from feed.upstream import ProviderSpec
    from feed.providers.memory import MemoryLink
    from feed.providers.pool import VenuePool
    from feed.providers.scoring import ScoringPolicy

    ingest = Ingest(IngestConfig(epoch_base="bench"), registry=CollectorRegistry())
    rec = _Recorder()
    ingest.nc = rec
    ingest.nats_connected = True
    specs = [ProviderSpec(f"p{i}", "coinbase", f"memory://p{i}") for i in range(n_providers)]
    links = {s.name: MemoryLink(s) for s in specs}
    pool = VenuePool(ingest, VenueConfig("coinbase", tuple(symbols), tuple(specs), 30.0, ScoringPolicy()), links=links)
    ingest.pools.append(pool)
    return ingest, pool, links, rec


async def _failover_run(kind: str, recs, symbols, warmup_s: float, lag_s: float) -> float | None:
    ingest, pool, links, rec = _rig(3, symbols)
    task = asyncio.get_running_loop().create_task(pool.run())
    try:
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        first_ns = recs[0].recv_ts_ns
        fault_at = None
        faulty = None
        for r in recs:
            due = t0 + (r.recv_ts_ns - first_ns) / 1e9
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if fault_at is None and time.monotonic() - t0 >= warmup_s and pool.scorer.selected is not None:
                faulty = pool.scorer.selected
                rec.watch = (pool, faulty)
                fault_at = time.monotonic_ns()
                link = links[faulty]
                if kind == "disconnect":
                    link.disconnect()
                elif kind == "stall":
                    link.stall(True)
                else:
                    link.lag_s = lag_s
            for link in links.values():
                link.deliver(r.msg)
            if rec.first_healthy_ns is not None:
                return (rec.first_healthy_ns - fault_at) / 1e9
            if fault_at is not None and time.monotonic_ns() - fault_at > 10e9:
                return None
        return (rec.first_healthy_ns - fault_at) / 1e9 if rec.first_healthy_ns and fault_at else None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _cpu_run(n_providers: int, recs, symbols) -> float:
    """Process CPU seconds per venue message, every message delivered by each of ``n_providers``."""
    ingest, pool, links, rec = _rig(n_providers, symbols)
    task = asyncio.get_running_loop().create_task(pool.run())
    try:
        await asyncio.sleep(0.05)
        start = time.process_time()
        for batch in (recs[i:i + 200] for i in range(0, len(recs), 200)):
            for r in batch:
                for link in links.values():
                    link.deliver(r.msg)
            while any(not p.queue.empty() for p in pool.providers.values()):
                await asyncio.sleep(0)
        async with pool.lock:
            pass
        return (time.process_time() - start) / len(recs)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _cpu_replay(recs) -> float:
    """The peer: the plain capture-replay ingest (parse, book, publish) on the same messages."""
    from prometheus_client import CollectorRegistry

    from feed.ingest import Ingest, IngestConfig

    ingest = Ingest(IngestConfig(epoch_base="bench"), registry=CollectorRegistry())
    ingest.nc = _Recorder()
    start = time.process_time()
    for r in recs:
        await ingest.on_record(r)
    return (time.process_time() - start) / len(recs)


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    kinds = [k for k in args.kinds.split(",") if k]
    bad = set(kinds) - set(KINDS)
    if bad:
        raise ValueError(f"unknown fault kind(s) {', '.join(sorted(bad))}; known: {', '.join(KINDS)}")
    recs = _records()
    symbols = _symbols(recs)
    out: dict[str, Any] = {"failover_s": {}, "cpu_us_per_message": {}}
    for kind in kinds:
        times = []
        for i in range(args.runs):
            t = await _failover_run(kind, recs, symbols, args.warmup_s, args.lag_s)
            print(f"  {kind:<10} run {i + 1}/{args.runs}: "
                  f"{'no failover within 10 s' if t is None else f'{t * 1e3:.1f} ms'}", file=sys.stderr, flush=True)
            times.append(t)
        out["failover_s"][kind] = times
    if not args.skip_cpu:
        cpu_recs = recs[: args.cpu_messages] if args.cpu_messages else recs
        for label, coro in (("replay (no pool)", lambda: _cpu_replay(cpu_recs)),
                            ("1 provider", lambda: _cpu_run(1, cpu_recs, symbols)),
                            ("3 providers", lambda: _cpu_run(3, cpu_recs, symbols))):
            samples = []
            for _ in range(3):
                samples.append(await coro())
            out["cpu_us_per_message"][label] = statistics.median(samples) * 1e6
            print(f"  cpu {label:<16} {out['cpu_us_per_message'][label]:.1f} us/message", file=sys.stderr, flush=True)
    out["messages"] = len(recs)
    return out


def table(result: dict[str, Any]) -> str:
    lines = ["| fault on the selected provider | target | min | median | max | runs failed over |",
             "|---|---|---|---|---|---|"]
    for kind, times in result["failover_s"].items():
        ok = [t for t in times if t is not None]
        if ok:
            lines.append(f"| {kind} | < {TARGET_S[kind] * 1e3:.0f} ms | {min(ok) * 1e3:.1f} ms | "
                         f"{statistics.median(ok) * 1e3:.1f} ms | {max(ok) * 1e3:.1f} ms | {len(ok)}/{len(times)} |")
        else:
            lines.append(f"| {kind} | < {TARGET_S[kind] * 1e3:.0f} ms | - | - | - | 0/{len(times)} |")
    cpu = result.get("cpu_us_per_message") or {}
    if cpu:
        base = cpu.get("replay (no pool)")
        lines += ["", "| ingest CPU per venue message | µs | vs replay (no pool) |", "|---|---|---|"]
        for label, us in cpu.items():
            lines.append(f"| {label} | {us:.1f} | {us / base:.2f}x |" if base else f"| {label} | {us:.1f} | - |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    if args.runs < 1:
        print("bookcast failover-bench: --runs must be at least 1", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(_bench(args))
    except ValueError as exc:
        print(f"bookcast failover-bench: {exc}", file=sys.stderr)
        return 2
    text = table(result)
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        Path(str(args.out) + ".json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    failed = any(t is None for times in result["failover_s"].values() for t in times)
    return 1 if failed else 0

