"""A region's gateway: cut off from the lease cluster (``region_cut_off``) and no venue heard since the
subscription (the one "ingest went quiet" bound), judged on the gateway's own state, time passed in."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry

from feed.gateway.app import REGION_CUT_OFF, Gateway, GatewayConfig
from feed.gateway.instrument import InstrumentMachine
from feed.wire import Status


def _gateway(**kw) -> Gateway:
    gw = Gateway(GatewayConfig(**kw), CollectorRegistry())  # a registry of its own per gateway
    inst = "coinbase:BTC-USD"
    gw.machines[inst] = InstrumentMachine(inst, 16)
    gw.links[inst], gw.trade_links[inst] = {}, set()
    return gw


def test_unanswered_lease_bucket_marks_every_instrument_stale_and_an_answer_restores_them():
    gw = _gateway(region="a", lease_unreachable_s=1.0)
    machine = gw.machines["coinbase:BTC-USD"]
    now = time.monotonic()
    gw._lease_answered_s = now - 0.5
    gw._check_cut_off(now, time.time_ns())
    assert not gw.cut_off and machine.status is Status.OK
    gw._check_cut_off(now + 0.6, time.time_ns())  # 1.1 s without an answer
    assert gw.cut_off and machine.status is Status.STALE and machine.status_reason == REGION_CUT_OFF
    gw._lease_answered_s = now + 0.7
    gw._check_cut_off(now + 0.8, time.time_ns())
    assert not gw.cut_off and machine.status is Status.OK


def test_a_region_gateway_that_heard_no_venue_since_its_subscription_is_directory_silent():
    gw = _gateway(region="a", ingest_silent_s=5.0)
    gw._subscribed_s = time.monotonic() - 6.0
    assert gw.directory_silent()
    gw._venue_announced_s["coinbase"] = time.monotonic()  # a venue heard (announced, or from the KV directory)
    assert not gw.directory_silent()
    plain = _gateway(ingest_silent_s=5.0)  # no --region: a gateway may wait for its ingest as long as it likes
    plain._subscribed_s = time.monotonic() - 6.0
    assert not plain.directory_silent()
