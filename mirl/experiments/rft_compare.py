"""`mirl experiment rft-compare`: which fine-tuning method, at an equal budget?

SFT (more steps on the worked solutions), GRPO and its variants, PPO, online DPO and online MIO, each from the
same weak SFT start, on the arithmetic task (tiny GPT) and the visual digit task (tiny VLM), for each seed.
Every run gets the same training seconds (held-out evaluations are not counted; evaluated greedily every
budget/3 seconds), or with --budget-samples the same number of samples (evaluated every third of its steps).
Runs go two at a time in separate processes with one thread each (the machine has two cores), so each method
gets one core for the same time.

RL methods share one learning rate, temperature, group size (8) and prompts per step (16) per task (those of
examples/<task>/grpo.yaml). "Samples" are sampled completions for the RL methods and training examples for
SFT; "tokens" are the sampled response tokens (SFT: the completion tokens trained on).
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from ..logging import console
from .common import cached_sft, markdown_table, mean_se, mean_std, plot_curve_grid, write_outputs

TASKS = {  # start model, RL settings per task
    "arith": {
        "model": "gpt-nano",
        "sft_steps": 300,
        "max_len": 64,
        "max_new_tokens": 40,
        "rl_lr": 8e-5,
        "temperature": 1.0,
    },
    "digits": {
        "model": "vlm-nano",
        "sft_steps": 150,
        "max_len": 48,
        "max_new_tokens": 12,
        "rl_lr": 1e-4,
        "temperature": 0.3,
    },
}
METHODS = (
    "sft",
    "grpo",
    "dr_grpo",
    "dapo",
    "grpo_2x2",
    "cispo",
    "sapo",
    "gdpo",
    "reinforce_pp_baseline",
    "pass_rate",
    "ppo",
    "online_dpo",
    "online_mio",
)
GROUP, PROMPTS, SFT_BATCH = 8, 16, 64  # responses per prompt, prompts per step; SFT examples per step
OFF_POLICY = dict(num_iterations=2, minibatches=2)  # where the policy-loss variants differ from each other


def samples_per_step(method: str) -> int:
    """Samples one step draws (SFT: training examples); DAPO's refills draw more, counted in its results."""
    return SFT_BATCH if method == "sft" else GROUP * PROMPTS


def method_config(
    method: str,
    task: str,
    start: str,
    seed: int,
    budget: float,
    eval_n: int,
    out: str,
    budget_samples: int = 0,
    device: str = "auto",
):
    """The recipe config of one method: (recipe module name, Config). budget_samples > 0: that many samples
    (steps = budget_samples / samples per step) instead of `budget` seconds."""
    from ..recipes import grpo, online, ppo, sft

    t = TASKS[task]
    if budget_samples > 0:
        steps = max(1, math.ceil(budget_samples / samples_per_step(method)))
        clock = dict(steps=steps, time_budget_s=0.0, eval_every=max(1, steps // 3))
    else:
        clock = dict(steps=100000, time_budget_s=budget, eval_every_s=budget / 3)
    common = dict(
        model=str(start),
        task=task,
        seed=seed,
        threads=1,
        device=device,
        out_dir=out,
        eval_n=eval_n,
        max_new_tokens=t["max_new_tokens"],
        report=False,
        **clock,
    )
    rl = dict(common, lr=t["rl_lr"], temperature=t["temperature"])
    g = dict(rl, group_size=GROUP, prompts_per_step=PROMPTS)
    variants = {
        "grpo": {},
        "dr_grpo": dict(loss_agg="dr_grpo", scale_rewards="none"),
        "dapo": dict(loss_agg="dapo", clip_eps_high=0.28, dynamic_sampling=True),
        "grpo_2x2": OFF_POLICY,
        "cispo": dict(OFF_POLICY, policy_loss="cispo"),
        "sapo": dict(OFF_POLICY, policy_loss="sapo"),
        "gdpo": dict(reward="task:1,format:0.1", advantage="gdpo"),
        "reinforce_pp_baseline": dict(advantage="reinforce_pp_baseline"),
        "pass_rate": dict(prompt_sampler="pass-rate"),
    }
    if method == "sft":
        return "sft", sft.Config(
            **common, lr=1e-3, warmup_steps=0, max_len=t["max_len"], n_train=5000, batch_size=SFT_BATCH
        )
    if method in variants:
        return "grpo", grpo.Config(**g, **variants[method])
    if method == "ppo":
        return "ppo", ppo.Config(**rl, samples_per_prompt=GROUP, prompts_per_step=PROMPTS)
    if method in ("online_dpo", "online_mio"):
        return "online", online.Config(**rl, loss=method.split("_")[1], k=GROUP, prompts_per_step=PROMPTS)
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def run_one(job: tuple) -> dict:
    """One method x task x seed in its own process: -> its evaluations and counts."""
    import importlib

    method, task, start, seed, budget, eval_n, out, budget_samples, device = job
    recipe, cfg = method_config(method, task, start, seed, budget, eval_n, out, budget_samples, device)
    t0 = time.time()
    res = importlib.import_module(f"mirl.recipes.{recipe}").train(cfg)
    evals = res.summary.get("evals", [])
    return {
        "method": method,
        "task": task,
        "seed": seed,
        "steps": res.summary["steps"],
        "wall_s": time.time() - t0,
        "evals": [{k: e[k] for k in ("step", "accuracy", "train_s", "samples", "tokens")} for e in evals],
    }


def run(cfg, seeds: list[int]) -> dict:
    """Every RFT method at the same budget (seconds, or samples) from the same SFT start, per task and seed."""
    from ..recipes import sft

    t_start = time.time()
    out = Path(cfg.out_dir) / "rft-compare"
    q = cfg.quick
    tasks = [s.strip() for s in cfg.tasks.split(",") if s.strip()]
    methods = [s.strip() for s in cfg.methods.split(",") if s.strip()]
    for name in tasks:
        if name not in TASKS:
            raise ValueError(f"rft-compare --tasks: {', '.join(TASKS)} (got {name!r})")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"rft-compare --methods: {', '.join(METHODS)} (got {m!r})")
    if cfg.budget_samples < 0 or (cfg.budget_s <= 0 and not cfg.budget_samples):
        raise ValueError(
            f"rft-compare needs a budget: --budget-s > 0 or --budget-samples > 0 "
            f"(got {cfg.budget_s:g} and {cfg.budget_samples})"
        )
    seeds = seeds[:1] if q else seeds[: cfg.rft_seeds]
    by_samples = cfg.budget_samples > 0
    budget = 5.0 if q else cfg.budget_s
    budget_samples = (256 if q else cfg.budget_samples) if by_samples else 0
    eval_n = 50 if q else 200
    starts = {}
    for name in tasks:  # the weak SFT start of each task (cached)
        t = TASKS[name]
        steps = t["sft_steps"] // 2 if q else t["sft_steps"]
        starts[name] = cached_sft(
            sft.Config(
                model=t["model"],
                task=name,
                steps=steps,
                warmup_steps=10,
                seed=0,
                max_len=t["max_len"],
                n_train=5000,
                max_new_tokens=t["max_new_tokens"],
                threads=cfg.threads,
                device=cfg.device,
                eval_n=0,
                report=False,
                out_dir=str(out / f"start_{name}"),
            )
        )
    jobs = [
        (m, name, str(starts[name]), s, budget, eval_n, str(out / f"{name}_{m}_seed{s}"), budget_samples, cfg.device)
        for name in tasks
        for s in seeds
        for m in methods
    ]
    what = f"{budget_samples} samples" if by_samples else f"{budget:g} s of training"
    console.print(f"rft-compare: {len(jobs)} runs of {what} each, {cfg.workers} at a time")
    with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(run_one, jobs))

    panels, rows, numbers = [], [], []
    for name in tasks:
        for axis, label in (
            ("train_s", "training seconds"),
            ("samples", "samples (SFT: training examples)"),
            ("tokens", "sampled tokens (SFT: trained)"),
        ):
            lines = {}
            for m in methods:
                rs = [r for r in results if r["task"] == name and r["method"] == m]
                n = min(len(r["evals"]) for r in rs)
                xs = [sum(r["evals"][i][axis] for r in rs) / len(rs) for i in range(n)]
                ms = [mean_se([r["evals"][i]["accuracy"] for r in rs]) for i in range(n)]
                lines[m] = (xs, [a for a, _ in ms], [b for _, b in ms])
            panels.append({"title": f"{name}: held-out accuracy vs {label}", "xlabel": label, "lines": lines})
        for m in methods:
            rs = [r for r in results if r["task"] == name and r["method"] == m]
            a0 = mean_se([r["evals"][0]["accuracy"] for r in rs])
            a1 = mean_se([r["evals"][-1]["accuracy"] for r in rs])
            gain = mean_se([r["evals"][-1]["accuracy"] - r["evals"][0]["accuracy"] for r in rs])
            steps = mean_std([r["steps"] for r in rs])
            samples = mean_std([r["evals"][-1]["samples"] for r in rs])
            tokens = mean_std([r["evals"][-1]["tokens"] for r in rs])
            train_s = mean_std([r["evals"][-1]["train_s"] for r in rs])
            numbers.append(
                {
                    "task": name,
                    "method": m,
                    "accuracy_start": a0,
                    "accuracy_end": a1,
                    "gain": gain,
                    "steps": steps,
                    "samples": samples,
                    "tokens": tokens,
                    "train_s": train_s,
                    "runs": rs,
                }
            )
            rows.append(
                [
                    name,
                    m,
                    f"{a0[0]:.3f}",
                    f"{a1[0]:.3f} ± {a1[1]:.3f}",
                    f"{gain[0]:+.3f} ± {gain[1]:.3f}",
                    f"{steps[0]:.0f}",
                    f"{samples[0]:.0f}",
                    f"{tokens[0]:.0f}",
                    f"{train_s[0]:.0f}",
                ]
            )
    png = plot_curve_grid(
        panels,
        out / "rft_compare.png",
        ncols=3,
        title=f"rft-compare: {what} per run (1 thread), {len(seeds)} seed(s), mean ± s.e.",
    )
    table = (
        f"{what} per run (evaluations excluded), one thread each, {cfg.workers} runs at a time, held-out greedy "
        f"accuracy on {eval_n} prompts, {len(seeds)} seed(s) (mean ± standard error over seeds; steps, samples, "
        "tokens and training seconds: means).\n\n"
        + markdown_table(
            ["task", "method", "accuracy start", "accuracy end", "gain", "steps", "samples", "tokens", "train s"], rows
        )
    )
    console.print(table)
    numbers = {
        "budget_s": 0.0 if by_samples else budget,
        "budget_samples": budget_samples,
        "eval_n": eval_n,
        "seeds": seeds,
        "runs": numbers,
        "seconds": time.time() - t_start,
    }
    return write_outputs(out, "rft-compare", numbers, table, [png]) | {"seconds": numbers["seconds"]}
