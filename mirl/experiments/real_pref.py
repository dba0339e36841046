"""`mirl experiment mio-vs-dpo-real`: the MIO claim on a real model, with seeds and an equal tuning budget.

    1. pairs: k samples per training prompt from the start model itself, verified by the task's checker (a correct
       answer chosen, a wrong one rejected), written once to <out>/pairs.jsonl and shared by every run
    2. each loss (DPO, MIO = NCA's pair loss, IPO, SimPO) from the same start on the same pairs, with LoRA, at each
       of --real-lrs (seed 0), scored on a validation split: prompts of the task's train split that made no pair
    3. each loss at the rate its validation accuracy picked, seeds 1, 2, ... as well
    4. held-out accuracy (the task's test split) mean and standard error over seeds; the chosen and rejected
       log-probs of fixed probe pairs (the first 256 training pairs) through training; wall time of every run
    5. optionally (--real-losses online-nca, online-infonca) NCA or InfoNCA over k fresh samples per prompt with their
       scalar rewards (mirl online --loss nca), the same rates searched, --real-online-steps steps of
       --real-batch-size prompts; its training prompts come from the train split, so they may include validation ones

The runs go --workers at a time, each in its own process with one thread; a run already done with the same job
(its out_dir's result.json) is read back, so an interrupted experiment, or one given more losses, resumes.
--quick: a tiny GPT after 200 SFT steps on arith instead of SmolLM2 (the CI size). Output:
<out>/mio-vs-dpo-real/{results.json, summary.md, probes.png}.
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

from ..logging import console
from .common import cached_sft, markdown_table, mean_se, mean_std, plot_curve_grid, write_outputs


def split_list(s: str, kind=str) -> list:
    """'a,b' -> [kind('a'), kind('b')] (blanks dropped)."""
    return [kind(x.strip()) for x in s.split(",") if x.strip()]


def difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a less mean of b, and the standard error of that difference (the two seed sets independent)."""
    (ma, sa), (mb, sb) = mean_se(a), mean_se(b)
    return ma - mb, math.sqrt(sa**2 + sb**2)


def pick_lr(val: dict[float, float]) -> float:
    """The rate of the best validation accuracy (the smaller rate on a tie).

    >>> pick_lr({1e-4: 0.5, 3e-4: 0.6, 1e-3: 0.6})
    0.0003
    """
    best = max(val.values())
    return min(lr for lr, acc in val.items() if acc == best)


ONLINE = {"online-nca": "nca", "online-infonca": "infonca"}  # group losses on fresh samples (mirl online --loss)


def online_config(c: dict) -> dict:
    """mirl online's options for a group loss run from a pair run's: the same model, rate, seed, length and LoRA;
    k samples per prompt at the pairs' temperature, --real-online-steps steps of --real-batch-size prompts."""
    keep = ("model", "task", "lr", "seed", "max_len", "max_new_tokens", "lora_r", "lora_alpha", "eval_n", "threads",
            "report", "report_to", "device", "out_dir", "bf16")  # fmt: skip
    out = {k: c[k] for k in keep if k in c}
    return {**out, "loss": ONLINE[c["loss"]], "k": c["k"], "temperature": c["temperature"],
            "steps": c["online_steps"], "prompts_per_step": c["batch_size"]}  # fmt: skip


def probe_logps(policy, pairs: list[dict], max_len: int) -> tuple[float, float]:
    """The mean summed log-prob of the chosen and of the rejected answers of the first 256 pairs (the probes), in
    float32 (the pair runs take theirs inside mirl dpo, under its arithmetic; this serves the start and the online
    group-loss runs)."""
    import torch

    from ..data.collate import encode_pairs
    from ..data.formats import SkipCounter
    from ..recipes.preference import all_pair_logps

    skipped = SkipCounter()
    enc = encode_pairs(policy, pairs[:256], max_len, skipped)
    if not enc:
        raise ValueError(f"no probe pair fits --real-max-len {max_len} (dropped: {skipped.counts})")
    with torch.no_grad():
        chosen, rejected = all_pair_logps(policy, enc, policy.tokenizer.pad_token_id, False)
    return float(chosen.mean()), float(rejected.mean())


def run_one(job: dict) -> dict:
    """One loss x rate x seed in its own process: train on the shared pairs, score the test split (and the
    validation split for the rate search's runs)."""
    import torch

    from ..data.tasks import make_task
    from ..eval import evaluate
    from ..recipes import preference

    c = job["config"]
    done = Path(c["out_dir"]) / "result.json"  # a run finished before with the same job is not run again
    if done.exists() and json.loads(done.read_text())["job"] == job:
        return json.loads(done.read_text())["result"]
    torch.set_num_threads(1)
    pairs = [json.loads(line) for line in Path(job["pairs"]).read_text().splitlines() if line.strip()]
    t0 = time.time()
    if c["loss"] in ONLINE:  # a group loss on fresh samples: k per prompt, scalar rewards (the task's score)
        from ..recipes import online

        res = online.train(online.Config(**online_config(c)))
        start = job["start_probe"]  # float32, as probe_logps takes the end
        end = probe_logps(res.model, pairs, c["max_len"])
    else:  # the probes' start, curve and end from the run itself, under its arithmetic
        res = preference.train(preference.Config(**c), data=pairs)
        s = res.summary
        start = (s["probe_start"]["chosen_logps"], s["probe_start"]["rejected_logps"])
        end = (start[0] + s["chosen_logp_change"], start[1] + s["rejected_logp_change"])
    train_s = time.time() - t0
    policy = res.model
    task = make_task(job["config"]["task"], policy.tokenizer, "auto")
    val, test = (task.examples(split, n, 0) for split, n in (("train", job["n_prompts"] + job["val_n"]),
                                                                ("test", job["eval_n"])))  # fmt: skip
    sets = {"val": val[job["n_prompts"] :], "test": test} if job["val"] else {"test": test}  # val: the search only
    mnt = job["config"]["max_new_tokens"]
    acc = {name: evaluate(policy, task, ex, max_new_tokens=mnt) for name, ex in sets.items()}
    probes = [(r["step"], r["probe/chosen_logps"], r["probe/rejected_logps"]) for r in res.history if "probe/mass" in r]
    result = {
        "loss": job["config"]["loss"],
        "lr": job["config"]["lr"],
        "seed": job["config"]["seed"],
        "val": acc["val"].accuracy if "val" in acc else None,
        "test": acc["test"].accuracy,
        "test_se": acc["test"].accuracy_se,
        "probes": probes,
        "probe_start": start,
        "probe_end": end,
        "train_s": train_s,
        "wall_s": time.time() - t0,
    }
    done.write_text(json.dumps({"job": job, "result": result}))
    return result


def start_and_pairs(cfg, out: Path) -> tuple[str, dict]:
    """The start model (a preset or the cached tiny SFT model with --quick) and the pairs file, sampled once."""
    from ..data.tasks import make_task
    from ..eval import evaluate
    from ..models import load_policy
    from ..recipes import sft
    from ..rollout.pairs import sample_pairs

    q = cfg.quick
    model, task_name = cfg.real_model, "arith" if q else cfg.real_task
    if q:
        sft_cfg = sft.Config(task="arith", steps=200, seed=0, threads=cfg.threads, eval_n=0, report=False,
                             out_dir=str(out / "sft"))  # fmt: skip
        model = str(cached_sft(sft_cfg))
    pairs_file, info_file = out / "pairs.jsonl", out / "pairs.json"
    key = {"model": model, "task": task_name, "n_prompts": cfg.real_n_prompts, "k": cfg.real_k,
           "temperature": cfg.real_temperature, "max_new_tokens": cfg.real_max_new_tokens, "val_n": cfg.real_val_n,
           "eval_n": cfg.eval_n}  # fmt: skip
    if info_file.exists() and json.loads(info_file.read_text())["key"] == key:
        console.print(f"[green]using the pairs sampled before[/] ({pairs_file})")
        info = json.loads(info_file.read_text())
        if "probe" not in info["start"]:  # a pairs file of an earlier version: the probes' start log-probs
            pairs = [json.loads(line) for line in pairs_file.read_text().splitlines() if line.strip()]
            info["start"]["probe"] = probe_logps(load_policy(model), pairs, cfg.real_max_len)
            info_file.write_text(json.dumps(info, indent=1))
        return model, info
    import torch

    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    policy = load_policy(model)
    task = make_task(task_name, policy.tokenizer, "auto")
    train = task.examples("train", cfg.real_n_prompts + cfg.real_val_n, 0)
    mnt = cfg.real_max_new_tokens
    longest = max(len(policy.encode_prompt(e["prompt"])[0]) for e in train[: cfg.real_n_prompts])
    if longest + mnt > cfg.real_max_len:  # checked before the sampling: such pairs would be dropped in training
        raise ValueError(
            f"--real-max-len {cfg.real_max_len}: {task_name}'s longest training prompt is {longest} "
            f"tokens, plus --real-max-new-tokens {mnt}; give --real-max-len {longest + mnt} or more"
        )
    pairs, stats = sample_pairs(policy, task, train[: cfg.real_n_prompts], k=cfg.real_k,
                                temperature=cfg.real_temperature, max_new_tokens=mnt, seed=0)  # fmt: skip
    sample_s = time.time() - t0
    start = {
        "val": evaluate(policy, task, train[cfg.real_n_prompts :], max_new_tokens=mnt).accuracy,
        "test": evaluate(policy, task, task.examples("test", cfg.eval_n, 0), max_new_tokens=mnt),
    }
    start["test"], start["test_se"] = start["test"].accuracy, start["test"].accuracy_se
    start["probe"] = probe_logps(policy, pairs, cfg.real_max_len) if pairs else (float("nan"), float("nan"))
    out.mkdir(parents=True, exist_ok=True)
    pairs_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    info = {"key": key, "stats": stats, "n_pairs": len(pairs), "sample_s": sample_s, "start": start}
    info_file.write_text(json.dumps(info, indent=1))
    console.print(f"{len(pairs)} pairs from {cfg.real_n_prompts} prompts ({stats}) in {sample_s:.0f} s; start {start}")
    return model, info


def run(cfg, seeds: list[int]) -> dict:
    """The LR search on the validation split, then the seeds at each loss's chosen rate; the table and the probes."""
    t_start = time.time()
    out = Path(cfg.out_dir) / "mio-vs-dpo-real"
    q = cfg.quick
    if q:  # the CI size, on the tiny GPT's compact arith
        cfg = replace(cfg, real_n_prompts=128, real_val_n=50, eval_n=100, real_k=8, real_temperature=1.0,
                      real_max_new_tokens=16, real_max_len=64)  # fmt: skip
    losses = split_list(cfg.real_losses)
    lrs = split_list(cfg.real_lrs, float)
    if len(lrs) < 1 or len(seeds) < 1:
        raise ValueError("mio-vs-dpo-real needs --real-lrs and --seeds")
    if q:
        losses, lrs, seeds = losses[:3], lrs[:2], seeds[:2]
    model, info = start_and_pairs(cfg, out)
    if info["n_pairs"] < 2:
        hint = "raise --real-n-prompts or --real-k"
        raise ValueError(f"mio-vs-dpo-real: {info['n_pairs']} pairs from {cfg.real_n_prompts} prompts; {hint}")

    def job(loss: str, lr: float, seed: int, val: bool) -> dict:
        c = {"model": model, "task": "arith" if q else cfg.real_task, "loss": loss, "lr": lr, "seed": seed,
             "beta": cfg.real_beta, "steps": 10 if q else cfg.real_steps, "batch_size": cfg.real_batch_size,
             "warmup_steps": 2 if q else 4, "max_len": cfg.real_max_len, "max_new_tokens": cfg.real_max_new_tokens,
             **({} if q else {"lora_r": 16, "lora_alpha": 32}), "probe_every": 2 if q else 20, "eval_n": 0,
             "threads": 1, "report": False, "report_to": "none", "device": cfg.device, "bf16": cfg.real_bf16 or None,
             "out_dir": str(out / "runs" / f"{loss}_lr{lr:g}_seed{seed}")}  # fmt: skip
        extra = {}
        if loss in ONLINE:
            c.update(k=cfg.real_k, temperature=cfg.real_temperature, online_steps=4 if q else cfg.real_online_steps)
            extra["start_probe"] = info["start"]["probe"]
        return {"config": c, "pairs": str(out / "pairs.jsonl"), "n_prompts": cfg.real_n_prompts,
                "val_n": cfg.real_val_n, "eval_n": cfg.eval_n, "val": val, **extra}  # fmt: skip

    pool = ProcessPoolExecutor(max_workers=cfg.workers, mp_context=get_context("spawn"))
    with pool:
        search = list(pool.map(run_one, [job(loss, lr, seeds[0], True) for loss in losses for lr in lrs]))
        chosen = {loss: pick_lr({r["lr"]: r["val"] for r in search if r["loss"] == loss}) for loss in losses}
        console.print(f"rates chosen on the validation split: {chosen}")
        more = list(pool.map(run_one, [job(loss, chosen[loss], s, False) for loss in losses for s in seeds[1:]]))
    final = {loss: [r for r in search + more if r["loss"] == loss and r["lr"] == chosen[loss]] for loss in losses}
    return write_results(cfg, out, info, losses, lrs, chosen, search, final, time.time() - t_start)


def write_results(cfg, out, info, losses, lrs, chosen, search, final, wall_s) -> dict:
    """results.json, the table (summary.md) and the probe curves (probes.png)."""
    start = info["start"]
    rows, numbers = [], {"pairs": info, "chosen_lr": chosen, "search": search, "final": final, "seconds": wall_s}
    base = [r["test"] for r in final[losses[0]]]
    for loss in losses:
        rs = final[loss]
        tests = [r["test"] for r in rs]
        m, se = mean_se(tests)
        d, dse = difference(tests, base)
        dc = mean_se([r["probe_end"][0] - r["probe_start"][0] for r in rs])  # from the start model's, in nats
        dr = mean_se([r["probe_end"][1] - r["probe_start"][1] for r in rs])
        val = " / ".join(f"{r['val']:.3f}" for lr in lrs for r in search if r["loss"] == loss and r["lr"] == lr)
        noise = "-" if loss == losses[0] else f"{d:+.3f} ± {dse:.3f}" + (" (> 2 SE)" if abs(d) > 2 * dse else "")
        rows.append([loss, val, f"{chosen[loss]:g}", ", ".join(f"{t:.3f}" for t in tests), f"{m:.3f} ± {se:.3f}",
                     f"{m - start['test']:+.3f}", noise, f"{dc[0]:+.2f}", f"{dr[0]:+.2f}",
                     f"{mean_std([r['train_s'] for r in rs])[0]:.0f}"])  # fmt: skip
    header = ["loss", "validation accuracy at lr " + " / ".join(f"{lr:g}" for lr in lrs), "chosen lr",
              "held-out per seed", "held-out mean ± SE", "vs start", f"vs {losses[0]} (± SE)",
              "probe chosen logp change", "probe rejected logp change", "train s (mean)"]  # fmt: skip
    table = (
        f"{info['n_pairs']} pairs from {cfg.real_n_prompts} prompts ({info['stats']}); start: validation "
        f"{start['val']:.3f}, held-out {start['test']:.3f} ± {start['test_se']:.3f} (n = {cfg.eval_n})\n\n"
        + markdown_table(header, rows)
    )
    panels = []
    for col, name in ((1, "chosen"), (2, "rejected")):
        lines = {}
        for loss in losses:
            curves = [[(0, *r["probe_start"]), *r["probes"]] for r in final[loss] if r["probes"]]
            if not curves:  # an online group loss logs no probe curve (its change is in the table)
                continue
            n = min(len(c) for c in curves)
            steps = [curves[0][i][0] for i in range(n)]
            stats = [mean_se([c[i][col] for c in curves]) for i in range(n)]
            lines[loss] = (steps, [a for a, _ in stats], [b for _, b in stats])
        panels.append({"title": f"probe pairs: {name} log-prob", "xlabel": "step", "lines": lines})
    pngs = [plot_curve_grid(panels, out / "probes.png", ncols=2, title="mio-vs-dpo-real")]
    return write_outputs(out, "mio-vs-dpo-real", numbers, table, pngs)
