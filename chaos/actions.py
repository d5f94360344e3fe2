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
from chaos.state import start_ticks
from feed.procs import port_open

log = logging.getLogger("bookcast.chaos.actions")

PROOF_TIMEOUT_S = 10.0


def _proxy_stats(proxy: str) -> dict:
    return http_json(f"{current().stack.proxy_api}/proxies/{proxy}")["stats"]


def inject_toxic(type: str, attributes: dict | None = None, stream: str = "downstream", toxicity: float = 1.0,
                 proxy: str = "gateway-a", name: str | None = None) -> dict:
    """Add a Toxiproxy-style toxic on ``proxy`` (chaos.proxy). Proof: the proxy counts the toxic acting on
    the traffic (``stats.toxic_hits[name] > 0``) within ``PROOF_TIMEOUT_S``. Returns the proof."""
    drill = current()
    body = {"type": type, "stream": stream, "toxicity": toxicity, "attributes": attributes or {}}
    if name:
        body["name"] = name
    toxic = validate_toxic(body)          # ToxicError before anything is recorded
    api = drill.stack.proxy_api
    before = _proxy_stats(proxy)
    sid = drill.state.add("toxic", api=api, proxy=proxy, toxic=toxic.name)
    http_json(f"{api}/proxies/{proxy}/toxics", {**body, "name": toxic.name})
    drill.hard_limit(sid, f"toxic {toxic.name} on {proxy}")
    drill.note("fault_onset", f"toxic {toxic.type} {toxic.stream} {toxic.attributes} toxicity={toxicity} on {proxy}")
    deadline = time.monotonic() + PROOF_TIMEOUT_S
    after = before
    while time.monotonic() < deadline:
        after = _proxy_stats(proxy)
        if after["toxic_hits"].get(toxic.name, 0) > 0:
            break
        time.sleep(0.05)
    hits = after["toxic_hits"].get(toxic.name, 0)
    proof = Proof(f"toxic {toxic.name}", hits > 0,
                  {"toxic_hits": hits, "connections_active": after["connections_active"],
                   "bytes_downstream_at_onset": before["bytes_downstream"],
                   "bytes_downstream_at_proof": after["bytes_downstream"]})
    drill.proofs.append(proof)
    drill.note("proof", f"{proof.fault}: {'took effect' if proof.took_effect else 'NOT injected'}", **proof.evidence)
    return {"took_effect": proof.took_effect, **proof.evidence}


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
    os.kill(pid, sig)
    drill.note("fault_onset", f"{signal} {role} pid={pid}")
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
    done = [e for e in drill.state.entries() if e["kind"] not in ("process",)]
    for entry in reversed(done):
        try:
            drill.state.undo(entry["id"])
        except (OSError, urllib.error.URLError) as exc:
            log.error("rollback of %s failed: %s", entry, exc)
    if done:
        drill.note("rollback", f"undid {len(done)} injection(s)")
    return [e["kind"] for e in done]
