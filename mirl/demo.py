"""The embedded default job: `mirl demo` (or `make demo`), on a laptop CPU in about three minutes.

1. A weak start: a short SFT of the tiny GPT on addition with a chain of thought (cached in out_dir/sft
   after the first run; --refresh retrains).
2. GRPO from that start, rewarded by the task's verifier: the online method, whose gain over the start is
   what a user came for.
3. Preference pairs: K samples per training prompt from the same start, verified (correct = chosen); DPO
   and MIO from the same start, on the same pairs, with the same steps, lr and beta.
4. A table of held-out greedy accuracy of every method against the start (and of the change in chosen /
   rejected log-probs of DPO and MIO), and one PNG: the accuracies, and the chosen and rejected
   log-probs over steps for DPO and MIO.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.table import Table

from .data.tasks import make_task
from .device import resolve_device
from .eval import evaluate
from .experiments.common import cached_sft
from .logging import console
from .models import load_policy
from .recipes import grpo, preference, sft
from .report import plot_preference_curves
from .rollout.pairs import sample_pairs


@dataclass
class Config:
    """The default job's options: a weak SFT start, then GRPO, and DPO and MIO on pairs sampled and verified."""

    out_dir: str = "runs/demo"  # where the SFT cache, runs, table and plot go
    task: str = "arith:2"  # built-in task
    sft_steps: int = 110  # SFT optimizer steps (a weak start leaves room to improve)
    grpo_steps: int = 600  # GRPO steps (16 prompts x 8 samples each)
    grpo_lr: float = 2e-4  # GRPO learning rate
    pref_steps: int = 60  # DPO / MIO optimizer steps (each)
    beta: float = 0.1  # the same beta for DPO and MIO
    lr: float = 3e-5  # the same learning rate for DPO and MIO
    n_prompts: int = 512  # training prompts sampled for pairs
    k: int = 8  # samples per prompt
    sample_temperature: float = 1.0  # sampling temperature of the pairs
    eval_n: int = 300  # held-out prompts
    seed: int = 0  # seed
    threads: int = 2  # torch CPU threads
    device: str = "auto"  # auto (a GPU when there is one) | cpu | cuda | cuda:N
    refresh: bool = False  # retrain the cached SFT model


def run(cfg: Config) -> dict:
    """SFT (cached), GRPO from it, pairs sampled from it and DPO and MIO on them; prints the table, writes the plot."""
    t_start = time.time()
    device = resolve_device(cfg.device)
    out = Path(cfg.out_dir)
    task = make_task(cfg.task)
    test = task.examples("test", cfg.eval_n, cfg.seed)

    # ---- 1. a weak SFT start, cached ---------------------------------------------------------------------
    sft_cfg = sft.Config(
        task=cfg.task,
        steps=cfg.sft_steps,
        seed=cfg.seed,
        threads=cfg.threads,
        device=cfg.device,
        out_dir=str(out / "sft"),
        eval_n=0,
    )
    if cfg.refresh:
        shutil.rmtree(out / "sft", ignore_errors=True)
    final = cached_sft(sft_cfg)
    start = load_policy(final).to(device)
    start_acc = evaluate(start, task, test, max_new_tokens=40).accuracy
    console.print(f"start (SFT, {cfg.sft_steps} steps): held-out accuracy {start_acc:.3f}")
    results = {}

    # ---- 2. GRPO from the start --------------------------------------------------------------------------
    t0 = time.time()
    g = grpo.train(
        grpo.Config(
            model=str(final),
            task=cfg.task,
            steps=cfg.grpo_steps,
            lr=cfg.grpo_lr,
            group_size=8,
            prompts_per_step=16,
            eval_n=0,
            seed=cfg.seed,
            threads=cfg.threads,
            device=cfg.device,
            out_dir=str(out / "grpo"),
            report=False,
        )
    )
    results["GRPO"] = {"accuracy": evaluate(g.model, task, test, max_new_tokens=40).accuracy, "s": time.time() - t0}

    # ---- 3. pairs from the start's own samples; DPO and MIO, same start, same pairs, same budget ----------
    prompts = task.examples("train", cfg.n_prompts, cfg.seed + 1)
    pairs, stats = sample_pairs(start, task, prompts, k=cfg.k, temperature=cfg.sample_temperature, seed=cfg.seed)
    console.print(
        f"pairs: {stats['pairs']} from {stats['prompts']} prompts (sample accuracy "
        f"{stats['sample_accuracy']:.2f}; {stats['skipped_all_correct']} all-correct and "
        f"{stats['skipped_all_wrong']} all-wrong prompts skipped)"
    )
    histories = {}
    for loss in ("dpo", "mio"):
        t0 = time.time()
        pcfg = preference.Config(
            loss=loss,
            beta=cfg.beta,
            lr=cfg.lr,
            steps=cfg.pref_steps,
            task=cfg.task,
            seed=cfg.seed,
            threads=cfg.threads,
            device=cfg.device,
            out_dir=str(out / loss),
            eval_n=0,
            report=False,
        )
        res = preference.train(pcfg, model=load_policy(final).to(device), data=pairs)
        results[loss.upper()] = {
            "accuracy": evaluate(res.model, task, test, max_new_tokens=40).accuracy,
            "chosen_logp_change": res.summary["chosen_logp_change"],
            "rejected_logp_change": res.summary["rejected_logp_change"],
            "s": time.time() - t0,
        }
        histories[loss.upper()] = res.history

    # ---- 4. table and plot -------------------------------------------------------------------------
    table = Table(
        title=f"mirl demo: {task.name}, held-out greedy accuracy (n={len(test)}); DPO and MIO: beta={cfg.beta}, "
        f"{cfg.pref_steps} steps, the same {stats['pairs']} pairs"
    )
    for col in ("method", "held-out accuracy", "vs start", "chosen logp change", "rejected logp change", "seconds"):
        table.add_column(col, justify="right")
    table.add_row(f"start (SFT {cfg.sft_steps} steps)", f"{start_acc:.3f}", "-", "-", "-", "-")
    for name, r in results.items():
        table.add_row(
            name,
            f"{r['accuracy']:.3f}",
            f"{r['accuracy'] - start_acc:+.3f}",
            f"{r['chosen_logp_change']:+.2f}" if "chosen_logp_change" in r else "-",
            f"{r['rejected_logp_change']:+.2f}" if "rejected_logp_change" in r else "-",
            f"{r['s']:.0f}",
        )
    console.print(table)
    png = plot_preference_curves(
        histories,
        out / "demo.png",
        title=f"mirl demo on {task.name}: held-out accuracy; DPO vs MIO log-probs (beta={cfg.beta})",
        accuracies={"start": start_acc, **{k: v["accuracy"] for k, v in results.items()}},
    )
    summary = {
        "start_accuracy": start_acc,
        "pairs": stats,
        **{k.lower(): v for k, v in results.items()},
        "seconds": time.time() - t_start,
        "config": asdict(cfg),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    console.print(f"plot: {png}\nsummary: {out / 'summary.json'}\ntotal {summary['seconds']:.0f} s")
    return summary
