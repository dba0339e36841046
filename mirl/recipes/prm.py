"""A process reward model: per-step labels for sampled solutions, and a scalar head trained to predict, at
each step's last token, whether the solution is still right there (binary cross-entropy, the two classes
weighted to balance). The saved model
serves as a reward (`--reward rm:<out_dir>/final`: the smallest step probability, PRM-min).

Labels (--labels):
    verifier  the task's step verifier (arith: each column and the answer, ArithTask.step_scores): a step is
              right when it and every step before it are (prefix correctness)
    mc        Monte-Carlo rollouts of the policy (Math-Shepherd): a step is right when at least one of
              --mc-rollouts continuations from just after it reaches the right answer
Solutions: --samples-per-prompt samples of the policy per training prompt, plus the task's worked solution and
one of its plausible wrong ones per prompt (balanced labels from the start). Solutions whose step ends the
tokenizer merges away are left out, counted. The labelled solutions are kept in <out_dir>/labels.json, so that
a run resumed from its checkpoint (--save-every, --resume, as in every recipe) trains on the same ones.

    mirl prm --model runs/sft1/final --task arith:1 --steps 300
    mirl grpo --model runs/sft1/final --task arith:1 --reward rm:runs/prm/final
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..checkpoint import recover, save_checkpoint
from ..data.collate import batch_indices, pad_batch
from ..data.tasks import make_task
from ..device import autocast, phase
from ..logging import TRACKERS, console
from ..models.heads import RewardModel, step_token_mask
from ..optim import Schedule, make_optimizer, optimizer_step
from ..options import ConfigError, choice, choice_list
from ..rollout.score import completions
from .common import build_policy
from .run import Result, end_of_run, end_of_step, open_run, resume_state, setup

LABELS = ("verifier", "mc")


@dataclass
class Config:
    """Options of `mirl prm` (one line of doc each, the CLI's flags)."""

    model: str = "gpt-nano"  # the backbone and the policy whose samples are labelled: preset or saved folder
    task: str = "arith"  # a built-in task with a step verifier (the compact arith tasks)
    labels: str = choice("verifier", among=LABELS)  # step labels: the task's step checks, or Monte-Carlo rollouts (mc)
    mc_rollouts: int = 4  # --labels mc: continuations sampled after each step
    n_prompts: int = 512  # training prompts (held-out: the task's test split)
    samples_per_prompt: int = 4  # policy samples per prompt (besides one worked and one wrong solution)
    temperature: float = 1.0  # sampling temperature
    max_new_tokens: int = 40  # response length limit
    separators: str = ",|"  # a step ends before each of these characters and at the end
    steps: int = 300  # optimizer steps
    batch_size: int = 32  # solutions per step
    lr: float = 3e-4  # learning rate (head and backbone)
    max_len: int = 128  # model context for new tiny models
    eval_n: int = 200  # held-out prompts whose samples measure the step accuracy (0 = skip)
    seed: int = 0  # seed of prompts, sampling and initialisation
    threads: int = 2  # torch CPU threads
    out_dir: str = "runs/prm"  # run folder: metrics.jsonl, labels.json, summary.json, checkpoint/, final/ (the PRM)
    save_every: int = 0  # checkpoint every N steps (0 = only at the end)
    resume: bool = False  # continue from out_dir/checkpoint
    stop_at_step: int = 0  # end the run after this step as if interrupted (0 = run to the end)
    device: str = "auto"  # auto (a GPU when there is one; torchrun: the rank's) | cpu | cuda | cuda:N
    bf16: bool | None = None  # bf16 autocast for the training forward and backward (auto: on for a bf16 GPU)
    report_to: str = choice_list("tensorboard", *TRACKERS, "none")  # experiment trackers, comma-separated (or none)
    log_every: int = 1  # metrics to the trackers every N steps (metrics.jsonl gets every step)
    allow_config_change: bool = False  # with --resume: continue although options differ from the run's


def prefix_labels(step_scores: list[tuple[int, float]], ends: list[int]) -> list[float]:
    """Per step boundary (the character offset where the prefix ends, in order; the last one the whole text):
    1.0 when every verifier step ending at or before it is right (the last boundary: every step)."""
    out = [float(all(s == 1.0 for e, s in step_scores if e <= end)) for end in ends[:-1]]
    return out + [float(all(s == 1.0 for _, s in step_scores))]


def boundaries(text: str, separators: str) -> list[int]:
    """The character offsets where steps end: before each separator (not at 0) and the end of the text."""
    return [i for i, c in enumerate(text) if c in separators and i > 0] + [len(text)]


def mc_labels(policy, task, example: dict, text: str, ends: list[int], *, k: int, max_new_tokens: int, seed: int):
    """Math-Shepherd's hard estimate: 1.0 at a boundary when one of k continuations of the prefix (from the
    policy) reaches the right answer; the last boundary: whether the text itself is right."""
    prefixes = [text[:e] for e in ends[:-1]]
    outs = completions(
        policy, [example["prompt"] + p for p in prefixes], max_new_tokens=max_new_tokens, samples=k,
        temperature=1.0, seed=seed,
    ) if prefixes else []  # fmt: skip
    got = [float(any(task.score(p + c, example) >= 1.0 for c in cs)) for p, cs in zip(prefixes, outs)]
    return got + [float(task.score(text, example) >= 1.0)]


def labelled(policy, task, examples, cfg: Config, seed: int) -> list[dict]:
    """Solutions with their per-step labels: [{'prompt', 'text', 'labels'}] (labels in boundary order)."""
    rng = random.Random(seed)
    samples = completions(
        policy, [e["prompt"] for e in examples], max_new_tokens=cfg.max_new_tokens, samples=cfg.samples_per_prompt,
        temperature=cfg.temperature, seed=seed,
    )  # fmt: skip
    out = []
    for i, (e, texts) in enumerate(zip(examples, samples)):
        for text in [*texts, e["solution"], task.wrong_solution(e, rng)]:
            if not text.strip():
                continue
            ends = boundaries(text, cfg.separators)
            if cfg.labels == "verifier":
                labels = prefix_labels(task.step_scores(text, e), ends)
            else:
                kw = dict(k=cfg.mc_rollouts, max_new_tokens=cfg.max_new_tokens, seed=seed + i)
                labels = mc_labels(policy, task, e, text, ends, **kw)
            out.append({"prompt": e["prompt"], "text": text, "labels": labels})
    return out


def encode(rm: RewardModel, rows: list[dict]):
    """-> ids, attention mask, step mask (B, T) and the labels at the step mask's positions (N,)."""
    tok = rm.tokenizer
    seqs, step_rows, labels = [], [], []
    for r in rows:
        p = tok.encode(r["prompt"], add_special_tokens=True)
        resp = tok.encode(r["text"], add_special_tokens=False) + [tok.eos_token_id]
        mask = step_token_mask(tok, resp, rm.separators)
        if sum(mask) != len(r["labels"]):  # a boundary the tokenizer merged away: the row is not usable
            continue
        seqs.append((p + resp, len(p)))
        step_rows.append([0] * len(p) + mask)
        labels += r["labels"]
    device = rm.policy.device
    ids, attn, _ = pad_batch(seqs, tok.pad_token_id, device=device)
    steps, _, _ = pad_batch([(m, 0) for m in step_rows], 0, device=device)  # the step-end mask, padded alike
    return ids, attn, steps, torch.tensor(labels, device=device)


@torch.no_grad()
def step_accuracy(rm: RewardModel, rows: list[dict], batch_size: int = 64) -> dict:
    """Held-out: the fraction of step labels predicted right (probability 0.5), the balanced accuracy (the mean
    of the right and the wrong steps' recall: 0.5 for a constant guess, whatever the label balance), and the
    fraction of last steps (whether the whole solution is right) predicted right."""
    preds, wants, lasts = [], [], []
    for s in range(0, len(rows), batch_size):
        ids, attn, steps, labels = encode(rm, rows[s : s + batch_size])
        preds.append((rm.token_scores(ids, attn)[steps.bool()] > 0).float())  # row by row, boundaries in order
        wants.append(labels.float())
        lasts.append(steps.sum(1).cumsum(0) - 1 + sum(len(w) for w in wants[:-1]))  # each row's last boundary
    pred, want, last = torch.cat(preds), torch.cat(wants), torch.cat(lasts)
    recall = [float((pred[want == c] == c).float().mean()) if (want == c).any() else 1.0 for c in (0.0, 1.0)]
    return {
        "step_accuracy": float((pred == want).float().mean()),
        "balanced_accuracy": sum(recall) / 2,
        "outcome_accuracy": float((pred[last] == want[last]).float().mean()),
        "steps": len(want),
    }


def check_separators(task, separators: str, n: int = 64) -> None:
    """--separators must split the task's worked solutions into steps: characters that none of them holds make
    every solution one step (an outcome reward model, not a process one)."""
    solutions = [e["solution"] for e in task.examples("train", n, 0)]
    if not separators or not any(len(boundaries(x, separators)) > 1 for x in solutions):
        raise ConfigError(
            f"--separators {separators!r}: none of these characters is inside {task.name}'s worked solutions (e.g. "
            f"{solutions[0]!r}), so every solution would be one step; give the characters that end its steps (the "
            "arith tasks: ',|', the default)"
        )


def usable(rm: RewardModel, rows: list[dict], which: str) -> list[dict]:
    """The labelled solutions whose step ends fall on distinct tokens (encode() can place their labels); the
    others are counted in a warning. None usable: an error."""
    tok = rm.tokenizer

    def fits(r: dict) -> bool:
        ids = tok.encode(r["text"], add_special_tokens=False) + [tok.eos_token_id]
        return sum(step_token_mask(tok, ids, rm.separators)) == len(r["labels"])

    keep = [r for r in rows if fits(r)]
    if rows and not keep:
        raise ValueError(
            f"none of the {len(rows)} {which} solutions is usable: the tokenizer merges their step ends "
            f"(--separators {rm.separators!r}) into the tokens around them"
        )
    if len(keep) < len(rows):
        from ..logging import warn

        warn(f"{len(rows) - len(keep)} of {len(rows)} {which} solutions left out: the tokenizer merges a step end")
    return keep


def labels_for_run(policy, task, cfg: Config) -> tuple[list[dict], list[dict], float]:
    """The labelled training and held-out solutions -> (train rows, test rows, labelling seconds): made once
    and kept in <out_dir>/labels.json, read back when the run is resumed (the policy has trained since). A stop
    signal during labelling stops the run before training (nothing to save yet)."""
    from ..checkpoint import atomic_write_text
    from ..stop import StopRequested, requested

    path = Path(cfg.out_dir) / "labels.json"
    if cfg.resume and path.exists():
        try:
            saved = json.loads(path.read_text())
            return saved["train"], saved["test"], saved["label_seconds"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: cannot read the run's labelled solutions ({e}); start the run afresh") from e
    t0 = time.perf_counter()
    train_rows = labelled(policy, task, task.examples("train", cfg.n_prompts, cfg.seed), cfg, cfg.seed)
    if requested():
        raise StopRequested(requested(), "while labelling the training solutions (before any step)")
    test_rows = (
        labelled(policy, task, task.examples("test", cfg.eval_n, cfg.seed), cfg, cfg.seed + 1) if cfg.eval_n else []
    )
    if requested():
        raise StopRequested(requested(), "while labelling the held-out solutions (before any step)")
    label_s = time.perf_counter() - t0
    atomic_write_text(path, json.dumps({"train": train_rows, "test": test_rows, "label_seconds": label_s}))
    return train_rows, test_rows, label_s


def train(cfg: Config, model=None) -> Result:
    """model: optional Policy (backbone and the sampled policy)."""
    # ---- setup -------------------------------------------------------------------------------------
    cfg = setup(cfg)
    if cfg.resume:  # before the labelling, which takes a while
        recover(cfg.out_dir)
        if not (Path(cfg.out_dir) / "checkpoint" / "state.json").exists():
            raise FileNotFoundError(f"no checkpoint to resume from in {cfg.out_dir} (expected checkpoint/state.json)")
    policy = build_policy(model, cfg.model, max_len=cfg.max_len, seed=cfg.seed, device=cfg.device)
    task = make_task(cfg.task, policy.tokenizer, "no")
    if not hasattr(task, "step_scores"):
        raise ConfigError(f"mirl prm needs a task with a step verifier (the arith tasks); {cfg.task!r} has none")
    check_separators(task, cfg.separators)
    train_rows, test_rows, label_s = labels_for_run(policy, task, cfg)
    rm = RewardModel(policy, "step", cfg.separators).to(policy.device)
    train_rows, test_rows = usable(rm, train_rows, "training"), usable(rm, test_rows, "held-out")
    n_labels = sum(len(r["labels"]) for r in train_rows)
    positive = sum(sum(r["labels"]) for r in train_rows) / max(1, n_labels)
    console.print(f"prm: {len(train_rows)} labelled solutions ({positive:.2f} of steps right) in {label_s:.1f} s")
    pos_weight = torch.tensor((1 - positive) / max(positive, 1e-6), device=policy.device)
    optimizer = make_optimizer(rm, cfg.lr, 0.0)
    state = {"before": {}}  # the held-out accuracy before training, kept with checkpoints
    start, evals = resume_state(cfg.out_dir, rm.policy, optimizer, extras=state) if cfg.resume else (0, [])
    if cfg.resume:
        head = Path(cfg.out_dir) / "checkpoint" / "reward_head.safetensors"
        try:
            rm.head.load_state_dict(load_file(str(head)))
        except Exception as e:  # noqa: BLE001 - safetensors' and torch's errors: one line naming the file
            raise ValueError(f"{head}: cannot load the checkpoint's reward head ({str(e).splitlines()[0]})") from e
    elif test_rows:
        state["before"] = step_accuracy(rm.eval(), test_rows)

    # ---- derived values: the schedule (constant lr, gradients clipped to 1), when to save and stop ----------
    schedule = Schedule(cfg.lr, 0, cfg.steps, 1.0, 1.0)
    run = open_run(cfg, desc="prm", show=("loss", "step_accuracy"), start=start, evals=evals)

    def save(step):
        def head(folder):
            save_file(
                {k: v.contiguous() for k, v in rm.head.state_dict().items()},
                str(folder / "reward_head.safetensors"),
                metadata={"aggregate": rm.aggregate, "separators": rm.separators},
            )

        save_checkpoint(cfg.out_dir, rm.policy, optimizer, step, extra=state, write_extra=head)

    rm.train()

    # ---- training loop -----------------------------------------------------------------------------
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        idx = batch_indices(len(train_rows), cfg.batch_size, step, cfg.seed)
        ids, attn, steps, labels = encode(rm, [train_rows[i] for i in idx])
        with phase("update", step + 1, ids.shape):
            with autocast(policy, cfg.bf16):
                logits = rm.token_scores(ids, attn)[steps.bool()].float()
            # the classes weighted to balance (most sampled steps of a weak policy are wrong)
            loss = F.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=pos_weight)
            loss.backward()
        grad_norm, _ = optimizer_step(rm, optimizer, step, schedule)
        row = {
            "loss": loss.item(),
            "step_accuracy": float(((logits > 0) == labels).float().mean()),
            "grad_norm": grad_norm,
        }
        if end_of_step(run, step + 1, row, t_step=t0, save=save):
            break

    # ---- evaluate and save -------------------------------------------------------------------------
    after = step_accuracy(rm.eval(), test_rows) if test_rows and run.cadence.finishes else {}
    summary = end_of_run(run, rm, save=lambda path: rm.save(path))
    summary.update(
        {"before": state["before"], "after": after, "labelled": len(train_rows), "positive_frac": positive,
         "label_seconds": label_s, "config": asdict(cfg)}
    )  # fmt: skip
    (Path(cfg.out_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    if after:
        console.print(f"prm: held-out {after}")
    return Result(rm, run.history, summary)
