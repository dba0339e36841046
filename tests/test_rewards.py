"""Rewards: each rule by hand, weights and None, and faults (raise, NaN, hang, wrong arity) counted, not fatal."""

import time

import pytest
import torch

from mirl.data.tasks import make_task
from mirl.rewards import RewardSet, get_reward, parse_reward_spec, register_reward
from mirl.rewards.builtin import extract_answer, soft_overlong


def r(name, completions, **cols):
    return get_reward(name)(["q"] * len(completions), completions, **cols)


def test_math_accuracy_equivalences():
    comps = [
        "<answer>\\frac{1}{2}</answer>",
        "The answer is \\boxed{0.5}",
        "<answer>1/3</answer>",
        "<answer>2</answer>",
    ]
    assert r("accuracy", comps, answer=["0.5", "1/2", "0.34", "\\frac{4}{2}"]) == [1.0, 1.0, 0.0, 1.0]
    assert r("accuracy", ["<answer>7</answer>"], answer=["not math at all %%"]) in ([None], [0.0])


def test_exact_numeric_format():
    assert r("exact", ["<answer> 42 </answer>", "42!"], answer=["42", "42"]) == [1.0, 0.0]
    assert r("numeric", ["it is 3/4", "x = 0.7501", "none"], answer=["0.75", "0.75", "1"]) == [1.0, 0.0, 0.0]
    assert r("numeric", ["5"], answer=["five"]) == [None]
    ok = "<think>2+2 is 4</think> <answer>4</answer>"
    assert r("format", [ok, "<answer>4</answer>", ok + " trailing"]) == [1.0, 0.0, 0.0]
    assert extract_answer("a <answer> b </answer> c") == "b"


def test_overlong_penalty_by_hand():
    assert soft_overlong(
        ["q"] * 4, ["a"] * 4, completion_lengths=[10, 80, 90, 100], max_completion_length=100, overlong_buffer=20
    ) == [0.0, 0.0, -0.5, -1.0]
    assert soft_overlong(["q"], ["a"]) == [None]


def test_task_and_reasoning_gym_rewards():
    task = make_task("arith")
    ex = task.examples("train", 3)
    ((name, fn, w),) = parse_reward_spec("task", task)
    assert fn([e["prompt"] for e in ex], [e["solution"] for e in ex], example=ex) == [1.0, 1.0, 1.0]
    rg = make_task("rg:basic_arithmetic")
    rex = rg.examples("train", 2)
    entries = [e["rg_entry"] for e in rex] + [rex[0]["rg_entry"]]
    got = r("reasoning_gym", [e["answer"] for e in rex] + ["wrong"], rg_entry=entries)
    assert got[:2] == [1.0, 1.0] and got[2] < 1.0
    with pytest.raises(ValueError, match="needs a task"):
        parse_reward_spec("task")
    with pytest.raises(ValueError, match="unknown reward 'acc'.*accuracy"):
        parse_reward_spec("acc")


def test_weights_and_none():
    @register_reward("test_only_half")
    def half(prompts, completions, **_):
        return [None if c == "skip" else 0.5 for c in completions]

    rs = RewardSet(parse_reward_spec("test_only_half:2,format:1"))
    total, per_fn, m = rs.score(["q"] * 2, ["skip", "<think>a</think><answer>b</answer>"])
    assert total.tolist() == [0.0, 2.0]  # None counts as absent, not as zero weight of the other
    assert torch.isnan(per_fn[0, 0])
    rs2 = RewardSet(parse_reward_spec("test_only_half"))
    total, _, m = rs2.score(["q"], ["skip"])
    assert torch.isnan(total[0]) and m["reward/unscorable"] == 1.0


def test_faults_are_counted_and_the_run_goes_on():
    @register_reward("test_only_raises")
    def boom(prompts, completions, **_):
        raise RuntimeError("scorer crashed")

    @register_reward("test_only_nan")
    def nan(prompts, completions, **_):
        return [float("nan"), float("inf"), 1.0]

    @register_reward("test_only_hangs")
    def hang(prompts, completions, **_):
        time.sleep(30)
        return [1.0] * len(completions)

    rs = RewardSet(parse_reward_spec("test_only_raises,test_only_nan,test_only_hangs,format"), timeout_s=0.5)
    t0 = time.time()
    total, per_fn, m = rs.score(["q"] * 3, ["a", "b", "c"])
    assert time.time() - t0 < 5
    assert per_fn[:, 1].isnan().tolist() == [True, True, False]
    assert rs.faults["test_only_raises/error (RuntimeError: scorer crashed)"] == 1
    assert rs.faults["test_only_nan/non-finite value"] == 2
    assert rs.faults["test_only_hangs/timeout"] == 1
    assert total.tolist() == [0.0, 0.0, 1.0]  # format still scored every row


def test_wrong_arity_rejected_at_setup():
    @register_reward("test_only_bad_arity")
    def bad(completions):
        return [1.0]

    with pytest.raises(ValueError, match="f\\(prompts, completions, \\*\\*columns\\)"):
        parse_reward_spec("test_only_bad_arity")
