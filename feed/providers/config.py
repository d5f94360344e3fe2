"""Provider pool configuration: a TOML file (``bookcast up --config FILE``, ``bookcast ingest --config FILE``).

Shape (every key but ``ws_url``, ``name`` and ``symbols`` optional)::

    [scoring]                      # feed.providers.scoring.ScoringPolicy fields, for every venue
    stale_after_s = 0.5            # a provider silent this long while the venue moved on is excluded
    max_lag_s = 1.0

    [venues.polymarket]
    symbols = ["7132...2563", "6581...5422"]   # venue symbols (token ids, product ids, market tickers)
    stale_after_s = 30.0           # instruments become `stale` for clients when the upstream is silent this long
    [venues.polymarket.scoring]    # per-venue overrides of [scoring]
    max_lag_s = 2.0
    [[venues.polymarket.providers]]
    name = "pm-direct"
    ws_url = "wss://ws-subscriptions-clob.polymarket.com/ws/market"
    rest_url = "https://clob.polymarket.com"
    weight = 1.0
    [[venues.polymarket.providers]]
    name = "pm-relay"
    ws_url = "wss://relay.example/ws/market"

    [[venues.kalshi.providers]]
    name = "kalshi"
    ws_url = "wss://api.elections.kalshi.com/trade-api/ws/v2"
    auth = { key_id = "...", private_key_file = "/etc/bookcast/kalshi.pem" }   # never logged

Pure apart from ``load_config`` reading the file. Errors: ``ConfigError`` (a ``ValueError``) naming the file,
the key and what is wrong.
"""
from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feed.errors import FeedError
from feed.upstream import ProviderSpec
from feed.providers.scoring import ScoringPolicy
from feed.venues import VENUES

# Per-venue default staleness bound for clients (seconds without data or heartbeat): Coinbase sends a
# heartbeat every second; Polymarket answers PING every 10 s; Kalshi sends pings every 10 s.
DEFAULT_STALE_AFTER_S = {"coinbase": 5.0, "polymarket": 30.0, "kalshi": 30.0}


class ConfigError(FeedError, ValueError):
    """A provider config that cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class VenueConfig:
    venue: str
    symbols: tuple[str, ...]
    providers: tuple[ProviderSpec, ...]
    stale_after_s: float
    scoring: ScoringPolicy = field(default_factory=ScoringPolicy)


@dataclass(frozen=True)
class PoolConfig:
    venues: tuple[VenueConfig, ...]
    source: str = "<memory>"

    def describe(self) -> str:
        """One line per venue, for logs: provider names and URLs, never auth."""
        return "; ".join(f"{v.venue}: {len(v.symbols)} symbols, providers "
                         + ", ".join(f"{p.name}={p.ws_url}" for p in v.providers) for v in self.venues)


_POLICY_FIELDS = {f.name: f.type for f in dataclasses.fields(ScoringPolicy)}


def _policy(base: ScoringPolicy, table: Any, where: str) -> ScoringPolicy:
    if table is None:
        return base
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: must be a table")
    changes = {}
    for key, value in table.items():
        if key not in _POLICY_FIELDS:
            raise ConfigError(f"{where}.{key}: unknown scoring setting; known: {', '.join(sorted(_POLICY_FIELDS))}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}.{key}: must be a number, got {value!r}")
        changes[key] = int(value) if _POLICY_FIELDS[key] in ("int", int) else float(value)
    try:
        return dataclasses.replace(base, **changes)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _str(table: Mapping, key: str, where: str, *, required: bool = True) -> str | None:
    value = table.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key}: must be a non-empty string, got {value!r}")
    return value


def parse_config(data: Mapping[str, Any], source: str = "<memory>") -> PoolConfig:
    """``PoolConfig`` from decoded TOML. Raises ``ConfigError``."""
    unknown = set(data) - {"scoring", "venues", "regions"}  # [regions]: read by `bookcast up` (feed.stack)
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {', '.join(sorted(unknown))}; expected [scoring], [venues.*]")
    base = _policy(ScoringPolicy(), data.get("scoring"), f"{source}: scoring")
    venues_table = data.get("venues")
    if not isinstance(venues_table, Mapping) or not venues_table:
        raise ConfigError(f"{source}: no [venues.<venue>] table: configure at least one venue with providers")
    venues = []
    for venue, vt in venues_table.items():
        where = f"{source}: venues.{venue}"
        if venue not in VENUES:
            raise ConfigError(f"{where}: unknown venue; known venues: {', '.join(sorted(VENUES))}")
        if not isinstance(vt, Mapping):
            raise ConfigError(f"{where}: must be a table")
        symbols = vt.get("symbols")
        if not isinstance(symbols, list) or not symbols or not all(isinstance(s, str) and s for s in symbols):
            raise ConfigError(f"{where}.symbols: must be a non-empty list of venue symbols, got {symbols!r}")
        stale = vt.get("stale_after_s", DEFAULT_STALE_AFTER_S.get(venue, 30.0))
        if isinstance(stale, bool) or not isinstance(stale, (int, float)) or stale <= 0:
            raise ConfigError(f"{where}.stale_after_s: must be a positive number of seconds, got {stale!r}")
        plist = vt.get("providers")
        if not isinstance(plist, list) or not plist:
            raise ConfigError(f"{where}.providers: give at least one [[venues.{venue}.providers]] entry")
        specs = []
        names = set()
        for i, pt in enumerate(plist):
            pwhere = f"{where}.providers[{i}]"
            if not isinstance(pt, Mapping):
                raise ConfigError(f"{pwhere}: must be a table")
            extra = set(pt) - {"name", "ws_url", "rest_url", "weight", "auth"}
            if extra:
                raise ConfigError(f"{pwhere}: unknown key(s) {', '.join(sorted(extra))}")
            name = _str(pt, "name", pwhere)
            if name in names:
                raise ConfigError(f"{pwhere}.name: {name!r} is used twice in venue {venue}")
            names.add(name)
            weight = pt.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
                raise ConfigError(f"{pwhere}.weight: must be a positive number, got {weight!r}")
            auth = pt.get("auth")
            if auth is not None and (not isinstance(auth, Mapping)
                                     or not all(isinstance(k, str) and isinstance(v, str) for k, v in auth.items())):
                raise ConfigError(f"{pwhere}.auth: must be a table of strings")
            specs.append(ProviderSpec(name=name, venue=venue, ws_url=_str(pt, "ws_url", pwhere),
                                      rest_url=_str(pt, "rest_url", pwhere, required=False), weight=float(weight),
                                      auth=dict(auth) if auth is not None else None))
        venues.append(VenueConfig(venue, tuple(symbols), tuple(specs), float(stale),
                                  _policy(base, vt.get("scoring"), f"{where}.scoring")))
    return PoolConfig(tuple(venues), source)


def load_config(path: Path) -> PoolConfig:
    """Read and check a provider config file. Raises ``ConfigError`` (also for unreadable or bad TOML)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read provider config: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, str(path))


def toml_text(config: PoolConfig) -> str:
    """A config back as TOML text (for ``bookcast up --simulate``, which writes one for its simulators)."""
    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = []
    for v in config.venues:
        lines.append(f"[venues.{v.venue}]")
        lines.append("symbols = [" + ", ".join(q(s) for s in v.symbols) + "]")
        lines.append(f"stale_after_s = {v.stale_after_s!r}")
        default = ScoringPolicy()
        overrides = {f: getattr(v.scoring, f) for f in _POLICY_FIELDS if getattr(v.scoring, f) != getattr(default, f)}
        if overrides:
            lines.append(f"[venues.{v.venue}.scoring]")
            lines.extend(f"{k} = {val!r}" for k, val in overrides.items())
        for p in v.providers:
            lines.append(f"[[venues.{v.venue}.providers]]")
            lines.append(f"name = {q(p.name)}")
            lines.append(f"ws_url = {q(p.ws_url)}")
            if p.rest_url:
                lines.append(f"rest_url = {q(p.rest_url)}")
            lines.append(f"weight = {p.weight!r}")
            if p.auth:
                lines.append("auth = { " + ", ".join(f"{k} = {q(val)}" for k, val in p.auth.items()) + " }")
        lines.append("")
    return "\n".join(lines)
