"""`mirl experiment starvation`: can RL with a verifier learn an answer its reference almost never samples?

The MIO paper's claim (docs/algorithms.md §1): with negatives drawn from pi_ref, a response whose reference
probability is ~0 is (almost) never sampled and so gets (almost) no gradient. The test bed is a bandit per
prompt: a softmax policy over N answers (a free logit per prompt and answer, started at the reference),
one correct answer per prompt whose reference probability is set to p_ref. Every method draws the same
G samples per prompt and step and takes one Adam step with the library's own functions:

    grpo        verifier reward, group-normalised advantages, clipped surrogate + k3 KL (losses.policy)
    ppo         verifier reward, a learned value per prompt as the baseline (advantages.gae), value loss
    dpo, mio    offline: the correct answer as chosen, a reference sample as rejected (losses registry)
    online_mio  the correct answer as the positive, the current samples as negatives (group_js)

A GRPO group whose G rewards are all 0 has zero advantage and no gradient: counted as zero_signal.
Expected per step: a group sees the answer with probability 1 - (1 - p)^G, ~G p for small p.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..advantages import gae, group_advantages
from ..logging import console
from ..losses import get_loss
from ..losses.policy import clipped_policy_loss, clipped_value_loss
from .common import curve_stats, fmt, markdown_table, mean_std, plot_curve_grid, write_outputs

METHODS = ("grpo", "ppo", "dpo", "mio", "online_mio")


def make_bandit(seed: int, p_ref: float, n_prompts: int = 16, n_answers: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (reference logits (P, N) with the correct answer at probability p_ref exactly, correct (P,))."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_prompts, n_answers, generator=g)
    correct = torch.randint(n_answers, (n_prompts,), generator=g)
    rows = torch.arange(n_prompts)
    others = logits.clone()
    others[rows, correct] = float("-inf")
    # p = e^c / (e^c + Z_others)  ->  c = log(p / (1 - p)) + log Z_others
    logits[rows, correct] = math.log(p_ref / (1 - p_ref)) + torch.logsumexp(others, -1)
    return logits, correct


def train_bandit(
    method: str,
    ref: torch.Tensor,
    correct: torch.Tensor,
    *,
    steps: int,
    group_size: int = 8,
    lr: float = 0.05,
    beta: float = 0.1,
    kl_coef: float = 0.04,
    seed: int = 0,
) -> dict:
    """-> curves {'step', 'p_correct', 'accuracy', 'zero_signal_frac', 'correct_seen'}."""
    p_n, n = ref.shape
    rows = torch.arange(p_n)
    theta = ref.clone().requires_grad_(True)
    value = torch.zeros(p_n, requires_grad=True)
    opt = torch.optim.Adam([theta, value], lr=lr)
    g = torch.Generator().manual_seed(seed + 1000)
    ref_logp = torch.log_softmax(ref, -1)
    # offline pairs: the correct answer against one reference sample per prompt and step (fixed by seed)
    offline_rej = torch.multinomial(ref_logp.exp(), steps, replacement=True, generator=g)  # (P, steps)
    curves = {"step": [], "p_correct": [], "accuracy": [], "zero_signal_frac": [], "correct_seen": []}
    seen = 0
    for step in range(steps + 1):
        logp = torch.log_softmax(theta, -1)
        with torch.no_grad():
            samples = torch.multinomial(logp.exp(), group_size, replacement=True, generator=g)  # (P, G)
            reward = (samples == correct[:, None]).float()
            seen += int(reward.sum())
            zero = float(((reward.max(1).values - reward.min(1).values) == 0).float().mean())
        if step % 5 == 0 or step == steps:
            curves["step"].append(step)
            curves["p_correct"].append(float(logp.detach()[rows, correct].exp().mean()))
            curves["accuracy"].append(float((logp.argmax(-1) == correct).float().mean()))
            curves["zero_signal_frac"].append(zero)
            curves["correct_seen"].append(seen)
        if step == steps:
            break
        lp = logp.gather(1, samples).reshape(-1, 1)  # (P*G, 1): one "token" per answer
        mask = torch.ones_like(lp)
        if method in ("grpo", "ppo"):
            if method == "grpo":
                adv = group_advantages(reward.reshape(-1), group_size)
                extra = 0.0
            else:
                v = value[:, None].expand(-1, group_size).reshape(-1, 1)
                adv, returns = gae(reward.reshape(-1, 1), v.detach(), mask)
                adv = adv[:, 0]
                extra = clipped_value_loss(v, v.detach(), returns, mask)
            loss, _ = clipped_policy_loss(
                lp, lp.detach(), adv, mask, beta=kl_coef, ref_logps=ref_logp.gather(1, samples).reshape(-1, 1)
            )
            loss = loss + extra
        elif method in ("dpo", "mio"):
            rej = offline_rej[:, step]
            loss, _ = get_loss(method)(
                logp[rows, correct], logp[rows, rej], ref_logp[rows, correct], ref_logp[rows, rej], beta=beta
            )
            loss = loss.mean()
        elif method == "online_mio":
            group = torch.cat([correct[:, None], samples], 1)  # (P, 1 + G)
            loss, _ = get_loss("group_js")(
                logp.gather(1, group), ref_logp.gather(1, group), group == correct[:, None], beta=beta
            )
            loss = loss.mean()
        else:
            raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return curves


def run(cfg, seeds: list[int]) -> dict:
    """The bandit of the starvation claim: how fast each method finds a response the reference rarely samples."""
    t0 = time.time()
    out = Path(cfg.out_dir) / "starvation"
    steps = cfg.starve_steps // 2 if cfg.quick else cfg.starve_steps
    p_refs = (1e-1, 1e-2, 1e-4, 1e-6)
    runs = {(p, m): [] for p in p_refs for m in METHODS}
    for p in p_refs:
        for seed in seeds:
            ref, correct = make_bandit(seed, p)
            for m in METHODS:
                runs[(p, m)].append(train_bandit(m, ref, correct, steps=steps, seed=seed))
    panels, rows, numbers = [], [], []
    for p in p_refs:
        for key, title in (
            ("p_correct", "pi(correct)"),
            ("accuracy", "greedy accuracy"),
            ("zero_signal_frac", "groups with all-equal rewards"),
        ):
            lines = {}
            for m in METHODS:
                mm, ss = curve_stats([c[key] for c in runs[(p, m)]])
                lines[m] = (runs[(p, m)][0]["step"], mm, ss)
            panels.append({"title": f"p_ref(correct)={p:g}: {title}", "lines": lines, "logy": key == "p_correct"})
        for m in METHODS:
            cs = runs[(p, m)]
            pc = mean_std([c["p_correct"][-1] for c in cs])
            acc = mean_std([c["accuracy"][-1] for c in cs])
            zero = mean_std([sum(c["zero_signal_frac"]) / len(c["zero_signal_frac"]) for c in cs])
            seen = mean_std([c["correct_seen"][-1] for c in cs])
            numbers.append(
                {
                    "p_ref": p,
                    "method": m,
                    "p_correct_end": pc,
                    "accuracy_end": acc,
                    "zero_signal_frac": zero,
                    "correct_samples_seen": seen,
                    "curves": cs,
                }
            )
            rows.append([f"{p:g}", m, f"{pc[0]:.3g} ± {pc[1]:.2g}", fmt(*acc), f"{zero[0]:.3f}", f"{seen[0]:.1f}"])
    png = plot_curve_grid(
        panels,
        out / "starvation.png",
        ncols=3,
        title=f"starvation: {steps} steps, G=8 samples per prompt and step, 16 prompts, 64 answers, {len(seeds)} seeds",
    )
    g = 8
    expect = "; ".join(f"p={p:g}: {1 - (1 - p) ** g:.2g}" for p in p_refs)
    table = (
        f"{steps} steps; chance that a group of {g} reference samples contains the answer: {expect}.\n"
        "zero-signal = mean fraction of prompts whose G samples all had the same reward (no GRPO gradient); "
        "correct seen = correct answers sampled over the run (all prompts).\n\n"
        + markdown_table(
            ["p_ref(correct)", "method", "pi(correct) end", "greedy accuracy end", "zero-signal frac", "correct seen"],
            rows,
        )
    )
    pivot = [
        [m]
        + [
            f"{next(n for n in numbers if n['p_ref'] == p and n['method'] == m)['p_correct_end'][0]:.3g}"
            for p in p_refs
        ]
        for m in METHODS
    ]
    table = (
        "pi(correct) after training, mean over seeds:\n\n"
        + markdown_table(["method"] + [f"p_ref = {p:g}" for p in p_refs], pivot)
        + "\n"
        + table
    )
    console.print(table)
    numbers = {"steps": steps, "runs": numbers, "seconds": time.time() - t0}
    return write_outputs(out, "starvation", numbers, table, [png]) | {"seconds": numbers["seconds"]}
