"""Reward model training (Bradley-Terry): a scalar head on a policy backbone, loss -log sigma(r_w - r_l).

Data: TRL preference data (--data, any of its formats), or pairs sampled from a policy (--model) on a
task and verified (correct = chosen), on training prompts for training and on held-out prompts for the
held-out pair accuracy. The trained model is a reward for the RL recipes: --reward rm:<out_dir>/final.

    mirl rm --model runs/sft/final --task arith --steps 300
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import distributed as dist
from ..checkpoint import save_checkpoint
from ..data.collate import batch_images, batch_indices, encode_pairs, pad_batch
from ..data.formats import SkipCounter, load_rows, preference_records
from ..data.tasks import make_task
from ..device import autocast, phase
from ..logging import TRACKERS, console
from ..losses import mean_over_examples
from ..losses.preference import bradley_terry_loss
from ..models.heads import RewardModel
from ..optim import Schedule, make_optimizer, optimizer_step
from ..options import choice, choice_list
from ..rollout.pairs import sample_pairs
from .common import (
    build_policy,
    check_context,
    check_fsdp,
    gathered_policy,
    policy_options,
    report_skips,
    video_options,
)
from .run import Result, end_of_run, end_of_step, open_run, resume_state, setup


@dataclass
class Config:
    """Options of `mirl rm` (one line of doc each, the CLI's flags)."""

    model: str = "gpt-nano"  # backbone (preset or folder); also the policy that samples pairs for --task
    data: str = ""  # TRL preference data; empty = pairs sampled from --model on --task
    split: str = "train"  # the split of --data to read (a datasets folder or hub dataset with several)
    data_config: str = ""  # the configuration (subset) of a hub dataset --data
    revision: str = ""  # the hub revision (branch, tag, commit) of a hub dataset --data
    model_revision: str = ""  # the hub revision (branch, tag, commit) of a hub model --model
    eval_data: str = ""  # held-out preference data (default: 10% of --data, or held-out task prompts)
    task: str = "arith"  # task for generated pairs
    chat: str = choice("auto", "yes", "no")  # built-in task through the model's chat template (auto: if it has one)
    pairs: str = choice("both", among=("synthetic", "sampled", "both"))  # synthetic: gold vs a corrupted answer
    n_prompts: int = 20000  # training prompts for synthetic pairs (one pair each)
    n_sampled_prompts: int = 2048  # training prompts for sampled pairs (K samples each)
    eval_prompts: int = 256  # held-out prompts to sample evaluation pairs from
    k: int = 8  # samples per prompt
    pairs_per_prompt: int = 2  # pairs drawn per prompt with both correct and wrong samples
    aggregate: str = choice("mean", among=("last", "mean"))  # score: the head's mean over the response, or at its end
    max_len: int = 64  # prompt + response tokens
    steps: int = 300  # optimizer steps
    batch_size: int = 32  # pairs per step
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4  # learning rate
    warmup_steps: int = 20  # linear warmup (optimizer steps)
    min_lr_ratio: float = 0.1  # cosine decay floor as a fraction of lr (1 = constant after warmup)
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    seed: int = 0  # seed of initialisation, data order and sampling
    threads: int = 2  # torch CPU threads
    out_dir: str = "runs/rm"  # run folder: config.json, metrics.jsonl, tb/, checkpoint/, final/, report/
    save_every: int = 0  # checkpoint every N steps (0 = only at the end)
    resume: bool = False  # continue from out_dir/checkpoint
    stop_at_step: int = 0  # end the run after this step as if interrupted (0 = run to the end)
    # -- options every training recipe has (the same names, types, defaults and docs: tests/test_recipes.py)
    lora_r: int = 0  # LoRA rank (0 = full fine-tuning)
    lora_alpha: int = 16  # LoRA scaling alpha
    lora_dropout: float = 0.0  # dropout on the LoRA path
    lora_targets: str = ""  # comma-separated module names (default: every linear layer of the blocks)
    save_adapter_only: bool = False  # with LoRA: save the adapters alone instead of merged weights
    device: str = "auto"  # auto (a GPU when there is one; torchrun: the rank's) | cpu | cuda | cuda:N
    bf16: bool | None = None  # bf16 autocast for the training forward and backward (auto: on for a bf16 GPU)
    activation_checkpointing: bool | None = None  # recompute activations in the backward (auto: GPU, HF model > 1B)
    freeze_vision: bool = False  # image+text models: keep the vision tower frozen (projector and LM train)
    video_fps: float = 2.0  # --data videos: frames kept per second of a video file (data/video.py)
    video_max_frames: int = 8  # --data videos: at most this many frames, evenly spaced over the clip
    video_max_pixels: int = 602112  # --data videos: each frame scaled to at most this many pixels (768 x 28^2; 0: any)
    compile: bool = False  # torch.compile each transformer block (in place); the first steps compile
    fsdp: bool = False  # under torchrun: FSDP2 (fully_shard per block): parameters, grads, optimizer state sharded
    report: bool = True  # at the end: <out_dir>/report/index.html (metric plots, config, sample completions)
    report_to: str = choice_list("tensorboard", *TRACKERS, "none")  # experiment trackers, comma-separated (or none)
    log_every: int = 1  # metrics to the trackers every N steps (metrics.jsonl gets every step)
    allow_config_change: bool = False  # with --resume: continue although options differ from the run's


def synthetic_pairs(task, examples: list[dict], seed: int) -> list[dict]:
    """The task's worked solution (chosen) against a corrupted one (rejected), one pair per example."""
    rng = random.Random(seed)
    return [
        {
            "prompt": e["prompt"],
            "chosen": e["solution"],
            "rejected": task.wrong_solution(e, rng),
            "where": f"{task.name} synthetic #{i}",
        }
        for i, e in enumerate(examples)
    ]


def pair_scores(rm, pairs, pad_id):
    """Reward-model scores of the chosen and rejected sides of encoded pairs: (chosen (N,), rejected (N,), tokens)."""
    seqs = [c for c, _ in pairs] + [r for _, r in pairs]
    ids, attn, resp = pad_batch(seqs, pad_id, device=rm.policy.device)
    s = rm(ids, attn, resp, images=batch_images(seqs))
    return s[: len(pairs)], s[len(pairs) :], int(attn.sum())


@torch.no_grad()
def pair_accuracy(rm, pairs, pad_id, batch_size: int = 128) -> float:
    """The fraction of pairs whose chosen side scores higher."""
    rm.eval()
    correct = 0
    for s in range(0, len(pairs), batch_size):
        c, r, _ = pair_scores(rm, pairs[s : s + batch_size], pad_id)
        correct += int((c > r).sum())
    rm.train()
    return correct / max(1, len(pairs))


def task_pairs(cfg: Config, policy) -> tuple[list[dict], list[dict], list[dict] | None]:
    """Pairs made on --task: synthetic (the worked solution against a corrupted one) and / or sampled from the policy
    and verified, for training; held out, the policy's own samples on held-out prompts, verified (the pairs an RL
    run will see). -> (training records, held-out records, held-out synthetic records or None)."""
    task = make_task(cfg.task, policy.tokenizer, cfg.chat)
    if cfg.pairs not in ("synthetic", "sampled", "both"):
        raise ValueError(f"pairs must be 'synthetic', 'sampled' or 'both', got {cfg.pairs!r}")
    if cfg.pairs != "sampled" and not hasattr(task, "wrong_solution"):
        raise ValueError(f"task {task.name} cannot make synthetic pairs; use --pairs sampled")
    data, synth_eval = [], None
    if cfg.pairs in ("synthetic", "both"):
        data += synthetic_pairs(task, task.examples("train", cfg.n_prompts, cfg.seed), cfg.seed)
        synth_eval = synthetic_pairs(task, task.examples("test", cfg.eval_prompts, cfg.seed), cfg.seed + 1)
    if cfg.pairs in ("sampled", "both"):
        sampled, st = sample_pairs(
            policy,
            task,
            task.examples("train", cfg.n_sampled_prompts, cfg.seed + 2),
            k=cfg.k,
            seed=cfg.seed,
            pairs_per_prompt=cfg.pairs_per_prompt,
        )
        data += sampled
        console.print(f"reward-model training pairs sampled from {cfg.model}: {st}")
    eval_data, st_eval = sample_pairs(
        policy, task, task.examples("test", cfg.eval_prompts, cfg.seed), k=cfg.k, seed=cfg.seed + 1
    )
    console.print(f"held-out pairs sampled from {cfg.model}: {st_eval}")
    return data, eval_data, synth_eval


def file_pairs(cfg: Config, tok, skips: SkipCounter, eval_data: list[dict] | None) -> tuple[list[dict], list[dict]]:
    """Pairs read from --data (rows that cannot be used counted in skips); held out: eval_data when given, else
    --eval-data, else the first 10% of --data. -> (training records, held-out records)."""
    video = video_options(cfg)
    data = preference_records(load_rows(cfg.data, cfg.split, cfg.data_config, cfg.revision), tok, skips, video)
    if eval_data is None and cfg.eval_data:
        eval_data = preference_records(
            load_rows(cfg.eval_data, cfg.split, cfg.data_config, cfg.revision), tok, skips, video
        )
    elif eval_data is None:
        cut = max(1, len(data) // 10)
        data, eval_data = data[cut:], data[:cut]
    return data, eval_data


def write_head(rm, folder: Path) -> None:
    """The reward head's weights, with its aggregation, beside the backbone in a checkpoint folder."""
    save_file(dict(rm.head.state_dict()), str(folder / "reward_head.safetensors"), metadata={"aggregate": rm.aggregate})


def bt_loss(rm, batch: list[tuple], pad_id: int, *, bf16: bool, n_global: int):
    """The Bradley-Terry loss of a micro-batch of pairs, summed over its pairs and divided by n_global (the pairs of
    the global batch). -> (loss, per-pair metrics, the tokens that went through the model)."""
    with autocast(rm.policy, bf16):  # the scores and the loss in float32
        c, r, n = pair_scores(rm, batch, pad_id)
    per_ex, metrics = bradley_terry_loss(c.float(), r.float())
    return mean_over_examples(per_ex, global_count=n_global), metrics, n


def held_out_summary(rm, held_out: list, synth_held_out: list, acc0: float | None, pad_id: int) -> dict:
    """The pair accuracy after training on the held-out pairs (and before: acc0) and on the held-out synthetic
    pairs, printed."""
    summary = {}
    if held_out:
        summary["held_out_accuracy_before"] = acc0
        summary["held_out_accuracy"] = pair_accuracy(rm, held_out, pad_id)
        console.print(
            f"reward model held-out pair accuracy: {summary['held_out_accuracy']:.3f} "
            f"(before training {acc0:.3f}, n={len(held_out)})"
        )
    if synth_held_out:
        summary["held_out_synthetic_accuracy"] = pair_accuracy(rm, synth_held_out, pad_id)
        console.print(
            f"reward model held-out synthetic pair accuracy: {summary['held_out_synthetic_accuracy']:.3f} "
            f"(n={len(synth_held_out)})"
        )
    return summary


def train(cfg: Config, model=None, data: list[dict] | None = None, eval_data: list[dict] | None = None) -> Result:
    """Train a Bradley-Terry reward model. data / eval_data: optional preference records; model: optional Policy."""
    # ---- setup -------------------------------------------------------------------------------------
    cfg = setup(cfg)
    check_fsdp(cfg.fsdp, lora_r=cfg.lora_r > 0, resume=cfg.resume)
    policy = build_policy(model, cfg.model, **policy_options(cfg))
    check_context(policy, cfg.max_len, cfg.model)
    tok = policy.tokenizer
    skips = SkipCounter()
    synth_eval = None
    if data is None and cfg.data:
        data, eval_data = file_pairs(cfg, tok, skips, eval_data)
    elif data is None:
        data, eval_data, synth_eval = task_pairs(cfg, policy)
    synth_held_out = encode_pairs(policy, synth_eval, cfg.max_len, skips) if synth_eval else []
    pairs = encode_pairs(policy, data, cfg.max_len, skips)
    held_out = encode_pairs(policy, eval_data or [], cfg.max_len, skips)
    if not pairs:
        raise ValueError(f"no usable preference pairs for the reward model ({skips.report()})")
    rm = RewardModel(policy, cfg.aggregate).to(policy.device)
    if cfg.fsdp and dist.world_size() > 1:  # FSDP2 on the backbone; the small head stays whole (averaged by hand)
        dist.wrap(policy, fsdp=True)
    optimizer = make_optimizer(rm, cfg.lr, cfg.weight_decay)
    start, evals = resume_state(cfg.out_dir, rm.policy, optimizer) if cfg.resume else (0, [])
    if cfg.resume:
        rm.head.load_state_dict(load_file(str(Path(cfg.out_dir) / "checkpoint" / "reward_head.safetensors")))
    acc0 = pair_accuracy(rm, held_out, tok.pad_token_id) if held_out else None

    # ---- derived values: the global batch, the schedule, when to save and stop -----------------------------
    world = dist.world_size()
    schedule = Schedule(cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio, cfg.max_grad_norm)
    run = open_run(cfg, desc="rm", show=("loss", "accuracy"), start=start, evals=evals)
    save = lambda s: save_checkpoint(cfg.out_dir, rm.policy, optimizer, s, write_extra=lambda d: write_head(rm, d))
    rm.train()

    # ---- training loop -----------------------------------------------------------------------------
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        # the global batch is batch_size x grad_accum x ranks; this rank takes its shard
        idx = dist.shard(batch_indices(len(pairs), cfg.batch_size * cfg.grad_accum * world, step, cfg.seed))
        sums, ntok = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}, 0
        with phase("update", step + 1, (2 * len(idx), cfg.max_len)):
            for m in range(cfg.grad_accum):
                mb = [pairs[i] for i in idx[m * cfg.batch_size : (m + 1) * cfg.batch_size]]
                loss, metrics, n = bt_loss(rm, mb, tok.pad_token_id, bf16=cfg.bf16, n_global=len(idx) * world)
                loss.backward()
                ntok += n
                sums["loss"] += loss.item()
                sums["accuracy"] += float(metrics["accuracy"].sum()) / len(idx)
                sums["margin"] += float(metrics["margin"].sum()) / len(idx)
        grad_norm, lr = optimizer_step(rm, optimizer, step, schedule, sync_grads=True)
        sums = {k: dist.all_sum(v) / world for k, v in sums.items()}  # global means (equal shards)
        row = {**sums, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": ntok / (time.perf_counter() - t0)}
        if end_of_step(run, step + 1, row, t_step=t0, save=save):
            break

    # ---- evaluate and save -------------------------------------------------------------------------
    if run.main:
        report_skips(skips, cfg.out_dir)
    summary = {"train_pairs": len(pairs), "held_out_pairs": len(held_out)}
    summary.update(held_out_summary(rm, held_out, synth_held_out, acc0, tok.pad_token_id))
    backbone = gathered_policy(rm.policy, cfg)
    if run.main and backbone is not rm.policy:
        plain = RewardModel(backbone, cfg.aggregate).to(backbone.device)
        plain.head.load_state_dict(rm.head.state_dict())
        rm = plain
    summary.update(end_of_run(run, rm, save=lambda path: rm.save(path), report=cfg.report))
    summary["config"] = asdict(cfg)
    return Result(rm, run.history, summary)
