"""``bookcast why``: "is this slow because of us or the upstream?" for the current run, in one command.

Finds the running stack through the state file ``bookcast up`` wrote (``feed.runstate``), asks its probe for
the last ``--since`` of the run, and prints the verdict in one sentence first, then the hop table (with clock
skew counted apart), the slowest messages, the host's CPU saturation and what to check next. It is
``bookcast latency report`` with the defaults a person at a terminal wants; the same options apply.

Exit codes: 0 verdict printed, 1 no stack or no samples yet, 2 bad usage or an unknown instrument.
"""
from __future__ import annotations

import argparse

from exporter import report

EXAMPLES = """examples:
  bookcast why                                   # the running stack, last 2 minutes
  bookcast why --since 10m --instrument coinbase:SKL-USD
  bookcast why --format json                     # the same, for scripts (verdict.cause, verdict.interval, ...)
  bookcast why --run all --since 1d              # every run in the store (once the stack has stopped)"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    report.add_report_arguments(p, since="2m")
    p.set_defaults(top=5)


def main(args: argparse.Namespace) -> int:
    return report.main(args)
