"""Learning tests on arith:2 (sums of up to two digits with a chain of thought), from one weak SFT start.

Each asserts a gain measured on a held-out set of 300 distinct prompts (arith:1's held-out split has 16, too few:
one pair moved a test by 1/16 on another CPU). The asserted margins are at most half the smallest gain measured
over 4 seeds on two CPU kinds' numerics (the figures are in each test's docstring), so that a different float
rounding, which changes every sample after the first few steps, cannot fail them.
"""

import importlib.util
from pathlib import Path

import pytest

from mirl.data.tasks import make_task
from mirl.data.tasks.split import distinct_count
from mirl.eval import evaluate
from mirl.models import load_policy
from mirl.recipes import grpo, sft

HELD_OUT = 300


@pytest.fixture(scope="module")
def task():
    return make_task("arith:2")


@pytest.fixture(scope="module")
def held_out(task):
    return task.examples("test", HELD_OUT, 0)


def test_the_held_out_split_is_distinct_and_disjoint(task, held_out):
    """The test split is 300 distinct prompts (300 plain draws held 180), none of them in the training split;
    arith:1's 16 distinct test problems are repeated to fill a request, and counted."""
    assert distinct_count(held_out) == HELD_OUT
    train = task.examples("train", 5000, 0)
    assert not {e["prompt"] for e in held_out} & {e["prompt"] for e in train}
    assert task.examples("test", 100, 0) == held_out[:100]  # a prefix: smaller sets are the same problems
    small = make_task("arith:1").examples("test", 40, 0)
    assert len(small) == 40 and distinct_count(small) == 16
