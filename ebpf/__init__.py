"""eBPF probes on bookcast's own processes (bcc; tracepoints and raw tracepoints only). See ebpf/cli.py."""


class EbpfError(Exception):
    """Root of this package's errors."""
