"""`mirl experiment rft-compare`: which fine-tuning method, at an equal wall-clock budget?

SFT (more steps on the worked solutions), GRPO, Dr. GRPO, DAPO, PPO, online DPO and online MIO, each from
the same weak SFT start, on the arithmetic task (tiny GPT) and the visual digit task (tiny VLM), for each
seed. Every run gets the same training seconds (held-out evaluations are not counted) and is evaluated
greedily every budget/3 seconds. Runs go two at a time in separate processes with one thread each (the
machine has two cores), so each method gets one core for the same time.

RL methods share one learning rate and temperature per task (those of examples/<task>/grpo.yaml).
"Samples" are sampled completions for the RL methods and training examples for SFT.
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from ..logging import console
from .common import cached_sft, fmt, markdown_table, mean_std, plot_curve_grid, write_outputs

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
METHODS = ("sft", "grpo", "dr_grpo", "dapo", "ppo", "online_dpo", "online_mio")


def method_config(method: str, task: str, start: str, seed: int, budget: float, eval_n: int, out: str):
    """The recipe config of one method: (recipe module name, Config)."""
    from ..recipes import grpo, online, ppo, sft

    t = TASKS[task]
    common = dict(
        model=str(start),
        task=task,
        seed=seed,
        threads=1,
        out_dir=out,
        time_budget_s=budget,
        eval_n=eval_n,
        eval_every_s=budget / 3,
        max_new_tokens=t["max_new_tokens"],
        report=False,
    )
    rl = dict(common, lr=t["rl_lr"], temperature=t["temperature"], steps=100000)
    if method == "sft":
        return "sft", sft.Config(**common, steps=100000, lr=1e-3, warmup_steps=0, max_len=t["max_len"], n_train=5000)
    if method == "grpo":
        return "grpo", grpo.Config(**rl)
    if method == "dr_grpo":
        return "grpo", grpo.Config(**rl, loss_agg="dr_grpo", scale_rewards="none")
    if method == "dapo":
        return "grpo", grpo.Config(**rl, loss_agg="dapo", clip_eps_high=0.28, dynamic_sampling=True)
    if method == "ppo":
        return "ppo", ppo.Config(**rl, samples_per_prompt=8, prompts_per_step=16)
    if method in ("online_dpo", "online_mio"):
        return "online", online.Config(**rl, loss=method.split("_")[1], k=8, prompts_per_step=16)
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def run_one(job: tuple) -> dict:
    """One method x task x seed in its own process: -> its evaluations and counts."""
    import importlib

    method, task, start, seed, budget, eval_n, out = job
    recipe, cfg = method_config(method, task, start, seed, budget, eval_n, out)
    t0 = time.time()
    res = importlib.import_module(f"mirl.recipes.{recipe}").train(cfg)
    evals = res.summary.get("evals", [])
    return {
        "method": method,
        "task": task,
        "seed": seed,
        "steps": res.summary["steps"],
        "wall_s": time.time() - t0,
        "evals": [{k: e[k] for k in ("step", "accuracy", "train_s", "samples")} for e in evals],
    }


def run(cfg, seeds: list[int]) -> dict:
    """Every RFT method at the same wall-clock budget from the same SFT start, per task and seed."""
    from ..recipes import sft

    t_start = time.time()
    out = Path(cfg.out_dir) / "rft-compare"
    q = cfg.quick
    tasks = [s.strip() for s in cfg.tasks.split(",") if s.strip()]
    methods = [s.strip() for s in cfg.methods.split(",") if s.strip()]
    for name in tasks:
        if name not in TASKS:
            raise ValueError(f"rft-compare tasks: {', '.join(TASKS)} (got {name!r})")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"rft-compare methods: {', '.join(METHODS)} (got {m!r})")
    seeds = seeds[:1] if q else seeds[: cfg.rft_seeds]
    budget = 5.0 if q else cfg.budget_s
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
                eval_n=0,
                report=False,
                out_dir=str(out / f"start_{name}"),
            )
        )
    jobs = [
        (m, name, str(starts[name]), s, budget, eval_n, str(out / f"{name}_{m}_seed{s}"))
        for name in tasks
        for s in seeds
        for m in methods
    ]
    console.print(f"rft-compare: {len(jobs)} runs of {budget:g} s training each, {cfg.workers} at a time")
    with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(run_one, jobs))

    panels, rows, numbers = [], [], []
    for name in tasks:
        for axis, label in (("train_s", "training seconds"), ("samples", "samples (SFT: training examples)")):
            lines = {}
            for m in methods:
                rs = [r for r in results if r["task"] == name and r["method"] == m]
                n = min(len(r["evals"]) for r in rs)
                xs = [sum(r["evals"][i][axis] for r in rs) / len(rs) for i in range(n)]
                ms = [mean_std([r["evals"][i]["accuracy"] for r in rs]) for i in range(n)]
                lines[m] = (xs, [a for a, _ in ms], [b for _, b in ms])
            panels.append({"title": f"{name}: held-out accuracy vs {label}", "xlabel": label, "lines": lines})
        for m in methods:
            rs = [r for r in results if r["task"] == name and r["method"] == m]
            a0 = mean_std([r["evals"][0]["accuracy"] for r in rs])
            a1 = mean_std([r["evals"][-1]["accuracy"] for r in rs])
            gain = mean_std([r["evals"][-1]["accuracy"] - r["evals"][0]["accuracy"] for r in rs])
            steps = mean_std([r["steps"] for r in rs])
            samples = mean_std([r["evals"][-1]["samples"] for r in rs])
            numbers.append(
                {
                    "task": name,
                    "method": m,
                    "accuracy_start": a0,
                    "accuracy_end": a1,
                    "gain": gain,
                    "steps": steps,
                    "samples": samples,
                    "runs": rs,
                }
            )
            rows.append(
                [
                    name,
                    m,
                    f"{a0[0]:.3f}",
                    f"{a1[0]:.3f} ± {a1[1]:.3f}",
                    fmt(*gain, digits=3),
                    f"{steps[0]:.0f}",
                    f"{samples[0]:.0f}",
                ]
            )
    png = plot_curve_grid(
        panels,
        out / "rft_compare.png",
        ncols=2,
        title=f"rft-compare: {budget:g} s of training per run (1 thread), {len(seeds)} seed(s)",
    )
    table = (
        f"{budget:g} s of training per run (evaluations excluded), one thread each, held-out greedy "
        f"accuracy on {eval_n} prompts, {len(seeds)} seed(s) (mean ± std).\n\n"
        + markdown_table(["task", "method", "accuracy start", "accuracy end", "gain", "steps", "samples"], rows)
    )
    console.print(table)
    numbers = {"budget_s": budget, "eval_n": eval_n, "seeds": seeds, "runs": numbers, "seconds": time.time() - t_start}
    return write_outputs(out, "rft-compare", numbers, table, [png]) | {"seconds": numbers["seconds"]}
