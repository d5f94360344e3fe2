"""The provider drills' stack: two venue simulators as upstream providers, the fault proxy in front of each,
a pooled ingest with failover, and an unfaulted control path beside it (real processes on loopback).

Adapter module. Layout (every process recorded in the state file before anything else happens)::

    simulator provider-1 --- proxy "provider-1" --+
                                                   +-- ingest (pool: provider-1, provider-2) -> nats -> gateway-a -- faulted group
    simulator provider-2 --- proxy "provider-2" --+                                       \\-> checker
              \\------------------------------------- ingest-control (pool: provider-2)    -> nats-control -> gateway-c -- control group

Both simulators replay the same capture from one shared start instant (``bookcast simulate --start-at-ns``),
so they serve the same venue events: the pool's switch between them is lossless by construction. Drills
fault **provider-1** (a toxic on its proxy, or its simulator's knobs); the control ingest reads
provider-2 straight (no proxy), so the control group's books never pass through anything faulted (Netflix
ChAP's control). ``failover=False`` gives the faulted ingest provider-1 only (the checks must then fail);
``faulted_via_proxy=False`` points the faulted ingest at provider-1's simulator directly, so a proxy toxic
is *not on the data path* (the "not injected" test).

Roles for ``chaos.actions``: ``provider-1``, ``provider-2`` (simulators), ``proxy``, ``ingest``,
``ingest-control``, ``gateway-a``, ``gateway-c``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from chaos.stack import DrillStack, Proc, http_json, record_workdir
from feed.natsserver import NatsServer
from feed.procs import free_port, http_ok, wait_until

log = logging.getLogger("bookcast.chaos.provider_stack")

PROVIDERS = ("provider-1", "provider-2")


@dataclass
class ProviderDrillStack(DrillStack):
    kind = "providers"
    layout = "2 venue simulators behind the fault proxy, pooled ingest + gateway, control ingest + gateway"
    control_nats: NatsServer | None = None
    control_state_id: str | None = None
    venue: str = ""
    sim_ports: dict | None = None
    proxy_ports: dict | None = None
    stale_after_s: float = 0.5      # ScoringPolicy.stale_after_s: a provider silent this long is excluded

    def start(self) -> ProviderDrillStack:
        from feed.capture import read_capture

        self.venue = next(iter(read_capture(self.capture))).venue
        self.workdir_state_id = record_workdir(self.state, self.workdir)
        self.nats = NatsServer(name="bookcast-drill").start()
        self.nats_state_id = self.state.add_process(self.nats.pid, "nats-server")
        self.control_nats = NatsServer(name="bookcast-drill-control").start()
        self.control_state_id = self.state.add_process(self.control_nats.pid, "nats-server (control)")
        start_at_ns = time.time_ns() + 2_000_000_000
        self.sim_ports = {}
        for i, role in enumerate(PROVIDERS):
            port = free_port()
            self.sim_ports[role] = port
            self._spawn(Proc(role, ["simulate", "--venue", self.venue, "--capture", str(self.capture), "--port",
                                    str(port), "--speed", str(self.speed), "--start-at-ns", str(start_at_ns),
                                    "--seed", str(i + 1)], port))
        api_port_file = self.workdir / "proxy-api"
        proxy = Proc("proxy", ["-m", "chaos.proxy", "--port-file", str(api_port_file)], None)
        self._spawn(proxy, python_module=True)
        wait_until(lambda: api_port_file.exists() and api_port_file.read_text().strip(), 60, what="fault proxy API",
                   proc=proxy.popen)
        self.proxy_api = api_port_file.read_text().strip()
        self.proxy_ports = {}
        for role in PROVIDERS:
            created = http_json(f"{self.proxy_api}/proxies", {"name": role, "listen": "127.0.0.1:0",
                                                              "upstream": f"127.0.0.1:{self.sim_ports[role]}"})
            self.proxy_ports[role] = int(created["listen"].rpartition(":")[2])
        symbols: list[str] = []
        for role in PROVIDERS:
            port = self.sim_ports[role]
            wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/healthz", 1.0), 90, what=f"simulator {role}",
                       proc=self.procs[role].popen)
            symbols = symbols or list(http_json(f"http://127.0.0.1:{port}/sim/status")["instruments"])
        faulted = [self._spec("provider-1", via_proxy=self.faulted_via_proxy)]
        if self.failover:
            faulted.append(self._spec("provider-2", via_proxy=True))
        self._write_config("faulted.toml", symbols, faulted)
        self._write_config("control.toml", symbols, [self._spec("provider-2", via_proxy=False)])
        for role, conf, nats in (("ingest", "faulted.toml", self.nats), ("ingest-control", "control.toml",
                                                                          self.control_nats)):
            port = free_port()
            self._spawn(Proc(role, ["ingest", "--config", str(self.workdir / conf), "--nats", nats.url,
                                    "--http-port", str(port), "--name", f"drill-{role}"], port))
        for role, nats in (("gateway-a", self.nats), ("gateway-c", self.control_nats)):
            port = free_port()
            # the Coinbase BTC-USD book is ~1.1 MB: on a loaded machine the ingest takes longer than the
            # default 2 s to answer its snapshot request, and a retried request never arrives in time
            self._spawn(Proc(role, ["gateway", "--nats", nats.url, "--port", str(port), "--workers", "1",
                                    "--snapshot-timeout-s", "10", "--name", role], port))
        for role in ("gateway-a", "gateway-c"):
            self.wait_gateway(role, 90)
        self.instruments = self._pick_instruments()
        return self

    def _spec(self, role: str, *, via_proxy: bool):
        from feed.upstream import ProviderSpec
        from feed.stack import simulator_urls

        port = self.proxy_ports[role] if via_proxy else self.sim_ports[role]
        ws_url, rest_url = simulator_urls(self.venue, port)
        # provider-1 (the one drills fault) is preferred: the pool reads it until it is degraded
        return ProviderSpec(role, self.venue, ws_url, rest_url, weight=2.0 if role == "provider-1" else 1.0)

    def _write_config(self, name: str, symbols: list[str], specs: list) -> None:
        from feed.providers.config import PoolConfig, VenueConfig, toml_text
        from feed.providers.scoring import ScoringPolicy

        venue = VenueConfig(self.venue, tuple(symbols), tuple(specs), 5.0,
                            ScoringPolicy(stale_after_s=self.stale_after_s))
        (self.workdir / name).write_text(toml_text(PoolConfig((venue,))))

    def _pick_instruments(self) -> list[str]:
        def listing():
            return http_json(f"http://127.0.0.1:{self.procs['gateway-a'].port}/v1/instruments")["instruments"]
        wait_until(lambda: len([i for i in listing() if i["seq"] > 0]) >= 1, 60, what="gateway-a books moving")
        busiest = sorted(listing(), key=lambda i: -i["seq"])
        return [i["instrument"] for i in busiest[: self.instruments_wanted]]

    def stop(self) -> None:
        super().stop()
        if self.control_nats is not None:
            self.control_nats.cleanup()
            if self.control_state_id:
                self.state.remove(self.control_state_id)

    # -- what the runner reads ---------------------------------------------------------------------
    def faulted_urls(self) -> list[str]:
        return [self.ws_url("gateway-a")]

    def control_urls(self) -> list[str]:
        return [self.ws_url("gateway-c")]

    def faulted_first_url(self) -> str:
        return self.ws_url("gateway-a")

    def quiesce_roles(self) -> list[str]:
        return ["ingest", "ingest-control"]

    def checker_urls(self) -> dict[str, str]:
        return {"faulted": self.nats.url, "control": self.control_nats.url}

    def ingest_status(self) -> dict:
        return http_json(f"http://127.0.0.1:{self.procs['ingest'].port}/v1/status", timeout_s=2)

    def system_view(self) -> dict | None:
        pool = self.ingest_status()["providers"][self.venue]
        sel = pool.get("selected")
        me = next((p for p in pool["providers"] if p["name"] == sel), None)
        return {"selected": sel, "healthy": bool(me and me["health"] in ("healthy", "probation")
                                               and me["connected"] and not me["fault"])}

    def before_experiment(self, timeout_s: float = 60.0) -> None:
        """Wait until the faulted ingest reads provider-1 (the provider every drill faults): a fault on a
        standby provider is not on the data path (the fault's proof then says "not injected")."""
        def reading() -> bool:
            try:
                return self.system_view().get("selected") == "provider-1"
            except (OSError, ValueError, KeyError):
                return False
        try:
            wait_until(reading, timeout_s, what="the pooled ingest reading provider-1", interval_s=0.2)
        except TimeoutError as exc:
            log.warning("%s", exc)

    def selected(self) -> str | None:
        try:
            return self.system_view().get("selected")
        except (OSError, ValueError, KeyError):
            return None

    def sim_url(self, role: str) -> str:
        return f"http://127.0.0.1:{self.sim_ports[role]}"

    def describe(self) -> dict:
        out = super().describe()
        out.update({"venue": self.venue, "control_nats": self.control_nats.url if self.control_nats else None,
                    "simulators": {r: self.sim_url(r) for r in PROVIDERS}, "proxies": self.proxy_ports})
        return out
