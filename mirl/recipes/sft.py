"""Supervised fine-tuning: next-token NLL on the completion tokens, token mean over the global batch.

Data: a built-in task's worked solutions (`--task arith`) or a TRL prompt-completion / messages file
(`--data train.jsonl`, parquet or a datasets folder).

    mirl sft --task arith --steps 600 --out-dir runs/sft          # CPU, about a minute
    torchrun --nproc-per-node 2 -m mirl sft --task arith           # same code, distributed
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from .. import distributed as dist
from ..checkpoint import save_checkpoint
from ..data.collate import batch_images, batch_indices, encode_example, pad_batch
from ..data.formats import SkipCounter, completion_records, load_rows
from ..data.tasks import make_task
from ..device import autocast, phase
from ..logging import TRACKERS
from ..logps import fused_sequence_logps, sequence_logps
from ..losses import masked_reduce
from ..optim import Schedule, make_optimizer, optimizer_step
from ..options import ConfigError, choice, choice_list
from .common import (
    build_policy,
    check_context,
    check_fsdp,
    gathered_policy,
    policy_options,
    report_skips,
    video_options,
)
from .held_out import held_out_evaluator, held_out_set, last_evaluation
from .run import Result, end_of_run, end_of_step, open_run, resume_state, setup


@dataclass
class Config:
    """Options of `mirl sft` (one line of doc each, the CLI's flags)."""

    model: str = "gpt-nano"  # preset name (gpt-nano, gpt-micro, gpt-d<N>) or a saved model folder
    task: str = "arith"  # built-in task whose solutions are the SFT data (ignored when --data is set)
    chat: str = choice("auto", "yes", "no")  # built-in task through the model's chat template (auto: if it has one)
    data: str = ""  # TRL prompt-completion or messages data: .jsonl, .parquet or a datasets folder
    env: str = ""  # an environment's demonstrations as the data (calc): --n-train examples solved with its tools
    split: str = "train"  # the split of --data to read (a datasets folder or hub dataset with several)
    data_config: str = ""  # the configuration (subset) of a hub dataset --data
    revision: str = ""  # the hub revision (branch, tag, commit) of a hub dataset --data
    model_revision: str = ""  # the hub revision (branch, tag, commit) of a hub model --model
    n_train: int = 20000  # task examples to generate
    max_len: int = 64  # prompt + completion tokens; longer completions are truncated, counted
    steps: int = 600  # optimizer steps
    batch_size: int = 64  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3  # peak learning rate
    warmup_steps: int = 30  # linear warmup (optimizer steps)
    min_lr_ratio: float = 0.1  # cosine decay floor as a fraction of lr (1 = constant after warmup)
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    seed: int = 0  # seed of initialisation, data order and sampling
    threads: int = 2  # torch CPU threads
    out_dir: str = "runs/sft"  # run folder: config.json, metrics.jsonl, tb/, checkpoint/, final/, report/
    save_every: int = 0  # checkpoint every N steps (0 = only at the end)
    resume: bool = False  # continue from out_dir/checkpoint
    stop_at_step: int = 0  # end the run after this step as if interrupted (0 = run to the end)
    eval_n: int = 200  # held-out task prompts for the final greedy accuracy (0 = skip)
    eval_benchmark: str = ""  # held-out set: a benchmark (gsm8k, math500, aime24, aime25, amc23) instead of the task
    eval_every: int = 0  # also evaluate every N steps (0 = only at the end)
    eval_every_s: float = 0.0  # also evaluate every N seconds of training (evaluations excluded; 0 = off)
    time_budget_s: float = 0.0  # stop after this many seconds of training (evaluations excluded; 0 = no limit)
    max_new_tokens: int = 40  # generation length for evaluation
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


def task_records(task, n: int, seed: int) -> list[dict]:
    """The SFT data of a built-in task: its worked solutions, n training examples as prompt-completion records."""
    return [
        {
            "prompt": e["prompt"],
            "completion": e["solution"],
            "images": e.get("images"),
            "where": f"{task.name} train #{i}",
        }
        for i, e in enumerate(task.examples("train", n, seed))
    ]


def env_demonstrations(spec: str, tokenizer, chat: str, n: int, seed: int) -> list[dict]:
    """--env: the environment's demonstrations(n, seed), prompt-completion records in the plain protocol
    (envs/protocol.py), the form its episodes take on a model without a chat template."""
    from ..envs.loader import load_env

    factory, name = load_env(spec)
    env = factory()
    if not callable(getattr(env, "demonstrations", None)):
        raise ConfigError(f"--env {name}: it has no demonstrations(n, seed) to train on; give --data")
    if chat == "yes" or (chat == "auto" and getattr(tokenizer, "chat_template", None) is not None):
        raise ConfigError(
            f"--env {name}: its demonstrations are in the plain protocol, and this model's episodes would go "
            "through its chat template; add --chat no (and run the episodes with --chat no too)"
        )
    return env.demonstrations(n, seed)


def encode_records(policy, data: list[dict], max_len: int, skips: SkipCounter) -> list[tuple]:
    """The records tokenised (prompt + completion, the completion trained on); rows that cannot be used are
    skipped and counted in skips. No usable row at all is an error."""
    encoded = [
        encode_example(
            policy,
            d["prompt"],
            d["completion"],
            max_len,
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
    return encoded


def micro_batches(encoded: list[tuple], idx: list[int], batch_size: int, grad_accum: int, pad_id: int, device):
    """This rank's examples of a step (idx) in grad_accum micro-batches: [(ids, attn, resp (B, T), images)]."""
    chunks = [[encoded[i] for i in idx[m * batch_size : (m + 1) * batch_size]] for m in range(grad_accum)]
    return [(*pad_batch(c, pad_id, device=device), batch_images(c)) for c in chunks]


def completion_nll(model_fwd, policy, micro: tuple, *, n_tokens: int, bf16: bool) -> torch.Tensor:
    """One micro-batch's NLL of its completion tokens, summed and divided by n_tokens (the completion tokens
    of the global batch: exact accumulation and exact DDP). The LM head runs on completion positions only,
    in chunks, when the model allows."""
    ids, attn, resp, images = micro
    with autocast(policy, bf16):
        out = model_fwd(ids, attn, images=images, output="hidden_and_head")
    if out.head_weight is not None:
        seq, _ = fused_sequence_logps(out.hidden, out.head_weight, ids, resp)
        return masked_reduce(-seq[:, None], torch.ones_like(seq[:, None]), "token_mean", global_count=n_tokens)
    per_token, _, _ = sequence_logps(out.logits, ids, resp)
    return masked_reduce(-per_token, resp[:, 1:], "token_mean", global_count=n_tokens)


def train(cfg: Config, model=None, data: list[dict] | None = None) -> Result:
    """data: optional [{'prompt', 'completion'}]; model: optional Policy (else cfg.model is loaded)."""
    # ---- setup -------------------------------------------------------------------------------------
    cfg = setup(cfg)
    policy = build_policy(model, cfg.model, **policy_options(cfg))
    check_context(policy, cfg.max_len, cfg.model)
    tok = policy.tokenizer
    task = make_task(cfg.task, tok, cfg.chat) if cfg.task and not cfg.data and not cfg.env else None
    if cfg.env and cfg.data:
        raise ConfigError("--env and --data are two sources of SFT data (the environment's demonstrations, a file)")
    if cfg.env and (cfg.eval_every or cfg.eval_every_s):
        raise ConfigError("--eval-every and --eval-every-s have no effect with --env: sft --env evaluates nothing "
                          "(evaluate its episodes with mirl eval --env)")  # fmt: skip
    if data is None and cfg.data:
        rows = load_rows(cfg.data, cfg.split, cfg.data_config, cfg.revision)
        data = completion_records(rows, tok, video_options(cfg))
    elif data is None and cfg.env:
        data = env_demonstrations(cfg.env, tok, cfg.chat, cfg.n_train, cfg.seed)
    elif data is None and task is not None:
        data = task_records(task, cfg.n_train, cfg.seed)
    elif data is None:
        raise ValueError("sft needs --data or --task")
    skips = SkipCounter()
    encoded = encode_records(policy, data, cfg.max_len, skips)
    check_fsdp(cfg.fsdp, lora_r=cfg.lora_r > 0, resume=cfg.resume, eval_every=bool(cfg.eval_every or cfg.eval_every_s))
    model_fwd = dist.wrap(policy, cfg.fsdp)  # DDP (or FSDP2) under torchrun, the policy itself otherwise
    optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay)  # after FSDP2 sharding, which replaces params
    start, evals = resume_state(cfg.out_dir, policy, optimizer) if cfg.resume else (0, [])
    test = task.examples("test", cfg.eval_n, cfg.seed) if task is not None and cfg.eval_n else []
    eval_task, test = held_out_set(policy, task, test, benchmark=cfg.eval_benchmark, chat=cfg.chat, n=cfg.eval_n,
                                   max_new_tokens=cfg.max_new_tokens)  # fmt: skip
    if dist.is_main() and test and (cfg.eval_every or cfg.eval_every_s) and not cfg.resume:
        held_out_evaluator(policy, eval_task, test, run=None, evals=evals, max_new_tokens=cfg.max_new_tokens)(
            0, "before SFT"
        )
    policy.train()

    # ---- derived values: the global batch, the schedule, when to save, evaluate and stop -----------------
    per_step = cfg.batch_size * cfg.grad_accum * dist.world_size()  # examples per optimizer step
    longest = max(len(e[0]) for e in encoded)
    schedule = Schedule(cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio, cfg.max_grad_norm)
    run = open_run(cfg, desc="sft", show=("loss", "lr"), start=start, evals=evals)
    run.samples = start * per_step  # training examples so far, recorded with each held-out evaluation
    evaluate = held_out_evaluator(policy, eval_task, test, run=run, max_new_tokens=cfg.max_new_tokens)
    save = lambda s: save_checkpoint(cfg.out_dir, policy, optimizer, s, {"evals": run.evals})

    # ---- training loop -----------------------------------------------------------------------------
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        # the global batch is batch_size x grad_accum x ranks; this rank takes its shard
        idx = dist.shard(batch_indices(len(encoded), per_step, step, cfg.seed))
        micro = micro_batches(encoded, idx, cfg.batch_size, cfg.grad_accum, tok.pad_token_id, policy.device)
        # global divisor over micro-batches and ranks: exact accumulation and exact DDP
        n_tokens = dist.all_sum(sum(int(resp[:, 1:].sum()) for _, _, resp, _ in micro))
        run.tokens += n_tokens
        run.samples += per_step
        total_loss = 0.0
        with phase("update", step + 1, (len(idx), longest)):
            for mb in micro:
                loss = completion_nll(model_fwd, policy, mb, n_tokens=n_tokens, bf16=cfg.bf16)
                loss.backward()
                total_loss += loss.item()
        grad_norm, lr = optimizer_step(policy, optimizer, step, schedule)
        dt = time.perf_counter() - t0
        n_in = dist.all_sum(sum(int(attn.sum()) for _, attn, _, _ in micro))
        loss_value = dist.all_sum(total_loss) / dist.world_size()  # each rank's loss carries a factor world
        row = {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": n_in / dt}
        if end_of_step(run, step + 1, row, t_step=t0, save=save, evaluate=evaluate):
            break

    # ---- save and evaluate (rank 0) ----------------------------------------------------------------
    policy = gathered_policy(policy, cfg)
    if run.main:
        report_skips(skips, cfg.out_dir)
    final_eval = held_out_evaluator(policy, eval_task, test, run=run, max_new_tokens=cfg.max_new_tokens)
    summary = end_of_run(
        run,
        policy,
        merged=not cfg.save_adapter_only,
        evaluate=final_eval and (lambda: final_eval(run.steps, "after SFT")),
        report=cfg.report,
        task=eval_task,
        examples=eval_task.examples("test", 8, cfg.seed) if eval_task is not None else data,
        max_new_tokens=cfg.max_new_tokens,
    )
    summary["skipped"] = skips.counts
    if test and run.evals and run.cadence.finishes and run.main:
        summary["eval"] = last_evaluation(run.evals, len(test))
    summary["config"] = asdict(cfg)
    return Result(policy, run.history, summary)
