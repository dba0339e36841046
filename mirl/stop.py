"""The run's stop request (SIGINT / SIGTERM), readable from every layer (it imports nothing from mirl).

recipes/run.py installs the signal handlers, which only record the signal here; a recipe stops after its
current step (checkpoint, then Interrupted). Code that waits on something outside the process (a reward
worker) polls requested() and gives up at once with StopRequested, so that a run answers SIGTERM within
seconds whatever a reward function does.
"""

from __future__ import annotations

_SIGNAL: dict = {"name": None}


def request(name: str) -> None:
    """Record that the run was asked to stop by the signal `name` ('SIGTERM', 'SIGINT')."""
    _SIGNAL["name"] = name


def clear() -> None:
    """Forget any earlier request (a new run starts)."""
    _SIGNAL["name"] = None


def requested() -> str | None:
    """The name of the signal that asked the run to stop, or None."""
    return _SIGNAL["name"]


class StopRequested(Exception):
    """A stop signal came while the run waited in the middle of a step (`where` says on what); the step is
    abandoned, nothing of it is saved."""

    def __init__(self, signal_name: str, where: str):
        super().__init__(f"{signal_name} {where}")
        self.signal_name, self.where = signal_name, where
