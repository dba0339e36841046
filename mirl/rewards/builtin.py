"""Rule-based rewards. Each takes (prompts, completions, **columns) and returns one float or None per sample."""

from __future__ import annotations

import logging
import re

from .registry import RewardFault, register_reward

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
FORMAT_RE = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)
NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")
logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call when we own the timeout


def extract_answer(completion: str) -> str:
    """The text inside <answer>...</answer> if present, else the whole completion (stripped)."""
    m = ANSWER_TAG.search(completion)
    return (m.group(1) if m else completion).strip()


@register_reward("accuracy")
def math_accuracy(prompts, completions, answer, **_):
    """1.0 if the answer is mathematically equal to the column `answer` (math-verify: numbers, fractions,
    LaTeX, \\boxed{}), else 0.0; None if the reference answer cannot be parsed.

    >>> math_accuracy(["q"], ["<answer>\\\\frac{1}{2}</answer>"], answer=["0.5"])
    [1.0]
    """
    from math_verify import parse, verify

    out = []
    for completion, ref in zip(completions, answer):
        gold = parse(str(ref), parsing_timeout=None)
        if not gold:
            out.append(None)
            continue
        pred = parse(extract_answer(completion), parsing_timeout=None)
        out.append(float(bool(pred) and verify(gold, pred, timeout_seconds=None)))
    return out


@register_reward("env")
def env_reward(prompts, completions, env_reward=None, **_):
    """The environment's reward of each episode (multi-turn runs with --env: the column the episode runner
    passes), None where it gave none (the episode faulted, or the environment leaves scoring to the others).

    >>> env_reward(["q", "q"], ["a", "b"], env_reward=[1.0, None])
    [1.0, None]
    """
    if env_reward is None:
        raise ValueError("the env reward needs episodes: use it with --env")
    return [None if r is None else float(r) for r in env_reward]


env_reward.in_process = True  # it only reads a column


@register_reward("exact")
def exact_match(prompts, completions, answer, **_):
    """1.0 if the extracted answer equals the column `answer` after stripping whitespace.

    >>> exact_match(["q"], ["<answer> 42 </answer>"], answer=["42"])
    [1.0]
    """
    return [float(extract_answer(c) == str(a).strip()) for c, a in zip(completions, answer)]


@register_reward("numeric")
def numeric_match(prompts, completions, answer, rel_tol: float = 1e-6, **_):
    """1.0 if the last number in the extracted answer equals the numeric `answer` (relative tolerance).

    >>> numeric_match(["q"], ["so it is 3/4"], answer=["0.75"])
    [1.0]
    """
    out = []
    for c, a in zip(completions, answer):
        try:
            ref = _to_float(str(a))
        except ValueError:
            out.append(None)
            continue
        nums = NUMBER_RE.findall(extract_answer(c))
        if not nums:
            out.append(0.0)
            continue
        got = _to_float(nums[-1])
        out.append(float(abs(got - ref) <= rel_tol * max(1.0, abs(ref))))
    return out


def _to_float(s: str) -> float:
    s = s.strip()
    if "/" in s:
        num, den = s.split("/", 1)
        return float(num) / float(den)
    return float(s)


@register_reward("format")
def think_answer_format(prompts, completions, **_):
    """1.0 if the completion is exactly <think>...</think><answer>...</answer> (whitespace allowed around).

    >>> think_answer_format(["q"], ["<think>2+2</think><answer>4</answer>"])
    [1.0]
    """
    return [float(bool(FORMAT_RE.match(c))) for c in completions]


@register_reward("short")
def short_answer(prompts, completions, max_chars: int = 40, **_):
    """1.0 if the completion is one line of at most max_chars characters (a bare answer, no rambling), else 0.0:
    the format reward of an instruct model asked to reply with just the answer.

    >>> short_answer(["q", "q"], ["47 + 38 = 85", "The sum of 47 and 38 is a concept...\\nLet us see"])
    [1.0, 0.0]
    """
    return [float(len(c.strip()) <= max_chars and "\n" not in c.strip()) for c in completions]


@register_reward("overlong")
def soft_overlong(
    prompts, completions, completion_lengths=None, max_completion_length: int = 0, overlong_buffer: int = 0, **_
):
    """DAPO's soft overlong penalty: 0 up to L_max - buffer tokens, then linear down to -1 at L_max.

    Needs the recipe's columns `completion_lengths` (tokens) and `max_completion_length`; `overlong_buffer`
    defaults to a quarter of the maximum.
    >>> soft_overlong(["q"] * 3, ["a"] * 3, completion_lengths=[10, 90, 100], max_completion_length=100,
    ...               overlong_buffer=20)
    [0.0, -0.5, -1.0]
    """
    if completion_lengths is None or not max_completion_length:
        return [None] * len(completions)
    buffer = overlong_buffer or max(1, max_completion_length // 4)
    start = max_completion_length - buffer
    return [min(0.0, (start - n) / buffer) if n > start else 0.0 for n in completion_lengths]


@register_reward("iou")
def box_iou_reward(prompts, completions, box, **_):
    """IoU of the first box '[x1,y1,x2,y2]' in the completion with the row's ground-truth `box`; 0 when the
    completion has no box. Rows whose box is None get None; a reference box that is not four numbers (or a
    string holding them) is a RewardFault, counted and reported, not a silent 0.

    >>> box_iou_reward(["q", "q"], ["[0,0,2,2]", "no box"], box=[[1, 0, 3, 2], [0, 0, 1, 1]])
    [0.3333333333333333, 0.0]
    >>> box_iou_reward(["q"], ["[0,0,2,2]"], box=[[1, 2]])
    [RewardFault('reference box [1, 2] has 2 numbers, not 4 (x1, y1, x2, y2)')]
    """
    from ..data.tasks.visual import box_iou, parse_box

    out = []
    for c, gt in zip(completions, box):
        if gt is None:
            out.append(None)
            continue
        ref = reference_box(gt)
        if isinstance(ref, RewardFault):
            out.append(ref)
            continue
        pred = parse_box(c)
        out.append(0.0 if pred is None else box_iou(pred, ref))
    return out


def reference_box(gt) -> list[float] | RewardFault:
    """A row's reference box as four floats, corners in order, or a RewardFault saying what is wrong with it."""
    import math

    from ..data.tasks.visual import parse_box

    if isinstance(gt, str):
        parsed = parse_box(gt)
        if parsed is None:
            return RewardFault(f"reference box {gt[:40]!r} is not '[x1, y1, x2, y2]'")
        return parsed
    if not isinstance(gt, (list, tuple)):
        return RewardFault(f"reference box {str(gt)[:40]!r} is a {type(gt).__name__}, not [x1, y1, x2, y2]")
    if len(gt) != 4:
        return RewardFault(f"reference box {str(list(gt))[:40]} has {len(gt)} numbers, not 4 (x1, y1, x2, y2)")
    try:
        x1, y1, x2, y2 = (float(v) for v in gt)
    except (TypeError, ValueError):
        return RewardFault(f"reference box {str(list(gt))[:40]} holds a value that is not a number")
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return RewardFault(f"reference box {str(list(gt))[:40]} holds a non-finite number")
    return [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]


@register_reward("reasoning_gym")
def reasoning_gym_score(prompts, completions, rg_entry=None, **_):
    """reasoning-gym's own scorer for the entry's source dataset; None for rows without an rg_entry."""
    if rg_entry is None:
        return [None] * len(completions)
    import reasoning_gym

    out = []
    for c, entry in zip(completions, rg_entry):
        if not entry:
            out.append(None)
            continue
        scorer = reasoning_gym.get_score_answer_fn(entry["metadata"]["source_dataset"])
        first = c.strip().splitlines()[0].strip() if c.strip() else ""
        out.append(float(scorer(answer=extract_answer(first), entry=entry)))
    return out


def task_reward(task):
    """The built-in task's checker as a reward; needs the column `example` (the task's example dicts)."""

    def reward(prompts, completions, example=None, **_):
        if example is None:
            raise ValueError("the task reward needs the column 'example'")
        return [task.score(c, e) for c, e in zip(completions, example)]

    reward.__name__ = f"task_{task.name}"
    reward.required_columns = task.score_columns  # checked against every prompt row at start
    return reward
