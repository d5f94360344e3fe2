from __future__ import annotations

import pytest

from feed.natsserver import NatsServer
from feed.stack import bundled_capture
from tests.e2e.harness import Stack


@pytest.fixture(scope="module")
def ws_stack(tmp_path_factory):
    """nats-server with its WebSocket listener, one gateway worker, and an ingest looping the bundled
    Coinbase recording at real speed: both locust users' targets on one feed."""
    stack = Stack(tmp_path_factory.mktemp("loadtest"), workers=1)
    try:
        stack.nats = NatsServer(name="loadtest-nats", websocket_port=0, workdir=str(stack.tmp))
        stack.nats.start()
        stack.start_gateway()
        stack.start_ingest([bundled_capture()], speed=1.0, loop=True)
        stack.wait_instruments(10)
        yield stack
    finally:
        stack.stop()
