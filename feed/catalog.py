"""The metric catalog: every bookcast metric declared once (name, type, help, unit, labels, buckets).

Services, eBPF specs, dashboards and alert rules refer to these names; ``tests/exporter`` fails on a
metric used anywhere that is not declared here or that breaks Prometheus naming (base units, counters
ending in ``_total``). Pure: declarations only; ``feed.metrics`` builds prometheus-client objects.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class MetricType(enum.StrEnum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"
    SUMMARY = "summary"  # quantiles (label ``quantile``) with _count and _sum, exposed by a custom collector


# 10 µs to 10 s, roughly 1-2.5-5 per decade: resolves the microsecond tail of a loopback hop and the
# seconds of a stalled upstream with the same buckets.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0, 2.5, 5.0, 10.0,
)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str
    type: MetricType
    help: str
    unit: str = ""  # base unit the name ends in: "seconds", "bytes", or "" for counts
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None


def _c(name: str, help: str, labels: tuple[str, ...] = ()) -> MetricSpec:
    return MetricSpec(name, MetricType.COUNTER, help, "", labels)


def _g(name: str, help: str, unit: str = "", labels: tuple[str, ...] = ()) -> MetricSpec:
    return MetricSpec(name, MetricType.GAUGE, help, unit, labels)


def _h(name: str, help: str, labels: tuple[str, ...] = ()) -> MetricSpec:
    return MetricSpec(name, MetricType.HISTOGRAM, help, "seconds", labels, LATENCY_BUCKETS_S)


SPECS: tuple[MetricSpec, ...] = (
    # ingest
    _c("bookcast_ingest_messages_total", "Raw venue messages read by the ingest.", ("venue",)),
    _c("bookcast_ingest_parse_errors_total", "Venue messages that could not be parsed (dropped, logged).", ("venue",)),
    _c("bookcast_ingest_ignored_total", "Venue messages knowingly ignored (subscriptions, tickers, unknown types).", ("venue",)),
    _c("bookcast_ingest_deltas_published_total", "Sequenced deltas published to NATS.", ("venue",)),
    _c("bookcast_ingest_trades_published_total", "Trades published to NATS.", ("venue",)),
    _c("bookcast_ingest_dropped_deltas_total", "Venue deltas dropped because no snapshot of the book was seen yet.", ("venue",)),
    _c("bookcast_ingest_crossed_books_total", "Books left crossed by venue input (remote fault of the venue).", ("venue",)),
    _c("bookcast_ingest_snapshot_requests_total", "Snapshot requests answered over NATS request/reply."),
    _g("bookcast_ingest_instruments", "Instruments whose book the ingest holds."),
    _g("bookcast_ingest_provider_up", "1 while an upstream source (provider) delivers, 0 once it ended or failed; "
       "provider is 'replay:<capture file>' for replays.", labels=("provider",)),
    _c("bookcast_ingest_upstream_clock_skew_total", "Deltas whose ts_event_ns is later than ts_ingest_ns (the upstream's "
       "clock ahead of ours); bookcast_hop_upstream_seconds observes them as 0.", ("venue",)),
    _h("bookcast_hop_upstream_seconds", "Venue event time to ingest receive (ts_ingest_ns - ts_event_ns, "
       "negative clamped to 0).", ("venue",)),
    _h("bookcast_hop_ingest_seconds", "Ingest receive to NATS publish (ts_publish_ns - ts_ingest_ns).", ("venue",)),
    # gateway
    _g("bookcast_gateway_clients", "Open WebSocket connections."),
    _g("bookcast_gateway_instruments", "Instruments with a NATS subscription on this gateway."),
    _g("bookcast_gateway_queue_bytes", "Bytes queued for clients, summed over connections (sampled every second).", "bytes"),
    _g("bookcast_gateway_queue_items", "Items queued for clients, summed over connections (sampled every second)."),
    _c("bookcast_gateway_worker_cpu_seconds_total", "CPU time (user + system) of each gateway worker process, by "
       "worker name (sampled every second; a restarted worker carries on its name's count): rate() is the cores a "
       "worker uses, and a worker near 1 is saturated, its deltas waiting in its inbound queue (the NATS + gateway "
       "hop grows).", ("worker",)),
    _c("bookcast_gateway_nats_messages_total", "Messages received from NATS, by type (delta, trade).", ("type",)),
    _c("bookcast_gateway_messages_sent_total", "Frames written to clients.", ("type",)),
    _c("bookcast_gateway_socket_writes_total", "Socket writes of frames to clients: one per frame, or one for a "
       "client's whole backlog when it has fallen behind (frames sent / socket writes = batching)."),
    _c("bookcast_gateway_bytes_sent_total", "Bytes of frames written to clients."),
    _c("bookcast_gateway_requests_total", "Client requests received.", ("op",)),
    _c("bookcast_gateway_errors_total", "Error replies sent, by error code.", ("code",)),
    _c("bookcast_gateway_resyncs_total", "resync notices sent to clients, by reason.", ("reason",)),
    _c("bookcast_gateway_slow_consumer_closes_total", "Connections closed with 4008 after repeated overflows."),
    _c("bookcast_gateway_ping_timeouts_total", "Connections dropped (1006, no close handshake) for answering no "
       "WebSocket ping within half the ping interval (PROTOCOL.md section 4)."),
    _c("bookcast_gateway_closes_total", "Connections closed by the gateway, by close code.", ("code",)),
    _c("bookcast_gateway_conflated_total", "Deltas merged into a conflated delta."),
    _c("bookcast_gateway_gaps_total", "Upstream gaps and epoch changes detected on NATS deltas."),
    _c("bookcast_gateway_snapshot_fetch_failures_total", "Failed snapshot requests to the ingest (retried)."),
    _c("bookcast_gateway_bad_upstream_total", "Malformed messages received from NATS (dropped, logged)."),
    _h("bookcast_hop_nats_gateway_seconds", "NATS publish to gateway queueing (ts_send_ns - ts_publish_ns).", ("venue",)),
    # latency probe (exporter.probe): hop is upstream, ingest, nats_gateway, client or e2e
    _h("bookcast_probe_latency_seconds", "Per-hop latency of every delta the probe received, from the message's "
       "own stamps.", ("region", "hop")),
    MetricSpec("bookcast_probe_latency_window_seconds", MetricType.SUMMARY, "Exact (HDR, 3 significant digits) "
               "latency quantiles p50, p90, p99, p99.9, p99.99 over a sliding window (1m, 10m).", "seconds",
               ("region", "hop", "window")),
    _g("bookcast_probe_latency_max_seconds", "Largest latency over a sliding window (1m, 10m).", "seconds",
       ("region", "hop", "window")),
    _c("bookcast_probe_messages_total", "Deltas measured by the probe.", ("region",)),
    _c("bookcast_probe_clock_skew_total", "Samples whose hop came out negative (clocks disagree); recorded as 0.",
       ("region", "hop")),
    _c("bookcast_probe_gaps_total", "Broken histories the probe's SDK detected (seq gap, epoch change, stale "
       "heartbeat, checksum mismatch).", ("region",)),
    _c("bookcast_probe_resyncs_total", "resync notices received from the gateway, by reason.", ("region", "reason")),
    _c("bookcast_probe_reconnects_total", "Reconnections of the probe's client.", ("region",)),
    _g("bookcast_probe_stale_instruments", "Subscribed instruments with no message and no heartbeat for the stale "
       "threshold.", labels=("region",)),
    _g("bookcast_probe_connected", "1 while the probe holds a connection to the region's gateway.", labels=("region",)),
    # ClickHouse sink (exporter.clickhouse): table is latency_samples or book_events
    _c("bookcast_clickhouse_rows_written_total", "Rows inserted into ClickHouse.", ("table",)),
    _c("bookcast_clickhouse_rows_dropped_total", "Rows dropped because the write buffer was full.", ("table",)),
    _c("bookcast_clickhouse_write_errors_total", "Failed batch inserts (the batch is dropped and counted).", ("table",)),
    _g("bookcast_clickhouse_buffer_rows", "Rows waiting in the write buffer.", labels=("table",)),
    # --- ebpf (ebpf/programs/*.json): kernel log2 histograms, slot k = [2^(k-1), 2^k) µs or bytes -> le 2^k
    *(MetricSpec(name, MetricType.HISTOGRAM, help, unit, labels, tuple(2.0 ** k * scale for k in range(27)))
      for name, unit, scale, labels, help in (
        ("bookcast_ebpf_syscall_latency_seconds", "seconds", 1e-6, ("role", "syscall"),
         "Syscall duration (enter to exit) of bookcast's processes, by process role and syscall."),
        ("bookcast_ebpf_runqueue_latency_seconds", "seconds", 1e-6, ("role",),
         "Time a bookcast thread waited for a CPU: wakeup (or preemption) to running."),
        ("bookcast_ebpf_offcpu_seconds", "seconds", 1e-6, ("role", "state"),
         "Time a bookcast thread spent off CPU, by the state it left in (runnable, interruptible, "
         "uninterruptible, other)."),
        ("bookcast_ebpf_tcp_srtt_seconds", "seconds", 1e-6, ("role",),
         "Smoothed RTT of TCP sockets on the listening ports of bookcast's processes, per received segment."),
        ("bookcast_ebpf_socket_queue_seconds", "seconds", 1e-6, ("role",),
         "Time data waited in a socket (sk_data_ready) until the bookcast process read it."),
        ("bookcast_ebpf_socket_send_size_bytes", "bytes", 1.0, ("role",),
         "Bytes per successful socket send of bookcast's processes."),
    )),
    _c("bookcast_ebpf_tcp_retransmits_total", "TCP segments retransmitted on the listening ports of bookcast's "
       "processes.", ("role",)),
    _g("bookcast_ebpf_traced_processes", "Processes the eBPF probes trace, by role.", labels=("role",)),
    # --- ebpf network-stack probes (issue 17: ebpf/programs/netstack, listenq, softirq) -------------------
    *(MetricSpec(name, MetricType.HISTOGRAM, help, "seconds", labels, tuple(2.0 ** k * 1e-6 for k in range(27)))
      for name, labels, help in (
        ("bookcast_ebpf_netstack_latency_seconds", ("role",),
         "Time from a packet's arrival in the network stack (net:netif_receive_skb) to the bookcast process "
         "copying its data out of the socket (skb:skb_copy_datagram_iovec), TCP (UDP copies a linear skb without a "
         "tracepoint), by reader role."),
        ("bookcast_ebpf_softirq_latency_seconds", ("role", "vec"),
         "Network softirq latency: raised (irq:softirq_raise) to running (softirq_entry), by vec (net_rx, net_tx) "
         "and the role of the task it ran on top of (host: not a bookcast process)."),
        ("bookcast_ebpf_softirq_run_seconds", ("role", "vec"),
         "Time a network softirq ran (softirq_entry to softirq_exit), by vec and the role of the task it ran on "
         "top of (host: not a bookcast process)."),
    )),
    MetricSpec("bookcast_ebpf_accept_queue_length_at_arrival", MetricType.HISTOGRAM, "Accept-queue (listen "
               "backlog) length each new connection found on a bookcast listening port, itself included, by role "
               "and port.", "", ("role", "port"), tuple(2.0 ** k for k in range(17))),
    _g("bookcast_ebpf_accept_queue_length", "Connections waiting in the accept queue of a bookcast listening port "
       "(every SO_REUSEPORT socket of the port summed), by role and port.", labels=("role", "port")),
    _g("bookcast_ebpf_accept_queue_limit", "Accept-queue capacity of a bookcast listening port (listen() backlog "
       "+ 1 per socket, summed over the port's sockets), by role and port.", labels=("role", "port")),
    _c("bookcast_ebpf_accept_queue_overflows_total", "Handshakes dropped because the accept queue of a bookcast "
       "listening port was full at the final ACK (skb:kfree_skb reason TCP_LISTEN_OVERFLOW), by role and port.",
       ("role", "port")),
    # --- contracts for work in flight: names agreed before the code that emits them lands ---------------
    # providers (issue 16): provider is the configured provider name, venue the venue
    _g("bookcast_ingest_provider_selected", "1 for the provider the ingest reads a venue from, 0 for hot standbys.",
       labels=("venue", "provider")),
    _g("bookcast_ingest_provider_score", "Provider health score from 0 (excluded) to 1 (best), per the scoring "
       "rules in feed.providers.", labels=("venue", "provider")),
    _g("bookcast_ingest_provider_lag_seconds", "How far a provider is behind the best provider of its venue (venue "
       "seq or event time).", "seconds", ("venue", "provider")),
    _c("bookcast_ingest_provider_messages_total", "Raw venue messages received from a provider (read or standby).",
       ("venue", "provider")),
    _c("bookcast_ingest_provider_errors_total", "Provider faults by kind (disconnect, error_reply, malformed, "
       "throttled, stale, lag).", ("venue", "provider", "kind")),
    _c("bookcast_ingest_provider_switches_total", "Switches of the provider a venue is read from, by reason.",
       ("venue", "reason")),
    _c("bookcast_ingest_integrity_faults_total", "Upstream integrity faults by kind (crossed, seq_gap, duplicate, "
       "reset, stale).", ("venue", "kind")),
    _g("bookcast_ingest_instruments_by_status", "Instruments by PROTOCOL section 11 status (ok, stale, crossed, "
       "resyncing, halted, resolved).", labels=("venue", "status")),
    # regions (issue 9)
    _g("bookcast_ingest_leader", "1 while this ingest holds the publishing lease, 0 while it is a standby.",
       labels=("region",)),
    _g("bookcast_ingest_lease_age_seconds", "Time since the lease this ingest last saw was written.", "seconds",
       ("region",)),
    _c("bookcast_ingest_takeovers_total", "Lease takeovers by this ingest, by kind (lossless: same epoch; lossy: "
       "new epoch).", ("region", "kind")),
    _c("bookcast_probe_failovers_total", "Region moves of the probe's SDK client, by reason.", ("region", "reason")),
    # regions (issue 9), beyond the names agreed above
    _g("bookcast_gateway_region_clients", "Open WebSocket connections of a region's gateway (gateway --region).",
       labels=("region",)),
    # security and integrity on the gateway (issue 10)
    _c("bookcast_gateway_auth_failures_total", "Rejected tokens and upgrades, by reason (never the token).",
       ("reason",)),
    _c("bookcast_gateway_connections_rejected_total", "Connections refused before or at the upgrade, by reason "
       "(per_source_cap, total_cap, handshake_timeout, idle_timeout, bad_version, bad_origin).", ("reason",)),
    _c("bookcast_gateway_checksum_mismatches_total", "Deltas from NATS whose checksum does not match the gateway's "
       "own book after applying them (the instrument is resynced)."),
    # security (issue 10), beyond the names agreed above
    _c("bookcast_gateway_handshake_failures_total", "Connections that failed before or at the upgrade without a "
       "gateway decision, by reason (bad_http, client_vanished, unmasked_frame); each is one DEBUG log line.",
       ("reason",)),
    _c("bookcast_gateway_conflicting_deltas_total", "Two different deltas from NATS for one (epoch, seq) of an "
       "instrument: one was forged or replayed (the instrument is resynced)."),
    # chaos drills (issue 14): exported by `bookcast drill run` while it runs
    _g("bookcast_drill_running", "1 while a drill's fault is injected.", labels=("drill",)),
    _g("bookcast_drill_detect_seconds", "Fault onset to first detection in the last run of a drill.", "seconds",
       ("drill",)),
    _g("bookcast_drill_failover_seconds", "Fault onset to service from the healthy path in the last run.", "seconds",
       ("drill",)),
    _g("bookcast_drill_recover_seconds", "Fault onset to every book correct again in the last run.", "seconds",
       ("drill",)),
    _c("bookcast_drill_gaps_total", "Gaps seen by drill clients, by kind (detected, undetected).", ("drill", "kind")),
    _g("bookcast_ebpf_up", "1 when the eBPF probes are loaded and attached; 0 with the reason (no_bcc, no_privilege, "
       "no_kernel_headers, no_tracefs, load_failed) when not.", labels=("reason",)),
)

CATALOG: dict[str, MetricSpec] = {s.name: s for s in SPECS}


def naming_problems(spec: MetricSpec) -> list[str]:
    """Prometheus naming rules a spec breaks (empty if none)."""
    problems = []
    if not spec.name.startswith("bookcast_"):
        problems.append("name must start with bookcast_")
    if spec.type is MetricType.COUNTER and not spec.name.endswith("_total"):
        problems.append("counter must end in _total")
    if spec.type is not MetricType.COUNTER and spec.name.endswith("_total"):
        problems.append("only counters end in _total")
    if spec.unit and not (spec.name.endswith(f"_{spec.unit}") or spec.name.endswith(f"_{spec.unit}_total")):
        problems.append(f"name must end in its unit _{spec.unit}")
    for bad in ("_ms", "_us", "_ns", "_milliseconds", "_microseconds", "_kb", "_mb"):
        if spec.name.endswith(bad):
            problems.append(f"non-base unit suffix {bad}")
    if spec.type is MetricType.HISTOGRAM and not spec.buckets:
        problems.append("histogram needs buckets")
    return problems
