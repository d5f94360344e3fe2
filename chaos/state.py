"""What a drill injected or started, on disk, so a rollback always finds it (also after a crash).

Adapter module. Every fault and every process a drill starts is recorded in a JSON state file *before* it
takes effect and removed once undone; ``undo_all`` undoes whatever is still listed, newest first. The next
``bookcast drill run`` calls ``undo_all`` before it starts, so a drill killed mid-fault (SIGKILL, a crash,
a power cut of the runner) leaves nothing behind once anything runs again.

Entry kinds (``kind`` plus fields)::

    process    pid, start_ticks, what      stopped by PID (SIGCONT, SIGTERM, then SIGKILL) if still the same
                                           process (same /proc start time: a reused PID is never signalled)
    sigstop    pid, start_ticks, what      SIGCONT
    toxic      api, proxy, toxic           DELETE {api}/proxies/{proxy}/toxics/{toxic}
    proxy_off  api, proxy                  POST {api}/proxies/{proxy} {"enabled": true}
    nft_table  family, table, netns        nft delete table (inside ``ip netns exec NETNS`` when set)
    netns      name                        ip netns delete NAME (SIGKILL what still runs inside first)
    link       name                        ip link delete NAME (the namespaces' bridge)
    http_post  url, body, what             POST body to url (e.g. a simulator knob reset)
    workdir    path                        rm -r PATH: a drill stack's work directory (its processes' logs,
                                           NATS stores); only a ``bookcast-drill-*`` directory, else refused

Default path: ``$BOOKCAST_CHAOS_STATE`` or ``run/chaos/state.json``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("bookcast.chaos.state")

# what a drill stack itself made (undone when the stack stops, or by ``undo_all`` after a crash); every other
# kind is an injection, undone by a drill's rollback
STACK_KINDS = ("process", "netns", "link", "workdir")
# the only directories a ``workdir`` entry may remove (a corrupt or hand-edited state file must not rm -r /)
WORKDIR_PREFIX = "bookcast-drill-"


def default_path() -> Path:
    return Path(os.environ.get("BOOKCAST_CHAOS_STATE", "run/chaos/state.json"))


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def same_process(pid: int, ticks: int | None) -> bool:
    now = start_ticks(pid)
    return now is not None and (ticks is None or now == ticks)


class StateFile:
    """The list of live injections. Thread-safe; every change is written (atomically) at once."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path else default_path()
        self._lock = threading.RLock()

    def entries(self) -> list[dict[str, Any]]:
        with self._lock:
            try:
                return json.loads(self.path.read_text())["entries"]
            except FileNotFoundError:
                return []
            except (ValueError, KeyError):
                log.warning("state file %s unreadable; treating as empty", self.path)
                return []

    def _write(self, entries: list[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # one per writer
        tmp.write_text(json.dumps({"entries": entries}, indent=1))
        os.replace(tmp, self.path)

    def add(self, kind: str, **fields: Any) -> str:
        """Record an injection; returns its id (for ``remove``)."""
        entry = {"id": uuid.uuid4().hex[:12], "kind": kind, "at_s": time.time(), **fields}
        with self._lock:
            self._write(self.entries() + [entry])
        return entry["id"]

    def add_process(self, pid: int, what: str) -> str:
        return self.add("process", pid=pid, start_ticks=start_ticks(pid), what=what)

    def remove(self, entry_id: str) -> None:
        with self._lock:
            self._write([e for e in self.entries() if e["id"] != entry_id])

    def undo(self, entry_id: str) -> bool:
        """Undo one entry now and remove it. Returns False if it was not listed."""
        with self._lock:
            entry = next((e for e in self.entries() if e["id"] == entry_id), None)
            if entry is None:
                return False
            undo_entry(entry)
            self.remove(entry_id)
            return True

    def undo_all(self, keep: tuple[str, ...] = ()) -> list[str]:
        """Undo every listed entry but those of the kinds in ``keep``, newest first. Returns one line per
        entry undone."""
        done = []
        with self._lock:
            for entry in reversed(self.entries()):
                if entry["kind"] in keep:
                    continue
                try:
                    undo_entry(entry)
                    done.append(f"{entry['kind']} {describe(entry)}")
                except Exception as exc:  # noqa: BLE001 - keep undoing the rest, say what failed
                    log.error("could not undo %s: %s", describe(entry), exc)
                    done.append(f"{entry['kind']} {describe(entry)} FAILED: {exc}")
                self.remove(entry["id"])
        return done


def describe(entry: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in entry.items() if k not in ("id", "kind", "at_s", "start_ticks", "body"))


def _http(method: str, url: str, body: Any = None) -> None:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5):
            pass
    except urllib.error.HTTPError as exc:
        if exc.code != 404:   # already gone is undone
            raise
    except OSError as exc:    # the proxy process itself is gone: nothing is injected any more
        log.info("%s %s: %s (its owner is gone)", method, url, exc)


def undo_entry(entry: dict[str, Any]) -> None:
    kind = entry["kind"]
    if kind == "process":
        _stop_pid(entry["pid"], entry.get("start_ticks"))
    elif kind == "sigstop":
        if same_process(entry["pid"], entry.get("start_ticks")):
            os.kill(entry["pid"], signal.SIGCONT)
    elif kind == "toxic":
        _http("DELETE", f"{entry['api']}/proxies/{entry['proxy']}/toxics/{entry['toxic']}")
    elif kind == "proxy_off":
        _http("POST", f"{entry['api']}/proxies/{entry['proxy']}", {"enabled": True})
    elif kind == "http_post":
        _http("POST", entry["url"], entry.get("body"))
    elif kind == "nft_table":
        cmd = ["nft", "delete", "table", entry["family"], entry["table"]]
        if entry.get("netns"):
            cmd = ["ip", "netns", "exec", entry["netns"], *cmd]
        subprocess.run(cmd, capture_output=True, check=False)
    elif kind == "netns":
        pids = subprocess.run(["ip", "netns", "pids", entry["name"]], capture_output=True, text=True, check=False)
        for pid in pids.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "delete", entry["name"]], capture_output=True, check=False)
    elif kind == "link":
        subprocess.run(["ip", "link", "delete", entry["name"]], capture_output=True, check=False)
    elif kind == "workdir":
        path = Path(entry["path"])
        if not path.is_absolute() or not path.name.startswith(WORKDIR_PREFIX) or path.is_symlink():
            raise ValueError(f"refusing to remove {str(path)!r}: not a drill stack's work directory "
                             f"(an absolute {WORKDIR_PREFIX}* directory)")
        shutil.rmtree(path, ignore_errors=True)
    else:
        raise ValueError(f"unknown state entry kind {kind!r}")


def _stop_pid(pid: int, ticks: int | None, grace_s: float = 5.0) -> None:
    if not same_process(pid, ticks):
        return
    for sig in (signal.SIGCONT, signal.SIGTERM):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not same_process(pid, ticks) or _zombie(pid):
            _reap(pid)
            return
        time.sleep(0.02)
    try:
        os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    _reap(pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
