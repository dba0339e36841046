"""Small pieces every recipe shares word for word: run setup, data, the optimizer step, saving."""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checkpoint import atomic_write_text
from ..data.formats import SkipCounter
from ..logging import MetricLogger, console
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


@dataclass
class Result:
    """What every recipe's train() returns: the trained model, one dict of metrics per step, a summary."""

    model: object
    history: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)


@dataclass
class Cadence:
    """When a run saves, evaluates and stops: part of the derived values each recipe computes near its top."""

    steps: int  # steps of the recipe's loop
    save_every: int = 0  # checkpoint every N steps (0 = only at the end)
    eval_every: int = 0  # held-out evaluation every N steps (0 = off)
    eval_every_s: float = 0.0  # ... or every N seconds of training (evaluations excluded; 0 = off)
    time_budget_s: float = 0.0  # stop after this many seconds of training (0 = no limit)
    stop_at_step: int = 0  # end after this step as if interrupted (0 = run to the end)
    resumable: bool = True  # False under FSDP2: the weights are sharded, no resumable checkpoint is written

    def checkpoint_due(self, step: int, stopping: bool = False) -> bool:
        """Every save_every steps, at the last step, and whenever the run stops early."""
        return self.resumable and (
            bool(self.save_every and step % self.save_every == 0) or step == self.steps or stopping
        )

    @property
    def finishes(self) -> bool:
        """The run goes to its last step (no --stop-at-step before it): it saves final/ and evaluates."""
        return not (self.stop_at_step and self.stop_at_step < self.steps)


class Run:
    """The bookkeeping between a recipe's steps: the metrics log (rank 0), the held-out evaluations and the
    training clock (evaluation time excluded), and the history returned in the Result."""

    def __init__(
        self,
        out_dir,
        cadence: Cadence,
        *,
        desc: str,
        show: tuple[str, ...],
        resume: bool,
        start: int,
        evals: list | None = None,
    ):
        import time

        from .. import distributed as dist

        self.out_dir, self.cadence, self.start = Path(out_dir), cadence, start
        self.main = dist.is_main()
        self.log = (
            MetricLogger(out_dir, cadence.steps, desc=desc, resume=resume, start_step=start, show=show)
            if self.main
            else None
        )
        self.history: list[dict] = []
        self.evals: list[dict] = evals if evals is not None else []
        self.samples = 0  # responses sampled so far (online recipes)
        self.t_train = time.perf_counter()

    def train_seconds(self) -> float:
        """Seconds since training began, less the time spent in held-out evaluations."""
        import time

        return time.perf_counter() - self.t_train - sum(e.get("eval_s", 0.0) for e in self.evals)

    def out_of_time(self) -> bool:
        """Whether the time budget is spent (evaluation time excluded)."""
        return bool(self.cadence.time_budget_s) and self.train_seconds() > self.cadence.time_budget_s

    def eval_due(self, step: int) -> bool:
        """Whether a held-out evaluation is due after `step` (every N steps, or N seconds of training)."""
        c = self.cadence
        if c.eval_every and step % c.eval_every == 0:
            return True
        last = max((e.get("train_s", 0.0) for e in self.evals), default=0.0)
        return bool(c.eval_every_s) and self.train_seconds() - last >= c.eval_every_s

    @property
    def steps(self) -> int:
        """The steps completed so far, counting those before a resume."""
        return self.start + len(self.history)


def end_of_step(run: Run, step: int, row: dict, *, t_step: float, save, evaluate=None) -> bool:
    """The tail of every recipe's step, the same in all: the step's time, a held-out evaluation when due
    (rank 0; evaluate(step) -> accuracy), the history and the metrics log, a checkpoint when due
    (save(step) on rank 0), and whether to stop: the time budget, --stop-at-step or a signal (SIGINT /
    SIGTERM: the checkpoint is written, then Interrupted is raised). Every rank decides alike."""
    import time

    from .. import distributed as dist

    row["time/step_s"] = time.perf_counter() - t_step  # evaluations are not part of the step
    if evaluate is not None and run.main and run.eval_due(step):
        row["eval/accuracy"] = evaluate(step)
    run.history.append({"step": step, **row})
    halt = stop_signal()
    stop = (
        halt is not None
        or dist.all_sum(float(run.out_of_time())) > 0
        or bool(run.cadence.stop_at_step and step >= run.cadence.stop_at_step)
    )
    if run.main:
        run.log.log(step, row)
        if run.cadence.checkpoint_due(step, stop):
            save(step)
    dist.barrier()
    if halt is not None:
        raise Interrupted(step, halt, saved=run.cadence.checkpoint_due(step, True), out_dir=str(run.out_dir))
    return stop


def end_of_run(
    run: Run,
    policy,
    *,
    save=None,
    merged: bool = True,
    extra_save=None,
    evaluate=None,
    report: bool = False,
    task=None,
    examples=None,
    max_new_tokens: int = 40,
) -> dict:
    """The end of every recipe, the same in all: close the log; when the run went to its last step, rank 0
    saves final/ (save(folder), or the policy merged or as adapters, then extra_save(folder)) and evaluates
    (evaluate() -> accuracy); rank 0 writes samples.jsonl and the report page (report); every rank waits.
    -> the summary's common part (steps, seconds, evaluations)."""
    from .. import distributed as dist

    if run.main:
        run.log.close()
    if run.main and run.cadence.finishes:
        folder = run.out_dir / "final"
        if save is not None:
            save(folder)
        else:
            save_final(policy, folder, merged=merged)
        if extra_save is not None:
            extra_save(folder)
        if evaluate is not None:
            evaluate()
    if run.main and report:
        write_samples_and_report(run.out_dir, policy, task, examples, max_new_tokens=max_new_tokens)
    dist.barrier()
    return {"steps": run.steps, "train_seconds": run.train_seconds(), "evals": run.evals}


def held_out_evaluator(policy, task, test, *, run: Run | None, evals: list | None = None, max_new_tokens: int):
    """evaluate(step, label=None) -> greedy held-out accuracy, recorded in run.evals (or `evals` before the
    run exists); None when there is no held-out set."""
    if not test:
        return None

    def evaluate(step: int, label: str | None = None) -> float:
        return held_out_accuracy(
            policy,
            task,
            test,
            max_new_tokens=max_new_tokens,
            evals=run.evals if run is not None else evals,
            step=step,
            label=label or f"at step {step}",
            run=run,
        )

    return evaluate


def build_policy(
    model,
    name: str,
    *,
    max_len: int,
    seed: int,
    lora_r: int = 0,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    lora_targets: str = "",
    save_adapter_only: bool = False,
    activation_checkpointing: bool = False,
    freeze_vision: bool = False,
    compile: bool = False,
):
    """The policy to train: `model` when given, else loaded from `name` (a preset or a folder), with LoRA
    adapters, activation checkpointing, a frozen vision tower and compiled blocks as asked."""
    policy = model if model is not None else load_policy(name, max_seq_len=max(256, max_len), seed=seed)
    if save_adapter_only and not (lora_r > 0 or policy.has_lora):
        raise ConfigError("--save-adapter-only needs LoRA adapters (--lora-r > 0)")
    if save_adapter_only and policy.source is None:
        raise ConfigError("--save-adapter-only needs a base model loaded from a folder (not a preset); save merged")
    if lora_r > 0 and not policy.has_lora:
        policy.add_lora(lora_r, lora_alpha, lora_dropout, lora_targets)
    if activation_checkpointing:
        policy.enable_activation_checkpointing()
    if freeze_vision:
        policy.freeze_vision()
    if compile and not policy.compile_blocks():
        raise ValueError("--compile found no transformer blocks to compile in this model")
    return policy


def policy_options(cfg) -> dict:
    """The build_policy options of a recipe's Config (every training recipe has these fields)."""
    return dict(
        max_len=cfg.max_len,
        seed=cfg.seed,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        lora_targets=cfg.lora_targets,
        save_adapter_only=cfg.save_adapter_only,
        activation_checkpointing=cfg.activation_checkpointing,
        freeze_vision=cfg.freeze_vision,
        compile=cfg.compile,
    )


def autocast(policy, bf16: bool):
    """bf16 autocast around the training forward when bf16 (a no-op context otherwise)."""
    return torch.autocast(policy.device.type, dtype=torch.bfloat16, enabled=bf16)


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


def save_final(policy, path, *, merged: bool = True) -> None:
    """The trained model to `path`; a failed write (no space, permissions) is a CheckpointError naming it."""
    from ..checkpoint import CheckpointError

    try:
        policy.save(path, merged=merged)
    except OSError as e:
        raise CheckpointError(f"writing the final model to {path} failed ({e.strerror or e})") from e


@dataclass(frozen=True)
class Schedule:
    """The optimizer's settings over a run: linear warmup, then cosine decay to min_lr_ratio * lr over
    total_steps optimizer steps; gradients clipped to max_grad_norm (0 = off)."""

    lr: float
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float
    max_grad_norm: float


def optimizer_step(
    policy, optimizer, step: int, schedule: Schedule, *, sync_grads: bool = False
) -> tuple[float, float]:
    """One optimizer step (0-based `step`): average gradients over ranks when sync_grads (the recipes that do
    not use DDP), set the scheduled learning rate, clip, step, zero the gradients. -> (grad_norm before
    clipping, lr). A non-finite gradient norm raises TrainingDiverged before the update."""
    from ..distributed import average_gradients

    if sync_grads:
        average_gradients(policy)
    s = schedule
    lr = lr_at(step, lr=s.lr, warmup_steps=s.warmup_steps, total_steps=s.total_steps, min_lr_ratio=s.min_lr_ratio)
    set_lr(optimizer, lr)
    grad_norm = clip_grad(policy, s.max_grad_norm)
    if not math.isfinite(grad_norm):  # every rank sees the same (averaged) gradients: all stop here together
        raise TrainingDiverged(
            f"optimizer step {step + 1}: the gradient norm is {grad_norm} (a non-finite loss or gradient; lr "
            f"{lr:g}); stopped before applying it. Nothing was saved over the last good checkpoint (if any) and "
            "no final/ was written"
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def report_skips(skips: SkipCounter, out_dir: str | Path) -> None:
    """Print the skip counts (when any) and write <out_dir>/skips.json."""
    if skips.total or skips.notes:
        console.print(f"[yellow]{skips.report()}[/]")
    (Path(out_dir) / "skips.json").write_text(json.dumps({**skips.counts, **skips.notes}))


def load_prompts(
    policy,
    data,
    *,
    data_path: str,
    split: str,
    task_name: str,
    n_prompts: int,
    seed: int,
    reward: str,
    reward_timeout_s: float,
    eval_n: int,
    recipe: str,
):
    """The start every online recipe shares: the task, the prompt records, the rewards (their columns checked
    against every row) and the held-out examples. -> (task, data, reward_set, test)."""
    from ..data.formats import load_rows, prompt_records
    from ..data.tasks import make_task
    from ..rewards import RewardSet, parse_reward_spec
    from ..rollout.score import check_reward_columns

    task = make_task(task_name) if task_name else None
    if data is None:
        if data_path:
            data = prompt_records(load_rows(data_path, split), policy.tokenizer)
        elif task is not None:
            data = task.examples("train", n_prompts, seed)
        else:
            raise ValueError(f"{recipe} needs --task or --data")
    reward_set = RewardSet(parse_reward_spec(reward, task), timeout_s=reward_timeout_s)
    check_reward_columns(reward_set, data, data_path or task_name)
    test = task.examples("test", eval_n, seed) if task is not None and eval_n else []
    return task, data, reward_set, test


def resume_state(out_dir, policy, optimizer, generator=None) -> tuple[int, list]:
    """Weights, optimizer, RNG (and the sampling generator's state) from <out_dir>/checkpoint.
    -> (the checkpoint's step, the held-out evaluations so far)."""
    from ..checkpoint import load_checkpoint

    state = load_checkpoint(out_dir, policy, optimizer)
    if generator is not None:
        generator.set_state(torch.tensor(state["gen_rng"], dtype=torch.uint8))
    console.print(f"resumed from {out_dir}/checkpoint at step {state['step']}")
    return state["step"], state.get("evals", [])


def prompt_options(cfg) -> dict:
    """The load_prompts options of an online recipe's Config (grpo, online and ppo have these fields)."""
    return dict(
        data_path=cfg.data,
        split=cfg.split,
        task_name=cfg.task,
        n_prompts=cfg.n_prompts,
        seed=cfg.seed,
        reward=cfg.reward,
        reward_timeout_s=cfg.reward_timeout_s,
        eval_n=cfg.eval_n,
    )


def held_out_accuracy(
    policy, task, test, *, max_new_tokens: int, evals: list, step: int, label: str, run: Run | None = None
) -> float:
    """Greedy accuracy on the held-out examples, appended to evals (with the training seconds so far, the
    samples drawn so far and the evaluation's own seconds) and printed. run None: before training."""
    import time

    from ..eval import evaluate

    t0 = time.perf_counter()
    train_s = 0.0 if run is None else run.train_seconds()
    res = evaluate(policy, task, test, max_new_tokens=max_new_tokens)
    acc = res.accuracy
    # an evaluation before training (run None) is outside the training clock: nothing to subtract
    evals.append(
        {
            "step": step,
            "accuracy": acc,
            "mean_score": res.mean_score,
            "train_s": train_s,
            "samples": 0 if run is None else run.samples,
            "eval_s": 0.0 if run is None else time.perf_counter() - t0,
            **(res.details or {}),
        }
    )
    console.print(f"held-out accuracy {label}: {acc:.3f}, mean score {res.mean_score:.3f} (n={len(test)})")
    return acc


def write_samples_and_report(
    out_dir, policy, task=None, examples: list[dict] | None = None, *, max_new_tokens: int, n_samples: int = 8
) -> None:
    """End of a run (rank 0): <out_dir>/samples.jsonl (greedy completions of a few held-out prompts with
    their task score, or of the first training prompts when there is no task) and the report page."""
    from ..report import write_report
    from ..rollout.score import completions

    examples = (examples or [])[:n_samples]
    if examples:
        images = [e.get("images") for e in examples] if any(e.get("images") for e in examples) else None
        outs = completions(policy, [e["prompt"] for e in examples], max_new_tokens=max_new_tokens, images=images)
        with open(Path(out_dir) / "samples.jsonl", "w") as f:
            for e, o in zip(examples, outs):
                score = task.score(o[0], e) if task is not None else None
                row = {
                    "prompt": e["prompt"],
                    "completion": o[0],
                    "reward": score,
                    "reference": e.get("solution") or e.get("chosen"),
                }
                f.write(json.dumps(row) + "\n")
    console.print(f"report: {write_report([out_dir])}")


def check_fsdp(fsdp: bool, **unsupported: bool) -> None:
    """--fsdp: refuse what it does not support yet, named by its flag: check_fsdp(cfg.fsdp, lora_r=..., ...).
    The held-out evaluation before training runs before the sharding, the one after on the gathered weights."""
    bad = [flag(name) for name, on in unsupported.items() if on]
    if fsdp and bad:
        raise ValueError(f"--fsdp does not support {', '.join(bad)} yet")


def gathered_policy(policy, *, fsdp: bool, model: str, max_len: int, seed: int):
    """After FSDP2 training: every rank gathers the full weights (a collective); rank 0 gets a plain copy of
    the policy (built from `model` like the trained one) to save, evaluate and report, the others None.
    Without FSDP2: the policy itself."""
    from .. import distributed as dist

    if not (fsdp and dist.world_size() > 1):
        return policy
    state = dist.full_state_dict(policy)
    if not dist.is_main():
        return None
    plain = load_policy(model, max_seq_len=max(256, max_len), seed=seed)
    plain.load_state_dict(state)
    return plain
