"""Held-out splits by hashing the prompt (or an example's 'split_key', e.g. a scene description): a problem
is in the test split iff crc32(key) % 10 == 0.

Train and test are disjoint for any seed and any size, and sampling terminates even when the problem
space is tiny (1-digit addition has 100 problems, about 10 of them held out).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable


def is_test(prompt: str) -> bool:
    """Whether a prompt is held out: one in ten by a CRC32 of its text (stable across runs and machines)."""
    return zlib.crc32(prompt.encode()) % 10 == 0


def sample_split(make: Callable[[random.Random], dict], name: str, split: str, n: int, seed: int) -> list[dict]:
    """n examples of one split drawn from make(rng), deterministic in (name, split, seed).

    The train split is drawn with replacement (the task's distribution of problems). The test split is a held-out
    set of distinct problems: the first n distinct ones (by prompt, or 'split_key') among at most 5n draws, in
    draw order (300 plain draws of arith:2's test split hold only 180 distinct prompts, its one-digit problems
    many times over). A split with fewer distinct problems (arith:1's test split has 16) is filled up with
    repeats in draw order, so that n is always met; `distinct_count` says how many a set holds."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{name}-{split}-{seed}")
    want_test = split == "test"
    out, seen, repeats, draws = [], set(), [], 0
    while len(out) < n and draws < (5 * n if want_test else n):
        ex = make(rng)
        key = ex.get("split_key", ex["prompt"])
        if is_test(key) != want_test:
            continue
        draws += 1
        if want_test and key in seen:
            repeats.append(ex)
        else:
            out.append(ex)
            seen.add(key)
    return out + repeats[: n - len(out)]


def distinct_count(examples: list[dict]) -> int:
    """How many distinct problems (prompt, or 'split_key' where the prompt's text is shared) a list holds."""
    return len({ex.get("split_key", ex["prompt"]) for ex in examples})
