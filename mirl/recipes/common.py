"""Small pieces every recipe shares word for word: run setup, data, the optimizer step, saving."""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checkpoint import atomic_write_text, save_checkpoint
from ..data.formats import SkipCounter
from ..logging import console
from ..models import load_policy
from ..optim import clip_grad, lr_at, set_lr
from ..options import ConfigError, flag


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN or infinite: the run stops before the bad update."""


def setup(cfg) -> None:
    """Threads, seeds, torch.distributed when launched by torchrun. Few threads by default:
    oversubscribing a small CPU makes every step slower. Every rank seeds alike (same initial weights)."""
    from ..distributed import init, is_main
    from ..options import check_config

    check_config(cfg)  # the CLI checked already; the Python API gets the same answers
    init()
    torch.set_num_threads(max(1, cfg.threads))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    out = Path(cfg.out_dir)
    recipe = type(cfg).__module__.rsplit(".", 1)[-1]
    saved = out / "config.json"
    if cfg.resume:
        check_resume_config(cfg, recipe, saved)
    if is_main():
        try:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(saved, json.dumps({"recipe": recipe, **asdict(cfg)}, indent=1))
        except OSError as e:
            raise ConfigError(f"--out-dir {cfg.out_dir}: cannot write the run folder ({e.strerror or e})") from e
    watch_stop_signals()


# options that may change between a run and its resumption: they do not change what is trained
RESUMABLE_CHANGES = {
    "resume",
    "out_dir",
    "stop_at_step",
    "threads",
    "allow_config_change",
    "report",
    "eval_every",
    "eval_every_s",
    "eval_n",
    "time_budget_s",
    "save_every",
}


def check_resume_config(cfg, recipe: str, saved: Path) -> None:
    """--resume continues the same run: the checkpoint must come from this recipe, and the options that
    decide what is trained must be those it was started with (--allow-config-change lets them differ)."""
    if not saved.exists():
        return  # no run here: load_checkpoint says so
    try:
        old = json.loads(saved.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{saved}: cannot read the run's config to resume it ({e})") from e
    if old.get("recipe", recipe) != recipe:
        raise ConfigError(
            f"{cfg.out_dir} holds a run of 'mirl {RECIPE_COMMANDS.get(old['recipe'], old['recipe'])}'; "
            f"it cannot be resumed by 'mirl {RECIPE_COMMANDS.get(recipe, recipe)}'"
        )
    now = asdict(cfg)
    diff = [k for k in now if k not in RESUMABLE_CHANGES and k in old and old[k] != now[k]]
    if diff and not cfg.allow_config_change:
        shown = ", ".join(f"{flag(k)} {old[k]!r} -> {now[k]!r}" for k in diff[:8])
        raise ConfigError(
            f"--resume: the options differ from the run's in {saved}: {shown}; resume with the same "
            "options, or pass --allow-config-change"
        )


RECIPE_COMMANDS = {"preference": "dpo", "reward_model": "rm"}


class Interrupted(Exception):
    """SIGINT or SIGTERM: the recipe saved the last completed step and stops."""

    def __init__(self, step: int, signal_name: str, saved: bool, out_dir: str):
        super().__init__(f"{signal_name} after step {step}")
        self.step, self.signal_name, self.saved, self.out_dir = step, signal_name, saved, out_dir


_STOP = {"signal": None}


def watch_stop_signals() -> None:
    """SIGINT / SIGTERM ask the run to stop after the current step (checkpoint, then Interrupted); a second
    SIGINT stops at once. Only in the main thread (signal handlers cannot be set elsewhere)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    _STOP["signal"] = None

    def handler(signum, frame):
        if _STOP["signal"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        _STOP["signal"] = signal.Signals(signum).name

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def stop_signal() -> str | None:
    """The name of the signal that asked the run to stop (None when none did), the same on every rank."""
    from .. import distributed as dist

    name = _STOP["signal"]
    if dist.world_size() > 1 and dist.all_sum(float(name is not None)) > 0:
        return name or "SIGTERM"
    return name


def halt_if_signalled(cfg, step: int, name: str | None) -> None:
    """After step `step` was completed and (when allowed) saved: raise Interrupted when a signal asked to stop."""
    if name is not None:
        raise Interrupted(step, name, saved=checkpoint_due(cfg, step, True), out_dir=cfg.out_dir)


@dataclass
class Result:
    """What every recipe's train() returns: the trained model, one dict of metrics per step, a summary."""

    model: object
    history: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def log_and_checkpoint(cfg, log, policy, optimizer, step: int, row: dict, main: bool) -> None:
    """Rank 0 logs the step and writes the checkpoint when due; every rank waits for it."""
    from .. import distributed as dist

    halt = stop_signal()
    if main:
        log.log(step, row)
        if checkpoint_due(cfg, step, halt is not None):
            save_checkpoint(cfg.out_dir, policy, optimizer, step)
    dist.barrier()
    halt_if_signalled(cfg, step, halt)


def train_seconds(t_train: float, evals=()) -> float:
    """Seconds since t_train, less the time spent in held-out evaluations (their 'eval_s')."""
    import time

    return time.perf_counter() - t_train - sum(e.get("eval_s", 0.0) for e in evals)


def out_of_time(cfg, t_train: float, evals=()) -> bool:
    """The time budget (cfg.time_budget_s, 0 = none) is spent; evaluation time does not count."""
    return bool(cfg.time_budget_s) and train_seconds(t_train, evals) > cfg.time_budget_s


def eval_due(cfg, step: int, t_train: float, evals) -> bool:
    """Every cfg.eval_every steps, or every cfg.eval_every_s seconds of training (evaluations excluded)."""
    if cfg.eval_every and step % cfg.eval_every == 0:
        return True
    every_s = getattr(cfg, "eval_every_s", 0.0)
    last = max((e.get("train_s", 0.0) for e in evals), default=0.0)
    return bool(every_s) and train_seconds(t_train, evals) - last >= every_s


def checkpoint_due(cfg, step: int, stopping: bool) -> bool:
    """Every save_every steps, at the last step, and whenever the run stops early; never under FSDP2 (the
    weights are sharded: no resumable checkpoint yet, the final model is gathered and saved)."""
    if getattr(cfg, "fsdp", False):
        return False
    return bool(cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps or stopping


@dataclass
class ModelArgs:
    """Options every recipe takes: PEFT LoRA, bf16 autocast, activation checkpointing, the end-of-run report."""

    lora_r: int = 0  # LoRA rank (0 = full fine-tuning)
    lora_alpha: int = 16  # LoRA scaling alpha
    lora_dropout: float = 0.0  # dropout on the LoRA path
    lora_targets: str = ""  # comma-separated module names (default: every linear layer of the blocks)
    save_adapter_only: bool = False  # with LoRA: save the adapters alone instead of merged weights
    bf16: bool = False  # bf16 autocast for the training forward and backward (CPU and CUDA)
    activation_checkpointing: bool = False  # recompute block activations in the backward: less memory
    freeze_vision: bool = False  # image+text models: keep the vision tower frozen (projector and LM train)
    compile: bool = False  # torch.compile each transformer block (in place); the first steps compile
    fsdp: bool = False  # under torchrun: FSDP2 (fully_shard per block): parameters, grads, optimizer state sharded
    report: bool = True  # at the end: <out_dir>/report/index.html (metric plots, config, sample completions)
    allow_config_change: bool = False  # with --resume: continue although options differ from the run's


def get_policy(cfg, model):
    policy = model if model is not None else load_policy(cfg.model, max_seq_len=max(256, cfg.max_len), seed=cfg.seed)
    if cfg.save_adapter_only and not (cfg.lora_r > 0 or policy.has_lora):
        raise ConfigError("--save-adapter-only needs LoRA adapters (--lora-r > 0)")
    if cfg.save_adapter_only and policy.source is None:
        raise ConfigError("--save-adapter-only needs a base model loaded from a folder (not a preset); save merged")
    if getattr(cfg, "lora_r", 0) > 0 and not policy.has_lora:
        policy.add_lora(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    if getattr(cfg, "activation_checkpointing", False):
        policy.enable_activation_checkpointing()
    if getattr(cfg, "freeze_vision", False):
        policy.freeze_vision()
    if getattr(cfg, "compile", False):
        n = policy.compile_blocks()
        if not n:
            raise ValueError("--compile found no transformer blocks to compile in this model")
    return policy


def autocast(cfg, policy):
    """bf16 autocast around the training forward when cfg.bf16 (a no-op context otherwise)."""
    return torch.autocast(policy.device.type, dtype=torch.bfloat16, enabled=bool(getattr(cfg, "bf16", False)))


class AdapterOffReference:
    """The reference of a LoRA run: the same model with its adapters off, no gradient, no second copy."""

    def __init__(self, policy):
        self.policy = policy
        self.tokenizer = policy.tokenizer

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), self.policy.reference_context():
            return self.policy(*args, **kwargs)


def frozen_reference(policy):
    """A frozen reference policy: adapters switched off under LoRA, else a frozen copy."""
    import copy

    if policy.has_lora:
        return AdapterOffReference(policy)
    return copy.deepcopy(policy).eval().requires_grad_(False)


def save_final(policy, cfg, path) -> None:
    """The trained model to `path`; a failed write (no space, permissions) is a CheckpointError naming it."""
    from ..checkpoint import CheckpointError

    try:
        policy.save(path, merged=not cfg.save_adapter_only)
    except OSError as e:
        raise CheckpointError(f"writing the final model to {path} failed ({e.strerror or e})") from e


def optimizer_step(policy, optimizer, step: int, cfg, sync_grads: bool = False) -> tuple[float, float]:
    """(Average gradients over ranks when sync_grads: the online recipes, which do not use DDP), clip, step,
    zero grads; set the learning rate for `step`. Returns (grad_norm, lr)."""
    from ..distributed import average_gradients

    if sync_grads:
        average_gradients(policy)
    lr = lr_at(step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, min_lr_ratio=cfg.min_lr_ratio)
    set_lr(optimizer, lr)
    grad_norm = clip_grad(policy, cfg.max_grad_norm)
    if not math.isfinite(grad_norm):  # every rank sees the same (averaged) gradients: all stop here together
        raise TrainingDiverged(
            f"optimizer step {step + 1}: the gradient norm is {grad_norm} (a non-finite loss or "
            f"gradient; lr {lr:g}); stopped before applying it. Nothing was saved over "
            f"{Path(cfg.out_dir) / 'checkpoint'} (the last good checkpoint, if any) and no "
            "final/ was written"
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def report_skips(skips: SkipCounter, out_dir: str | Path) -> None:
    if skips.total or skips.notes:
        console.print(f"[yellow]{skips.report()}[/]")
    (Path(out_dir) / "skips.json").write_text(json.dumps({**skips.counts, **skips.notes}))


def online_setup(cfg, model, data, recipe: str):
    """The start every online recipe shares: policy, task, prompt records, rewards (columns checked),
    held-out examples. -> (policy, task, data, reward_set, test)."""
    from ..data.formats import load_rows, prompt_records
    from ..data.tasks import make_task
    from ..rewards import RewardSet, parse_reward_spec
    from ..rollout.score import check_reward_columns

    check_fsdp(cfg, recipe)
    setup(cfg)
    policy = get_policy(cfg, model)
    task = make_task(cfg.task) if cfg.task else None
    if data is None:
        if cfg.data:
            data = prompt_records(load_rows(cfg.data, cfg.split), policy.tokenizer)
        elif task is not None:
            data = task.examples("train", cfg.n_prompts, cfg.seed)
        else:
            raise ValueError(f"{recipe} needs --task or --data")
    reward_set = RewardSet(parse_reward_spec(cfg.reward, task), timeout_s=cfg.reward_timeout_s)
    check_reward_columns(reward_set, data, cfg.data or cfg.task)
    test = task.examples("test", cfg.eval_n, cfg.seed) if task is not None and cfg.eval_n else []
    return policy, task, data, reward_set, test


def held_out_accuracy(
    policy, task, test, cfg, evals: list, step: int, label: str, t_train: float | None = None, samples: int = 0
) -> float:
    """Greedy accuracy on the held-out examples, appended to evals (with the training seconds so far, the
    samples drawn so far and the evaluation's own seconds) and printed."""
    import time

    from ..eval import evaluate

    t0 = time.perf_counter()
    train_s = 0.0 if t_train is None else train_seconds(t_train, evals)
    res = evaluate(policy, task, test, max_new_tokens=cfg.max_new_tokens)
    acc = res.accuracy
    # an evaluation before training (t_train None) is outside the training clock: nothing to subtract
    evals.append(
        {
            "step": step,
            "accuracy": acc,
            "mean_score": res.mean_score,
            "train_s": train_s,
            "samples": samples,
            "eval_s": 0.0 if t_train is None else time.perf_counter() - t0,
            **(res.details or {}),
        }
    )
    console.print(f"held-out accuracy {label}: {acc:.3f}, mean score {res.mean_score:.3f} (n={len(test)})")
    return acc


def finish_run(cfg, policy, task=None, examples: list[dict] | None = None, n_samples: int = 8) -> None:
    """End of every run (rank 0): <out_dir>/samples.jsonl (greedy completions of a few held-out prompts with
    their task score, or of the first training prompts when there is no task) and the report page."""
    if not getattr(cfg, "report", False):
        return
    from ..report import write_report
    from ..rollout.score import completions

    examples = (examples or [])[:n_samples]
    if examples:
        images = [e.get("images") for e in examples] if any(e.get("images") for e in examples) else None
        outs = completions(policy, [e["prompt"] for e in examples], max_new_tokens=cfg.max_new_tokens, images=images)
        with open(Path(cfg.out_dir) / "samples.jsonl", "w") as f:
            for e, o in zip(examples, outs):
                score = task.score(o[0], e) if task is not None else None
                f.write(
                    json.dumps(
                        {
                            "prompt": e["prompt"],
                            "completion": o[0],
                            "reward": score,
                            "reference": e.get("solution") or e.get("chosen"),
                        }
                    )
                    + "\n"
                )
    page = write_report([cfg.out_dir])
    console.print(f"report: {page}")


def check_fsdp(cfg, recipe: str) -> None:
    """--fsdp: what it does not support yet (LoRA, resume, evaluation during training, a separate PPO critic,
    dynamic sampling). The held-out evaluation before training runs before the sharding, the one after on
    the gathered weights."""
    if not getattr(cfg, "fsdp", False):
        return
    bad = [
        name
        for name, on in (
            ("--lora-r", cfg.lora_r > 0),
            ("--resume", cfg.resume),
            ("--eval-every", getattr(cfg, "eval_every", 0) or getattr(cfg, "eval_every_s", 0)),
            ("--critic separate", getattr(cfg, "critic", "") == "separate"),
            ("--dynamic-sampling", getattr(cfg, "dynamic_sampling", False)),
        )
        if on
    ]
    if bad:
        raise ValueError(f"--fsdp does not support {', '.join(bad)} yet")


def gathered_policy(policy, cfg):
    """After FSDP2 training: every rank gathers the full weights (a collective); rank 0 gets a plain copy of
    the policy to save, evaluate and report, the others None. Without --fsdp: the policy itself."""
    from .. import distributed as dist

    if not (getattr(cfg, "fsdp", False) and dist.world_size() > 1):
        return policy
    state = dist.full_state_dict(policy)
    if not dist.is_main():
        return None
    plain = load_policy(cfg.model, max_seq_len=max(256, cfg.max_len), seed=cfg.seed)
    plain.load_state_dict(state)
    return plain
