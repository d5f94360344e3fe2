"""Chaos Toolkit actions (``"provider": {"type": "python", "module": "chaos.actions", "func": ...}``).

Each fault is recorded in the state file *before* it is applied, gets a hard time limit (the drill's
``fault_limit_s``, after which it is undone whatever happens), notes its onset in the timeline, and then
collects proof that it took effect (the proxy's own counters, the process gone or paused). A fault whose
proof fails makes the drill's verdict "not injected". Rollbacks (``rollback_*``) are idempotent: they undo
whatever is still recorded and are safe to run when nothing was injected.

Arguments are checked by chaostoolkit-lib against these signatures before the run.
"""
from __future__ import annotations

import logging
import os
import signal as _signal
import time
import urllib.error

from chaos.context import Proof, current
from chaos.proxy import validate_toxic
from chaos.stack import http_json
from chaos.state import STACK_KINDS, start_ticks
from feed.procs import port_open

log = logging.getLogger("bookcast.chaos.actions")

PROOF_TIMEOUT_S = 10.0


def _proxy_stats(proxy: str) -> dict:
    return http_json(f"{current().stack.proxy_api}/proxies/{proxy}")["stats"]


def inject_toxic(type: str, attributes: dict | None = None, stream: str = "downstream", toxicity: float = 1.0,
                 proxy: str = "gateway-a", name: str | None = None, require_read: bool = True) -> dict:
    """Add a Toxiproxy-style toxic on ``proxy`` (chaos.proxy). Proof: the proxy counts the toxic acting on
    the traffic (``stats.toxic_hits[name] > 0``) within ``PROOF_TIMEOUT_S``, and on the providers stack
    (``require_read``) the pooled ingest was reading that provider at onset. Returns the proof."""
    drill = current()
    body = {"type": type, "stream": stream, "toxicity": toxicity, "attributes": attributes or {}}
    if name:
        body["name"] = name
    toxic = validate_toxic(body)          # ToxicError before anything is recorded
    api = drill.stack.proxy_api
    selected = _selected_at_onset(proxy) if require_read else None
    before = _proxy_stats(proxy)
    sid = drill.state.add("toxic", api=api, proxy=proxy, toxic=toxic.name)
    # the onset is noted before the call: a client may see the fault before the proxy's answer comes back
    drill.note("fault_onset", f"toxic {toxic.type} {toxic.stream} {toxic.attributes} toxicity={toxicity} on {proxy}")
    http_json(f"{api}/proxies/{proxy}/toxics", {**body, "name": toxic.name})
    drill.hard_limit(sid, f"toxic {toxic.name} on {proxy}")
    deadline = time.monotonic() + PROOF_TIMEOUT_S
    after = before
    while time.monotonic() < deadline:
        after = _proxy_stats(proxy)
        if after["toxic_hits"].get(toxic.name, 0) > 0:
            break
        time.sleep(0.05)
    hits = after["toxic_hits"].get(toxic.name, 0)
    evidence = {"toxic_hits": hits, "connections_active": after["connections_active"],
                "bytes_downstream_at_onset": before["bytes_downstream"],
                "bytes_downstream_at_proof": after["bytes_downstream"]}
    if selected is not None:
        evidence["provider_read_at_onset"] = selected
    proof = Proof(f"toxic {toxic.name}", hits > 0 and (not require_read or selected in (None, proxy)), evidence)
    drill.proofs.append(proof)
    drill.note("proof", f"{proof.fault}: {'took effect' if proof.took_effect else 'NOT injected'}", **proof.evidence)
    return {"took_effect": proof.took_effect, **proof.evidence}


def _selected_at_onset(provider: str) -> str | None:
    """On the providers stack: the provider the pooled ingest reads at onset (waiting up to 30 s for it to
    be ``provider``; "" when unknown), so a fault on a standby provider is proved *not on the data path*;
    None on other stacks (or another proxy)."""
    stack = current().stack
    if not hasattr(stack, "selected") or not provider.startswith("provider-"):
        return None
    deadline = time.monotonic() + 30.0     # the pool may be on the other provider for a while: wait for it
    while stack.selected() != provider and time.monotonic() < deadline:
        time.sleep(0.2)
    return stack.selected() or ""


def remove_toxics(proxy: str = "gateway-a") -> dict:
    """End every toxic fault on ``proxy``: undo their state entries. Returns the proxy's final counters."""
    drill = current()
    for entry in drill.state.entries():
        if entry["kind"] == "toxic" and entry["proxy"] == proxy:
            drill.state.undo(entry["id"])
    stats = _proxy_stats(proxy)
    drill.note("fault_end", f"toxics removed from {proxy}", toxic_hits=stats["toxic_hits"])
    return stats


def signal_process(role: str, signal: str = "SIGKILL") -> dict:
    """Send ``signal`` (SIGKILL, SIGSTOP, SIGTERM) to the drill stack's ``role`` (gateway-a, ingest, ...).
    SIGSTOP is recorded (undone with SIGCONT); SIGKILL/SIGTERM are undone by ``rollback_restart``.
    Proof: the process is gone and its port closed (SIGKILL/SIGTERM), or its state is ``T`` (SIGSTOP)."""
    drill = current()
    sig = _signal.Signals[signal]
    pid = drill.stack.pid(role)
    if sig is _signal.SIGSTOP:
        sid = drill.state.add("sigstop", pid=pid, start_ticks=start_ticks(pid), what=role)
        drill.hard_limit(sid, f"SIGSTOP of {role}")
    drill.note("fault_onset", f"{signal} {role} pid={pid}")
    os.kill(pid, sig)
    port = drill.stack.procs[role].port
    deadline = time.monotonic() + PROOF_TIMEOUT_S
    took, evidence = False, {"pid": pid}
    while time.monotonic() < deadline and not took:
        if sig is _signal.SIGSTOP:
            status = _proc_state(pid)
            took, evidence["proc_state"] = status == "T", status
        else:
            gone = drill.stack.procs[role].popen.poll() is not None
            closed = port is None or not port_open("127.0.0.1", port)
            took, evidence["exited"], evidence["port_closed"] = gone and closed, gone, closed
        if not took:
            time.sleep(0.05)
    proof = Proof(f"{signal} {role}", took, evidence)
    drill.proofs.append(proof)
    drill.note("proof", f"{proof.fault}: {'took effect' if took else 'NOT injected'}", **evidence)
    return {"took_effect": took, **evidence}


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def resume_process(role: str) -> dict:
    """SIGCONT a role paused by ``signal_process(role, "SIGSTOP")`` (undoes its state entry)."""
    drill = current()
    for entry in drill.state.entries():
        if entry["kind"] == "sigstop" and entry.get("what") == role:
            drill.state.undo(entry["id"])
    drill.note("fault_end", f"SIGCONT {role}")
    return {"proc_state": _proc_state(drill.stack.pid(role))}


def rollback_restart(role: str) -> dict:
    """Start ``role`` again if it is not running (idempotent). Returns {"restarted": bool, "took_s": s}."""
    drill = current()
    proc = drill.stack.procs[role]
    if proc.popen is not None and proc.popen.poll() is None and _proc_state(proc.popen.pid) not in ("T", "gone"):
        return {"restarted": False}
    took_s = drill.stack.restart_role(role)
    drill.note("fault_end", f"{role} restarted in {took_s:.2f} s")
    return {"restarted": True, "took_s": round(took_s, 3)}


def rolling_restart(roles: list[str], pause_s: float = 1.0) -> dict:
    """Restart each role in turn (SIGTERM: the gateway sends ``shutdown`` and drains, then a new process on
    the same port), waiting for each to serve before the next, ``pause_s`` between. Proof: every role has
    a new PID and the old one exited."""
    drill = current()
    drill.note("fault_onset", f"rolling restart of {', '.join(roles)}")
    evidence = {}
    for role in roles:
        old = drill.stack.pid(role)
        took_s = drill.stack.restart_role(role)
        new = drill.stack.pid(role)
        evidence[role] = {"old_pid": old, "new_pid": new, "took_s": round(took_s, 3), "old_exited": start_ticks(old) is None}
        drill.note("restart", f"{role} pid {old} -> {new} in {took_s:.2f} s")
        time.sleep(pause_s)
    took = all(e["old_pid"] != e["new_pid"] and e["old_exited"] for e in evidence.values())
    proof = Proof("rolling restart", took, evidence)
    drill.proofs.append(proof)
    drill.note("proof", f"rolling restart: {'took effect' if took else 'NOT injected'}")
    drill.note("fault_end", "rolling restart done")
    return {"took_effect": took, **evidence}


def hold(duration_s: float) -> dict:
    """Keep the fault in place for ``duration_s`` (the safeguard watches meanwhile)."""
    time.sleep(float(duration_s))
    return {"held_s": duration_s}


def rollback_all() -> list[str]:
    """Undo everything the state file lists (toxics, pauses, started fault processes). Idempotent."""
    drill = current()
    done = [e for e in drill.state.entries() if e["kind"] not in STACK_KINDS]
    for entry in reversed(done):
        try:
            drill.state.undo(entry["id"])
        except (OSError, urllib.error.URLError) as exc:
            log.error("rollback of %s failed: %s", entry, exc)
    if done:
        drill.note("rollback", f"undid {len(done)} injection(s)")
    return [e["kind"] for e in done]


# -- upstream providers (chaos.provider_stack): the venue simulators' fault knobs ------------------------

# knob -> the simulator counters (GET /sim/status) that move when the knob acts on the data
SIM_PROOF_COUNTERS = {
    "stall": ("stalled_total",), "error_rate": ("handshakes_refused_total", "rest_errors_total"),
    "refuse_connections": ("handshakes_refused_total",), "rest_429": ("rest_errors_total",),
    "crossed": ("crossed_total",), "reset_seq": ("resets_total",), "disconnect": ("disconnects_total",),
    "drop_next": ("dropped_total",), "duplicate_next": ("duplicated_total",), "reorder_next": ("reordered_total",),
    "bad_next": ("bad_frames_total",), "flood_next": ("bad_frames_total",),
}
# knobs without a counter: proved by the faulted ingest's own view of the provider (/v1/status)
SIM_PROOF_POOL = {"lag_s": "lag_s", "latency_ms": "latency_s", "jitter_ms": "latency_s"}


def _sim_status(provider: str) -> dict:
    return http_json(f"{current().stack.sim_url(provider)}/sim/status")


def _pool_provider(provider: str) -> dict:
    stack = current().stack
    pool = stack.ingest_status()["providers"][stack.venue]
    return next(p for p in pool["providers"] if p["name"] == provider)


def set_sim_faults(knobs: dict, provider: str = "provider-1") -> dict:
    """Set fault knobs on a provider's venue simulator (``POST /sim/faults``, ``feed.simulator.world.Faults``:
    stall, lag_s, latency_ms, error_rate, refuse_connections, drop_next, duplicate_next, crossed, reset_seq,
    disconnect, ...). The reset (every given knob back to its default) is recorded first. Proof: the
    simulator's own counters for each knob moved (``SIM_PROOF_COUNTERS``), or for lag and latency the
    faulted ingest measured it on that provider (``lag_s`` / ``latency_s`` in its ``/v1/status``).
    Raises ``ValueError`` for an unknown knob (before anything is recorded)."""
    from feed.simulator.world import Faults

    drill = current()
    probe = Faults()
    probe.update(knobs)                     # ValueError naming the knob, nothing recorded
    defaults = Faults().as_dict()
    reset = {k: defaults[k] for k in knobs}
    url = f"{drill.stack.sim_url(provider)}/sim/faults"
    selected = _selected_at_onset(provider)
    before = _sim_status(provider)["counters"]
    sid = drill.state.add("http_post", url=url, body=reset, what=f"reset {', '.join(knobs)} on {provider}")
    onset_s = drill.note("fault_onset", f"simulator {provider}: {knobs}")   # before: the simulator acts at once
    http_json(url, knobs)
    drill.hard_limit(sid, f"simulator faults {knobs} on {provider}")
    deadline = time.monotonic() + PROOF_TIMEOUT_S
    evidence: dict = {}
    took = False
    while time.monotonic() < deadline and not took:
        after = _sim_status(provider)["counters"]
        moved = {}
        for knob in knobs:
            for counter in SIM_PROOF_COUNTERS.get(knob, ()):
                moved[counter] = after[counter] - before[counter]
        checks = [any(after[c] > before[c] for c in SIM_PROOF_COUNTERS[k]) for k in knobs if k in SIM_PROOF_COUNTERS]
        for knob, field_name in SIM_PROOF_POOL.items():
            if knob in knobs and float(knobs[knob]) > 0:
                try:
                    seen = _pool_provider(provider).get(field_name) or 0.0
                except (OSError, ValueError, KeyError, StopIteration):
                    seen = 0.0
                wanted = float(knobs[knob]) * (1.0 if knob == "lag_s" else 1e-3) / 2
                evidence[f"ingest_{field_name}"] = seen
                if seen < wanted and knob == "lag_s":
                    # a pool of one provider (failover disabled) has no peer to measure lag against: the
                    # faulted clients' own e2e (receipt minus the venue's event time) shows the lag then
                    e2e = sorted(d.e2e_s for d in drill.groups.recorder.snapshot()[0]
                                 if d.group == "faulted" and d.e2e_s is not None and d.t_s >= onset_s + 0.5)
                    if e2e:
                        evidence["faulted_e2e_median_s"] = round(e2e[len(e2e) // 2], 3)
                        seen = max(seen, e2e[len(e2e) // 2])
                checks.append(seen >= wanted)
        evidence.update(moved)
        took = bool(checks) and all(checks)
        if not took:
            time.sleep(0.1)
    if selected is not None:
        evidence["provider_read_at_onset"] = selected
        took = took and selected == provider
    proof = Proof(f"simulator {provider} {','.join(knobs)}", took, evidence)
    drill.proofs.append(proof)
    drill.note("proof", f"{proof.fault}: {'took effect' if took else 'NOT injected'}", **evidence)
    return {"took_effect": took, **evidence}


def clear_sim_faults(provider: str = "provider-1") -> dict:
    """End the simulator faults on ``provider`` (undo their recorded resets). Returns its counters."""
    drill = current()
    url = f"{drill.stack.sim_url(provider)}/sim/faults"
    for entry in drill.state.entries():
        if entry["kind"] == "http_post" and entry["url"] == url:
            drill.state.undo(entry["id"])
    counters = _sim_status(provider)["counters"]
    drill.note("fault_end", f"simulator faults cleared on {provider}")
    return counters


def flap_toxic(proxy: str = "provider-1", cycles: int = 3, down_s: float = 1.0, up_s: float = 1.0) -> dict:
    """A flapping provider: ``cycles`` times a ``down`` toxic on ``proxy`` (every connection closed, new
    ones refused) for ``down_s``, then removed for ``up_s``. Proof: each down counted hits."""
    current()
    hits = []
    for cycle in range(int(cycles)):
        r = inject_toxic("down", {}, proxy=proxy, name=f"flap-{cycle}", require_read=cycle == 0)
        hits.append(r["toxic_hits"])
        time.sleep(float(down_s))
        remove_toxics(proxy)
        time.sleep(float(up_s))
    return {"cycles": cycles, "toxic_hits": hits}


# -- regions (chaos.region_stack) ------------------------------------------------------------------------

def nats_lame_duck(role: str = "nats-a", wait_drained: bool = True) -> dict:
    """Put a region's NATS server in lame-duck mode (SIGUSR2, as ``nats-server --signal ldm=PID``): it stops
    accepting connections at once, sends its clients the lame-duck notice (INFO ``ldm``), and after its
    grace period closes them one by one and exits (the region stack configures a drain that fits a drill:
    ``RegionDrillStack.lame_duck_config``). Undone by ``rollback_restart``.

    Proof: its client port refuses new connections within ``PROOF_TIMEOUT_S``. With ``wait_drained`` the
    action then waits for the drain to end (the server exited: every client it held was closed), up to the
    stack's ``lame_duck_drain_s`` plus 20 s for a loaded machine; ``drained_after_s`` says when (None: it
    did not end in time, the evidence says so and the verdict's failover figures show what the clients did)."""
    drill = current()
    pid = drill.stack.pid(role)
    port = drill.stack.procs[role].port
    drain_s = drill.stack.lame_duck_drain_s(role) if hasattr(drill.stack, "lame_duck_drain_s") else 0.0
    onset = drill.note("fault_onset", f"lame duck {role} pid={pid}")
    os.kill(pid, _signal.SIGUSR2)
    deadline = time.monotonic() + PROOF_TIMEOUT_S
    closed = False
    while time.monotonic() < deadline and not closed:
        closed = not port_open("127.0.0.1", port)
        if not closed:
            time.sleep(0.05)
    evidence = {"pid": pid, "client_port_closed": closed, "drain_bound_s": round(drain_s, 3)}
    proof = Proof(f"lame duck {role}", closed, evidence)
    drill.proofs.append(proof)
    drill.note("proof", f"{proof.fault}: {'took effect' if closed else 'NOT injected'}", **evidence)
    if closed and wait_drained:
        popen = drill.stack.procs[role].popen
        deadline = onset + drain_s + 20.0
        while popen.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        drained = popen.poll() is not None
        evidence["drained_after_s"] = round(time.monotonic() - onset, 3) if drained else None
        drill.note("lame_duck_drained" if drained else "note",
                   f"lame duck {role}: " + (f"every client closed, server exited {evidence['drained_after_s']} s "
                                            "after the signal" if drained else
                                            f"still draining {drain_s + 20.0:.0f} s after the signal"), **evidence)
    return {"took_effect": closed, **evidence}


def _nft(*args: str, stdin: str | None = None, netns: str | None = None) -> str:
    import subprocess

    argv = ["nft", *args] if not netns else ["ip", "netns", "exec", netns, "nft", *args]
    r = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return r.stdout


def _nft_dropped(table: str, netns: str | None = None) -> int:
    import json as _json

    out = _json.loads(_nft("-j", "list", "table", "inet", table, netns=netns))
    packets = 0
    for item in out.get("nftables", []):
        for expr in (item.get("rule") or {}).get("expr", []):
            if "counter" in expr:
                packets += int(expr["counter"].get("packets", 0))
    return packets


def partition_regions(region: str = "b") -> dict:
    """Partition ``region`` from every other cluster of the supercluster (the other data region and the lease
    cluster): root; the region stack runs each cluster's NATS servers in a network namespace of its own
    (``configuration.netns``), and ``feed.partition.Partition`` puts an nftables table *inside region's
    namespace* dropping every packet to and from the other clusters' addresses (its gateway links and its
    route to the lease go silent both ways; its own clients keep their connections). The table is recorded
    (``nft_table`` with its namespace) before it is applied; rollback deletes it, and deleting the namespace
    (the stack's stop, or ``undo_all`` after a crash) takes it too. Proof: the table's own counters dropped
    packets within ``PROOF_TIMEOUT_S``. Raises ``PermissionError`` when not root, ``RuntimeError`` when the
    stack is not in namespaces."""
    from feed.partition import Partition

    if os.geteuid() != 0:
        raise PermissionError("partition_regions needs root (network namespaces and nftables)")
    drill = current()
    netns = drill.stack.region_namespace(region) if hasattr(drill.stack, "region_namespace") else None
    if not netns:
        raise RuntimeError("partition_regions needs the region stack in network namespaces (configuration.netns)")
    cut = Partition(drill.stack.regions.supercluster, region)
    sid = drill.state.add("nft_table", family="inet", table=cut.table, netns=netns)
    others = sorted(a for c, a in drill.stack.network.addresses.items() if c != region)
    drill.note("fault_onset", f"partition: region {region} cut from {others} (nft table {cut.table} in {netns})")
    cut.apply()
    drill.hard_limit(sid, f"partition of {region} (nft table {cut.table} in {netns})")
    deadline = time.monotonic() + PROOF_TIMEOUT_S
    dropped = 0
    while time.monotonic() < deadline and dropped == 0:
        dropped = cut.dropped()
        if not dropped:
            time.sleep(0.1)
    evidence = {"nft_table": cut.table, "netns": netns, "dropped_addresses": others, "packets_dropped": dropped}
    proof = Proof(f"partition {region}", dropped > 0, evidence)
    drill.proofs.append(proof)
    drill.note("proof", f"{proof.fault}: {'took effect' if dropped else 'NOT injected'}", **evidence)
    return {"took_effect": dropped > 0, **evidence}


def heal_partition() -> dict:
    """End every partition (undo the recorded nftables tables). Returns the packets each had dropped."""
    drill = current()
    dropped = {}
    for entry in drill.state.entries():
        if entry["kind"] == "nft_table":
            try:
                dropped[entry["table"]] = _nft_dropped(entry["table"], entry.get("netns"))
            except RuntimeError:
                dropped[entry["table"]] = None
            drill.state.undo(entry["id"])
    if dropped:      # a rollback after the method healed it already: no second end
        drill.note("fault_end", f"partition healed: {dropped}")
    return dropped
