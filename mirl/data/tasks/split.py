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
    """n examples of one split drawn from make(rng), deterministic in (name, split, seed)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{name}-{split}-{seed}")
    want_test = split == "test"
    out = []
    while len(out) < n:
        ex = make(rng)
        if is_test(ex.get("split_key", ex["prompt"])) == want_test:
            out.append(ex)
    return out
