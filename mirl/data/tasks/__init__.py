"""Procedural verifiable tasks: examples(split, n, seed) -> [{'prompt', 'answer', 'solution', ...}],
score(completion, example) -> float in [0, 1] (1 = correct).

    make_task("arith")  make_task("arith:4")  make_task("countdown")  make_task("rg:basic_arithmetic")
"""

from .arith import ArithTask
from .countdown import CountdownTask
from .rg import ReasoningGymTask


def make_task(name: str):
    base, _, arg = name.partition(":")
    if base == "arith":
        return ArithTask(int(arg) if arg else 3)
    if base == "countdown":
        return CountdownTask(int(arg) if arg else 3)
    if base == "rg":
        if not arg:
            raise ValueError("a reasoning-gym task needs a dataset name: rg:<name>, e.g. rg:basic_arithmetic")
        return ReasoningGymTask(arg)
    raise ValueError(f"unknown task {name!r}; valid: arith[:digits], countdown[:n_numbers], rg:<dataset>")


__all__ = ["ArithTask", "CountdownTask", "ReasoningGymTask", "make_task"]
