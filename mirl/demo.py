"""The embedded default job: `mirl demo` (or `make demo`), on a laptop CPU in a few minutes.

1. SFT of the tiny GPT on 3-digit addition with a chain of thought (cached in out_dir/sft after the
   first run; --refresh retrains).
2. Preference pairs: K samples per training prompt from the SFT model, verified (correct = chosen).
3. DPO and MIO from the same SFT checkpoint, on the same pairs, with the same steps, lr and beta.
4. A table of held-out greedy accuracy and of the change in chosen / rejected log-probs, and a PNG of
   chosen and rejected log-probs over steps for both.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.table import Table

from .data.tasks import make_task
from .eval import evaluate
from .experiments.common import cached_sft
from .logging import console
from .models import load_policy
from .recipes import preference, sft
from .report import plot_preference_curves
from .rollout.pairs import sample_pairs


@dataclass
class Config:
    """The default job's options: SFT, then pairs sampled and verified, then DPO and MIO side by side."""

    out_dir: str = "runs/demo"  # where the SFT cache, runs, table and plot go
    task: str = "arith"  # built-in task
    sft_steps: int = 400  # SFT optimizer steps
    pref_steps: int = 60  # DPO / MIO optimizer steps (each)
    beta: float = 0.1  # the same beta for DPO and MIO
    lr: float = 1e-4  # the same learning rate for DPO and MIO
    n_prompts: int = 512  # training prompts sampled for pairs
    k: int = 8  # samples per prompt
    eval_n: int = 300  # held-out prompts
    seed: int = 0  # seed
    threads: int = 2  # torch CPU threads
    refresh: bool = False  # retrain the cached SFT model


def run(cfg: Config) -> dict:
    """SFT (cached), pairs sampled from it, DPO and MIO on them; prints the table and writes the plot."""
    t_start = time.time()
    out = Path(cfg.out_dir)
    task = make_task(cfg.task)
    test = task.examples("test", cfg.eval_n, cfg.seed)

    # ---- 1. SFT, cached ----------------------------------------------------------------------------
    sft_cfg = sft.Config(
        task=cfg.task, steps=cfg.sft_steps, seed=cfg.seed, threads=cfg.threads, out_dir=str(out / "sft"), eval_n=0
    )
    if cfg.refresh:
        shutil.rmtree(out / "sft", ignore_errors=True)
    final = cached_sft(sft_cfg)
    sft_policy = load_policy(final)
    sft_acc = evaluate(sft_policy, task, test, max_new_tokens=40).accuracy

    # ---- 2. pairs from the SFT model's own samples -------------------------------------------------
    pairs, stats = sample_pairs(
        sft_policy, task, task.examples("train", cfg.n_prompts, cfg.seed + 1), k=cfg.k, seed=cfg.seed
    )
    console.print(
        f"pairs: {stats['pairs']} from {stats['prompts']} prompts (sample accuracy "
        f"{stats['sample_accuracy']:.2f}; {stats['skipped_all_correct']} all-correct and "
        f"{stats['skipped_all_wrong']} all-wrong prompts skipped)"
    )

    # ---- 3. DPO and MIO, same start, same pairs, same budget ---------------------------------------
    results = {}
    for loss in ("dpo", "mio"):
        pcfg = preference.Config(
            loss=loss,
            beta=cfg.beta,
            lr=cfg.lr,
            steps=cfg.pref_steps,
            task=cfg.task,
            seed=cfg.seed,
            threads=cfg.threads,
            out_dir=str(out / loss),
            eval_n=0,
        )
        res = preference.train(pcfg, model=load_policy(final), data=pairs)
        acc = evaluate(res.model, task, test, max_new_tokens=40).accuracy
        results[loss] = {
            "accuracy": acc,
            "chosen_logp_change": res.summary["chosen_logp_change"],
            "rejected_logp_change": res.summary["rejected_logp_change"],
            "history": res.history,
        }

    # ---- 4. table and plot -------------------------------------------------------------------------
    table = Table(
        title=f"mirl demo: {task.name}, held-out n={len(test)}, beta={cfg.beta}, "
        f"{cfg.pref_steps} steps, {stats['pairs']} pairs"
    )
    for col in ("method", "held-out accuracy", "chosen logp change", "rejected logp change"):
        table.add_column(col, justify="right")
    table.add_row("SFT", f"{sft_acc:.3f}", "-", "-")
    for loss, r in results.items():
        table.add_row(
            loss.upper(), f"{r['accuracy']:.3f}", f"{r['chosen_logp_change']:+.2f}", f"{r['rejected_logp_change']:+.2f}"
        )
    console.print(table)
    png = plot_preference_curves(
        {k.upper(): v["history"] for k, v in results.items()},
        out / "logps.png",
        title=f"DPO vs MIO on {task.name} (beta={cfg.beta})",
    )
    summary = {
        "sft_accuracy": sft_acc,
        "pairs": stats,
        **{k: {kk: vv for kk, vv in v.items() if kk != "history"} for k, v in results.items()},
        "seconds": time.time() - t_start,
        "config": asdict(cfg),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    console.print(f"plot: {png}\nsummary: {out / 'summary.json'}\ntotal {summary['seconds']:.0f} s")
    return summary
