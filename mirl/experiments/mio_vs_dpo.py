"""`mirl experiment mio-vs-dpo`: does MIO stop the chosen likelihood from falling, as the paper reports?

(a) The toy (experiments/toy.py): a linear-softmax policy over clustered responses, hard-negative pairs,
    full-batch gradient descent, for every beta x lr x loss x seed. Curves of the chosen and rejected
    log-ratio, the margin, the mass on the pair's two responses and held-out accuracy (mean +- std over
    seeds), and a table of the chosen log-ratio's peak and end value.
(b) The tiny GPT: SFT on arithmetic (cached), pairs sampled from the SFT model and verified, then each
    loss from the same start on the same pairs (pairs and data order differ by seed). Curves of the fixed
    probe pairs' chosen / rejected log-ratio and mass; held-out greedy accuracy at the end.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..logging import console
from .common import cached_sft, curve_stats, fmt, markdown_table, mean_std, plot_curve_grid, write_outputs
from .toy import make_toy, train_toy

TOY_PANELS = (
    ("chosen_logratio", "chosen log-ratio  delta_w", 0.0),
    ("rejected_logratio", "rejected log-ratio  delta_l", 0.0),
    ("margin", "margin  delta_w - delta_l", None),
    ("mass", "pi(w) + pi(l)", None),
    ("test_accuracy", "held-out accuracy", None),
)


def run_toy(cfg, seeds: list[int], out: Path) -> tuple[dict, list[Path], str]:
    """The linear-softmax toy for every (loss, beta, lr, seed): curves of the chosen log-ratio, margin and accuracy."""
    betas = [float(b) for b in cfg.betas.split(",")]
    lrs = [float(x) for x in cfg.toy_lrs.split(",")]
    losses = [s.strip() for s in cfg.toy_losses.split(",") if s.strip()]
    steps = cfg.toy_steps // 2 if cfg.quick else cfg.toy_steps
    toys = {s: make_toy(s) for s in seeds}
    runs: dict = {}
    for beta in betas:
        for lr in lrs:
            for loss in losses:
                runs[(beta, lr, loss)] = [train_toy(toys[s], loss, beta, lr, steps) for s in seeds]
    pngs, rows, numbers = [], [], []
    for lr in lrs:
        panels = []
        for beta in betas:
            for key, title, hline in TOY_PANELS:
                lines, diverged = {}, []
                for loss in losses:
                    curves = runs[(beta, lr, loss)]
                    m, s = curve_stats([c[key] for c in curves])  # a diverged seed's NaNs are left out
                    lines[loss] = (curves[0]["step"][: len(m)], m, s)
                    n_div = sum(1 for c in curves if c["diverged_at"] is not None)
                    diverged += [f"{loss} {n_div}/{len(curves)}"] if n_div else []
                note = f"\n(diverged: {', '.join(diverged)})" if diverged else ""
                panels.append({"title": f"beta={beta}: {title}{note}", "lines": lines, "hline": hline})
        pngs.append(
            plot_curve_grid(
                panels,
                out / f"toy_lr{lr:g}.png",
                ncols=len(TOY_PANELS),
                title=f"toy: linear-softmax policy, hard negatives, gradient descent lr={lr:g}, "
                f"{len(seeds)} seeds (mean +- std)",
            )
        )
    for (beta, lr, loss), curves in runs.items():
        diverged = sum(1 for c in curves if c["diverged_at"] is not None)
        ok = [c for c in curves if c["diverged_at"] is None]
        peak = mean_std([max(c["chosen_logratio"]) for c in ok])
        end = mean_std([c["chosen_logratio"][-1] for c in ok])
        drop = mean_std([max(c["chosen_logratio"]) - c["chosen_logratio"][-1] for c in ok])
        below = sum(1 for c in ok if c["chosen_logratio"][-1] < 0)
        margin = mean_std([c["margin"][-1] for c in ok])
        mass = mean_std([c["mass"][-1] for c in ok])
        acc0 = mean_std([c["test_accuracy"][0] for c in ok])
        acc = mean_std([c["test_accuracy"][-1] for c in ok])
        numbers.append(
            {
                "beta": beta,
                "lr": lr,
                "loss": loss,
                "seeds": len(curves),
                "diverged": diverged,
                "chosen_logratio_peak": peak,
                "chosen_logratio_end": end,
                "decline_from_peak": drop,
                "seeds_chosen_below_reference": below,
                "margin_end": margin,
                "mass_end": mass,
                "accuracy_start": acc0,
                "accuracy_end": acc,
                "curves": curves,
            }
        )
        rows.append(
            [
                f"{beta:g}",
                f"{lr:g}",
                loss,
                fmt(*peak),
                fmt(*end),
                fmt(*drop),
                f"{below}/{len(ok)}",
                fmt(*margin),
                fmt(*mass),
                f"{acc0[0]:.2f} -> {acc[0]:.2f}" if ok else "-",
                f"{diverged}/{len(curves)}" if diverged else "0",
            ]
        )
    table = markdown_table(
        [
            "beta",
            "lr",
            "loss",
            "delta_w peak",
            "delta_w end",
            "decline",
            "seeds delta_w<0",
            "margin end",
            "pi(w)+pi(l) end",
            "held-out acc",
            "diverged",
        ],
        rows,
    )
    # the compact view: the chosen log-ratio at the end (its peak in brackets) per loss, one row per beta x lr
    by = {(n["beta"], n["lr"], n["loss"]): n for n in numbers}
    pivot = []
    for beta in betas:
        for lr in lrs:
            cells = []
            for loss in losses:
                n = by[(beta, lr, loss)]
                cells.append(
                    "diverged"
                    if n["diverged"] == n["seeds"]
                    else f"{n['chosen_logratio_end'][0]:+.2f} ({n['chosen_logratio_peak'][0]:+.2f})"
                )
            pivot.append([f"{beta:g}", f"{lr:g}"] + cells)
    compact = "Chosen log-ratio delta_w at the end (its peak), mean over seeds:\n\n" + markdown_table(
        ["beta", "lr"] + losses, pivot
    )
    return {"steps": steps, "runs": numbers}, pngs, compact + "\nEvery number:\n\n" + table


def run_gpt(cfg, seeds: list[int], out: Path) -> tuple[dict, list[Path], str]:
    """The tiny GPT: SFT, sampled pairs, then each loss from the same start, per seed; probe curves and accuracy."""
    from ..data.tasks import make_task
    from ..device import resolve_device
    from ..eval import evaluate
    from ..models import load_policy
    from ..recipes import preference, sft
    from ..rollout.pairs import sample_pairs

    q = cfg.quick
    task = make_task("arith")
    test = task.examples("test", 100 if q else cfg.eval_n, 0)
    final = cached_sft(
        sft.Config(
            task="arith",
            steps=200 if q else cfg.sft_steps,
            seed=0,
            threads=cfg.threads,
            device=cfg.device,
            out_dir=str(out / "sft"),
            eval_n=0,
        )
    )
    sft_acc = evaluate(load_policy(final).to(resolve_device(cfg.device)), task, test, max_new_tokens=40).accuracy
    losses = [s.strip() for s in (cfg.quick_gpt_losses if q else cfg.gpt_losses).split(",") if s.strip()]
    steps = 30 if q else cfg.pref_steps
    runs: dict = {loss: [] for loss in losses}
    pair_stats = {}
    for seed in seeds:
        pairs, stats = sample_pairs(
            load_policy(final).to(resolve_device(cfg.device)),
            task,
            task.examples("train", 128 if q else cfg.n_prompts, seed + 1),
            k=8,
            seed=seed,
        )
        pair_stats[seed] = stats
        for loss in losses:
            res = preference.train(
                preference.Config(
                    loss=loss,
                    beta=cfg.gpt_beta,
                    lr=cfg.gpt_lr,
                    steps=steps,
                    task="arith",
                    seed=seed,
                    threads=cfg.threads,
                    device=cfg.device,
                    eval_n=0,
                    probe_every=2 if q else 5,
                    report=False,
                    out_dir=str(out / f"gpt_{loss}_seed{seed}"),
                ),
                model=load_policy(final).to(resolve_device(cfg.device)),
                data=pairs,
            )
            start = res.summary["probe_start"]
            probe = [h for h in res.history if "probe/chosen_logps" in h]
            acc = evaluate(res.model, task, test, max_new_tokens=40).accuracy
            runs[loss].append(
                {
                    "step": [0] + [h["step"] for h in probe],
                    "chosen_logratio": [0.0] + [h["probe/chosen_logps"] - start["chosen_logps"] for h in probe],
                    "rejected_logratio": [0.0] + [h["probe/rejected_logps"] - start["rejected_logps"] for h in probe],
                    "mass": [start["mass"]] + [h["probe/mass"] for h in probe],
                    "accuracy": acc,
                    "pairs": len(pairs),
                }
            )
            console.print(
                f"[bold]gpt {loss} seed {seed}[/]: held-out {acc:.3f}, chosen log-ratio "
                f"{runs[loss][-1]['chosen_logratio'][-1]:+.2f}"
            )
    panels = []
    for key, title in (
        ("chosen_logratio", "chosen log-ratio (probe pairs)"),
        ("rejected_logratio", "rejected log-ratio (probe pairs)"),
        ("mass", "pi(w) + pi(l) (probe pairs)"),
    ):
        lines = {}
        for loss, rs in runs.items():
            m, s = curve_stats([r[key] for r in rs])
            lines[loss] = (rs[0]["step"][: len(m)], m, s)
        panels.append({"title": title, "lines": lines, "hline": 0.0 if "ratio" in key else None})
    png = plot_curve_grid(
        panels,
        out / "gpt.png",
        ncols=3,
        title=f"tiny GPT, arithmetic, sampled+verified pairs, beta={cfg.gpt_beta}, lr={cfg.gpt_lr}, {len(seeds)} seeds",
    )
    rows, numbers = [], []
    for loss, rs in runs.items():
        cw = mean_std([r["chosen_logratio"][-1] for r in rs])
        peak = mean_std([max(r["chosen_logratio"]) for r in rs])
        rl = mean_std([r["rejected_logratio"][-1] for r in rs])
        acc = mean_std([r["accuracy"] for r in rs])
        numbers.append(
            {
                "loss": loss,
                "chosen_logratio_peak": peak,
                "chosen_logratio_end": cw,
                "rejected_logratio_end": rl,
                "accuracy": acc,
                "runs": rs,
            }
        )
        rows.append([loss, fmt(*peak), fmt(*cw), fmt(*rl), f"{acc[0]:.3f} ± {acc[1]:.3f}"])
    table = f"SFT start: held-out accuracy {sft_acc:.3f} (n={len(test)}); {steps} steps each.\n\n" + markdown_table(
        ["loss", "delta_w peak", "delta_w end", "delta_l end", "held-out accuracy"], rows
    )
    return {"sft_accuracy": sft_acc, "pair_sampling": pair_stats, "steps": steps, "runs": numbers}, [png], table


def run(cfg, seeds: list[int]) -> dict:
    """The MIO-vs-DPO experiment: the toy and the tiny GPT, results.json, summary.md and plots."""
    t0 = time.time()
    out = Path(cfg.out_dir) / "mio-vs-dpo"
    toy_numbers, toy_pngs, toy_table = run_toy(cfg, seeds, out)
    console.print(toy_table)
    gpt_seeds = seeds[:1] if cfg.quick else seeds[: cfg.gpt_seeds]
    gpt_numbers, gpt_pngs, gpt_table = run_gpt(cfg, gpt_seeds, out)
    console.print(gpt_table)
    table = (
        f"## (a) toy, {len(seeds)} seeds, {toy_numbers['steps']} full-batch steps\n\n{toy_table}\n"
        f"## (b) tiny GPT, {len(gpt_seeds)} seed(s)\n\n{gpt_table}"
    )
    numbers = {"toy": toy_numbers, "gpt": gpt_numbers, "seconds": time.time() - t0}
    return write_outputs(out, "mio-vs-dpo", numbers, table, toy_pngs + gpt_pngs) | {"seconds": numbers["seconds"]}
