from __future__ import annotations

import pytest

from tests.e2e.harness import Stack


@pytest.fixture(scope="module")
def live_stack(tmp_path_factory):
    """One gateway worker fed by the bundled Coinbase recording, looping at real speed."""
    stack = Stack(tmp_path_factory.mktemp("live"), workers=1)
    try:
        yield stack.start_looping_replay()
    finally:
        stack.stop()


@pytest.fixture
def make_stack(tmp_path):
    stacks: list[Stack] = []

    def make(**kwargs) -> Stack:
        stack = Stack(tmp_path / f"stack{len(stacks)}", **kwargs)
        stack.tmp.mkdir()
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()
