"""The reward registry: name -> f(prompts, completions, **columns) -> list[float | None]."""

from __future__ import annotations

from collections.abc import Callable

REWARDS: dict[str, Callable] = {}


def register_reward(name: str):
    def wrap(fn):
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is registered twice")
        REWARDS[name] = fn
        return fn

    return wrap


def get_reward(name: str) -> Callable:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; valid: task, rm:<folder>, {', '.join(sorted(REWARDS))}")
    return REWARDS[name]
