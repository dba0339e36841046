"""The reward registry: name -> f(prompts, completions, **columns) -> list[float | None]."""

from __future__ import annotations

from collections.abc import Callable

REWARDS: dict[str, Callable] = {}


def register_reward(name: str):
    """Register a reward function f(prompts, completions, **columns) -> list[float | None] under `name`."""

    def wrap(fn):
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is registered twice")
        REWARDS[name] = fn
        return fn

    return wrap


def get_reward(name: str) -> Callable:
    """The registered reward `name`; an unknown name is an error listing the valid ones."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; valid: task, rm:<folder>, {', '.join(sorted(REWARDS))}")
    return REWARDS[name]


class RewardFault:
    """What a reward returns for a sample whose input is bad (an unparseable reference answer, a malformed
    box): unlike None (not applicable), it is counted as a fault of the reward and reported with its reason.

    >>> RewardFault("reference box '[1, 2]' has 2 numbers, not 4").reason
    "reference box '[1, 2]' has 2 numbers, not 4"
    """

    def __init__(self, reason: str):
        self.reason = reason

    def __reduce__(self):  # pickled to and from the reward worker
        return RewardFault, (self.reason,)

    def __repr__(self) -> str:
        return f"RewardFault({self.reason!r})"
