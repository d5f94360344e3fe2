"""The leader's NATS server enters lame-duck mode (SIGUSR2) in a region with no other server: the leading ingest
hands the publishing lease over at once (issue 9), and the other region's standby, in step, takes over without a
new epoch, long before the server's grace period ends and closes its clients (only then could the lease expire).

Real supercluster, ingests and gateways (``feed.regions.RegionsStack``); region a's server drains after 60 s, so
a takeover within the test's 30 s deadline can only come from the hand-over.
"""
from __future__ import annotations

import os
import signal

import pytest

from feed.procs import wait_until
from feed.regions import RegionsStack

pytestmark = pytest.mark.e2e
GRACE_S = 60  # lame_duck_grace_period of region a's server: longer than any deadline below


def test_leader_whose_only_server_goes_lame_duck_hands_the_lease_over_losslessly(tmp_path):
    stack = RegionsStack(tmp_path, regions=["a", "b"], lease_ttl_s=1.5)
    a, b = stack.procs
    for server in a.nats.servers:
        server.extra_config = "\n".join(x for x in (server.extra_config, f'lame_duck_grace_period: "{GRACE_S}s"',
                                                    'lame_duck_duration: "120s"') if x)
    try:
        stack.start(timeout_s=90)
        assert stack.leader() is a
        wait_until(lambda: all((h := b.ha()).get("in_step", {0: False}).values()) and h.get("acquire_hold_s") == 0,
                   60, what="b's standby in step and armed")
        takeovers = b.ha().get("takeovers", 0)
        os.kill(a.nats.servers[0].pid, signal.SIGUSR2)  # lame-duck mode: clients told at once, closed after GRACE_S
        wait_until(lambda: b.ha().get("role") == "leader" and b.ha().get("takeovers", 0) > takeovers, 30,
                   what="b leads after a's server announced lame-duck mode", proc=b.ingest)
        assert a.nats.servers[0].proc.poll() is None  # still draining: nothing was closed yet
        kinds = set((b.ha().get("last_takeover") or {}).get("instruments", {}).values())
        assert kinds == {"lossless"}, b.ha()
        wait_until(lambda: "publishing lease handed over" in stack.log("ingest-a"), 10, what="a's log says why")
        wait_until(lambda: a.ha().get("role") == "standby", 10, what="a stands by", proc=a.ingest)
    finally:
        stack.stop()
