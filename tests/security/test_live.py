"""A hardened stack under attack: NATS users, token auth, the ops listener, connection hygiene, all real.

One stack for the module (nats-server with users, an ingest and a gateway logging in with password files,
the gateway with a token key, an ops port and short hygiene timeouts), then: what the public port serves,
auth on upgrade and REST, 4001 on expiry, forged deltas, and a healthy client streaming while 2,000 idle
connections, floods, slowloris and a fuzzing client hit the gateway.
"""
from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import nats
import orjson
import pytest

from feed.auth import Algorithm, issue_token
from feed.natsauth import NatsCredentials, NatsRole, NatsUser, write_password_file
from feed.natsserver import NatsServer
from feed.procs import free_port, stop_process, wait_until
from feed.stack import bundled_capture
from feed.subjects import delta_subject
from tests.e2e.harness import spawn_cli
from tests.security import attack

pytestmark = pytest.mark.e2e
SECRET = b"live-test-secret-live-test-secret-0001"


def token(instruments=("coinbase:*",), ttl_s: int = 3600, sub: str = "desk") -> str:
    return issue_token(sub=sub, instruments=list(instruments), now_s=int(time.time()), ttl_s=ttl_s,
                       algorithm=Algorithm.HS256, key=SECRET, kid="k1")


def get(url: str, tok: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {tok}"} if tok else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return None, b""


class Secured:
    """nats-server, a looping replay and a gateway with an ops port and short hygiene timeouts; NATS has
    users (ingest and gateway log in) and the gateway checks tokens."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.users = {r: NatsUser.generate(r) for r in NatsRole}
        self.nats = NatsServer(name="secured-nats", users=list(self.users.values()), workdir=str(tmp))
        self.port, self.ops_port, self.ingest_port = free_port(), free_port(), free_port()
        self.procs = []

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ops(self) -> str:
        return f"http://127.0.0.1:{self.ops_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def start(self) -> Secured:
        for attempt in range(3):  # a free port taken by another engineer's test in between: new ports
            try:
                self.nats.start()
                break
            except RuntimeError:
                self.nats.cleanup()
                if attempt == 2:
                    raise
                self.nats = NatsServer(name="secured-nats", users=list(self.users.values()), workdir=str(self.tmp))
        secret = self.tmp / "hs.secret"
        secret.write_bytes(SECRET)
        gateway_login = ["--nats-user", "gateway", "--nats-password-file",
                         str(write_password_file(self.tmp, self.users[NatsRole.GATEWAY]))]
        ingest_login = ["--nats-user", "ingest", "--nats-password-file",
                        str(write_password_file(self.tmp, self.users[NatsRole.INGEST]))]
        auth = ["--auth-hs256-secret-file", f"k1={secret}", "--max-connections-per-token", "2500"]
        # the total cap sits 300 above the 2,000 idle WebSockets of the attack test, so a few hundred silent
        # sockets reach it (fd exhaustion in small)
        self.gateway = spawn_cli([
            "gateway", "--nats", self.nats.url, "--port", str(self.port), *gateway_login, *auth,
            # pings every 30 s (pong due in 15 s): on this shared machine the gateway's loop was seen to lag
            # 5 s under the attack, and aiohttp drops a client whose pong it has not read by then (1006)
            "--ws-ping-interval-s", "30",
            "--ops-port", str(self.ops_port), "--idle-timeout-s", "2", "--handshake-timeout-s", "1.5",
            "--max-connections-per-source", "40", "--max-connections", "2300", "--rest-headroom", "100"],
            self.tmp / "gateway.log")
        self.procs.append(self.gateway)
        # the ingest starts while the gateway does (the gateway asks for announcements when it subscribes)
        self.ingest = spawn_cli(["replay", "--nats", self.nats.url, *ingest_login, "--speed", "1", "--loop",
                                 "--http-port", str(self.ingest_port), str(bundled_capture())],
                                self.tmp / "ingest.log")
        self.procs.append(self.ingest)
        wait_until(lambda: get(self.base + "/readyz")[0] == 200, 60, what="gateway /readyz", proc=self.gateway)
        tok = token()
        wait_until(lambda: len(self.instruments(tok)) >= 10, 60, what="10 instruments listed", proc=self.ingest)
        return self

    def instruments(self, tok: str | None) -> list[str]:
        status, body = get(self.base + "/v1/instruments", tok)
        return [i["instrument"] for i in json.loads(body)["instruments"]] if status == 200 else []

    def metric(self, name: str, labels: str = "") -> float:
        _, body = get(self.ops + "/metrics")
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith(name + ("{" if labels else "")) and labels in line:
                total += float(line.rsplit(" ", 1)[1])
            elif not labels and line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def log(self) -> str:
        return (self.tmp / "gateway.log").read_text(errors="replace")

    def stop(self) -> None:
        for p in reversed(self.procs):
            stop_process(p, grace_s=10)
        self.nats.cleanup()


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    s = Secured(tmp_path_factory.mktemp("secured"))
    try:
        yield s.start()
    finally:
        s.stop()


def test_public_port_serves_no_metrics_when_the_ops_listener_is_on(secured):
    assert get(secured.base + "/metrics")[0] == 404
    assert get(secured.base + "/v1/status")[0] == 404
    status, body = get(secured.ops + "/metrics")
    assert status == 200 and b"bookcast_gateway_clients" in body
    status, body = get(secured.ops + "/v1/status")
    assert status == 200 and json.loads(body)["ready"] is True
    assert get(secured.base + "/healthz")[0] == 200 and get(secured.base + "/readyz")[0] == 200


async def test_auth_on_upgrade_and_rest(secured):
    granted = secured.instruments(token())
    inst = granted[0]
    assert all(i.startswith("coinbase:") for i in granted)
    assert secured.instruments(token(instruments=[inst])) == [inst]  # the listing follows the patterns
    assert get(secured.base + f"/v1/book/{inst}")[0] == 401
    assert get(secured.base + f"/v1/book/{inst}", "not.a.token")[0] == 401
    assert get(secured.base + f"/v1/book/{inst}", token(instruments=["polymarket:*"]))[0] == 403
    status, body = get(secured.base + f"/v1/book/{inst}", token())
    assert status == 200 and json.loads(body)["type"] == "snapshot"
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await s.ws_connect(secured.base + "/v1/ws")
        assert info.value.status == 401
        async with s.ws_connect(secured.base + "/v1/ws", params={"token": token(instruments=[inst])}) as ws:
            await ws.send_str(orjson.dumps({"op": "subscribe", "id": 1, "instruments": [granted[1]]}).decode())
            reply = orjson.loads((await ws.receive(timeout=5)).data)
            assert reply["type"] == "error" and reply["code"] == "forbidden" and reply["id"] == 1
    assert secured.metric("bookcast_gateway_auth_failures_total", 'reason="missing"') >= 2
    assert secured.metric("bookcast_gateway_auth_failures_total", 'reason="malformed"') >= 1


async def test_a_token_expiring_while_connected_closes_4001(secured):
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(secured.base + "/v1/ws", headers={"Authorization": f"Bearer {token(ttl_s=2)}"}) as ws:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                msg = await ws.receive(timeout=15)
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                    break
            assert ws.close_code == 4001


async def test_forged_delta_is_refused_by_nats(secured):
    """Issue 10's adversarial run, repeated: a delta published with the gateway's own NATS login never
    reaches the gateway (nats-server refuses it), so nothing conflicts and nothing is resynced."""
    inst = secured.instruments(token())[0]
    errors: list[str] = []
    conflicts0 = secured.metric("bookcast_gateway_conflicting_deltas_total")
    mismatches0 = secured.metric("bookcast_gateway_checksum_mismatches_total")

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    user = secured.users[NatsRole.GATEWAY]
    nc = await nats.connect(secured.nats.url, error_cb=on_error, allow_reconnect=False,
                            **NatsCredentials(user.name, user.password).connect_kwargs())
    try:
        _, body = get(secured.base + f"/v1/book/{inst}", token())
        snap = json.loads(body)
        forged = {"type": "delta", "instrument": inst, "epoch": snap["epoch"], "seq": snap["seq"] + 1,
                  "prev_seq": snap["seq"], "changes": [["bid", "0.00000001", "123456"]], "checksum": snap["checksum"],
                  "ts_ingest_ns": 1, "ts_publish_ns": 2}
        await nc.publish(delta_subject(inst), orjson.dumps(forged))
        await nc.flush()
        await attack_wait(lambda: any("permissions violation" in e.lower() for e in errors), 5)
    finally:
        await nc.close()
    await asyncio.sleep(1.0)  # give a forgery that got through time to show (it must not)
    _, body = get(secured.base + f"/v1/book/{inst}", token())
    assert ["0.00000001", "123456"] not in json.loads(body)["bids"]
    assert secured.metric("bookcast_gateway_conflicting_deltas_total") == conflicts0
    assert secured.metric("bookcast_gateway_checksum_mismatches_total") == mismatches0


async def attack_wait(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_attacks_while_a_healthy_client_streams(secured):
    """2,000 idle WebSockets, a silent-socket flood from many addresses (past the total cap), slowloris and
    the fuzzing client, all at once, while a healthy client streams every instrument: 0 gaps, 0 resyncs,
    /healthz always 200, every attacker cut, every bad input its documented answer, no ERROR logged."""
    attack.raise_fd_limit()
    tok = token()
    instruments = secured.instruments(tok)
    rss_before = attack.rss_bytes(secured.gateway.pid)
    # a few handshakes at a time, each given long: on a loaded 2-core machine the point is that every
    # well-behaved client is let in and kept, not how fast (the measurement command times it)
    idle, failures = await attack.idle_websockets("127.0.0.1", secured.port, 2000, token=tok, concurrency=32,
                                                  timeout_s=30.0)
    assert len(idle) == 2000, failures
    await asyncio.sleep(0.5)
    rss_per_conn_kb = (attack.rss_bytes(secured.gateway.pid) - rss_before) / 2000 / 1024
    # the control (healthy client + /healthz probe) in its own process, as a real client would be. A probe
    # has 30 s: on this shared 2-core machine (load 15 seen) the gateway's loop can lag seconds behind
    # under the attack; a late answer is its CPU share, a refusal or no answer would be the finding
    control = attack.ControlProcess(f"ws://127.0.0.1:{secured.port}/v1/ws", instruments, tok,
                                    secured.base + "/healthz", probe_interval_s=0.2, probe_timeout_s=30.0).start()
    await control.ready()
    host, port = "127.0.0.1", secured.port
    silent, slow, cases = await asyncio.gather(
        # 4 s of attack: twice the idle (2 s) and handshake (1.5 s) timeouts, so every attacker is cut
        # while the healthy client streams (grace_s: the last ones opened get that long to be cut)
        attack.silent_sockets(host, port, 900, 4, attack.loopback_sources(0, 20), grace_s=15),
        attack.slowloris(host, port, 120, 4, 0.2, attack.loopback_sources(200, 3), grace_s=15),
        # the bad inputs from a thread with its own event loop: in this one, the floods' thousand
        # connects can delay a case's request past the 2 s idle timeout on a loaded machine (then it is
        # cut as a silent socket, correctly, and the case never gets to its input)
        asyncio.to_thread(asyncio.run, attack.fuzz_cases(host, port, token=tok)))
    frames = await attack.random_frames(host, port, 30, token=tok)
    await asyncio.sleep(1.0)
    stats, statuses = await control.stop()
    idle_held = sum(1 for c in idle if not c.closed.is_set())
    for c in idle:
        c.close()
    assert stats.gaps == 0 and stats.resyncs == 0 and stats.disconnects == 0 and stats.deltas > 0, stats.summary()
    # /healthz is never refused (no 503, reset or refusal); a probe the starved machine did not get to in
    # 30 s (a SYN dropped from a full accept queue is retried at 1, 3, 7, 15, 31 s) is allowed 1 in 10
    assert set(statuses) <= {200, "timeout"}, (statuses, control.health_latencies_s)
    assert statuses["timeout"] <= sum(statuses.values()) / 10, (statuses, control.health_latencies_s)
    assert idle_held == 2000  # well-behaved idle clients are kept
    assert rss_per_conn_kb < 100, rss_per_conn_kb
    assert silent.held_at_end == 0 and silent.opened + silent.refused == 900, silent
    assert slow.held_at_end == 0, slow
    assert slow.http_answers.get("408", 0) + slow.http_answers.get("503", 0) == slow.opened, slow
    differs = [(c.case, c.expected, c.answer) for c in cases if not c.ok]
    assert not differs, differs
    assert set(frames) <= {"close:1002", "close:1007", "close:1008", "close:1009", "error:bad_request", "reset"}, frames
    for code in ("1002", "1007", "1008", "1009"):  # every close the fuzz cases caused is counted
        assert secured.metric("bookcast_gateway_closes_total", f'code="{code}"') > 0, code
    # every silent socket the server closed was counted under one of these (none is held at the end)
    cut = sum(secured.metric("bookcast_gateway_connections_rejected_total", f'reason="{r}"')
              for r in ("idle_timeout", "idle_evicted", "per_source_cap", "total_cap"))
    assert cut >= silent.opened, (cut, silent)
    assert secured.metric("bookcast_gateway_connections_rejected_total", 'reason="handshake_timeout"') > 0
    log = secured.log()
    assert " ERROR " not in log and "Traceback" not in log, log[-3000:]
    refusal_lines = [ln for ln in log.splitlines() if "refused connections" in ln]
    assert len(refusal_lines) <= 3, refusal_lines  # once per interval, never per connection


async def test_forged_deltas_nats_lets_through_are_caught_by_the_gateway(secured):
    """The same forgeries published with a login NATS does not stop (the admin user: what every publisher
    is with NATS auth off, or with a leaked ingest or admin credential): a delta with a wrong checksum is a
    checksum mismatch, a level hidden below the checksummed top 10 is a conflicting delta when the
    ingest's own delta for that seq arrives; either way the instrument resyncs and the fake level never
    stays in REST or in a snapshot. (Last in the module: it resyncs one book of the shared stack.)"""
    from decimal import Decimal

    from feed.book import L2Book

    stack, tok = secured, token()
    admin = secured.users[NatsRole.ADMIN]

    def rest(url: str) -> tuple[int, bytes]:
        return get(url, tok)

    mismatches0 = stack.metric("bookcast_gateway_checksum_mismatches_total")
    names = stack.instruments(tok)
    before = {i: json.loads(rest(stack.base + f"/v1/book/{i}")[1]) for i in names}
    await asyncio.sleep(3)  # a window to count each book's deltas in (the quietest is picked)
    books = {i: json.loads(rest(stack.base + f"/v1/book/{i}")[1]) for i in names}
    # the quietest book (so a forgery for its next seq usually arrives before the ingest's own delta),
    # among those deeper than 10 levels (room below the checksummed top 10)
    deep_books = [i for i in names if len(books[i]["bids"]) > 11]
    assert deep_books, "the bundled capture has a book deeper than 10 levels"
    inst = min(deep_books, key=lambda i: books[i]["seq"] - before[i]["seq"])
    nc = await nats.connect(stack.nats.url, allow_reconnect=False,
                            **NatsCredentials(admin.name, admin.password).connect_kwargs())
    # a subscriber, so the gateway keeps this instrument's book (as in the adversarial run)
    watcher_session = aiohttp.ClientSession()
    watcher = await watcher_session.ws_connect(stack.ws_url, max_msg_size=0,
                                               headers={"Authorization": f"Bearer {tok}"})
    await watcher.send_str(orjson.dumps({"op": "subscribe", "id": 1, "instruments": [inst]}).decode())
    while orjson.loads((await watcher.receive(timeout=15)).data)["type"] != "snapshot":
        pass

    async def drain() -> None:
        async for _ in watcher:
            pass

    draining = asyncio.ensure_future(drain())

    async def forge(changes, *, right_checksum: bool) -> dict:
        snap = json.loads(rest(stack.base + f"/v1/book/{inst}")[1])
        book = L2Book(inst)
        book.apply_snapshot([(Decimal(p), Decimal(q)) for p, q in snap["bids"]],
                            [(Decimal(p), Decimal(q)) for p, q in snap["asks"]])
        book.apply_wire_changes(changes)
        checksum = book.checksum() if right_checksum else book.checksum() ^ 1
        forged = {"type": "delta", "instrument": inst, "epoch": snap["epoch"], "seq": snap["seq"] + 1,
                  "prev_seq": snap["seq"], "changes": changes, "checksum": checksum, "ts_ingest_ns": 1,
                  "ts_publish_ns": 2}
        await nc.publish(delta_subject(inst), orjson.dumps(forged))
        await nc.flush()
        return forged

    def fake_gone(level) -> bool:
        status, body = rest(stack.base + f"/v1/book/{inst}")
        return status == 200 and level not in json.loads(body)["bids"]

    try:
        # 1. a wrong checksum: caught on arrival (tried again if the ingest's delta for that seq came first)
        fake = ["0.00000001", "123456"]
        for _ in range(5):
            conflicts = stack.metric("bookcast_gateway_conflicting_deltas_total")
            await forge([["bid", *fake]], right_checksum=False)
            await attack_wait(lambda: stack.metric("bookcast_gateway_checksum_mismatches_total") > mismatches0
                              or stack.metric("bookcast_gateway_conflicting_deltas_total") > conflicts, 15)
            if stack.metric("bookcast_gateway_checksum_mismatches_total") > mismatches0:
                break
            await attack_wait(lambda: fake_gone(fake), 15)  # resynced: try again on the fresh book
        assert stack.metric("bookcast_gateway_checksum_mismatches_total") > mismatches0
        await attack_wait(lambda: fake_gone(fake), 15)
        # 2. a level hidden below the top 10 with the right checksum: caught as a conflicting delta
        conflicts = stack.metric("bookcast_gateway_conflicting_deltas_total")
        snap = json.loads(rest(stack.base + f"/v1/book/{inst}")[1])
        deep = [format(Decimal(snap["bids"][-1][0]) / 2, "f"), "5000"]  # below the lowest bid
        await forge([["bid", *deep]], right_checksum=True)
        await attack_wait(lambda: stack.metric("bookcast_gateway_conflicting_deltas_total")
                          > conflicts, 30)
        await attack_wait(lambda: fake_gone(deep), 15)
    finally:
        await nc.close()
        draining.cancel()
        await watcher.close()
        await watcher_session.close()
    async with aiohttp.ClientSession() as s, s.ws_connect(stack.ws_url,
                                                          headers={"Authorization": f"Bearer {tok}"}) as ws:
        await ws.send_str(orjson.dumps({"op": "subscribe", "id": 1, "instruments": [inst]}).decode())
        while True:
            msg = orjson.loads((await ws.receive(timeout=10)).data)
            if msg["type"] == "snapshot":
                break
        assert fake not in msg["bids"] and deep not in msg["bids"]
