"""--prompt-sampler (rollout/prompts.py): pass rates, online filtering by pass rate, the staged curriculum; by
hand and through grpo (the 2-rank = 1-process check is in tests/test_distributed.py)."""

import json

import pytest
import torch

from mirl.rollout.prompts import PromptSampler, curriculum_pool, pass_rates, select_by_pass_rate


def test_pass_rates_by_hand():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, float("nan"), 0.2, 1.0, 1.0, 1.0, 1.0])
    assert pass_rates(rewards, 4) == [0.75, 0.0, 1.0]  # NaN (unscorable) and 0.2 are fails


def test_select_by_pass_rate_keeps_informative_prompts_first():
    rates = {3: 0.0, 5: 1.0, 7: 0.5, 9: 0.25}
    assert select_by_pass_rate([3, 5, 7, 1, 9, 2], rates, 3) == [7, 1, 9]  # 1 is unmeasured: informative
    assert select_by_pass_rate([3, 5, 7], rates, 3) == [7, 3, 5]  # too few: topped up in order


def test_curriculum_pool_by_hand():
    order = list(range(9))
    # progress s / 8 of a 9-step run (0 at the first step, 1 at the last): stage floor(3 s / 8)
    assert [len(curriculum_pool(order, s / 8, 3)) for s in range(9)] == [3, 3, 3, 6, 6, 6, 9, 9, 9]
    assert curriculum_pool(order, 1.0, 3) == order  # the end: everything


def test_sampler_draws_easy_first_and_filters_solved_prompts():
    data = [{"prompt": str(i), "difficulty": i % 3} for i in range(30)]
    cur = PromptSampler("curriculum", data, prompts_per_step=4, seed=0, stages=3)  # steps s of 6: progress s / 5
    assert all(data[i]["difficulty"] == 0 for s in (0, 1) for i in cur.indices(s, s / 5))
    assert all(data[i]["difficulty"] <= 1 for s in (2, 3) for i in cur.indices(s, s / 5))
    assert {data[i]["difficulty"] for s in range(4, 40) for i in cur.indices(s, 1.0)} == {0, 1, 2}
    assert cur.metrics(0)["prompts/curriculum_max_difficulty"] == 0.0
    pr = PromptSampler("pass-rate", data, prompts_per_step=4, seed=0)
    first = pr.indices(0)
    pr.observe(first, torch.tensor([1.0] * 8 + [0.0] * 4 + [1.0, 0.0, 1.0, 0.0]), 4)
    assert pr.rates == {first[0]: 1.0, first[1]: 1.0, first[2]: 0.0, first[3]: 0.5}
    for s in range(1, 20):  # solved (1) and hopeless (0) prompts are not drawn while others are left
        assert not set(pr.indices(s)) & set(first[:3])
    m = pr.metrics(1)
    assert m["prompts/pass_rate_1"] == 0.5 and m["prompts/pass_rate_0"] == 0.25 and m["prompts/measured"] == 4
    restored = PromptSampler("pass-rate", data, prompts_per_step=4, seed=0)
    restored.load(json.loads(json.dumps(pr.state())))  # through a checkpoint's JSON
    assert restored.rates == pr.rates and restored.indices(5) == pr.indices(5)


def test_grpo_prompt_samplers_run_log_and_refuse_bad_input(tmp_path):
    from mirl.options import ConfigError
    from mirl.recipes import grpo

    common = dict(steps=3, group_size=4, prompts_per_step=4, max_new_tokens=6, eval_n=0, threads=1, report=False)
    # arith:2: a quarter of the prompts have two 1-digit operands; with 3 stages over 3 steps the first stage draws
    # from the easiest third, all of those and some 2-digit ones
    cfg = grpo.Config(task="arith:2", prompt_sampler="curriculum", curriculum_stages=3, out_dir=str(tmp_path), **common)
    sampler_rows = grpo.train(cfg).history
    assert [h["prompts/curriculum_max_difficulty"] for h in sampler_rows] == [2.0, 2.0, 2.0]
    cfg.curriculum_stages, cfg.steps, cfg.out_dir = 6, 6, str(tmp_path / "c6")  # the first sixth: 1-digit only
    assert grpo.train(cfg).history[0]["prompts/curriculum_max_difficulty"] == 1.0
    res = grpo.train(grpo.Config(task="arith:1", prompt_sampler="pass-rate", out_dir=str(tmp_path / "p"), **common))
    h = res.history[-1]
    assert h["prompts/measured"] == 12 and h["prompts/pass_rate_0"] + h["prompts/pass_rate_mid"] + h[
        "prompts/pass_rate_1"
    ] == pytest.approx(1.0)
    # resume keeps the tracker: the same prompts as the run without a stop
    grpo.train(grpo.Config(task="arith:1", prompt_sampler="pass-rate", out_dir=str(tmp_path / "r"), **common,
                           stop_at_step=2, save_every=1))  # fmt: skip
    resumed = grpo.train(
        grpo.Config(task="arith:1", prompt_sampler="pass-rate", out_dir=str(tmp_path / "r"), **common, resume=True)
    )
    assert resumed.history[-1]["prompts/measured"] == 12
    with pytest.raises(ConfigError, match="--prompt-sampler"):
        grpo.train(grpo.Config(task="arith:1", prompt_sampler="hardest", out_dir=str(tmp_path / "b"), **common))
    data = [{"prompt": "1+1=", "answer": "2"}] * 8
    with pytest.raises(ConfigError, match="'difficulty' per prompt"):
        grpo.train(
            grpo.Config(task="", reward="accuracy", prompt_sampler="curriculum", out_dir=str(tmp_path / "d"), **common),
            data=data,
        )
