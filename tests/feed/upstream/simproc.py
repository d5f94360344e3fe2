"""The simulator process helper lives in ``feed.simulator.proc``; re-exported for the tests."""
from feed.simulator.proc import Sim, simulator, start_in_ns

__all__ = ["Sim", "simulator", "start_in_ns"]
