"""Supervised fine-tuning: next-token NLL on the completion tokens, token mean over the global batch.

Data: a built-in task's worked solutions (`--task arith`) or a TRL prompt-completion / messages file
(`--data train.jsonl`, parquet or a datasets folder).

    mirl sft --task arith --steps 600 --out-dir runs/sft          # CPU, about a minute
    torchrun --nproc-per-node 2 -m mirl sft --task arith           # same code, distributed
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import distributed as dist
from ..checkpoint import load_checkpoint
from ..data.collate import batch_images, batch_indices, encode_example, pad_batch
from ..data.formats import SkipCounter, completion_records, load_rows
from ..data.tasks import make_task
from ..logging import MetricLogger, console
from ..logps import fused_sequence_logps, sequence_logps
from ..losses import masked_reduce
from ..optim import make_optimizer
from .common import (
    ModelArgs,
    Result,
    autocast,
    check_fsdp,
    eval_due,
    finish_run,
    gathered_policy,
    get_policy,
    held_out_accuracy,
    log_and_checkpoint,
    optimizer_step,
    out_of_time,
    report_skips,
    save_final,
    setup,
)


@dataclass
class Config(ModelArgs):
    model: str = "gpt-nano"  # preset name (gpt-nano, gpt-micro, gpt-d<N>) or a saved model folder
    task: str = "arith"  # built-in task whose solutions are the SFT data (ignored when --data is set)
    data: str = ""  # TRL prompt-completion or messages data: .jsonl, .parquet or a datasets folder
    split: str = "train"  # the split to read when --data is a datasets folder with several
    n_train: int = 20000  # task examples to generate
    max_len: int = 64  # prompt + completion tokens; longer completions are truncated, counted
    steps: int = 600  # optimizer steps
    batch_size: int = 64  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3  # peak learning rate
    warmup_steps: int = 30  # linear warmup steps
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    seed: int = 0  # seed for init, data order and sampling
    threads: int = 2  # torch CPU threads
    out_dir: str = "runs/sft"  # run folder: metrics.jsonl, tb/, checkpoint/, final/
    save_every: int = 0  # checkpoint every N steps (0 = only at the end)
    resume: bool = False  # continue from out_dir/checkpoint
    stop_at_step: int = 0  # end the run after this step as if interrupted (0 = run to the end)
    eval_n: int = 200  # held-out task prompts for the final greedy accuracy (0 = skip)
    eval_every: int = 0  # also evaluate every N steps (0 = only at the end)
    eval_every_s: float = 0.0  # also evaluate every N seconds of training (evaluations excluded; 0 = off)
    time_budget_s: float = 0.0  # stop after this many seconds of training (evaluations excluded; 0 = no limit)
    max_new_tokens: int = 40  # generation length for evaluation


def train(cfg: Config, model=None, data: list[dict] | None = None) -> Result:
    """data: optional [{'prompt', 'completion'}]; model: optional Policy (else cfg.model is loaded)."""
    # ---- setup -------------------------------------------------------------------------------------
    setup(cfg)
    policy = get_policy(cfg, model)
    tok = policy.tokenizer
    task = make_task(cfg.task) if cfg.task and not cfg.data else None
    if data is None:
        if cfg.data:
            data = completion_records(load_rows(cfg.data, cfg.split), tok)
        elif task is not None:
            data = [
                {
                    "prompt": e["prompt"],
                    "completion": e["solution"],
                    "images": e.get("images"),
                    "where": f"{task.name} train #{i}",
                }
                for i, e in enumerate(task.examples("train", cfg.n_train, cfg.seed))
            ]
        else:
            raise ValueError("sft needs --data or --task")
    skips = SkipCounter()
    encoded = [
        encode_example(
            policy,
            d["prompt"],
            d["completion"],
            cfg.max_len,
            skips,
            d.get("where", f"example {i}"),
            "completion",
            d.get("images"),
            d.get("image_base", ""),
        )
        for i, d in enumerate(data)
    ]
    encoded = [e for e in encoded if e is not None]
    if not encoded:
        raise ValueError(f"no usable SFT examples: every row was skipped ({skips.report()})")
    check_fsdp(cfg, "sft")
    model_fwd = dist.wrap(policy, cfg.fsdp)  # DDP (or FSDP2) under torchrun, the policy itself otherwise
    optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay)  # after FSDP2 sharding, which replaces params
    start = 0
    if cfg.resume:
        start = load_checkpoint(cfg.out_dir, policy, optimizer)["step"]
        console.print(f"resumed from {cfg.out_dir}/checkpoint at step {start}")
    main = dist.is_main()
    log = (
        MetricLogger(cfg.out_dir, cfg.steps, desc="sft", resume=cfg.resume, start_step=start, show=("loss", "lr"))
        if main
        else None
    )
    history, evals = [], []
    test = task.examples("test", cfg.eval_n, cfg.seed) if task is not None and cfg.eval_n else []
    per_step = cfg.batch_size * cfg.grad_accum * dist.world_size()  # examples per optimizer step
    if main and test and (cfg.eval_every or cfg.eval_every_s) and not cfg.resume:
        held_out_accuracy(policy, task, test, cfg, evals, start, "before SFT")
    policy.train()
    t_train = time.perf_counter()

    # ---- training loop -----------------------------------------------------------------------------
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        # the global batch is batch_size x grad_accum x ranks; this rank takes its shard
        idx = dist.shard(
            batch_indices(len(encoded), cfg.batch_size * cfg.grad_accum * dist.world_size(), step, cfg.seed)
        )
        chunks = [
            [encoded[i] for i in idx[m * cfg.batch_size : (m + 1) * cfg.batch_size]] for m in range(cfg.grad_accum)
        ]
        micro = [(*pad_batch(c, tok.pad_token_id), batch_images(c)) for c in chunks]
        # global divisor over micro-batches and ranks: exact accumulation and exact DDP
        n_tokens = dist.all_sum(sum(int(resp[:, 1:].sum()) for _, _, resp, _ in micro))
        total_loss = 0.0
        for ids, attn, resp, images in micro:
            with autocast(cfg, policy):
                # LM head on completion positions only, chunked
                fused = model_fwd(ids, attn, images=images, hidden_only=True)
            if fused is not None:
                seq, _ = fused_sequence_logps(*fused, ids, resp)
                loss = masked_reduce(-seq[:, None], torch.ones_like(seq[:, None]), "token_mean", global_count=n_tokens)
            else:
                per_token, _, _ = sequence_logps(model_fwd(ids, attn, images=images), ids, resp)
                loss = masked_reduce(-per_token, resp[:, 1:], "token_mean", global_count=n_tokens)
            loss.backward()
            total_loss += loss.item()
        grad_norm, lr = optimizer_step(policy, optimizer, step, cfg)
        dt = time.perf_counter() - t0
        n_in = dist.all_sum(sum(int(attn.sum()) for _, attn, _, _ in micro))
        loss_value = dist.all_sum(total_loss) / dist.world_size()  # each rank's loss carries a factor world
        metrics = {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": n_in / dt}
        if main and test and eval_due(cfg, step + 1, t_train, evals):
            metrics["eval/accuracy"] = held_out_accuracy(
                policy, task, test, cfg, evals, step + 1, f"at step {step + 1}", t_train, (step + 1) * per_step
            )
            policy.train()
        history.append({"step": step + 1, **metrics})
        stop = dist.all_sum(float(out_of_time(cfg, t_train, evals))) > 0  # every rank stops at the same step
        log_and_checkpoint(cfg, log, policy, optimizer, step + 1, metrics, main)
        if (cfg.stop_at_step and step + 1 >= cfg.stop_at_step) or stop:
            break
    if main:
        log.close()

    # ---- save and evaluate (rank 0) ----------------------------------------------------------------
    summary = {"steps": len(history) + start, "skipped": skips.counts}
    policy = gathered_policy(policy, cfg)  # FSDP2: the full weights on rank 0 (every rank takes part)
    if main:
        report_skips(skips, cfg.out_dir)
    if main and not (cfg.stop_at_step and cfg.stop_at_step < cfg.steps):
        save_final(policy, cfg, Path(cfg.out_dir) / "final")
        if test:
            acc = held_out_accuracy(
                policy, task, test, cfg, evals, summary["steps"], "after SFT", t_train, summary["steps"] * per_step
            )
            summary["eval"] = {"accuracy": acc, "n": len(test), "mean_score": evals[-1]["mean_score"]}
    summary["evals"] = evals
    if main:
        finish_run(cfg, policy, task, task.examples("test", 8, cfg.seed) if task is not None else data)
    summary["config"] = asdict(cfg)
    return Result(policy, history, summary)
