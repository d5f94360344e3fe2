"""Shared fixtures: the shared data folder (required), and real services started and stopped by PID."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; a missing folder fails the run (CI must have the real recordings)."""
    if not (SHARED_DATA / "coinbase" / "coinbase-level2-20210417.jsonl").is_file():
        pytest.fail(f"shared data not found at {SHARED_DATA}: the real recordings are required, not optional")
    return SHARED_DATA
