"""A run's lifecycle, the same in every recipe: the start (threads, seeds, the run folder, resume checks,
signal handlers), the bookkeeping between steps (Run, Cadence), one end_of_step and one end_of_run, held-out
evaluations, the samples and report page at the end, and the Result every train() returns."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..checkpoint import atomic_write_text
from ..logging import MetricLogger, console, parse_report_to
from ..options import ConfigError, flag
from .common import save_final


def setup(cfg):
    """Threads, seeds, torch.distributed when launched by torchrun, the device. Few threads by default:
    oversubscribing a small CPU makes every step slower. Every rank seeds alike (same initial weights).
    -> the Config with its automatic values made concrete (--device, --bf16: mirl/device.py), as saved."""
    from ..device import resolved
    from ..distributed import init, is_main
    from ..options import check_config

    check_config(cfg)  # the CLI checked already; the Python API gets the same answers
    cfg = resolved(cfg)
    init(torch.device(cfg.device))  # (NCCL for a CUDA run, gloo for a CPU one)
    if torch.device(cfg.device).type == "cuda":
        torch.cuda.set_device(torch.device(cfg.device))  # the current device: allocations, peak memory, NCCL
    if cfg.bf16 and is_main():
        from ..cpu import bf16_warning
        from ..logging import warn

        message = bf16_warning(torch.device(cfg.device).type)
        if message:
            warn(message)
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
    return cfg


# options that may change between a run and its resumption: they do not change what is trained
RESUMABLE_CHANGES = {
    "resume",
    "out_dir",
    "device",
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


def watch_stop_signals() -> None:
    """SIGINT / SIGTERM ask the run to stop after the current step (checkpoint, then Interrupted); a second
    SIGINT stops at once. Only in the main thread (signal handlers cannot be set elsewhere). The request is
    kept in mirl/stop.py, where code waiting in the middle of a step (the reward worker) sees it too."""
    import signal
    import threading

    from .. import stop

    if threading.current_thread() is not threading.main_thread():
        return
    stop.clear()

    def handler(signum, frame):
        if stop.requested() is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.request(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def stop_signal() -> str | None:
    """The name of the signal that asked the run to stop (None when none did), the same on every rank."""
    from .. import distributed as dist
    from .. import stop

    name = stop.requested()
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

    def progress(self, step: int, train_s: float) -> float:
        """The fraction of the run done when 0-based `step` starts, in [0, 1], for the schedules that follow the
        run (curriculum, KL): step / (steps - 1) (0 at the first step, 1 at the last) or training seconds / time
        budget, whichever is larger (whichever ends the run)."""
        by_time = train_s / self.time_budget_s if self.time_budget_s else 0.0
        return min(1.0, max(step / max(1, self.steps - 1), by_time))


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
        report_to: str = "tensorboard",
        log_every: int = 1,
        config: dict | None = None,
    ):
        import time

        from .. import distributed as dist

        self.out_dir, self.cadence, self.start = Path(out_dir), cadence, start
        self.main = dist.is_main()
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # a GPU run: its peak memory per step
            show = (*show, "memory/peak_gb")
        self.log = (
            MetricLogger(
                out_dir,
                cadence.steps,
                desc=desc,
                resume=resume,
                start_step=start,
                show=show,
                report_to=parse_report_to(report_to),
                log_every=log_every,
                config=config,
            )
            if self.main
            else None
        )
        self.history: list[dict] = []
        self.evals: list[dict] = evals if evals is not None else []
        self.samples = 0  # responses sampled so far (online recipes; SFT: training examples)
        self.tokens = 0  # response tokens sampled so far (SFT: completion tokens trained on)
        self.t_train = time.perf_counter()
        self.eval_s_before = sum(e.get("eval_s", 0.0) for e in self.evals)  # a resumed run's earlier sessions'

    def count_samples(self, scored) -> None:
        """Add a scored rollout's responses and their tokens to the run's counts (this rank's)."""
        self.samples += len(scored.batch.texts)
        self.tokens += int(scored.batch.response_mask.sum())

    def train_seconds(self) -> float:
        """Seconds since training began in this session (a resumed run's time budget starts again, and so does
        this clock), less the time this session spent in held-out evaluations."""
        import time

        evals_s = sum(e.get("eval_s", 0.0) for e in self.evals) - self.eval_s_before
        return time.perf_counter() - self.t_train - evals_s

    def progress(self, step: int) -> float:
        """Cadence.progress before 0-based `step`, from the training seconds of the slowest rank (a collective
        under torchrun with a time budget), so that every rank follows the same schedule."""
        from .. import distributed as dist

        train_s = dist.all_max(self.train_seconds()) if self.cadence.time_budget_s else 0.0
        return self.cadence.progress(step, train_s)

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

    def log_completions(self, step: int, scored, reward_names: list[str], n: int) -> None:
        """Every log_every steps (rank 0): n completions of the step's rollout (prompt, completion, reward per
        function, answer) to samples.jsonl, the report and the trackers."""
        from ..rollout.score import completion_rows

        if n and self.main and (step % self.log.log_every == 0 or step == self.cadence.steps):
            self.log.completions(step, completion_rows(scored, reward_names, n))

    @property
    def steps(self) -> int:
        """The steps completed so far, counting those before a resume."""
        return self.start + len(self.history)


def open_run(cfg, *, desc: str, show: tuple[str, ...], start: int = 0, evals: list | None = None) -> Run:
    """The Run of a recipe's Config, from its options: the cadence (every recipe saves every N steps and may stop
    at a step; --eval-every, --eval-every-s and --time-budget-s where the recipe has them; no resumable
    checkpoint under --fsdp), the trackers and the config they record."""
    has = {f.name for f in fields(cfg)}
    optional = {k: getattr(cfg, k) for k in ("eval_every", "eval_every_s", "time_budget_s") if k in has}
    cadence = Cadence(
        cfg.steps, cfg.save_every, stop_at_step=cfg.stop_at_step, resumable=not getattr(cfg, "fsdp", False), **optional
    )
    return Run(
        cfg.out_dir,
        cadence,
        desc=desc,
        show=show,
        resume=cfg.resume,
        start=start,
        evals=evals,
        report_to=cfg.report_to,
        log_every=cfg.log_every,
        config=asdict(cfg),
    )


def end_of_step(run: Run, step: int, row: dict, *, t_step: float, save, evaluate=None) -> bool:
    """The tail of every recipe's step, the same in all: the step's time, a held-out evaluation when due
    (rank 0; evaluate(step) -> accuracy), the history and the metrics log, a checkpoint when due
    (save(step) on rank 0), and whether to stop: the time budget, --stop-at-step or a signal (SIGINT /
    SIGTERM: the checkpoint is written, then Interrupted is raised). Every rank decides alike."""
    import time

    from .. import distributed as dist

    row["time/step_s"] = time.perf_counter() - t_step  # evaluations are not part of the step
    row.update(step_peak_memory())
    if evaluate is not None and run.main and run.eval_due(step):
        row["eval/accuracy"] = evaluate(step)
        if run.evals[-1].get("accuracy_se") is not None:  # over the held-out prompts (held_out.py); None under two
            row["eval/accuracy_se"] = run.evals[-1]["accuracy_se"]
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


def step_peak_memory() -> dict:
    """{'memory/peak_gb': the peak device memory allocated since the last call} when the run computes on a GPU
    (mirl/device.py), else {}; the count then starts again for the next step."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    from ..device import peak_memory_gb, reset_peak_memory

    device = torch.device("cuda", torch.cuda.current_device())
    peak = peak_memory_gb(device)
    reset_peak_memory(device)
    return peak


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
    (evaluate() -> accuracy); rank 0 writes evals.json (every held-out evaluation: step, accuracy, training
    seconds, samples), samples.jsonl and the report page (report); every rank waits.
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
    if run.main and run.evals:
        (run.out_dir / "evals.json").write_text(json.dumps(run.evals, indent=1))  # every held-out evaluation
    if run.main and report:
        from .held_out import write_samples_and_report

        write_samples_and_report(run.out_dir, policy, task, examples, max_new_tokens=max_new_tokens)
    dist.barrier()
    return {"steps": run.steps, "train_seconds": run.train_seconds(), "evals": run.evals}


def resume_state(out_dir, policy, optimizer, generator=None, extras: dict | None = None) -> tuple[int, list]:
    """Weights, optimizer, RNG (and the sampling generator's state) from <out_dir>/checkpoint; extras: the
    recipe's own saved values (e.g. the adaptive KL coefficient), filled in place from the checkpoint.
    -> (the checkpoint's step, the held-out evaluations so far)."""
    from ..checkpoint import load_checkpoint

    state = load_checkpoint(out_dir, policy, optimizer)
    if generator is not None:
        try:
            generator.set_state(torch.tensor(state["gen_rng"], dtype=torch.uint8))
        except RuntimeError:  # a CPU generator's state does not fit a CUDA one (the run moved between devices)
            from ..logging import warn

            generator.manual_seed(int(state["step"]) + 1)
            warn(f"--resume on another kind of device: the sampling stream restarts (seeded from step {state['step']})")
    if extras is not None:
        extras.update({k: state[k] for k in extras if k in state})
    console.print(f"resumed from {out_dir}/checkpoint at step {state['step']}")
    return state["step"], state.get("evals", [])
