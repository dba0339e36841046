"""The one-GPU check (docs/gpu.md): every recipe on the device, with figures, in one command.

    make gpu-check                                  # --device auto: about 8 minutes on an H100 (estimate)
    python bench/gpu_check.py --device cuda:1 --out gpu_check.json
    python bench/gpu_check.py --device cpu --quick --threads 1   # the dry form: tiny model, 2 steps, seconds

Items, each run in-process inside try/except and recorded as ok, failed (with the error's last line) or
skipped (with the reason), so that one failure does not lose the rest:

- every recipe (sft, dpo, rm, prm, grpo, grpo --step-rewards, online, ppo, distill), 5 steps in bf16 (on a
  GPU with native bf16; float32 elsewhere), frozen copies in --dtype bfloat16 where a recipe keeps one, on
  (a) the tiny preset gpt-nano and (b) a random-weight Qwen2 of Qwen2.5-0.5B's shape (hidden 896, 24 layers,
  14 query and 2 key/value heads, MLP 4864, 151936 vocabulary rows, tied embeddings) with bench/run.py's local
  tokenizer (a byte-level BPE of 8000 tokens trained there: nothing is downloaded). Each records whether every
  logged loss is finite, whether the weights changed (a per-tensor checksum before and after), the peak device
  memory (torch.cuda.max_memory_allocated, reset before the item; also the recipe's own `memory/peak_gb`) and
  steps/s (the median step time after the first). A recipe fails when a loss is not finite or no weight moved;
- `mirl eval` on the tiny model;
- GRPO with vLLM as the rollout engine (--engine vllm) when vllm imports: the log-prob gap between vLLM's
  samples and the trainer (the is/logp_gap_* metrics of the rollout correction), the weight sync's time and the
  sampling tokens/s, beside the local sampler's on the same model and batch;
- the same DPO and GRPO workloads in TRL on the same GPU when trl imports (bench/run.py's workers, both
  libraries in bf16 autocast and without activation checkpointing): steps/s and the peak-memory ratio;
- an out-of-memory error injected into the update of step 2 of a GRPO run through the CLI: the one line
  `mirl grpo` prints must name the update, the step and --prompts-per-step.

Rewards: a random-weight model gets every arithmetic answer wrong, so the task's verifier gives every sample
the same reward and GRPO's advantages are zero. GRPO, online and PPO are rewarded instead by the length of the
completion's text modulo 7 (varied for any model, as in bench/run.py), and GRPO --step-rewards, whose token
advantages come from the task's step verifier and are zero here, takes an entropy bonus (0.01) so that its
update still moves the weights; its advantages/std is recorded to show it.

Writes bench/results/gpu_check.json and a markdown table beside it (--out sets the JSON's path), prints the
table, and exits 1 when any item failed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
RECIPES = ("sft", "dpo", "rm", "prm", "grpo", "grpo --step-rewards", "online", "ppo", "distill")
QWEN_05B = dict(hidden=896, layers=24, heads=14, kv_heads=2, mlp=4864, vocab=8000, model_vocab=151936)
QWEN_NAME = "qwen2.5-0.5b-shape"
# batch sizes and lengths per model: rows per step (pairs, sequences), prompts x samples, new tokens, context
SIZES = {
    "gpt-nano": dict(batch=8, prompts=4, group=4, new_tokens=16, max_len=40),
    QWEN_NAME: dict(batch=8, prompts=8, group=8, new_tokens=128, max_len=160),
}
# arithmetic pairs for the tiny model's character tokenizer (the Qwen shape takes bench/run.py's word pairs)
ARITH_PAIRS = [
    {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1 + a % 3)}
    for a in range(10)
    for b in range(10)
]


def length_reward(prompts, completions, **_):
    """A reward that varies for any model: the completion's length in characters modulo 7, over 7."""
    return [len(c) % 7 / 7 for c in completions]


# ---- models: the tiny preset and the Qwen2.5-0.5B shape, saved once -----------------------------------------


def bench_module():
    """bench/run.py as a module (its model builder, its mirl and TRL workers)."""
    spec = importlib.util.spec_from_file_location("bench_run", HERE / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_models(root: Path) -> tuple[Path, Path]:
    """gpt-nano (the student of every recipe) and gpt-micro (the distillation teacher), random, seeded."""
    from mirl.models import load_policy

    load_policy("gpt-nano", seed=0).save(root / "gpt-nano")
    load_policy("gpt-micro", seed=1).save(root / "gpt-micro")
    return root / "gpt-nano", root / "gpt-micro"


def qwen_models(bench, root: Path, threads: int, steps: int) -> tuple[Path, Path, list[dict]]:
    """The Qwen2.5-0.5B shape with random weights and 8 word pairs of 64 + 64 tokens (bench/run.py's build, which
    the TRL comparison reuses), and a 4-layer teacher of the same width and tokenizer. -> (model, teacher, pairs)."""
    common = dict(threads=threads, steps=steps, warmup=1)
    bench.WORKLOADS["gpu-dpo"] = dict(kind="dpo", **QWEN_05B, batch=8, prompt=64, response=64, **common)
    bench.WORKLOADS["gpu-grpo"] = dict(
        kind="grpo", same_as="gpu-dpo", **QWEN_05B, prompts=4, group=8, prompt=64, new_tokens=128, **common
    )
    bench.WORKLOADS["gpu-teacher"] = dict(kind="dpo", **{**QWEN_05B, "layers": 4}, batch=1, prompt=4, response=4)
    folder = bench.build("gpu-dpo", root)
    teacher = bench.build("gpu-teacher", root)
    return folder, teacher, json.loads((folder / "data.json").read_text())


# ---- one item: ok, failed or skipped, with its wall time and peak device memory ---------------------------


def last_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[-1] if text else ''}"


def item(name: str, model: str, device: torch.device, fn) -> dict:
    """Run fn() -> figures (a dict, which may set status and error) and record it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    row, t = {"item": name, "model": model, "status": "ok"}, time.perf_counter()
    try:
        row.update(fn())
    except Exception as e:  # noqa: BLE001 - any failure of an item is its result, and the check goes on
        row.update(status="failed", error=last_line(e))
    row["wall_s"] = time.perf_counter() - t
    if device.type == "cuda":
        row["peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(f"[gpu-check] {name} on {model}: {row['status']} {row.get('error', '')}", flush=True)
    return row


def skipped(name: str, model: str, reason: str) -> dict:
    print(f"[gpu-check] {name} on {model}: skipped ({reason})", flush=True)
    return {"item": name, "model": model, "status": "skipped", "error": reason}


# ---- the recipes -----------------------------------------------------------------------------------------


def fingerprint(model) -> dict[str, tuple[float, float]]:
    """Per parameter tensor: (sum, sum of squares) in float64, enough to see that a tensor changed."""
    return {
        k: (float(p.detach().double().sum()), float(p.detach().double().square().sum()))
        for k, p in model.named_parameters()
    }


def recipe_config(recipe, folder, teacher, pairs, size, *, device, bf16, steps, threads, out, engine="local"):
    """(recipe module, its Config, the keyword arguments of its train besides the model) for one item."""
    from mirl.recipes import distill, grpo, online, ppo, preference, prm, reward_model, sft

    common = dict(model=str(folder), device=device, bf16=bf16, steps=steps, threads=threads, out_dir=str(out))
    common.update(seed=0, report_to="none")
    frozen = "bfloat16" if bf16 else "float32"  # --dtype of the reference, the teacher
    rl = dict(task="arith:1", eval_n=0, max_new_tokens=size["new_tokens"], **common)  # (prm has no report)
    b, n, g = size["batch"], size["prompts"], size["group"]
    pairwise = dict(task="", batch_size=b, max_len=size["max_len"], warmup_steps=0, report=False, **common)
    if recipe == "sft":
        rows = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs]
        return sft, sft.Config(eval_n=0, **pairwise), {"data": rows}
    if recipe == "dpo":
        return preference, preference.Config(eval_n=0, probe_every=0, **pairwise), {"data": pairs}
    if recipe == "rm":
        return reward_model, reward_model.Config(**pairwise), {"data": pairs[b:] or pairs, "eval_data": pairs[:b]}
    if recipe == "prm":
        cfg = prm.Config(n_prompts=2 * b, samples_per_prompt=1, batch_size=b, **{**rl, "task": "arith:2"})
        return prm, cfg, {}
    if recipe.startswith("grpo"):
        step_rewards = recipe == "grpo --step-rewards"
        cfg = grpo.Config(
            reward="task" if step_rewards else "gpu_check_length",
            step_rewards=step_rewards,
            entropy_coef=0.01 if step_rewards else 0.0,
            beta=0.0 if step_rewards else 0.04,  # plain GRPO keeps a reference (in --dtype), as a KL run does
            dtype="float32" if step_rewards else frozen,
            prompts_per_step=n,
            group_size=g,
            ignore_eos=True,
            engine=engine,
            report=False,
            **rl,
        )
        return grpo, cfg, {}
    if recipe == "online":
        cfg = online.Config(
            reward="gpu_check_length", positive_threshold=0.5, k=g, prompts_per_step=n, dtype=frozen, report=False, **rl
        )
        return online, cfg, {}
    if recipe == "ppo":
        cfg = ppo.Config(
            reward="gpu_check_length", samples_per_prompt=g // 2, prompts_per_step=n, dtype=frozen, report=False, **rl
        )
        return ppo, cfg, {}
    if recipe == "distill":
        cfg = distill.Config(teacher=str(teacher), prompts_per_step=2 * n, dtype=frozen, report=False, **rl)
        return distill, cfg, {}
    raise ValueError(f"unknown recipe {recipe!r}")


def train_recipe(recipe, folder, teacher, pairs, size, **options) -> dict:
    """One recipe from a fresh copy of the model: loss finite, weights changed, steps/s, the recipe's metrics."""
    from mirl.models import load_policy
    from mirl.models.heads import RewardModel

    module, cfg, data = recipe_config(recipe, folder, teacher, pairs, size, **options)
    policy = load_policy(folder)
    before = fingerprint(policy)
    try:
        res = module.train(cfg, model=policy, **data)
    finally:
        shutil.rmtree(options["out"], ignore_errors=True)  # a 0.5B model's final/ is 2.5 GB
    trained = res.model.policy if isinstance(res.model, RewardModel) else res.model
    after = fingerprint(trained)
    changed = sum(after[k] != v for k, v in before.items() if k in after)
    losses = [h["loss"] for h in res.history if "loss" in h]
    step_s = [h["time/step_s"] for h in res.history if "time/step_s" in h]
    logged_peak = [h["memory/peak_gb"] for h in res.history if "memory/peak_gb" in h]
    out = {
        "steps": len(res.history),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "loss_finite": bool(losses) and all(math.isfinite(x) for x in losses),
        "weights_changed": changed > 0,
        "changed_tensors": f"{changed}/{len(before)}",
        "steps_per_s": 1 / statistics.median(step_s[1:] or step_s) if step_s else None,
        "logged_peak_gb": max(logged_peak) if logged_peak else None,
        "bf16": options["bf16"],
    }
    if recipe.startswith("grpo"):
        out.update(rollout_figures(res.history, cfg.prompts_per_step * cfg.group_size))
    problems = [
        p for p, bad in (("a loss is not finite", not out["loss_finite"]), ("no weight changed", not changed)) if bad
    ]
    if problems:
        out.update(status="failed", error="; ".join(problems))
    return out


def rollout_figures(history, rows: int) -> dict:
    """A GRPO run's sampling tokens/s, its advantages' spread and, when its sampler is not the trainer (vLLM), the
    trainer-sampler log-prob gap its rollout correction logs (means over the steps after the first)."""
    later = history[1:] or history
    mean = lambda key: statistics.mean(h[key] for h in later) if all(key in h for h in later) else None
    gen_s = mean("time/generation_s")
    return {
        "gen_tokens_per_s": rows * mean("completions/mean_length") / gen_s if gen_s else None,
        "advantages_std": mean("advantages/std"),
        "logp_gap_mean": mean("is/logp_gap_mean"),
        "logp_gap_max": mean("is/logp_gap_max"),
    }


def mirl_eval(folder, *, device, threads, n) -> dict:
    """`mirl eval` (greedy accuracy on arith:1's held-out split): an accuracy in [0, 1] over n prompts."""
    from mirl import eval as evaluation

    res = evaluation.run(
        evaluation.Config(model=str(folder), task="arith:1", n=n, max_new_tokens=16, threads=threads, device=device)
    )
    ok = 0.0 <= res.accuracy <= 1.0 and res.n == n
    return {"accuracy": res.accuracy, "n": res.n, **({} if ok else {"status": "failed", "error": "bad accuracy"})}


# ---- GRPO with vLLM: the sync's time, beside the recipe's figures ------------------------------------------


def grpo_vllm(folder, pairs, size, **options) -> dict:
    """GRPO on the Qwen shape with --engine vllm; VLLMEngine.sync timed around each call (in this process)."""
    from mirl.rollout.engine import VLLMEngine

    times, real = [], VLLMEngine.sync

    def timed(self, policy):
        t = time.perf_counter()
        real(self, policy)
        times.append(time.perf_counter() - t)

    VLLMEngine.sync = timed
    try:
        out = train_recipe("grpo", folder, None, pairs, size, engine="vllm", **options)
    finally:
        VLLMEngine.sync = real
    return {**out, "sync_s": statistics.median(times) if times else None}


# ---- TRL on the same GPU: bench/run.py's workers ----------------------------------------------------------


@contextlib.contextmanager
def trl_on_device(bf16: bool):
    """bench/run.py's TRL workers compare float32 on a CPU (use_cpu=True, bf16=False); here TRL's configs are made
    with use_cpu=False and bf16 autocast as mirl's (activation checkpointing stays off for both)."""
    import trl

    saved = trl.DPOConfig, trl.GRPOConfig
    forced = lambda cls: lambda *a, **kw: cls(*a, **{**kw, "use_cpu": False, "bf16": bf16})
    trl.DPOConfig, trl.GRPOConfig = forced(saved[0]), forced(saved[1])
    try:
        yield
    finally:
        trl.DPOConfig, trl.GRPOConfig = saved


def versus_trl(bench, kind: str, folder: Path, device: torch.device, bf16: bool) -> dict:
    """mirl and then TRL on bench/run.py's workload gpu-<kind> (the Qwen shape): steps/s (median after warm-up)
    and peak device memory of each, and mirl's ratios to TRL."""
    w = bench.WORKLOADS[f"gpu-{kind}"]
    rows = json.loads((folder / "data.json").read_text())
    if kind == "grpo":
        rows = [{"prompt": r["prompt"]} for r in rows]
    out, cuda = {}, device.type == "cuda"
    for lib, worker in (("mirl", getattr(bench, f"mirl_{kind}")), ("trl", getattr(bench, f"trl_{kind}"))):
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        with trl_on_device(bf16):
            times = worker(folder, rows, w, w["steps"] + w["warmup"])
        out[f"{lib}_steps_per_s"] = 1 / statistics.median(times[w["warmup"] :])
        out[f"{lib}_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    out["speed_ratio"] = out["mirl_steps_per_s"] / out["trl_steps_per_s"]
    out["memory_ratio"] = out["mirl_peak_gb"] / out["trl_peak_gb"] if cuda else None
    return out


# ---- an injected out-of-memory error in GRPO's update ------------------------------------------------------


def injected_oom(folder, *, device, threads, out) -> dict:
    """`mirl grpo` in this process with grpo's optimizer_step raising torch.cuda.OutOfMemoryError at its second
    call (the update of step 2): the CLI's exit code and the line it prints, which must name the update, step 2
    and --prompts-per-step and be one line."""
    from mirl import cli
    from mirl.recipes import grpo

    calls, real = [], grpo.optimizer_step

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        return real(*args, **kwargs)

    argv = ["grpo", "--model", str(folder), "--task", "arith:1", "--reward", "gpu_check_length", "--steps", "3"]
    argv += ["--group-size", "4", "--prompts-per-step", "4", "--max-new-tokens", "8", "--eval-n", "0"]
    argv += ["--no-report", "--report-to", "none", "--threads", str(threads), "--device", device, "--out-dir", str(out)]
    stderr = io.StringIO()
    grpo.optimizer_step = failing
    try:
        with contextlib.redirect_stderr(stderr):
            rc = cli.main(argv)
    except Exception as e:  # noqa: BLE001 - not handled by the CLI: that is the finding
        return {"status": "failed", "error": f"the CLI raised {last_line(e)}", "calls": len(calls)}
    finally:
        grpo.optimizer_step = real
        shutil.rmtree(out, ignore_errors=True)
    lines = [x for x in stderr.getvalue().splitlines() if "memory" in x.lower()]
    message = lines[0] if lines else stderr.getvalue().strip()[-300:]
    wanted = ("update", "step 2", "--prompts-per-step")
    missing = [w for w in wanted if w not in message]
    result = {"rc": rc, "message": message}
    if rc == 0 or len(lines) != 1 or missing:
        result.update(status="failed", error=f"rc {rc}, {len(lines)} line(s) on memory, missing {missing}: {message}")
    return result


# ---- the table ---------------------------------------------------------------------------------------------


def fmt(x, spec=".3g") -> str:
    return "-" if x is None else format(x, spec)


def notes(r: dict) -> str:
    if r["status"] != "ok":
        return r.get("error", "")
    parts = []
    if r.get("changed_tensors"):
        parts.append(f"{r['changed_tensors']} tensors changed")
    if r.get("logged_peak_gb") is not None:
        parts.append(f"memory/peak_gb logged {r['logged_peak_gb']:.2f}")
    if r.get("logp_gap_mean") is not None:
        parts.append(f"logp gap vs trainer mean {r['logp_gap_mean']:.3g} max {r['logp_gap_max']:.3g}")
    if r.get("sync_s") is not None:
        parts.append(f"sync {r['sync_s']:.2f} s")
    if r.get("gen_tokens_per_s"):
        parts.append(f"sampling {r['gen_tokens_per_s']:.0f} tokens/s")
    if r.get("item", "").endswith("step-rewards") and r.get("advantages_std") is not None:
        parts.append(f"advantages std {r['advantages_std']:.3g}")
    if "speed_ratio" in r:
        parts.append(
            f"TRL {fmt(r['trl_steps_per_s'], '.2f')} steps/s, {fmt(r['trl_peak_gb'], '.2f')} GB; mirl/TRL speed "
            f"{fmt(r['speed_ratio'], '.2f')}x, memory {fmt(r['memory_ratio'], '.2f')}x"
        )
    if "accuracy" in r:
        parts.append(f"accuracy {r['accuracy']:.3f} on {r['n']}")
    if "message" in r:
        parts.append(f"printed: `{r['message']}`")
    return "; ".join(parts)


def table(report: dict) -> str:
    lines = [
        f"GPU check on {report['device_name']} ({report['device']}), torch {report['torch']}, "
        f"{report['steps']} steps per recipe, bf16 {report['bf16']}, {report['date']}",
        "",
        "| item | model | status | loss first -> last | weights changed | peak GB | steps/s | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["items"]:
        loss = f"{fmt(r.get('loss_first'))} -> {fmt(r.get('loss_last'))}" if "loss_first" in r else "-"
        changed = {True: "yes", False: "no"}.get(r.get("weights_changed"), "-")
        steps = fmt(r.get("steps_per_s") or r.get("mirl_steps_per_s"), ".2f")
        peak = fmt(r.get("mirl_peak_gb") or r.get("peak_gb"), ".2f")  # against TRL: mirl's own run
        lines.append(
            f"| {r['item']} | {r['model']} | {r['status']} | {loss} | {changed} | {peak} | {steps} | {notes(r)} |"
        )
    return "\n".join(lines) + "\n"


# ---- driver ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--quick", action="store_true", help="the dry form: tiny model only, 2 steps, no TRL, no vLLM")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", default=str(HERE / "results" / "gpu_check.json"), help="the JSON; the table beside it")
    args = ap.parse_args(argv)
    from mirl.device import resolve_device
    from mirl.rewards import REWARDS, register_reward

    device = resolve_device(args.device)
    if args.device == "auto" and device.type == "cpu" and not args.quick:  # hours on a CPU: say so, run nothing
        print(
            f"gpu-check: torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no CUDA GPU; "
            "--quick is the CPU dry form, --device cpu runs the full check on the CPU anyway",
            file=sys.stderr,
        )
        return 2
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    steps = 2 if args.quick else 5
    if "gpu_check_length" not in REWARDS:
        register_reward("gpu_check_length")(length_reward)
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="mirl-gpu-check-"))
    options = dict(device=str(device), bf16=bf16, steps=steps, threads=args.threads)
    items = []

    # -- the tiny model: every recipe, mirl eval, the injected out-of-memory error
    student, teacher = tiny_models(root)
    size = SIZES["gpt-nano"]
    for recipe in RECIPES:
        out = root / "runs" / recipe.replace(" ", "")
        run = partial(train_recipe, recipe, student, teacher, ARITH_PAIRS, size, out=out, **options)
        items.append(item(recipe, "gpt-nano", device, run))
    n_eval = 16 if args.quick else 200
    run = lambda: mirl_eval(student, device=str(device), threads=args.threads, n=n_eval)
    items.append(item("mirl eval", "gpt-nano", device, run))
    run = lambda: injected_oom(student, device=str(device), threads=args.threads, out=root / "runs" / "oom")
    items.append(item("injected OOM in update", "gpt-nano", device, run))

    # -- the Qwen2.5-0.5B shape: every recipe, GRPO with vLLM, DPO and GRPO in TRL
    if not args.quick:
        bench = bench_module()
        folder, big_teacher, pairs = qwen_models(bench, root / "models", args.threads, steps)
        size = SIZES[QWEN_NAME]
        for recipe in RECIPES:
            out = root / "runs" / recipe.replace(" ", "")
            run = partial(train_recipe, recipe, folder, big_teacher, pairs, size, out=out, **options)
            items.append(item(recipe, QWEN_NAME, device, run))
        try:
            import vllm  # noqa: F401
        except Exception as e:  # noqa: BLE001 - any import failure means: no vLLM here
            items.append(skipped("grpo --engine vllm", QWEN_NAME, f"vllm does not import ({last_line(e)})"))
        else:
            run = lambda: grpo_vllm(folder, pairs, size, out=root / "runs" / "vllm", **options)
            items.append(item("grpo --engine vllm", QWEN_NAME, device, run))
        for kind in ("dpo", "grpo"):
            name = f"{kind} vs TRL"
            if device.type != "cuda" or device != resolve_device("auto"):
                reason = "needs auto's CUDA device (bench/run.py's workers take it; pick it with CUDA_VISIBLE_DEVICES)"
                items.append(skipped(name, QWEN_NAME, reason))
            elif importlib.util.find_spec("trl") is None:
                items.append(skipped(name, QWEN_NAME, "trl is not installed"))
            else:
                items.append(item(name, QWEN_NAME, device, partial(versus_trl, bench, kind, folder, device, bf16)))

    # -- the report
    report = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "quick": args.quick,
        "steps": steps,
        "bf16": bf16,
        "date": time.strftime("%Y-%m-%d"),
        "items": items,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    text = table(report)
    out.with_suffix(".md").write_text(text)
    print("\n" + text)
    shutil.rmtree(root, ignore_errors=True)
    failed = [r["item"] + " on " + r["model"] for r in items if r["status"] == "failed"]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
