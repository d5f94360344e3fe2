"""eBPF program specs: which tracepoints a program needs, which catalog metrics it fills, its -D flags.

Each ``ebpf/programs/<name>.bpf.c`` has a ``<name>.json`` beside it (the cloudflare/ebpf_exporter
pairing); ``bookcast.json`` holds the parameters of the shared header ``bookcast.h``. A spec names metrics
only by their ``feed/catalog.py`` name, and every limit is written once: map sizes in the spec,
histogram slots from the catalog's buckets (``HIST_SLOTS``). The C gets them as ``-D`` flags.

Spec shape (JSON)::

    {"program": "tcp", "source": "tcp.bpf.c", "summary": "...",
     "tracepoints": [{"kind": "tracepoint", "event": "tcp:tcp_probe", "optional": true}],
     "parameters": {"MAX_PORTS": 256},
     "label_values": {"state": ["runnable", ...]},        # -DSTATE_RUNNABLE=0 ...
     "symbols": {"SOFTIRQ_NET_RX": {"event": "irq:softirq_entry", "field": "vec", "symbol": "NET_RX"}},
     "explain": "what an SRE learns from it (bookcast ebpf --explain)",
     "metrics": [{"metric": "bookcast_ebpf_tcp_srtt_seconds", "map": "tcp_srtt", "kernel_unit": "log2_us",
                  "labels": ["role"], "tracepoints": ["tcp:tcp_probe"]}]}

``kernel_unit``: ``log2_us`` (slots in µs, sum in ns; exported in seconds), ``log2_bytes`` (bytes),
``log2_count`` (a plain number, e.g. a queue length), ``count`` (a u64 counter) or ``queue_length`` (a
gauge computed from a per-port counter struct, see listenq.bpf.c). ``symbols`` are enum values the C
compares with (a drop reason, a softirq vector), read from the tracepoint's print format on this kernel
(``__print_symbolic``) rather than from headers that may be older than it; unknown ones become -1. An optional tracepoint that is missing compiles its probe out
(``-DHAVE_<NAME>=0``) and skips the metrics that need it; a missing required one skips the program.

Pure apart from ``load_programs`` (reads the spec files).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ebpf import EbpfError
from feed.catalog import CATALOG, MetricSpec, MetricType

PROGRAMS_DIR = Path(__file__).resolve().parent / "programs"
HEADER_SPEC = "bookcast.json"

# kernel unit -> (catalog type, catalog unit, bucket bound of slot k = 2**k * scale)
KERNEL_UNITS: dict[str, tuple[MetricType, str, float]] = {
    "log2_us": (MetricType.HISTOGRAM, "seconds", 1e-6),
    "log2_bytes": (MetricType.HISTOGRAM, "bytes", 1.0),
    "log2_count": (MetricType.HISTOGRAM, "", 1.0),
    "count": (MetricType.COUNTER, "", 0.0),
    "queue_length": (MetricType.GAUGE, "", 0.0),
}
# kernel sum unit -> exported unit: durations are summed in ns, sizes in bytes
SUM_SCALE: dict[str, float] = {"log2_us": 1e-9, "log2_bytes": 1.0, "log2_count": 1.0}


class SpecError(EbpfError, ValueError):
    """A spec file is malformed or disagrees with the metric catalog (message names file and field)."""


@dataclass(frozen=True, slots=True)
class Tracepoint:
    kind: str          # "tracepoint" or "raw_tracepoint"
    event: str         # "group:name", as under /sys/kernel/tracing/events/group/name
    optional: bool = False

    @property
    def have_flag(self) -> str:
        return "HAVE_" + self.event.split(":", 1)[1].upper()


@dataclass(frozen=True, slots=True)
class MetricBinding:
    metric: str
    map: str
    kernel_unit: str
    labels: tuple[str, ...]
    tracepoints: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Program:
    name: str
    source: Path
    summary: str
    tracepoints: tuple[Tracepoint, ...]
    parameters: dict[str, int]
    label_values: dict[str, tuple[str, ...]]
    metrics: tuple[MetricBinding, ...]
    explain: str = ""
    symbols: dict[str, tuple[str, str, str]] = field(default_factory=dict)   # flag -> (event, field, symbol)


@dataclass(frozen=True, slots=True)
class Plan:
    """What to compile for one program on one kernel."""

    program: Program
    cflags: tuple[str, ...]
    metrics: tuple[MetricBinding, ...]      # exported
    skipped: dict[str, str]                 # metric (or program name) -> reason

    @property
    def loadable(self) -> bool:
        return bool(self.metrics)


def parse_program(data: dict, source_dir: Path, where: str) -> Program:
    """A ``Program`` from one spec's JSON object. Raises ``SpecError`` naming ``where`` and the field."""
    try:
        tps = tuple(Tracepoint(t["kind"], t["event"], bool(t.get("optional", False))) for t in data["tracepoints"])
        metrics = tuple(MetricBinding(m["metric"], m["map"], m["kernel_unit"], tuple(m["labels"]),
                                      tuple(m["tracepoints"])) for m in data["metrics"])
        program = Program(data["program"], source_dir / data["source"], data["summary"], tps,
                          {k: int(v) for k, v in data.get("parameters", {}).items()},
                          {k: tuple(v) for k, v in data.get("label_values", {}).items()}, metrics,
                          str(data.get("explain", "")),
                          {k: (v["event"], v["field"], v["symbol"]) for k, v in data.get("symbols", {}).items()})
    except (KeyError, TypeError, ValueError) as exc:
        raise SpecError(f"{where}: missing or malformed field {exc}") from exc
    for tp in tps:
        if tp.kind not in ("tracepoint", "raw_tracepoint") or tp.event.count(":") != 1:
            raise SpecError(f"{where}: bad tracepoint kind={tp.kind} event={tp.event}")
    events = {tp.event for tp in tps}
    for m in metrics:
        if m.kernel_unit not in KERNEL_UNITS:
            raise SpecError(f"{where}: metric={m.metric} unknown kernel_unit={m.kernel_unit}")
        if not set(m.tracepoints) <= events:
            raise SpecError(f"{where}: metric={m.metric} uses tracepoints not declared: "
                            f"{sorted(set(m.tracepoints) - events)}")
    return program


def catalog_problems(program: Program, catalog: dict[str, MetricSpec] = CATALOG) -> list[str]:
    """Disagreements between a program's metrics and the catalog (empty if none)."""
    problems = []
    for m in program.metrics:
        spec = catalog.get(m.metric)
        if spec is None:
            problems.append(f"{program.name}: metric={m.metric} is not in feed/catalog.py")
            continue
        mtype, unit, _ = KERNEL_UNITS[m.kernel_unit]
        if (spec.type, spec.unit) != (mtype, unit):
            problems.append(f"{program.name}: metric={m.metric} is {spec.type}/{spec.unit!r} in the catalog, "
                            f"kernel_unit={m.kernel_unit} needs {mtype}/{unit!r}")
        if tuple(spec.labels) != m.labels:
            problems.append(f"{program.name}: metric={m.metric} labels {m.labels} != catalog {spec.labels}")
        if mtype is MetricType.HISTOGRAM:
            try:
                log2_slots(spec, m.kernel_unit)
            except SpecError as exc:
                problems.append(f"{program.name}: {exc}")
    return problems


def log2_slots(spec: MetricSpec, kernel_unit: str) -> int:
    """Number of finite buckets K of a catalog histogram whose bounds are 2**k * unit, k = 0..K-1.

    Raises:
        SpecError: the catalog's buckets are not that sequence (the kernel's log2 slots could not map).
    """
    scale = KERNEL_UNITS[kernel_unit][2]
    buckets = spec.buckets or ()
    expected = tuple(2.0 ** k * scale for k in range(len(buckets)))
    if not buckets or any(abs(b - e) > e * 1e-9 for b, e in zip(buckets, expected)):
        raise SpecError(f"metric={spec.name} buckets must be 2**k * {scale:g} for k = 0..K-1 (kernel log2 slots)")
    return len(buckets)


def print_symbols(format_text: str, field_name: str) -> dict[str, int]:
    """{symbol: value} of ``__print_symbolic(REC->field, { 3, "NET_RX" }, ...)`` in a tracepoint format file.

    >>> print_symbols('print fmt: "vec=%u", __print_symbolic(REC->vec, { 0, "HI" }, { 3, "NET_RX" })', "vec")
    {'HI': 0, 'NET_RX': 3}
    """
    m = re.search(r"__print_symbolic\(REC->" + re.escape(field_name) + r",(.*?)\)(?:,|$)", format_text, re.S)
    if not m:
        return {}
    return {name: int(value, 0) for value, name in re.findall(r'\{\s*(-?\w+)\s*,\s*"([^"]*)"\s*\}', m.group(1))}


def plan(program: Program, header_parameters: dict[str, int], available: set[str],
         catalog: dict[str, MetricSpec] = CATALOG, symbols: dict[str, int] | None = None) -> Plan:
    """cflags and exported metrics of ``program`` given the tracepoint events that exist (``available``).

    ``symbols``: the values of the program's ``symbols`` on this kernel (missing ones become -1).

    Raises:
        SpecError: the spec disagrees with the catalog (see ``catalog_problems``).
    """
    problems = catalog_problems(program, catalog)
    if problems:
        raise SpecError("; ".join(problems))
    missing = {tp.event for tp in program.tracepoints if tp.event not in available}
    required_missing = sorted(tp.event for tp in program.tracepoints if not tp.optional and tp.event in missing)
    if required_missing:
        return Plan(program, (), (), {m.metric: f"tracepoint {', '.join(required_missing)} not on this kernel"
                                      for m in program.metrics})
    metrics, skipped = [], {}
    for m in program.metrics:
        gone = [e for e in m.tracepoints if e in missing]
        if gone:
            skipped[m.metric] = f"tracepoint {', '.join(gone)} not on this kernel"
        else:
            metrics.append(m)
    slots = {log2_slots(catalog[m.metric], m.kernel_unit) for m in program.metrics
             if catalog[m.metric].type is MetricType.HISTOGRAM}
    if len(slots) > 1:
        raise SpecError(f"{program.name}: its histograms need one slot count, catalog gives {sorted(slots)}")
    params = {**header_parameters, **program.parameters, "HIST_SLOTS": slots.pop() if slots else 1}
    for label, values in program.label_values.items():
        params.update({f"{label}_{v}".upper(): i for i, v in enumerate(values)})
    params.update({tp.have_flag: int(tp.event not in missing) for tp in program.tracepoints if tp.optional})
    params.update({flag: (symbols or {}).get(flag, -1) for flag in program.symbols})
    cflags = (f"-I{program.source.parent}", *(f"-D{k}={v}" for k, v in params.items()))
    return Plan(program, cflags, tuple(metrics), skipped)


def load_programs(directory: Path = PROGRAMS_DIR) -> tuple[dict[str, int], list[Program]]:
    """(shared header parameters, programs) from the spec files in ``directory``, sorted by name.

    Raises:
        SpecError: a file is not valid JSON or misses a field.
    """
    def read(path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SpecError(f"{path}: {exc}") from exc

    header = read(directory / HEADER_SPEC)
    programs = [parse_program(read(p), directory, str(p))
                for p in sorted(directory.glob("*.json")) if p.name != HEADER_SPEC]
    return {k: int(v) for k, v in header.get("parameters", {}).items()}, programs
