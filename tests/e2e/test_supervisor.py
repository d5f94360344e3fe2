"""The gateway's process shape: a dead worker is restarted while the others serve; idle instruments are
released after their linger."""
from __future__ import annotations

import json
import os
import signal
import urllib.request

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from feed.procs import stop_process, wait_until
from tests.e2e.harness import http_ok

pytestmark = pytest.mark.e2e


def _children(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return {int(p) for p in f.read().split()}
    except FileNotFoundError:
        return set()


def _worker_cpu_s(base: str) -> dict[str, float]:
    """``bookcast_gateway_worker_cpu_seconds_total`` by worker name, from the gateway's ``/metrics``."""
    with urllib.request.urlopen(base + "/metrics", timeout=2) as r:
        families = text_string_to_metric_families(r.read().decode())
    return {s.labels["worker"]: s.value for f in families if f.name == "bookcast_gateway_worker_cpu_seconds"
            for s in f.samples if s.name.endswith("_total")}


def test_sigkilled_worker_is_restarted_and_the_gateway_keeps_serving(make_stack):
    stack = make_stack(workers=2)
    stack.start_nats()
    stack.start_gateway()
    sup = stack.gateway.pid
    wait_until(lambda: len(_children(sup)) == 2, 60, what="2 workers", proc=stack.gateway)
    wait_until(lambda: http_ok(stack.base + "/readyz"), 60, what="gateway ready", proc=stack.gateway)
    # each worker's own CPU time, under its name, from whichever worker answers the scrape (start-up counts:
    # every worker imported the gateway)
    seen: dict[str, float] = {}

    def cpu_read(enough) -> bool:
        seen.clear()
        seen.update(_worker_cpu_s(stack.base))
        return enough(seen)

    wait_until(lambda: cpu_read(lambda c: len(c) == 2 and all(v > 0 for v in c.values())), 30,
               what="both workers' CPU seconds", proc=stack.gateway)
    cpu_before = dict(seen)
    assert set(cpu_before) == {"gateway-0", "gateway-1"}, cpu_before
    before = _children(sup)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in _children(sup), 30, what="killed worker reaped", proc=stack.gateway)
    wait_until(lambda: http_ok(stack.base + "/readyz"), 60, what="the port still served", proc=stack.gateway)
    wait_until(lambda: len(_children(sup)) == 2, 60, what="worker restarted", proc=stack.gateway)
    replacement = _children(sup) - before
    assert len(replacement) == 1 and stack.gateway.poll() is None
    wait_until(lambda: http_ok(stack.base + "/readyz"), 60, what="gateway ready again", proc=stack.gateway)
    assert "restarting in" in stack.log("gateway") and "restarted pid=" in stack.log("gateway")
    # the dead worker's count stays and its replacement adds to it under the same name: rate() sees no reset
    wait_until(lambda: cpu_read(lambda c: all(c.get(w, 0) > v for w, v in cpu_before.items())), 30,
               what="both workers' CPU seconds grown past the kill", proc=stack.gateway)
    assert set(seen) == set(cpu_before), seen
    assert stop_process(stack.gateway, grace_s=15) == 0
    stack.gateway = None


def _instruments_gauge(base: str) -> float:
    with urllib.request.urlopen(base + "/metrics", timeout=2) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("bookcast_gateway_instruments "):
                return float(line.split()[1])
    raise AssertionError("no bookcast_gateway_instruments")


async def test_idle_instrument_is_released_after_its_linger(make_stack):
    stack = make_stack(gateway_args=["--instrument-linger-s", "0.5"])
    stack.start_looping_replay()
    inst = stack.instruments()[0]["instrument"]
    async with aiohttp.ClientSession() as s, s.ws_connect(stack.ws_url, max_msg_size=0) as ws:
        await ws.send_str(json.dumps({"op": "subscribe", "id": 1, "instruments": [inst]}))
        while json.loads((await ws.receive(timeout=10)).data)["type"] != "snapshot":
            pass
        assert _instruments_gauge(stack.base) == 1
        await ws.send_str(json.dumps({"op": "unsubscribe", "id": 2, "instruments": [inst]}))
        wait_until(lambda: _instruments_gauge(stack.base) == 0, 10, what="instrument released")
        assert f"instrument released instrument={inst}" in stack.log("gateway")
        # subscribing again brings it back, with a fresh snapshot
        await ws.send_str(json.dumps({"op": "subscribe", "id": 3, "instruments": [inst]}))
        types = []
        while "snapshot" not in types:
            types.append(json.loads((await ws.receive(timeout=10)).data)["type"])
        assert _instruments_gauge(stack.base) == 1
