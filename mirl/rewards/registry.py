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
