"""Iterative SFT <-> RL (OpenVLThinker): for N rounds, rejection-sampled SFT on the policy's own verified
samples, then a GRPO phase; one run folder, held-out accuracy after each phase.

Round r: sample --samples-per-prompt responses to --n-prompts training prompts (drawn afresh each round),
keep the first one of each prompt that the task's verifier accepts, fine-tune on those (sft recipe), then run
GRPO from there (grpo recipe). <out_dir>/round<r>/{sft,grpo} are the phases' own run folders, <out_dir>/
iterate.json the table of phases, <out_dir>/final the last policy. Every phase's options are checked as its
recipe checks them before anything trains (a bad one is named by iterate's flag: --grpo-lr, not --lr).
--resume continues a stopped run: the phases in iterate.json are done (their final models are loaded), the
phase that was stopped resumes from its own checkpoint, on the verified samples kept in round<r>/verified.json.

    mirl iterate --model runs/sft/final --task arith --rounds 3
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data.tasks import make_task
from ..device import resolve_device
from ..eval import evaluate
from ..logging import console
from ..options import ConfigError, choice
from ..recipes import grpo, sft
from ..recipes.common import build_policy
from ..recipes.run import Result
from ..rollout.pairs import verified_samples


@dataclass
class Config:
    """Options of `mirl iterate` (one line of doc each, the CLI's flags)."""

    model: str = "gpt-nano"  # preset or saved model folder (usually an SFT checkpoint)
    task: str = "arith"  # built-in task: prompts, verifier, held-out evaluation
    chat: str = choice("auto", "yes", "no")  # built-in task through the model's chat template (auto: if it has one)
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
    device: str = "auto"  # auto (a GPU when there is one) | cpu | cuda | cuda:N
    out_dir: str = "runs/iterate"  # run folder: iterate.json, round<r>/{sft,grpo}/, final/
    report: bool = False  # each phase's HTML report (off by default: one per phase)
    resume: bool = False  # continue the run in out_dir: finished phases are skipped, a stopped one resumes
    allow_config_change: bool = False  # with --resume: continue although options differ from the run's


def accepted_samples(policy, task, examples: list[dict], *, k: int, temperature: float, max_new_tokens: int, seed: int):
    """Rejection sampling: k responses per example, the first the task's verifier accepts ->
    ([{'prompt', 'completion'}], the fraction of all samples accepted)."""
    success = getattr(task, "success_threshold", 1.0)
    split = verified_samples(
        policy,
        task,
        examples,
        k=k,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=max(1, 64 // k),
        threshold=success,
    )
    records, accepted = [], 0
    for i, (e, (good, _, _)) in enumerate(zip(examples, split)):
        accepted += len(good)
        if good:
            records.append({"prompt": e["prompt"], "completion": good[0], "where": f"round sample {i}"})
    return records, accepted / max(1, k * len(examples))


# iterate's option -> the phase recipe's option it sets
PHASE_OPTIONS = {
    "sft": {"sft_steps": "steps", "sft_lr": "lr", "sft_batch_size": "batch_size", "max_len": "max_len"},
    "grpo": {
        "grpo_steps": "steps",
        "grpo_lr": "lr",
        "group_size": "group_size",
        "prompts_per_step": "prompts_per_step",
        "max_new_tokens": "max_new_tokens",
        "max_len": "max_len",
    },
}


def phase_config(cfg: Config, phase: str, folder: Path, resume: bool = False):
    """The sft or grpo Config of a phase, its run folder `folder`."""
    common = dict(
        task=cfg.task, chat=cfg.chat, eval_n=0, threads=cfg.threads, device=cfg.device, report=cfg.report, seed=cfg.seed
    )
    common.update(out_dir=str(folder), resume=resume, max_len=cfg.max_len)
    if phase == "sft":
        return sft.Config(steps=cfg.sft_steps, lr=cfg.sft_lr, batch_size=cfg.sft_batch_size, **common)
    return grpo.Config(
        steps=cfg.grpo_steps,
        lr=cfg.grpo_lr,
        group_size=cfg.group_size,
        prompts_per_step=cfg.prompts_per_step,
        max_new_tokens=cfg.max_new_tokens,
        **common,
    )


def check_phases(cfg: Config) -> None:
    """Every phase's options as its recipe will check them, before anything trains; a bad one is named by
    iterate's own flag (--grpo-lr, not the grpo phase's --lr)."""
    from ..options import check_config, flag

    for phase, names in PHASE_OPTIONS.items():
        try:
            check_config(phase_config(cfg, phase, Path(cfg.out_dir) / "round1" / phase))
        except ConfigError as e:
            msg = str(e)
            for mine, theirs in names.items():
                if msg.startswith(flag(theirs) + " "):
                    said = f"{flag(mine)}{msg[len(flag(theirs)) :]}"
                    raise ConfigError(f"{said} (the {phase} phase's {flag(theirs)})") from e
            raise ConfigError(f"the {phase} phase: {msg}") from e


def write_table(out: Path, cfg: Config, table: list[dict]) -> None:
    """<out_dir>/iterate.json: the config and the phases done so far (written whole after every phase)."""
    from ..checkpoint import atomic_write_text

    atomic_write_text(out / "iterate.json", json.dumps({"config": asdict(cfg), "phases": table}, indent=1))


def round_samples(policy, task, cfg: Config, r: int, folder: Path) -> tuple[list[dict], float]:
    """Round r's verified samples -> (records, accepted fraction), kept in <round folder>/verified.json so that
    a resumed SFT phase trains on the same ones."""
    from ..checkpoint import atomic_write_text

    path = folder / "verified.json"
    if cfg.resume and path.exists():
        try:
            saved = json.loads(path.read_text())
            return saved["records"], saved["accepted_frac"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{path}: cannot read the round's verified samples ({e})") from e
    examples = task.examples("train", cfg.n_prompts, cfg.seed + 1000 * r)
    records, rate = accepted_samples(
        policy,
        task,
        examples,
        k=cfg.samples_per_prompt,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed + r,
    )
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"records": records, "accepted_frac": rate}))
    return records, rate


def start_run(cfg: Config, out: Path) -> list[dict]:
    """The run folder and its config.json; with --resume, the phases done so far (iterate.json), after the
    same checks as every recipe's resume."""
    from ..checkpoint import atomic_write_text
    from ..recipes.run import check_resume_config

    done: list[dict] = []
    if cfg.resume:
        if not (out / "iterate.json").exists():
            raise FileNotFoundError(f"no iterate run to resume in {out} (expected {out / 'iterate.json'})")
        check_resume_config(cfg, "iterate", out / "config.json")
        try:
            done = json.loads((out / "iterate.json").read_text())["phases"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{out / 'iterate.json'}: cannot read the phases done ({e})") from e
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", json.dumps({"recipe": "iterate", **asdict(cfg)}, indent=1))
    except OSError as e:
        raise ConfigError(f"--out-dir {cfg.out_dir}: cannot write the run folder ({e.strerror or e})") from e
    return done


def train(cfg: Config, model=None) -> Result:
    """model: optional Policy to start from (else cfg.model is loaded)."""
    import torch

    from .. import stop
    from ..models import load_policy
    from ..options import check_config
    from ..recipes.run import watch_stop_signals

    # ---- setup: every phase's options checked before anything trains, the run folder, resume ------------
    if cfg.rounds < 1:
        raise ConfigError(f"--rounds {cfg.rounds!r}: must be an integer >= 1")
    check_config(cfg)
    check_phases(cfg)
    out = Path(cfg.out_dir)
    done = start_run(cfg, out)
    watch_stop_signals()
    torch.set_num_threads(max(1, cfg.threads))
    torch.manual_seed(cfg.seed)
    policy = build_policy(model, cfg.model, max_len=cfg.max_len, seed=cfg.seed, device=resolve_device(cfg.device))
    task = make_task(cfg.task, policy.tokenizer, cfg.chat)
    test = task.examples("test", cfg.eval_n, cfg.seed) if cfg.eval_n else []
    held_out = lambda p: evaluate(p, task, test, max_new_tokens=cfg.max_new_tokens).accuracy if test else None
    table = done[:1] or [{"round": 0, "phase": "start", "accuracy": held_out(policy)}]
    write_table(out, cfg, table)
    console.print(f"iterate: start, held-out accuracy {table[0]['accuracy']}")

    # ---- rounds: rejection-sampled SFT, then GRPO; the phases done before a resume are loaded, not run ----
    for r in range(1, cfg.rounds + 1):
        for phase in ("sft", "grpo"):
            folder = out / f"round{r}" / phase
            row = next((p for p in done if p["round"] == r and p["phase"] == phase), None)
            if row is not None:  # finished before the resume: its model (none when SFT had no samples)
                if (folder / "final").exists():
                    policy = load_policy(folder / "final", max_seq_len=max(256, cfg.max_len), seed=cfg.seed)
                    policy.to(resolve_device(cfg.device))
                table.append(row)
                continue
            if stop.requested():
                raise stop.StopRequested(stop.requested(), f"before round {r}'s {phase} phase")
            t0 = time.perf_counter()
            again = cfg.resume and (folder / "checkpoint" / "state.json").exists()  # the phase that was stopped
            extra = {}
            if phase == "sft":
                records, rate = round_samples(policy, task, cfg, r, folder.parent)
                if stop.requested():  # (sft.train's setup would forget a signal that came while sampling)
                    raise stop.StopRequested(stop.requested(), f"after round {r}'s rejection sampling")
                if records:  # nothing verified: the round goes straight to GRPO (counted in the table)
                    policy = sft.train(phase_config(cfg, "sft", folder, again), model=policy, data=records).model
                extra = {"verified_prompts": len(records), "accepted_frac": rate}
            else:
                policy = grpo.train(phase_config(cfg, "grpo", folder, again), model=policy).model
            table.append({"round": r, "phase": phase, "accuracy": held_out(policy), **extra,
                          "seconds": time.perf_counter() - t0})  # fmt: skip
            write_table(out, cfg, table)
            console.print(f"iterate: round {r} {phase}, held-out accuracy {table[-1]['accuracy']}")
    policy.save(out / "final")
    return Result(policy, table, {"phases": table, "config": asdict(cfg)})
