"""The five Grafana dashboards as grafanalib objects: feed overview (RED), latency, kernel (eBPF), SLO, drills.

Every query names only metrics declared in ``feed.catalog`` (and Prometheus's own ``up`` and ``ALERTS``)
or the recording rules of ``dashboards.slo``. A query whose series only exist once other work lands, or
only with eBPF, during a drill or while an alert is active, is built with ``needs=``; ``exceptions()``
lists them with the reason, and the end-to-end check (``bookcast dashboards check``) requires every
other query to return at least one series from a real Prometheus scraping a real stack.

Variables: ``$region`` (the ``region`` target label set in the Prometheus scrape config; the probe's
own ``region`` label for its metrics), ``$instance`` (scrape target), ``$venue``. There is no
``$instrument`` variable: no catalog metric carries an instrument label (per-instrument series are kept
out of Prometheus on purpose; per-instrument latency is ``bookcast latency report --instrument``).

Pure: builds objects, no I/O. Panel ids and grid positions are assigned in build order, so the same
input gives the same JSON.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from grafanalib import core as g

from dashboards import slo

DATASOURCE = {"type": "prometheus", "uid": "bookcast-prometheus"}


class Needs(enum.StrEnum):
    """Why a query may return nothing on a healthy stack today (the exception list)."""

    PROVIDERS = "providers"
    REGIONS = "regions"
    SECURITY = "security"
    DRILLS = "drills"
    EBPF = "ebpf"
    ALERTS = "alerts"


REASONS: dict[Needs, str] = {
    Needs.PROVIDERS: "provider pool metrics (issue 16, names in the catalog's contracts block) are not emitted "
                     "yet; the replay ingest exports only the provider-up gauge",
    Needs.REGIONS: "lease and failover metrics (issue 9) are not emitted yet",
    Needs.SECURITY: "gateway auth and integrity counters (issue 10) are not emitted yet",
    Needs.DRILLS: "drill series exist only while `bookcast drill run` runs (issue 14, not landed yet)",
    Needs.EBPF: "eBPF series need `bookcast up --ebpf` as root with bcc; tests/dashboards/"
                "test_stack_prometheus.py runs the exporter and requires them when root",
    Needs.ALERTS: "ALERTS series exist only while an alert is pending or firing; covered by "
                  "tests/dashboards/test_stack_prometheus.py (the fault test)",
}

R = 'region=~"$region"'
RI = 'region=~"$region", instance=~"$instance"'
RIV = 'region=~"$region", instance=~"$instance", venue=~"$venue"'
RATE = "$__rate_interval"
HOPS = (("upstream", "upstream (venue to ingest)"), ("ingest", "ingest"),
        ("nats_gateway", "NATS + gateway"), ("client", "client (gateway queue, socket, reader)"),
        ("e2e", "end to end"))


@dataclass(frozen=True, slots=True)
class Query:
    expr: str
    legend: str = ""
    needs: Needs | None = None
    instant: bool = False
    heatmap: bool = False


@dataclass
class Board:
    """Collects panels in order and lays them out on Grafana's 24-column grid."""

    title: str
    uid: str
    description: str
    panels: list[g.Panel] = field(default_factory=list)
    queries: list[tuple[str, Query]] = field(default_factory=list)  # (panel title, query)
    _x: int = 0
    _y: int = 0
    _row_h: int = 0

    def _pos(self, w: int, h: int) -> g.GridPos:
        if self._x + w > 24:
            self._x, self._y, self._row_h = 0, self._y + self._row_h, 0
        pos = g.GridPos(h=h, w=w, x=self._x, y=self._y)
        self._x += w
        self._row_h = max(self._row_h, h)
        return pos

    def row(self, title: str) -> None:
        if self._x:
            self._x, self._y, self._row_h = 0, self._y + self._row_h, 0
        self.panels.append(g.RowPanel(title=title, gridPos=g.GridPos(h=1, w=24, x=0, y=self._y)))
        self._y += 1

    def _targets(self, title: str, queries: list[Query]) -> list[g.Target]:
        out = []
        for i, q in enumerate(queries):
            self.queries.append((title, q))
            out.append(g.Target(expr=q.expr, legendFormat=q.legend, refId=chr(ord("A") + i), instant=q.instant,
                                format="heatmap" if q.heatmap else "time_series", datasource=DATASOURCE,
                                intervalFactor=1))
        return out

    def timeseries(self, title: str, queries: list[Query], unit: str = "short", *, description: str = "",
                   w: int = 12, h: int = 8, thresholds: list[tuple[float, str]] | None = None,
                   stack: bool = False) -> None:
        extra = None
        if thresholds:
            extra = {"fieldConfig": {"defaults": {"custom": {"thresholdsStyle": {"mode": "line"}}}}}
        steps = [{"color": "green", "value": None}] + [{"color": c, "value": v} for v, c in thresholds or []]
        self.panels.append(g.TimeSeries(
            title=title, description=description, dataSource=DATASOURCE, targets=self._targets(title, queries),
            unit=unit, gridPos=self._pos(w, h), thresholds=steps, extraJson=extra,
            stacking={"mode": "normal"} if stack else {"mode": "none"}))

    def heatmap(self, title: str, query: Query, *, description: str = "", w: int = 12, h: int = 8) -> None:
        self.panels.append(g.Heatmap(
            title=title, description=description, dataSource=DATASOURCE,
            targets=self._targets(title, [query]), dataFormat="tsbuckets", yBucketBound="upper",
            hideZeroBuckets=True, gridPos=self._pos(w, h),
            yAxis=g.YAxis(format="s", decimals=0),
            legend={"show": False}))

    def stat(self, title: str, queries: list[Query], unit: str = "short", *, description: str = "",
             w: int = 6, h: int = 5, mappings: list[dict] | None = None,
             thresholds: list[tuple[float, str]] | None = None, decimals: int | None = None) -> None:
        steps = [{"color": "green", "value": None}] + [{"color": c, "value": v} for v, c in thresholds or []]
        self.panels.append(g.Stat(
            title=title, description=description, dataSource=DATASOURCE, targets=self._targets(title, queries),
            format=unit, gridPos=self._pos(w, h), mappings=mappings or [], reduceCalc="lastNotNull",
            graphMode="area", decimals=decimals,
            thresholds=steps))

    def alert_list(self, title: str, *, w: int = 12, h: int = 8) -> None:
        self.panels.append(g.AlertList(title=title, gridPos=self._pos(w, h), show=g.ALERTLIST_SHOW_CURRENT,
                                       limit=20, stateFilter=[], onlyAlertsOnDashboard=False))

    def dashboard(self, templates: list[g.Template],
                  annotations: list[dict] | None = None) -> tuple[g.Dashboard, Board]:
        return g.Dashboard(
            title=self.title, uid=self.uid, description=self.description, tags=["bookcast"],
            panels=self.panels, templating=g.Templating(templates), refresh="10s",
            time=g.Time("now-1h", "now"), timezone="utc", graphTooltip=g.GRAPH_TOOLTIP_MODE_SHARED_CROSSHAIR,
            annotations=g.Annotations(annotations or []),
        ).auto_panel_ids(), self


def _var(name: str, label: str, query: str) -> g.Template:
    return g.Template(name=name, label=label, query=query, dataSource=DATASOURCE, includeAll=True, multi=True,
                      allValue=".*", default="$__all", refresh=g.REFRESH_ON_TIME_RANGE_CHANGE)


# Template variable queries: (name, label, label_values query, needs)
VARIABLES: dict[str, tuple[str, str, Needs | None]] = {
    "region": ("region", 'label_values(up{job=~"bookcast-.*"}, region)', None),
    "instance": ("instance", 'label_values(up{job=~"bookcast-.*", region=~"$region"}, instance)', None),
    "venue": ("venue", 'label_values(bookcast_ingest_messages_total{region=~"$region"}, venue)', None),
    "role": ("process role", 'label_values(bookcast_ebpf_traced_processes{region=~"$region"}, role)', Needs.EBPF),
    "drill": ("drill", "label_values(bookcast_drill_running, drill)", Needs.DRILLS),
}


def _templates(*names: str) -> list[g.Template]:
    return [_var(n, VARIABLES[n][0], VARIABLES[n][1]) for n in names]


def _q(p: str, metric: str, sel: str, hop: str | None = None) -> str:
    hop_sel = f', hop="{hop}"' if hop else ""
    return f"histogram_quantile({p}, sum by (le) (rate({metric}_bucket{{{sel}{hop_sel}}}[{RATE}])))"


# -- 1. feed overview (RED) --------------------------------------------------------------------
def feed_overview() -> tuple[g.Dashboard, Board]:
    b = Board("bookcast / Feed overview", "bookcast-feed",
              "Rate, errors, duration of the feed: messages in and out, clients, subscriptions, errors, "
              "resyncs, slow consumers, gaps, upstream integrity, providers.")
    b.row("Targets")
    b.stat("Scrape targets up", [Query(f'up{{job=~"bookcast-.*", {R}}}', "{{job}} {{instance}}")], w=24, h=4,
           mappings=[{"type": "value", "options": {"0": {"text": "DOWN", "color": "red"},
                                                   "1": {"text": "up", "color": "green"}}}],
           description="Prometheus's `up` for every bookcast process it scrapes.")
    b.row("Rate")
    b.timeseries("Messages in (ingest)", [
        Query(f"sum by (venue) (rate(bookcast_ingest_messages_total{{{RIV}}}[{RATE}]))", "{{venue}} raw"),
        Query(f"sum by (venue) (rate(bookcast_ingest_deltas_published_total{{{RIV}}}[{RATE}]))", "{{venue}} deltas"),
        Query(f"sum by (venue) (rate(bookcast_ingest_trades_published_total{{{RIV}}}[{RATE}]))", "{{venue}} trades"),
    ], "msg/s", description="Raw venue messages read, and deltas and trades published to NATS.")
    b.timeseries("Messages out (gateway)", [
        Query(f"sum by (type) (rate(bookcast_gateway_messages_sent_total{{{RI}}}[{RATE}]))", "sent {{type}}"),
        Query(f"sum by (type) (rate(bookcast_gateway_nats_messages_total{{{RI}}}[{RATE}]))", "from NATS {{type}}"),
        Query(f"sum (rate(bookcast_gateway_socket_writes_total{{{RI}}}[{RATE}]))", "socket writes"),
    ], "msg/s", description="Frames written to clients by type; frames / socket writes is the batching.")
    b.timeseries("Clients", [
        Query(f"sum by (instance) (bookcast_gateway_clients{{{RI}}})", "{{instance}}"),
    ], description="Open WebSocket connections per gateway.", w=8)
    b.timeseries("Subscriptions", [
        Query(f"sum by (instance) (bookcast_gateway_instruments{{{RI}}})", "NATS subscriptions {{instance}}"),
        Query(f"sum by (op) (rate(bookcast_gateway_requests_total{{{RI}}}[{RATE}]))", "requests {{op}}/s"),
    ], description="One NATS subscription per instrument per gateway; client requests by op.", w=8)
    b.timeseries("Bytes out and queued", [
        Query(f"sum (rate(bookcast_gateway_bytes_sent_total{{{RI}}}[{RATE}]))", "sent/s"),
        Query(f"sum by (instance) (bookcast_gateway_queue_bytes{{{RI}}})", "queued {{instance}}"),
    ], "bytes", w=8)
    b.row("Errors")
    b.timeseries("Errors by code", [
        Query(f"sum by (code) (rate(bookcast_gateway_errors_total{{{RI}}}[{RATE}]))", "gateway {{code}}"),
        Query(f"sum by (venue) (rate(bookcast_ingest_parse_errors_total{{{RIV}}}[{RATE}]))", "parse {{venue}}"),
        Query(f"sum (rate(bookcast_gateway_bad_upstream_total{{{RI}}}[{RATE}]))", "bad from NATS"),
    ], "ops", description="Error replies by PROTOCOL error code, unparseable venue messages, malformed NATS messages.")
    b.timeseries("Resyncs by reason", [
        Query(f"sum by (reason) (rate(bookcast_gateway_resyncs_total{{{RI}}}[{RATE}]))", "{{reason}}"),
    ], "ops")
    b.timeseries("Slow-consumer closes and closes by code", [
        Query(f"sum (rate(bookcast_gateway_slow_consumer_closes_total{{{RI}}}[{RATE}]))", "slow consumer (4008)"),
        Query(f"sum by (code) (rate(bookcast_gateway_closes_total{{{RI}}}[{RATE}]))", "close {{code}}"),
        Query(f"sum (rate(bookcast_gateway_conflated_total{{{RI}}}[{RATE}]))", "conflated deltas"),
    ], "ops")
    b.timeseries("Gaps", [
        Query(f"sum (rate(bookcast_gateway_gaps_total{{{RI}}}[{RATE}]))", "gateway: upstream gaps detected"),
        Query(f"sum by (region) (rate(bookcast_probe_gaps_total{{{R}}}[{RATE}]))", "probe {{region}}: undetected"),
        Query(f"sum (rate(bookcast_gateway_snapshot_fetch_failures_total{{{RI}}}[{RATE}]))", "snapshot fetch failures"),
    ], "ops", description="Gaps the gateway caught on NATS (resynced), and broken histories that reached the "
                          "probe's client unannounced (the gap SLI).")
    b.timeseries("Upstream integrity faults", [
        Query(f"sum by (venue, kind) (rate(bookcast_ingest_integrity_faults_total{{{RIV}}}[{RATE}]))",
              "{{venue}} {{kind}}", Needs.PROVIDERS),
        Query(f"sum by (venue) (rate(bookcast_ingest_crossed_books_total{{{RIV}}}[{RATE}]))", "{{venue}} crossed"),
        Query(f"sum by (venue) (rate(bookcast_ingest_dropped_deltas_total{{{RIV}}}[{RATE}]))",
              "{{venue}} dropped before snapshot"),
    ], "ops")
    b.timeseries("Instruments by status", [
        Query(f"sum by (venue, status) (bookcast_ingest_instruments_by_status{{{RIV}}})", "{{venue}} {{status}}",
              Needs.PROVIDERS),
        Query(f"sum (bookcast_ingest_instruments{{{RI}}})", "books held by the ingest"),
    ])
    b.row("Providers")
    b.stat("Provider in use", [
        Query(f"max by (venue, provider) (bookcast_ingest_provider_selected{{{RIV}}}) == 1", "{{venue}}: {{provider}}",
              Needs.PROVIDERS, instant=True),
    ], w=8, description="The provider each venue is read from (1 = selected).")
    b.timeseries("Provider scores", [
        Query(f"max by (venue, provider) (bookcast_ingest_provider_score{{{RIV}}})", "{{venue}} {{provider}}",
              Needs.PROVIDERS),
    ], "percentunit", w=8, thresholds=[(0.0, "red")])
    b.timeseries("Upstream sources up", [
        Query(f"max by (provider) (bookcast_ingest_provider_up{{{RI}}})", "{{provider}}"),
    ], w=8, description="1 while an upstream source delivers (replay:<file> for replays).")
    b.timeseries("Provider lag", [
        Query(f"max by (venue, provider) (bookcast_ingest_provider_lag_seconds{{{RIV}}})", "{{venue}} {{provider}}",
              Needs.PROVIDERS),
    ], "s", w=8)
    b.timeseries("Provider errors and switches", [
        Query(f"sum by (venue, provider, kind) (rate(bookcast_ingest_provider_errors_total{{{RIV}}}[{RATE}]))",
              "{{provider}} {{kind}}", Needs.PROVIDERS),
        Query(f"sum by (venue, reason) (increase(bookcast_ingest_provider_switches_total{{{RIV}}}[{RATE}]))",
              "switch {{venue}} {{reason}}", Needs.PROVIDERS),
    ], "ops", w=8)
    b.timeseries("Provider messages", [
        Query(f"sum by (venue, provider) (rate(bookcast_ingest_provider_messages_total{{{RIV}}}[{RATE}]))",
              "{{venue}} {{provider}}", Needs.PROVIDERS),
    ], "msg/s", w=8)
    b.row("Security and integrity (gateway)")
    b.timeseries("Auth failures and rejected connections", [
        Query(f"sum by (reason) (rate(bookcast_gateway_auth_failures_total{{{RI}}}[{RATE}]))", "auth {{reason}}",
              Needs.SECURITY),
        Query(f"sum by (reason) (rate(bookcast_gateway_connections_rejected_total{{{RI}}}[{RATE}]))",
              "rejected {{reason}}", Needs.SECURITY),
    ], "ops")
    b.timeseries("Checksum mismatches", [
        Query(f"sum (rate(bookcast_gateway_checksum_mismatches_total{{{RI}}}[{RATE}]))", "mismatches",
              Needs.SECURITY),
    ], "ops")
    return b.dashboard(_templates("region", "instance", "venue"))


# -- 2. latency ---------------------------------------------------------------------------------
def latency(config: slo.RuleConfig) -> tuple[g.Dashboard, Board]:
    objective = config.e2e_objective_s
    b = Board("bookcast / Latency", "bookcast-latency",
              "Per-hop latency: service histograms (10 µs..10 s buckets) and the probe's per-message "
              f"measurements. The e2e objective is {objective:g} s for {config.e2e_latency_target:.2%} "
              "of deliveries.")
    b.row("Us or upstream?")
    share = (f'max by (region) (bookcast_probe_latency_window_seconds{{{R}, hop="upstream", window="1m", '
             f'quantile="0.99"}})\n/ sum by (region) (bookcast_probe_latency_window_seconds{{{R}, '
             f'hop=~"upstream|ingest|nats_gateway|client", window="1m", quantile="0.99"}})')
    b.stat("Us or upstream? (p99, last minute)", [Query(share, "{{region}}")], "percentunit", w=8,
           description="Upstream's share of the sum of the per-hop p99s: under half, the tail is ours "
                       "(`bookcast latency report` attributes the slowest messages exactly).",
           mappings=[{"type": "range", "options": {"from": 0, "to": 0.5, "result": {"text": "us", "color": "orange"}}},
                     {"type": "range", "options": {"from": 0.5, "to": 1, "result": {"text": "upstream",
                                                                                      "color": "blue"}}}])
    b.stat("E2E p99 (last minute)", [Query(
        f'max by (region) (bookcast_probe_latency_window_seconds{{{R}, hop="e2e", window="1m", quantile="0.99"}})',
        "{{region}}")], "s", w=8, thresholds=[(objective, "red")])
    b.stat("Deliveries within objective (5m)", [Query(
        f"1 - {slo.ratio_record('e2e_latency', '5m')}{{{R}}}", "{{region}}")], "percentunit", w=8, decimals=3,
        thresholds=[(0.0, "red"), (config.e2e_latency_target, "green")])
    b.row("Per hop: p50 / p99 / p99.9 / max (probe)")
    for hop, label in HOPS:
        queries = [Query(_q(p, "bookcast_probe_latency_seconds", R, hop), f"p{name}")
                   for p, name in (("0.5", "50"), ("0.99", "99"), ("0.999", "99.9"))]
        queries.append(Query(f'max (bookcast_probe_latency_max_seconds{{{R}, hop="{hop}", window="1m"}})', "max (1m)"))
        thresholds = None
        if hop == "e2e":
            queries.append(Query(f"vector({objective:g})", "SLO objective"))
            thresholds = [(objective, "red")]
        b.timeseries(f"{label}", queries, "s", w=8 if hop != "e2e" else 12, thresholds=thresholds)
    b.timeseries("Probe per-region quantiles (exact, HDR, 1m window)", [
        Query(f'max by (region, quantile) (bookcast_probe_latency_window_seconds{{{R}, hop="e2e", window="1m"}})',
              "{{region}} p{{quantile}}"),
        Query(f"vector({objective:g})", "SLO objective"),
    ], "s", w=12, thresholds=[(objective, "red")])
    b.row("Heatmaps")
    b.heatmap("upstream (ingest histogram)", Query(
        f"sum by (le) (rate(bookcast_hop_upstream_seconds_bucket{{{RIV}}}[{RATE}]))", "{{le}}", heatmap=True), w=8)
    b.heatmap("ingest (ingest histogram)", Query(
        f"sum by (le) (rate(bookcast_hop_ingest_seconds_bucket{{{RIV}}}[{RATE}]))", "{{le}}", heatmap=True), w=8)
    b.heatmap("NATS + gateway (gateway histogram)", Query(
        f"sum by (le) (rate(bookcast_hop_nats_gateway_seconds_bucket{{{RIV}}}[{RATE}]))", "{{le}}", heatmap=True),
        w=8)
    b.heatmap("client (probe)", Query(
        f'sum by (le) (rate(bookcast_probe_latency_seconds_bucket{{{R}, hop="client"}}[{RATE}]))', "{{le}}",
        heatmap=True))
    b.heatmap("end to end (probe)", Query(
        f'sum by (le) (rate(bookcast_probe_latency_seconds_bucket{{{R}, hop="e2e"}}[{RATE}]))', "{{le}}",
        heatmap=True))
    b.row("Service histograms and clocks")
    b.timeseries("Service-side p99 by venue", [
        Query(f"histogram_quantile(0.99, sum by (le, venue) (rate(bookcast_hop_upstream_seconds_bucket{{{RIV}}}[{RATE}])))",
              "upstream {{venue}}"),
        Query(f"histogram_quantile(0.99, sum by (le, venue) (rate(bookcast_hop_ingest_seconds_bucket{{{RIV}}}[{RATE}])))",
              "ingest {{venue}}"),
        Query(f"histogram_quantile(0.99, sum by (le, venue) (rate(bookcast_hop_nats_gateway_seconds_bucket{{{RIV}}}[{RATE}])))",
              "NATS + gateway {{venue}}"),
    ], "s")
    b.timeseries("Gateway worker CPU", [
        Query(f"sum by (instance, worker) (rate(bookcast_gateway_worker_cpu_seconds_total{{{RI}}}[{RATE}]))",
              "{{instance}} {{worker}}"),
    ], "short", thresholds=[(0.9, "red")],
                 description="Cores each gateway worker process uses (user + system; 1 = one CPU). A worker is "
                             "one event loop: near 1 it is saturated, deltas wait in its inbound queue and the "
                             "NATS + gateway p99 beside grows with it (add workers, or move clients away).")
    b.timeseries("Clock skew (samples recorded as 0)", [
        Query(f"sum by (region, hop) (rate(bookcast_probe_clock_skew_total{{{R}}}[{RATE}]))", "probe {{region}} {{hop}}"),
        Query(f"sum by (venue) (rate(bookcast_ingest_upstream_clock_skew_total{{{RIV}}}[{RATE}]))", "ingest {{venue}}"),
    ], "ops")
    return b.dashboard(_templates("region", "instance", "venue"))


# -- 3. kernel (eBPF) ---------------------------------------------------------------------------
def kernel() -> tuple[g.Dashboard, Board]:
    b = Board("bookcast / Kernel (eBPF)", "bookcast-kernel",
              "bcc tracepoint programs on bookcast's own processes (`bookcast up --ebpf`, root): where a latency "
              "jump went inside our processes.")
    E = 'region=~"$region", instance=~"$instance", role=~"$role"'
    up = Query(f"max by (instance, reason) (bookcast_ebpf_up{{{R}}})", "{{instance}} {{reason}}", Needs.EBPF)
    b.stat("eBPF probes loaded", [up], w=8, mappings=[{"type": "value", "options": {
        "0": {"text": "not tracing", "color": "red"}, "1": {"text": "tracing", "color": "green"}}}])
    b.stat("Traced processes", [Query(f"sum by (role) (bookcast_ebpf_traced_processes{{{E}}})", "{{role}}",
                                      Needs.EBPF)], w=16)
    b.row("Syscalls")
    b.heatmap("Syscall latency (all roles and syscalls)", Query(
        f"sum by (le) (rate(bookcast_ebpf_syscall_latency_seconds_bucket{{{E}}}[{RATE}]))", "{{le}}", Needs.EBPF,
        heatmap=True))
    b.timeseries("Syscall latency p99 by role and syscall", [Query(
        f"histogram_quantile(0.99, sum by (le, role, syscall) (rate(bookcast_ebpf_syscall_latency_seconds_bucket{{{E}}}[{RATE}])))",
        "{{role}} {{syscall}}", Needs.EBPF)], "s")
    b.timeseries("Syscall rate by role and syscall", [Query(
        f"sum by (role, syscall) (rate(bookcast_ebpf_syscall_latency_seconds_count{{{E}}}[{RATE}]))",
        "{{role}} {{syscall}}", Needs.EBPF)], "ops")
    b.row("Scheduler")
    b.heatmap("Run-queue delay", Query(
        f"sum by (le) (rate(bookcast_ebpf_runqueue_latency_seconds_bucket{{{E}}}[{RATE}]))", "{{le}}", Needs.EBPF,
        heatmap=True))
    b.timeseries("Run-queue delay p99 by role", [Query(
        f"histogram_quantile(0.99, sum by (le, role) (rate(bookcast_ebpf_runqueue_latency_seconds_bucket{{{E}}}[{RATE}])))",
        "{{role}}", Needs.EBPF)], "s")
    b.timeseries("Off-CPU time by state (s per s)", [Query(
        f"sum by (role, state) (rate(bookcast_ebpf_offcpu_seconds_sum{{{E}}}[{RATE}]))", "{{role}} {{state}}",
        Needs.EBPF)], "s", stack=True)
    b.heatmap("Off-CPU intervals", Query(
        f"sum by (le) (rate(bookcast_ebpf_offcpu_seconds_bucket{{{E}}}[{RATE}]))", "{{le}}", Needs.EBPF, heatmap=True))
    b.row("TCP and sockets")
    b.timeseries("TCP retransmits", [Query(
        f"sum by (role) (rate(bookcast_ebpf_tcp_retransmits_total{{{E}}}[{RATE}]))", "{{role}}", Needs.EBPF)],
        "ops", w=8)
    b.timeseries("TCP smoothed RTT p50 / p99", [
        Query(f"histogram_quantile(0.5, sum by (le, role) (rate(bookcast_ebpf_tcp_srtt_seconds_bucket{{{E}}}[{RATE}])))",
              "p50 {{role}}", Needs.EBPF),
        Query(f"histogram_quantile(0.99, sum by (le, role) (rate(bookcast_ebpf_tcp_srtt_seconds_bucket{{{E}}}[{RATE}])))",
              "p99 {{role}}", Needs.EBPF),
    ], "s", w=8)
    b.timeseries("Socket queueing p99 (data ready to read)", [Query(
        f"histogram_quantile(0.99, sum by (le, role) (rate(bookcast_ebpf_socket_queue_seconds_bucket{{{E}}}[{RATE}])))",
        "{{role}}", Needs.EBPF)], "s", w=8)
    b.heatmap("Socket queueing", Query(
        f"sum by (le) (rate(bookcast_ebpf_socket_queue_seconds_bucket{{{E}}}[{RATE}]))", "{{le}}", Needs.EBPF,
        heatmap=True))
    b.timeseries("Bytes per socket send p50 / p99", [
        Query(f"histogram_quantile(0.5, sum by (le, role) (rate(bookcast_ebpf_socket_send_size_bytes_bucket{{{E}}}[{RATE}])))",
              "p50 {{role}}", Needs.EBPF),
        Query(f"histogram_quantile(0.99, sum by (le, role) (rate(bookcast_ebpf_socket_send_size_bytes_bucket{{{E}}}[{RATE}])))",
              "p99 {{role}}", Needs.EBPF),
    ], "bytes")
    return b.dashboard(_templates("region", "instance", "role"))


# -- 4. SLO -------------------------------------------------------------------------------------
def slos(config: slo.RuleConfig) -> tuple[g.Dashboard, Board]:
    b = Board("bookcast / SLO", "bookcast-slo",
              "Error budgets and burn rates of the three SLIs (dashboards/slo.py; SRE Workbook multiwindow, "
              f"multi-burn-rate alerts). Budget window {slo.BUDGET_WINDOW}.")
    b.row("Error budget remaining")
    for sli in slo.SLIS:
        budget = 1.0 - config.target(sli)
        b.stat(f"{slo.SLI_TITLES[sli]}: budget remaining ({slo.BUDGET_WINDOW})", [Query(
            f"1 - {slo.ratio_record(sli, slo.BUDGET_WINDOW)}{{{R}}} / {budget:.6g}", "{{region}}")],
            "percentunit", w=8, thresholds=[(0.0, "red")], decimals=1,
            description=f"Target {config.target(sli):g}: the share of the {slo.BUDGET_WINDOW} budget not yet spent "
                        "(negative: overspent).")
    b.row("SLI (last 5 minutes)")
    for sli in slo.SLIS:
        b.timeseries(f"{slo.SLI_TITLES[sli]} SLI", [
            Query(f"1 - {slo.ratio_record(sli, '5m')}{{{R}}}", "{{region}}"),
            Query(f"vector({config.target(sli):g})", "target"),
        ], "percentunit", w=8)
    b.row("Burn rate per window")
    for sli in slo.SLIS:
        budget = 1.0 - config.target(sli)
        b.timeseries(f"{slo.SLI_TITLES[sli]} burn rate", [
            Query(f"{slo.ratio_record(sli, w)}{{{R}}} / {budget:.6g}", f"{{{{region}}}} {w}")
            for w in slo.RATIO_WINDOWS[:-1]
        ], "x", w=8, thresholds=[(1.0, "yellow"), (6.0, "orange"), (14.4, "red")],
            description="Error ratio / budget. Pages at 14.4x (1h and 5m) and 6x (6h and 30m); ticket at 1x "
                        "(3d and 6h).")
    b.row("Alert states")
    b.timeseries("Alerts pending and firing", [
        Query('sum by (alertname, alertstate, region) (ALERTS{alertname=~"Bookcast.*", region=~"$region"})',
              "{{alertname}} {{region}} {{alertstate}}", Needs.ALERTS),
    ], w=12)
    b.alert_list("Alert list")
    return b.dashboard(_templates("region"))


# -- 5. drills ----------------------------------------------------------------------------------
def drills() -> tuple[g.Dashboard, Board]:
    b = Board("bookcast / Drills", "bookcast-drills",
              "Chaos drills (`bookcast drill run`, chaos/): when a fault was injected, how long detection, "
              "failover and recovery took, and the gaps clients saw.")
    D = 'drill=~"$drill"'
    b.stat("Detect time (last run)", [Query(f"max by (drill) (bookcast_drill_detect_seconds{{{D}}})", "{{drill}}",
                                            Needs.DRILLS)], "s", w=8)
    b.stat("Failover time (last run)", [Query(f"max by (drill) (bookcast_drill_failover_seconds{{{D}}})", "{{drill}}",
                                              Needs.DRILLS)], "s", w=8)
    b.stat("Recover time (last run)", [Query(f"max by (drill) (bookcast_drill_recover_seconds{{{D}}})", "{{drill}}",
                                             Needs.DRILLS)], "s", w=8)
    b.timeseries("Drill running", [Query(f"max by (drill) (bookcast_drill_running{{{D}}})", "{{drill}}", Needs.DRILLS)])
    b.timeseries("Gaps during drills", [
        Query(f"sum by (drill, kind) (increase(bookcast_drill_gaps_total{{{D}}}[{RATE}]))", "{{drill}} {{kind}}",
              Needs.DRILLS),
        Query(f"sum by (region) (increase(bookcast_probe_gaps_total{{{R}}}[{RATE}]))\n"
              f"and on () (max (bookcast_drill_running) == 1)", "probe {{region}}", Needs.DRILLS),
    ])
    b.timeseries("Lease and takeovers (regions)", [
        Query(f"max by (region, instance) (bookcast_ingest_leader{{{R}}})", "leader {{region}} {{instance}}",
              Needs.REGIONS),
        Query(f"sum by (region, kind) (increase(bookcast_ingest_takeovers_total{{{R}}}[{RATE}]))",
              "takeover {{region}} {{kind}}", Needs.REGIONS),
        Query(f"max by (region) (bookcast_ingest_lease_age_seconds{{{R}}})", "lease age {{region}}", Needs.REGIONS),
    ])
    b.timeseries("Client failovers and provider switches", [
        Query(f"sum by (region, reason) (increase(bookcast_probe_failovers_total{{{R}}}[{RATE}]))",
              "probe failover {{region}} {{reason}}", Needs.REGIONS),
        Query(f"sum by (venue, reason) (increase(bookcast_ingest_provider_switches_total{{{R}}}[{RATE}]))",
              "provider switch {{venue}} {{reason}}", Needs.PROVIDERS),
    ])
    annotations = [{
        "datasource": DATASOURCE, "enable": True, "expr": "max by (drill) (bookcast_drill_running) == 1",
        "iconColor": "red", "name": "drills", "step": "10s", "titleFormat": "drill {{drill}}",
        "tagKeys": "drill", "useValueForTime": False,
    }]
    b.queries.append(("annotation: drills", Query(annotations[0]["expr"], "", Needs.DRILLS)))
    return b.dashboard(_templates("region", "drill"), annotations)


def all_boards(config: slo.RuleConfig | None = None) -> list[tuple[g.Dashboard, Board]]:
    """Every dashboard with the board that collected its queries, in a fixed order."""
    config = config or slo.RuleConfig()
    return [feed_overview(), latency(config), kernel(), slos(config), drills()]


def exceptions(config: slo.RuleConfig | None = None) -> dict[str, tuple[Needs, str]]:
    """``{expr: (needs, "board / panel")}`` of every query allowed to return nothing on a healthy stack,
    including template variable queries."""
    out: dict[str, tuple[Needs, str]] = {}
    for dash, board in all_boards(config):
        for title, q in board.queries:
            if q.needs is not None:
                out[q.expr] = (q.needs, f"{dash.title} / {title}")
    for name, (_, query, needs) in VARIABLES.items():
        if needs is not None:
            out[query] = (needs, f"variable ${name}")
    return out
