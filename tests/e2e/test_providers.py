"""The provider pool end to end: real ``bookcast simulate`` processes as providers, nats-server, the ingest
(``bookcast ingest --config``), a gateway and SDK clients, all stopped by PID.

* per venue, 3 simulated providers replaying a real capture once: every client book equals the ingest's book
  of record and the capture's own final book;
* fault knobs on the provider being read: the ingest moves to a healthy one, the right metric and reason are
  counted, and clients end with exact books, never a checksum mismatch (every gap they had was announced).
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from feed.client import BookClient
from feed.model import Side
from feed.natsserver import NatsServer
from feed.procs import free_port, stop_process, wait_until
from feed.providers.config import PoolConfig, VenueConfig, toml_text
from feed.providers.scoring import ScoringPolicy
from feed.simulator import server as simulator
from feed.upstream import ProviderSpec
from tests.e2e.harness import http_ok, ingest_snapshot, spawn_cli

pytestmark = pytest.mark.e2e

from tests.feed.upstream.test_links_sim import capture_books

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
SOURCES = {  # venue -> (capture, speed): each pass lasts a few seconds
    "coinbase": ("coinbase-advanced/coinbase-advanced-level2-20260809.jsonl.gz", 3.0),
    "polymarket": ("polymarket/sol-15m-20251211.jsonl", 120.0),
    "kalshi": ("polymarket/sol-15m-20251211.jsonl", 120.0),
}


def get_json(url: str, timeout_s: float = 30.0):
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return json.loads(r.read())


def post_json(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def metrics(url: str) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(url, timeout=30) as r:  # generous: a loaded 2-core host
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        name, _, labels = head.partition("{")
        pairs = frozenset(tuple(kv.split("=", 1)) for kv in labels.rstrip("}").replace('"', "").split(",") if kv)
        out[(name, pairs)] = float(value)
    return out


@dataclass
class PoolStack:
    tmp: Path
    venue: str
    n: int = 3
    once: bool = True
    speed: float = 1.0
    capture: Path | None = None
    policy: ScoringPolicy = field(default_factory=ScoringPolicy)
    nats: NatsServer | None = None
    sims: list[tuple[int, subprocess.Popen]] = field(default_factory=list)
    ingest: subprocess.Popen | None = None
    gateway: subprocess.Popen | None = None
    ingest_port: int = 0
    gateway_port: int = 0
    names: list[str] = field(default_factory=list)

    @property
    def ingest_url(self) -> str:
        return f"http://127.0.0.1:{self.ingest_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.gateway_port}/v1/ws"

    def sim_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.sims[self.names.index(name)][0]}"

    def start(self) -> list[str]:
        self.nats = NatsServer(port=0, name="e2e-nats", workdir=str(self.tmp))
        self.nats.start()
        start_at = time.time_ns() + 4_000_000_000
        for i in range(self.n):
            port = free_port()
            args = ["simulate", "--venue", self.venue, "--capture", str(self.capture), "--port", str(port),
                    "--speed", str(self.speed), "--start-at-ns", str(start_at), "--seed", str(i + 1)]
            if self.once:
                args.append("--once")
            self.sims.append((port, spawn_cli(args, self.tmp / f"sim{i + 1}.log")))
        for port, proc in self.sims:
            wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), 60, what="simulator", proc=proc)
        symbols = get_json(f"http://127.0.0.1:{self.sims[0][0]}/sim/status")["instruments"]
        ws_path = simulator.WS_PATHS[self.venue]
        specs = tuple(ProviderSpec(f"sim{i + 1}", self.venue, f"ws://127.0.0.1:{port}{ws_path}",
                                   f"http://127.0.0.1:{port}") for i, (port, _) in enumerate(self.sims))
        self.names = [s.name for s in specs]
        config = self.tmp / "providers.toml"
        config.write_text(toml_text(PoolConfig((VenueConfig(self.venue, tuple(symbols), specs, 30.0, self.policy),))))
        self.gateway_port = free_port()
        self.gateway = spawn_cli(["gateway", "--nats", self.nats.url, "--port", str(self.gateway_port),
                                  "--workers", "1"], self.tmp / "gateway.log")
        self.ingest_port = free_port()
        self.ingest = spawn_cli(["ingest", "--config", str(config), "--nats", self.nats.url,
                                 "--http-port", str(self.ingest_port)], self.tmp / "ingest.log")
        wait_until(lambda: http_ok(f"http://127.0.0.1:{self.gateway_port}/readyz"), 30, what="gateway",
                   proc=self.gateway)
        instruments = [f"{self.venue}:{s}" for s in symbols]
        wait_until(lambda: self._listed() >= set(instruments), 60, what="instruments listed", proc=self.ingest)
        return instruments

    def _listed(self) -> set[str]:
        try:
            listing = get_json(f"http://127.0.0.1:{self.gateway_port}/v1/instruments")["instruments"]
        except OSError:
            return set()
        return {i["instrument"] for i in listing}

    def pool(self) -> dict:
        return get_json(self.ingest_url + "/v1/status")["providers"][self.venue]

    def selected(self) -> str | None:
        return self.pool()["selected"]

    def metric(self, name: str, **labels) -> float:
        want = frozenset(labels.items())
        return sum(v for (n, ls), v in metrics(self.ingest_url + "/metrics").items() if n == name and want <= ls)

    def fault(self, name: str, **knobs) -> None:
        post_json(self.sim_url(name) + "/sim/faults", knobs)

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for proc in [self.ingest, self.gateway, *(p for _, p in self.sims)]:
            if proc is not None:
                stop_process(proc, grace_s=10)
        if self.nats is not None:
            self.nats.stop()


@pytest.fixture
def pool_stack(tmp_path):
    stacks: list[PoolStack] = []

    def make(**kw) -> PoolStack:
        stacks.append(PoolStack(tmp_path, **kw))
        return stacks[-1]

    yield make
    for s in stacks:
        s.stop()


async def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if await asyncio.to_thread(predicate):
                return
        except OSError:
            pass  # an overloaded process did not answer in time: ask again
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


def norm(bids, asks) -> tuple:
    return tuple(tuple(level) for level in bids), tuple(tuple(level) for level in asks)


def levels(book) -> tuple:
    return norm(book.wire_levels(Side.BID), book.wire_levels(Side.ASK))


async def books_of_record(stack: PoolStack, instruments) -> dict[str, dict]:
    return {i: await ingest_snapshot(stack.nats.url, i) for i in instruments}


async def clients_equal_ingest(stack: PoolStack, clients, instruments, timeout_s: float = 60) -> dict[str, dict]:
    """Wait until every client's book of every instrument equals the ingest's (same epoch and seq)."""
    deadline = time.monotonic() + timeout_s
    while True:
        snaps = await books_of_record(stack, instruments)
        ok = all((lb := c.local_book(i)) is not None and (lb.epoch, lb.seq) == (snaps[i]["epoch"], snaps[i]["seq"])
                 for c in clients for i in instruments)
        if ok:
            for c in clients:
                for i in instruments:
                    assert levels(c.book(i)) == norm(snaps[i]["bids"], snaps[i]["asks"]), i
            return snaps
        if time.monotonic() > deadline:
            held = {i: [(lb.epoch, lb.seq) if (lb := c.local_book(i)) else None for c in clients] for i in instruments}
            raise AssertionError(f"clients never caught up with the ingest's books of record: clients {held}, "
                                 f"ingest {({i: (s['epoch'], s['seq']) for i, s in snaps.items()})}")
        await asyncio.sleep(0.2)


async def books_settle(stack: PoolStack, instruments: list[str], quiet_s: float = 3.0, timeout_s: float = 90) -> None:
    """Wait until the ingest's books of record keep one (epoch, seq) each for ``quiet_s``."""
    deadline = time.monotonic() + timeout_s
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        snaps = await books_of_record(stack, instruments)
        now = {i: (s["epoch"], s["seq"]) for i, s in snaps.items()}
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"the books of record never settled: last {last}")


@pytest.mark.parametrize("venue", ["polymarket", "coinbase", "kalshi"])
async def test_three_simulated_providers_clients_equal_ingest_and_capture(pool_stack, venue, shared_data):
    capture, speed = SOURCES[venue]
    stack = pool_stack(venue=venue, capture=shared_data / capture, speed=speed, once=True)
    instruments = await asyncio.to_thread(stack.start)
    async with BookClient(stack.ws_url, instruments) as client:
        await wait_for(lambda: all(get_json(f"http://127.0.0.1:{p}/sim/status")["done"] for p, _ in stack.sims),
                       120, "simulators done")
        # the capture is over: the books of record stop moving; the client must reach them exactly
        await clients_equal_ingest(stack, [client], instruments)
        snaps = await books_of_record(stack, instruments)
        expected = capture_books(venue, shared_data / capture)
        for inst in instruments:
            assert norm(snaps[inst]["bids"], snaps[inst]["asks"]) == norm(*expected[inst]), inst
            assert snaps[inst]["status"] in ("ok", "stale")
        assert client.stats.checksum_mismatches == 0
        st = stack.pool()
        assert len(st["providers"]) == 3 and all(p["connected"] for p in st["providers"])
        assert stack.metric("bookcast_ingest_provider_messages_total", venue=venue) > 0


async def _knob(stack: PoolStack, knob: str, **settings) -> str:
    """Turn a fault knob on at the provider the ingest reads now; returns that provider's name."""
    faulty: list[str] = []

    def read() -> bool:
        name = stack.selected()
        if name is not None:
            faulty.append(name)
        return name is not None

    await wait_for(read, 30, f"{knob}: a provider being read")
    if settings:
        await asyncio.to_thread(stack.fault, faulty[-1], **settings)
    return faulty[-1]


async def test_fault_knobs_on_the_read_provider_fail_over_with_exact_books(pool_stack, shared_data):
    venue = "coinbase"
    # a little more lenient than the defaults (0.5 s, 1 s) so a loaded test host does not flap on its own
    stack = pool_stack(venue=venue, capture=shared_data / SOURCES[venue][0], speed=1.0, once=False,
                       policy=ScoringPolicy(resample_interval_s=2.0, probation_s=0.5, stale_after_s=1.0,
                                            max_lag_s=1.5))
    instruments = await asyncio.to_thread(stack.start)
    m = stack.metric
    async with BookClient(stack.ws_url, instruments) as client:
        await wait_for(lambda: all(client.local_book(i) is not None for i in instruments), 30, "client books")

        async def moved_off(faulty: str, what: str, timeout_s: float = 30) -> None:
            await wait_for(lambda: stack.selected() not in (None, faulty), timeout_s, f"{what}: moved off {faulty}")

        async def healthy_again(name: str) -> None:
            await wait_for(lambda: next(p for p in stack.pool()["providers"] if p["name"] == name)["health"]
                           in ("healthy", "probation"), 30, f"{name} re-admitted")

        # disconnect: immediate switch, reason disconnect
        base = m("bookcast_ingest_provider_switches_total", reason="disconnect")
        faulty = await _knob(stack, "disconnect", disconnect=True)
        await moved_off(faulty, "disconnect")
        assert m("bookcast_ingest_provider_switches_total", reason="disconnect") > base
        assert m("bookcast_ingest_provider_errors_total", provider=faulty, kind="disconnect") >= 1

        def switches(*reasons: str) -> float:
            return sum(m("bookcast_ingest_provider_switches_total", reason=r) for r in reasons)

        # stall while alive: heartbeats go on, data stops. Coinbase numbers heartbeats with the data
        # (sequence_num), so the first heartbeat after the stall may show it as a seq gap before the
        # 0.5 s staleness rule fires: either reason is right.
        base = switches("stale", "integrity")
        faulty = await _knob(stack, "stall", stall=True)
        await moved_off(faulty, "stall")
        assert switches("stale", "integrity") > base
        await asyncio.to_thread(stack.fault, faulty, stall=False)

        # lag: data served 3 s behind (heartbeats on time): silent first (stale), then old data (lag), or
        # heartbeats ahead of the data (seq faults), or a healthy provider now scoring better (lag is in the
        # score); counted on the lagging provider
        base = switches("stale", "lag", "integrity", "better_score")
        faulty = await _knob(stack, "lag", lag_s=3.0)
        await moved_off(faulty, "lag")
        assert switches("stale", "lag", "integrity", "better_score") > base
        await wait_for(lambda: sum(m("bookcast_ingest_provider_errors_total", provider=faulty, kind=k)
                                   for k in ("lag", "stale", "integrity")) >= 1, 30, "lag counted on the provider")
        await asyncio.to_thread(stack.fault, faulty, lag_s=0.0)

        def errors(provider: str, kind: str) -> float:
            return m("bookcast_ingest_provider_errors_total", provider=provider, kind=kind)

        async def one_shot(knob: str, kind: str, **settings) -> str:
            """A one-shot fault on the read provider: counted on it (``kind``), and the pool reads another.
            (On a loaded host the pool may have moved on just before; the fault still counts on that provider.)"""
            faulty = await _knob(stack, knob + " (aim)")  # no settings yet: just who is read
            # somewhere to move to: with the other providers still excluded by the previous knob, keeping
            # the faulty one is the pool's documented choice (no candidate), not a failure to fail over
            await wait_for(lambda: any(p["health"] == "healthy" for p in stack.pool()["providers"]
                                       if p["name"] != faulty), 30, f"{knob}: a healthy provider besides {faulty}")
            base = errors(faulty, kind)
            await asyncio.to_thread(stack.fault, faulty, **settings)
            await wait_for(lambda: errors(faulty, kind) > base, 30, f"{knob}: {kind} counted on {faulty}")
            await moved_off(faulty, knob)
            return faulty

        # a dropped message while REST answers 429: a venue seq gap; the repair of that provider's books by
        # REST is throttled (counted), and the pool reads another meanwhile
        faulty = await _knob(stack, "rest_429", rest_429=True)
        base = errors(faulty, "integrity")
        await asyncio.to_thread(stack.fault, faulty, drop_next=1)
        await wait_for(lambda: errors(faulty, "integrity") > base, 30, "drop: seq gap counted")
        await wait_for(lambda: errors(faulty, "throttled") >= 1, 30, "REST 429 counted as throttled")
        await moved_off(faulty, "drop")
        await asyncio.to_thread(stack.fault, faulty, rest_429=False)
        assert m("bookcast_ingest_integrity_faults_total", kind="seq_gap") >= 1

        # a duplicated message: dropped by its venue seq, counted; no book changes twice
        faulty = await _knob(stack, "duplicate (aim)")
        base = errors(faulty, "duplicate")
        await asyncio.to_thread(stack.fault, faulty, duplicate_next=1)
        await wait_for(lambda: errors(faulty, "duplicate") > base, 30, "duplicate counted")

        await one_shot("reorder", "integrity", reorder_next=1)  # a seq gap, then a step back
        await one_shot("crossed", "integrity", crossed=True)  # a locked book at the end of a burst
        await one_shot("reset_seq", "integrity", reset_seq=True)  # the venue restarts its seq, new snapshots

        # latency on the read provider: its data arrives late; the pool moves to a faster one
        faulty = await _knob(stack, "latency", latency_ms=1500)
        await moved_off(faulty, "latency")
        await asyncio.to_thread(stack.fault, faulty, latency_ms=0)

        # a dead provider: disconnected and refusing connections; reconnects are counted errors
        faulty = await _knob(stack, "refuse", refuse_connections=True, disconnect=True)
        await moved_off(faulty, "refused")
        await wait_for(lambda: m("bookcast_ingest_provider_errors_total", provider=faulty, kind="error_reply") >= 1,
                       30, "refused reconnects counted")
        await asyncio.to_thread(stack.fault, faulty, refuse_connections=False)

        # the end: the venue goes quiet (no event at any provider; heartbeats go on) so the books of record
        # stop moving; then every client book equals the ingest's, no delta ever failed its checksum, and the
        # client never found a gap itself: every break it had was a resync the gateway sent
        for name in stack.names:
            await asyncio.to_thread(stack.fault, name, quiet=True)
        await books_settle(stack, instruments)
        await clients_equal_ingest(stack, [client], instruments, timeout_s=60)
        assert client.stats.checksum_mismatches == 0, client.stats
        assert client.stats.gaps == 0, client.stats
        assert sum(client.stats.resyncs_received.values()) >= 1, client.stats  # the lossy repairs were announced
        assert "Traceback" not in stack.log("ingest"), stack.log("ingest")[-3000:]


def test_up_simulate_runs_n_simulated_providers_per_venue(tmp_path, shared_data):
    """`bookcast up --simulate 2`: two simulators replay the capture, the ingest reads them through the pool."""
    import re
    import signal
    import sys

    from tests.e2e.harness import REPO

    proc = subprocess.Popen([sys.executable, "-m", "feed.cli", "up", "--port", "0", "--workers", "1", "--no-probe",
                             "--simulate", "2", "--capture", str(shared_data / "polymarket" / "sol-15m-20251211.jsonl"),
                             "--speed", "20"], cwd=REPO, stdout=subprocess.PIPE, stderr=open(tmp_path / "up.log", "wb"),
                            text=True, start_new_session=True)
    try:
        banner = ""
        deadline = time.monotonic() + 120
        while "try " not in banner and time.monotonic() < deadline and proc.poll() is None:
            banner += proc.stdout.readline()
        assert "2 simulated providers per venue" in banner, (banner, (tmp_path / "up.log").read_text()[-3000:])
        ingest = re.search(r"http://127\.0\.0\.1:(\d+)/metrics \(ingest\)", banner).group(1)
        status = get_json(f"http://127.0.0.1:{ingest}/v1/status")["providers"]["polymarket"]
        assert [p["name"] for p in status["providers"]] == ["sim-polymarket-1", "sim-polymarket-2"]
        assert status["selected"] in ("sim-polymarket-1", "sim-polymarket-2")
        wait_until(lambda: all(p["connected"] for p in get_json(f"http://127.0.0.1:{ingest}/v1/status")
                               ["providers"]["polymarket"]["providers"]), 30, what="both providers connected")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        stop_process(proc)
