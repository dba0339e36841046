"""Procedural verifiable tasks: examples(split, n, seed) -> [{'prompt', 'answer', 'solution', ...}],
score(completion, example) -> float in [0, 1] (1 = correct).

    make_task("arith")  make_task("arith:4")  make_task("countdown")  make_task("rg:basic_arithmetic")
    make_task("digits")  make_task("shapes")  make_task("grounding[:pair]")  # image + text (visual.py)
    make_task("motion[:level]")  make_task("count[:level]")             # video + text (video.py)
"""

from .arith import ArithTask
from .chat import ChatTask, chat_task
from .countdown import CountdownTask
from .rg import ReasoningGymTask
from .video import CountTask, MotionTask
from .visual import DigitArithTask, GroundingTask, ShapeCountTask


def make_task(name: str, tokenizer=None, chat: str = "auto"):
    """A built-in task by name: arith[:digits], countdown[:n], rg:<dataset>, digits, shapes, grounding[:variant],
    motion[:level], count[:level].
    With the model's tokenizer: asked through its chat template when it has one (chat 'auto') or chat is 'yes'
    (chat.py), in the compact format when it has none or chat is 'no'."""
    task = _make_task(name)
    return task if tokenizer is None else chat_task(task, tokenizer, chat)


def _make_task(name: str):
    base, _, arg = name.partition(":")
    if base in ("arith", "countdown"):
        lo, hi = (1, 12) if base == "arith" else (2, 8)
        if arg and not (arg.isdigit() and lo <= int(arg) <= hi):
            what = "digits" if base == "arith" else "numbers"
            raise ValueError(f"task {name!r}: the number of {what} after ':' must be an integer from {lo} to {hi}")
        return (ArithTask if base == "arith" else CountdownTask)(int(arg) if arg else 3)
    if base == "rg":
        if not arg:
            raise ValueError("a reasoning-gym task needs a dataset name: rg:<name>, e.g. rg:basic_arithmetic")
        return ReasoningGymTask.from_spec(arg)
    if base == "grounding":
        return GroundingTask(arg or "colour")
    if base in ("motion", "count"):
        if arg and arg not in ("1", "2", "3"):
            raise ValueError(f"task {name!r}: the level after ':' must be 1, 2 or 3")
        return (MotionTask if base == "motion" else CountTask)(int(arg) if arg else 1)
    visual = {"digits": DigitArithTask, "shapes": ShapeCountTask}
    if base in visual:
        return visual[base]()
    raise ValueError(
        f"unknown task {name!r}; valid: arith[:digits], countdown[:n_numbers], rg:<dataset>, "
        "digits, shapes, grounding[:colour|pair], motion[:1|2|3], count[:1|2|3]"
    )


__all__ = [
    "ArithTask",
    "ChatTask",
    "CountTask",
    "CountdownTask",
    "DigitArithTask",
    "GroundingTask",
    "MotionTask",
    "ReasoningGymTask",
    "ShapeCountTask",
    "chat_task",
    "make_task",
]
