"""Iterative SFT <-> RL (OpenVLThinker): for N rounds, rejection-sampled SFT on the policy's own verified
samples, then a GRPO phase; one run folder, held-out accuracy after each phase.

Round r: sample --samples-per-prompt responses to --n-prompts training prompts (drawn afresh each round),
keep the first one of each prompt that the task's verifier accepts, fine-tune on those (sft recipe), then run
GRPO from there (grpo recipe). <out_dir>/round<r>/{sft,grpo} are the phases' own run folders, <out_dir>/
iterate.json the table of phases, <out_dir>/final the last policy.

    mirl iterate --model runs/sft/final --task arith --rounds 3
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data.tasks import make_task
from ..eval import evaluate
from ..logging import console
from ..options import ConfigError
from ..recipes import grpo, sft
from ..recipes.common import build_policy
from ..recipes.run import Result
from ..rollout.score import completions


@dataclass
class Config:
    """Options of `mirl iterate` (one line of doc each, the CLI's flags)."""

    model: str = "gpt-nano"  # preset or saved model folder (usually an SFT checkpoint)
    task: str = "arith"  # built-in task: prompts, verifier, held-out evaluation
    chat: str = "auto"  # built-in task through the model's chat template: auto (if it has one), yes, no
    rounds: int = 3  # SFT -> GRPO rounds
    n_prompts: int = 512  # training prompts sampled for rejection sampling, each round
    samples_per_prompt: int = 8  # responses sampled per prompt (the first verified one is kept)
    temperature: float = 1.0  # rejection sampling temperature
    max_new_tokens: int = 40  # response length limit (sampling, GRPO, evaluation)
    sft_steps: int = 100  # SFT steps per round
    sft_lr: float = 1e-3  # SFT learning rate
    sft_batch_size: int = 32  # SFT batch size
    grpo_steps: int = 100  # GRPO steps per round
    grpo_lr: float = 1e-4  # GRPO learning rate
    group_size: int = 8  # GRPO: responses per prompt
    prompts_per_step: int = 16  # GRPO: prompts per step
    max_len: int = 128  # model context for new tiny models
    eval_n: int = 200  # held-out prompts evaluated (greedy) at the start and after every phase
    seed: int = 0  # seed of initialisation, prompts and sampling
    threads: int = 2  # torch CPU threads
    out_dir: str = "runs/iterate"  # run folder: iterate.json, round<r>/{sft,grpo}/, final/
    report: bool = False  # each phase's HTML report (off by default: one per phase)


def verified_samples(policy, task, examples: list[dict], *, k: int, temperature: float, max_new_tokens: int, seed: int):
    """Rejection sampling: k responses per example, the first the task's verifier accepts ->
    ([{'prompt', 'completion'}], the fraction of all samples accepted)."""
    outs = completions(
        policy,
        [e["prompt"] for e in examples],
        max_new_tokens=max_new_tokens,
        samples=k,
        temperature=temperature,
        batch_size=max(1, 64 // k),
        seed=seed,
    )
    success = getattr(task, "success_threshold", 1.0)
    records, accepted = [], 0
    for i, (e, samples) in enumerate(zip(examples, outs)):
        good = [s for s in samples if task.score(s, e) >= success]
        accepted += len(good)
        if good:
            records.append({"prompt": e["prompt"], "completion": good[0], "where": f"round sample {i}"})
    return records, accepted / max(1, k * len(examples))


def train(cfg: Config, model=None) -> Result:
    """model: optional Policy to start from (else cfg.model is loaded)."""
    if cfg.rounds < 1:
        raise ConfigError(f"--rounds {cfg.rounds!r}: must be an integer >= 1")
    import torch

    from ..options import check_config

    check_config(cfg)
    torch.set_num_threads(max(1, cfg.threads))
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy = build_policy(model, cfg.model, max_len=cfg.max_len, seed=cfg.seed)
    task = make_task(cfg.task, policy.tokenizer, cfg.chat)
    test = task.examples("test", cfg.eval_n, cfg.seed) if cfg.eval_n else []
    held_out = lambda p: evaluate(p, task, test, max_new_tokens=cfg.max_new_tokens).accuracy if test else None
    table = [{"round": 0, "phase": "start", "accuracy": held_out(policy)}]
    console.print(f"iterate: start, held-out accuracy {table[0]['accuracy']}")
    common = dict(task=cfg.task, chat=cfg.chat, eval_n=0, threads=cfg.threads, report=cfg.report, seed=cfg.seed)
    for r in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        examples = task.examples("train", cfg.n_prompts, cfg.seed + 1000 * r)
        records, rate = verified_samples(
            policy,
            task,
            examples,
            k=cfg.samples_per_prompt,
            temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens,
            seed=cfg.seed + r,
        )
        if records:  # nothing verified: the round goes straight to GRPO (counted in the table)
            res = sft.train(
                sft.Config(
                    steps=cfg.sft_steps,
                    lr=cfg.sft_lr,
                    batch_size=cfg.sft_batch_size,
                    max_len=cfg.max_len,
                    out_dir=str(out / f"round{r}" / "sft"),
                    **common,
                ),
                model=policy,
                data=records,
            )
            policy = res.model
        table.append(
            {"round": r, "phase": "sft", "accuracy": held_out(policy), "verified_prompts": len(records),
             "accepted_frac": rate, "seconds": time.perf_counter() - t0}
        )  # fmt: skip
        t0 = time.perf_counter()
        res = grpo.train(
            grpo.Config(
                steps=cfg.grpo_steps,
                lr=cfg.grpo_lr,
                group_size=cfg.group_size,
                prompts_per_step=cfg.prompts_per_step,
                max_new_tokens=cfg.max_new_tokens,
                max_len=cfg.max_len,
                out_dir=str(out / f"round{r}" / "grpo"),
                **common,
            ),
            model=policy,
        )
        policy = res.model
        table.append({"round": r, "phase": "grpo", "accuracy": held_out(policy), "seconds": time.perf_counter() - t0})
        for row in table[-2:]:
            console.print(f"iterate: round {r} {row['phase']}, held-out accuracy {row['accuracy']}")
        (out / "iterate.json").write_text(json.dumps({"config": asdict(cfg), "phases": table}, indent=1))
    policy.save(out / "final")
    return Result(policy, table, {"phases": table, "config": asdict(cfg)})
