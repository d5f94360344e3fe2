"""``bookcast bench``: benchmarks. ``bookcast bench fanout`` is ``loadtest.bench.fanout``.

Importing this module costs nothing beyond argparse: the benchmark's modules load when it runs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """examples:
  bookcast bench fanout --quick                    # tiny run (CI-sized): 20 clients, 50 msg/s, 3 s, both targets
  bookcast bench fanout                            # full: 100,1000,5000 clients x 10,100 msg/s, 20 s per cell
  bookcast bench fanout --clients 1000 --rates 100 --duration-s 30 --out run/bench/c1000
  bookcast bench fanout --clients 1000 --rates 100 --ebpf on    # the same with eBPF probes on the servers
  bookcast bench fanout --clients 1000 --rates 20,100 --repeat 3   # each ratio with its run-to-run spread
  bookcast bench fanout --clients 1000 --rates 20,100,150,200     # highest sustainable rate of each target
  bookcast bench fanout --idle 10000 --repeat 3                   # RSS per idle connection, healthy client p99
  bookcast bench fanout --clients 1000 --rates 20 --gateway-args "--write-through off"  # the A side of an A/B
  python -m loadtest.bench.floor --rate 100000    # this machine's kernel floor per delivery, and what 100,000/s takes"""

FANOUT_HELP = """open-loop fan-out benchmark: a synthetic ingest publishes at fixed rates to K instruments; every client
subscribes to all of them, through a real bookcast gateway and through nats-server's own WebSocket listener,
in the same run. Writes results.json, report.md and fanout.png to --out.

exit codes: 0 every cell ran and its accounting held; 1 a cell failed (a process died, a deadline passed) or
broke its accounting (published x subscribers != delivered + losses, redelivery, bookcast gaps);
2 bad usage, or an overhead toggle switched on that does not exist yet."""


def _csv(kind):
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return parse


def _targets(text: str) -> list[str]:
    targets = [t for t in text.split(",") if t]
    if not targets or any(t not in ("bookcast", "nats") for t in targets):
        raise argparse.ArgumentTypeError(f"targets are bookcast and/or nats, got {text!r}")
    return targets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="benchmark")
    f = sub.add_parser("fanout", help="bookcast gateway vs nats-server WebSocket, open loop", description=FANOUT_HELP,
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("--clients", type=_csv(int), help="client counts, one cell each (default 100,1000,5000)")
    f.add_argument("--rates", type=_csv(float),
                   help="publish rates in deltas/s, all instruments together (default 10,100); every client "
                        "receives every delta, so the offered fan-out is rate x clients")
    f.add_argument("--duration-s", type=float, help="open-loop publishing time per cell (default 20)")
    f.add_argument("--instruments", type=int, help="synthetic instruments (default 10)")
    f.add_argument("--client-procs", type=int, help="client-load processes per cell (default: one per CPU)")
    f.add_argument("--workers", type=int, help="bookcast gateway worker processes (default: one per CPU)")
    f.add_argument("--targets", type=_targets, default=["bookcast", "nats"],
                   help="bookcast and/or nats (default both)")
    f.add_argument("--drain-s", type=float, default=10.0,
                   help="after the last publish, how long clients may take to receive everything; what is "
                        "missing then is counted lost (default %(default)s)")
    f.add_argument("--connect-timeout-s", type=float, default=120.0,
                   help="for every client of a process to connect and subscribe (default %(default)s)")
    f.add_argument("--repeat", type=int, default=1,
                   help="run every cell N times, interleaved; the report gives each ratio's median, min, max and "
                        "spread ((max - min) / median) (default %(default)s)")
    f.add_argument("--idle", type=int, metavar="N",
                   help="idle-connections mode: per target, cells with 0 and with N idle connections (connected, "
                        "subscribed to nothing) beside --clients healthy subscribers (default 20, at --rates "
                        "default 100): RSS per idle connection and the healthy clients' p99 with and without them")
    f.add_argument("--saturated-busy-pct", type=float, default=90.0,
                   help="a cell whose machine was busier than this (all CPUs, everyone's processes) is marked "
                        "saturated and left out of the verdict (default %(default)s)")
    f.add_argument("--gateway-args", metavar="ARGS",
                   help="extra options for every bookcast gateway, e.g. \"--write-through off\" (to measure a "
                        "change against nats-server in its own run)")
    f.add_argument("--out", type=Path, help="output directory (default run/bench/fanout-<time>)")
    f.add_argument("--quick", action="store_true",
                   help="tiny defaults for CI: 20 clients, 50 msg/s, 3 s, 4 instruments, 2 client processes, "
                        "1 worker (explicit options still win)")
    for name, what in (
        ("exporter", "run the latency probe (bookcast probe) on the gateway in bookcast cells"),
        ("ebpf", "trace the server processes of every cell with bookcast ebpf --pid (needs root and bcc)"),
        ("otlp", "gateway (and probe) export to --otlp-endpoint $OTEL_EXPORTER_OTLP_ENDPOINT"),
    ):
        f.add_argument(f"--{name}", choices=["on", "off"], default="off",
                       help=f"{what}; 'on' fails with 'not available yet' when that is missing (default off)")


def main(args: argparse.Namespace) -> int:
    from loadtest.bench import fanout

    return fanout.run(args)
