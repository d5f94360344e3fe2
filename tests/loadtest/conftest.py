from __future__ import annotations

import pytest

from tests.e2e.harness import Stack


@pytest.fixture(scope="module")
def ws_stack(tmp_path_factory):
    """nats-server with its WebSocket listener, one gateway worker, and an ingest looping the bundled
    Coinbase recording at real speed: both locust users' targets on one feed."""
    stack = Stack(tmp_path_factory.mktemp("loadtest"), workers=1)
    try:
        yield stack.start_looping_replay(websocket=True)
    finally:
        stack.stop()
