"""A hardened multi-worker gateway: the supervisor hands every security option to each worker.

``bookcast gateway --workers 2`` with a token key, a NATS login (against a nats-server that refuses
anonymous clients), an ops port and TLS: both workers serve wss with tokens checked, both bind the ops
port, auth failures from either are counted in the one merged ``/metrics``, and a worker that is killed
comes back with the same options (its ops listener and its NATS login work again). The per-token caps
hold across the workers (one token's connections and subscriptions on both count against one cap), and
the killed worker's share is given back.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import time
import urllib.error
import urllib.request

import aiohttp
import orjson
import pytest

from feed.auth import Algorithm, issue_token
from feed.natsauth import NatsRole, NatsUser, write_password_file
from feed.natsserver import NatsServer
from feed.procs import free_port, stop_process, wait_until
from feed.stack import bundled_capture
from tests.e2e.harness import spawn_cli
from tests.feed.gateway.test_edge import _self_signed

pytestmark = pytest.mark.e2e
SECRET = b"workers-test-secret-workers-test-0001"


CONN_CAP, SUB_CAP = 4, 3  # per token, across both workers


def _token(sub: str = "desk") -> str:
    return issue_token(sub=sub, instruments=["coinbase:*"], now_s=int(time.time()), ttl_s=3600,
                       algorithm=Algorithm.HS256, key=SECRET, kid="k1")


def _get(url: str, ctx: ssl.SSLContext | None = None, tok: str | None = None) -> tuple[int | None, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {tok}"} if tok else {})
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return None, b""


def _children(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return {int(p) for p in f.read().split()}
    except FileNotFoundError:
        return set()


def _statuses(ops: str, want_pids: set[int], tries: int = 60) -> dict[int, dict]:
    """``/v1/status`` of each worker in ``want_pids`` (a fresh connection each time: the kernel spreads
    them over the workers bound to the ops port)."""
    seen: dict[int, dict] = {}
    for _ in range(tries):
        status, body = _get(ops + "/v1/status")
        if status == 200:
            doc = json.loads(body)
            seen[doc["pid"]] = doc
        if want_pids <= set(seen):
            break
    return seen


def _metric(ops: str, name: str, labels: str) -> float:
    _, body = _get(ops + "/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
               if line.startswith(name + "{") and labels in line)


async def test_every_worker_serves_with_the_supervisors_security_options(tmp_path):
    users = {r: NatsUser.generate(r) for r in NatsRole}
    server = NatsServer(name="workers-nats", users=list(users.values()), workdir=str(tmp_path))
    cert_file, key_file = _self_signed(tmp_path)
    client_ctx = ssl.create_default_context(cafile=str(cert_file))
    secret = tmp_path / "hs.secret"
    secret.write_bytes(SECRET)
    port, ops_port = free_port(), free_port()
    base, ops = f"https://127.0.0.1:{port}", f"http://127.0.0.1:{ops_port}"
    procs = []
    server.start()
    try:
        gateway = spawn_cli([
            "gateway", "--workers", "2", "--nats", server.url, "--port", str(port),
            "--nats-user", "gateway", "--nats-password-file", str(write_password_file(tmp_path, users[NatsRole.GATEWAY])),
            "--auth-hs256-secret-file", f"k1={secret}", "--ops-port", str(ops_port),
            "--tls-cert-file", str(cert_file), "--tls-key-file", str(key_file),
            "--max-connections-per-token", str(CONN_CAP), "--max-subscriptions-per-token", str(SUB_CAP)],
            tmp_path / "gateway.log")
        procs.append(gateway)
        # the ingest starts while the workers do (they ask for announcements when they subscribe)
        ingest = spawn_cli(["replay", "--nats", server.url, "--nats-user", "ingest", "--nats-password-file",
                            str(write_password_file(tmp_path, users[NatsRole.INGEST])), "--speed", "1", "--loop",
                            "--http-port", str(free_port()), str(bundled_capture())], tmp_path / "ingest.log")
        procs.append(ingest)
        wait_until(lambda: len(_children(gateway.pid)) == 2, 30, what="2 workers", proc=gateway)
        workers = _children(gateway.pid)
        wait_until(lambda: set(_statuses(ops, workers, tries=8)) == workers
                   and all(d["ready"] for d in _statuses(ops, workers).values()), 60,
                   what="both workers ready on the ops port (logged in to NATS)", proc=gateway)

        tok = _token()

        def listed() -> list[str]:
            status, body = _get(base + "/v1/instruments", client_ctx, tok)
            return [i["instrument"] for i in json.loads(body)["instruments"]] if status == 200 else []

        wait_until(lambda: len(listed()) >= 2, 30, what="instruments listed over https", proc=ingest)
        inst = listed()[0]
        assert _get(base + "/metrics", client_ctx)[0] == 404  # the ops listener took it off the public port
        assert _get(base + f"/v1/book/{inst}", client_ctx)[0] == 401

        n = 12  # refused upgrades, each on a new connection (the kernel spreads them over the workers)
        missing_before = _metric(ops, "bookcast_gateway_auth_failures_total", 'reason="missing"')
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ctx, force_close=True)) as s:
            for _ in range(n):  # refused upgrades, each on a new connection: spread over the workers
                with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                    await s.ws_connect(f"wss://127.0.0.1:{port}/v1/ws")
                assert info.value.status == 401
            # subscribed connections until the kernel has given each worker at least one (SO_REUSEPORT
            # hashes the 4-tuple: a dozen can all land on one worker), at most 64
            sockets: list = []
            per_worker: dict[int, int] = {}
            while len(sockets) < 64 and (len(sockets) < n or not (set(per_worker) == workers
                                                                   and all(per_worker.values()))):
                sess = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ctx))
                ws = await sess.ws_connect(f"wss://127.0.0.1:{port}/v1/ws",  # a token each: under its cap
                                           headers={"Authorization": f"Bearer {_token(f'desk-{len(sockets)}')}"})
                sockets.append((sess, ws))
                await ws.send_str(orjson.dumps({"op": "subscribe", "id": len(sockets), "instruments": [inst]}).decode())
                types = set()
                while "snapshot" not in types:
                    msg = orjson.loads((await ws.receive(timeout=15)).data)
                    assert msg["type"] != "error", msg
                    types.add(msg["type"])
                if len(sockets) >= n:
                    per_worker = {pid: d["websockets"] for pid, d in _statuses(ops, workers).items()}
            opened = len(sockets)
            for sess, ws in sockets:
                await ws.close()
                await sess.close()
        assert set(per_worker) == workers and all(per_worker.values()) and sum(per_worker.values()) == opened, per_worker
        # counters from both workers in the one merged /metrics
        assert _metric(ops, "bookcast_gateway_auth_failures_total", 'reason="missing"') - missing_before >= n

        # one token's connections on both workers count against one cap
        capped, insts = _token("capped"), listed()[:2]
        held: dict[int, list] = {pid: [] for pid in workers}
        all_held: list = []
        websockets = lambda: {pid: d["websockets"] for pid, d in _statuses(ops, workers).items()}  # noqa: E731

        def settled(total: int) -> dict[int, int]:
            seen: dict[int, int] = {}
            wait_until(lambda: set(seen.update(websockets()) or seen) == workers and sum(seen.values()) == total,
                       30, what=f"{total} websockets over both workers", proc=gateway)
            return seen

        async def capped_connect(sess):
            return await sess.ws_connect(f"wss://127.0.0.1:{port}/v1/ws", headers={"Authorization": f"Bearer {capped}"})

        # every held connection is read all along (aiohttp answers the gateway's pings only while reading,
        # and an unanswered ping closes it, giving its count back): replies to requests go to its queue
        inbox: dict = {}
        readers: list = []

        async def read_all(ws) -> None:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    inbox[ws].put_nowait(orjson.loads(msg.data))

        def hold(ws) -> None:
            inbox[ws] = asyncio.Queue()
            readers.append(asyncio.ensure_future(read_all(ws)))

        async def request(ws, op: str, rid: int, instruments: list[str]) -> dict:
            await ws.send_str(orjson.dumps({"op": op, "id": rid, "instruments": instruments}).decode())
            while True:
                msg = await asyncio.wait_for(inbox[ws].get(), 15)
                if msg.get("id") == rid:
                    return msg

        settled(0)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ctx, force_close=True)) as s:
            # hold CONN_CAP connections, CONN_CAP / 2 on each worker (new ones until the kernel puts them so)
            for _ in range(100):
                if all(len(v) == CONN_CAP // 2 for v in held.values()):
                    break
                before = settled(len(all_held))
                ws = await capped_connect(s)
                after = settled(len(all_held) + 1)
                (pid,) = [p for p in workers if after[p] > before[p]]
                if len(held[pid]) < CONN_CAP // 2:
                    held[pid].append(ws)
                    all_held.append(ws)
                    hold(ws)
                else:
                    await ws.close()
            assert all(len(v) == CONN_CAP // 2 for v in held.values()), {p: len(v) for p, v in held.items()}
            for _ in range(n // 2):  # each worker holds half the cap: only the shared count refuses these
                with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                    await capped_connect(s)
                assert info.value.status == 429
            a, b = (held[pid][0] for pid in sorted(workers))
            assert (await request(a, "subscribe", 1, insts))["type"] == "subscribed"
            assert (await request(b, "subscribe", 2, insts[:1]))["type"] == "subscribed"  # 3 = SUB_CAP
            refused = await request(b, "subscribe", 3, insts[1:])
            assert refused["type"] == "error" and refused["code"] == "too_many_instruments", refused
            assert (await request(a, "unsubscribe", 4, insts[1:]))["type"] == "unsubscribed"
            assert (await request(b, "subscribe", 5, insts[1:]))["type"] == "subscribed"

            victim = min(workers)
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: victim not in _children(gateway.pid) and len(_children(gateway.pid)) == 2, 30,
                       what="the killed worker restarted", proc=gateway)
            (replacement,) = _children(gateway.pid) - workers
            wait_until(lambda: _statuses(ops, {replacement}, tries=8).get(replacement, {}).get("ready"), 60,
                       what="the restarted worker ready on the ops port, logged in to NATS", proc=gateway)
            # the dead worker's CONN_CAP / 2 connections were given back: as many new ones fit, then 429
            more = [await capped_connect(s) for _ in range(CONN_CAP // 2)]
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await capped_connect(s)
            assert info.value.status == 429
            survivor = [ws for ws in held[max(workers)] if not ws.closed]
            assert len(survivor) == CONN_CAP // 2  # still open: the count under test is theirs
            for task in readers:
                task.cancel()
            for ws in all_held + more:
                await ws.close()
        # the replacement got --tls-*: every new https connection is answered, whichever worker takes it
        assert [_get(base + "/readyz", client_ctx)[0] for _ in range(n)] == [200] * n
        log = (tmp_path / "gateway.log").read_text(errors="replace")
        assert "Authorization" not in log and "Traceback" not in log, log[-3000:]
        assert SECRET.decode() not in log and users[NatsRole.GATEWAY].password not in log
    finally:
        for p in reversed(procs):
            stop_process(p, grace_s=15)
        server.cleanup()
