"""One place for a stack's state: the bookcast home, run ids, and the state file ``bookcast up`` writes.

Each ``bookcast up`` is a **run** with an id (``new_run_id``: UTC start time plus 4 random hex digits, so ids
sort by start time). ``bookcast up`` writes ``<home>/run.json`` once everything is ready and marks it stopped
(``stopped_ns``) on the way out; the other commands (``bookcast latency report``, ``bookcast why``,
``bookcast tail``, the SDK example in the README) read it, so no command needs a URL pasted and a report
defaults to the current (or last) run, wherever it is started from.

The home comes from configuration, never from the working directory (``home_dir``):

1. ``$BOOKCAST_HOME`` when set;
2. else, when the ``feed`` package runs from a source checkout (``pyproject.toml`` beside it, as with
   ``./dev``), ``<checkout>/.bookcast``;
3. else ``$XDG_STATE_HOME/bookcast`` (``~/.local/state/bookcast``).

The chDB store lives in ``<home>/chdb`` unless the state file names another store.

State file shape (JSON object, every field always present; URLs absent as ``null``)::

    {"version": 1, "run_id": "20261201T095200Z-3fa2", "pid": 4242, "started_ns": ..., "stopped_ns": null,
     "ws_url": "ws://127.0.0.1:8080/v1/ws", "http_url": "http://127.0.0.1:8080",
     "gateway_metrics_url": ..., "ingest_metrics_url": ..., "probe_url": "http://127.0.0.1:41877" | null,
     "ebpf_url": ... | null, "nats_url": "nats://127.0.0.1:4222", "store": "/abs/path/.bookcast/chdb",
     "retention_s": 604800, "instruments": ["coinbase:SKL-USD", ...]}

Adapter module (files and the environment).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from feed.errors import FeedError

STATE_FILE = "run.json"
VERSION = 1
DEFAULT_RETENTION_S = 7 * 86_400


_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration_s(text: str) -> float:
    """``"10m"`` -> 600.0; units s, m, h, d; a bare number is seconds (windows, retention). Raises ValueError."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"duration must look like 30s, 10m, 2h or 1d, got {text!r}")
    return float(m.group(1)) * _UNITS_S[m.group(2) or "s"]


class RunStateError(FeedError):
    """No state file, or one that cannot be read; the message says which file and what to do."""


def home_dir(environ: dict[str, str] | None = None) -> Path:
    """The directory holding the state file and the default chDB store (see the module docstring)."""
    env = os.environ if environ is None else environ
    if env.get("BOOKCAST_HOME"):
        return Path(env["BOOKCAST_HOME"]).expanduser().resolve()
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "feed").is_dir():
        return checkout / ".bookcast"
    state = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "bookcast"


def default_store(home: Path | None = None) -> Path:
    """The default chDB store path: ``<home>/chdb`` (absolute)."""
    return (home or home_dir()) / "chdb"


def new_run_id(now_ns: int | None = None) -> str:
    """``YYYYmmddTHHMMSSZ-xxxx``: the UTC start second and 4 random hex digits (ids sort by start time)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now_ns // 10**9))
    return f"{stamp}-{secrets.token_hex(2)}"


@dataclass
class RunState:
    run_id: str
    pid: int
    started_ns: int
    ws_url: str
    http_url: str
    nats_url: str
    store: str
    retention_s: int = DEFAULT_RETENTION_S
    stopped_ns: int | None = None
    gateway_metrics_url: str | None = None
    ingest_metrics_url: str | None = None
    probe_url: str | None = None
    ebpf_url: str | None = None
    instruments: list[str] = field(default_factory=list)
    version: int = VERSION

    @property
    def running(self) -> bool:
        """True while the ``bookcast up`` that wrote this file is alive and has not marked it stopped."""
        if self.stopped_ns is not None:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def to_json(self) -> dict:
        return asdict(self)


def state_path(home: Path | None = None) -> Path:
    return (home or home_dir()) / STATE_FILE


def write_state(state: RunState, home: Path | None = None) -> Path:
    """Write the state file atomically (temp file, then rename). Returns its path. Raises OSError."""
    path = state_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_state(home: Path | None = None) -> RunState:
    """The state file of the current (or last) run.

    Raises:
        RunStateError: no state file (``bookcast up`` never ran with this home) or it is malformed.
    """
    path = state_path(home)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunStateError(f"no running stack: {path} does not exist (start one with `bookcast up`, "
                            f"or set BOOKCAST_HOME to the home it used)") from None
    except (OSError, ValueError) as exc:
        raise RunStateError(f"cannot read {path}: {exc}") from None
    known = {f.name for f in fields(RunState)}
    try:
        return RunState(**{k: v for k, v in data.items() if k in known})
    except TypeError as exc:
        raise RunStateError(f"{path} is not a bookcast state file: {exc}") from None


def current_run(home: Path | None = None) -> RunState:
    """The state of the running stack.

    Raises:
        RunStateError: no state file, or its ``bookcast up`` has stopped (the message says when).
    """
    state = read_state(home)
    if not state.running:
        raise RunStateError(f"the last run ({state.run_id}) has stopped; start one with `bookcast up`")
    return state


def mark_stopped(run_id: str, home: Path | None = None, now_ns: int | None = None) -> None:
    """Set ``stopped_ns`` in the state file if it still describes ``run_id`` (a newer run's file is kept)."""
    try:
        state = read_state(home)
    except RunStateError:
        return
    if state.run_id == run_id:
        state.stopped_ns = time.time_ns() if now_ns is None else now_ns
        write_state(state, home)
