"""Offline preference optimisation with any registered loss: DPO, MIO, IPO, hinge, robust, SimPO, the MI
estimators (dv, js, nwj, infonce; group_* with each pair as a group of two), combined with weights.

    loss = mean over pairs of sum_i w_i * L_i(logp_w, logp_l, ref_logp_w, ref_logp_l; beta)
Chosen and rejected go through the model in one concatenated batch. The reference is either a frozen
copy (ref_mode=model) or log-probs precomputed once before training (ref_mode=precompute, the
default: no second model in memory; the policy at step 0 *is* the reference).
Log-probs are summed over response tokens (DPO's convention) or averaged (logp_agg=mean).

    mirl dpo --data pairs.jsonl --loss mio --beta 0.1
    mirl dpo --model runs/sft/final --task arith --loss dpo:1,sft:0.2     # pairs sampled and verified
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file

from .. import distributed as dist
from ..checkpoint import save_checkpoint
from ..data.collate import batch_images, batch_indices, encode_pairs, pad_batch
from ..data.formats import SkipCounter, load_rows, preference_records
from ..data.tasks import make_task
from ..device import autocast, phase
from ..logging import TRACKERS, console, warn
from ..logps import fused_sequence_logps, sequence_logps
from ..losses import get_loss, mean_over_examples, parse_loss_spec, preference_loss
from ..optim import Schedule, make_optimizer, optimizer_step
from ..options import choice, choice_list
from ..rollout.pairs import sample_pairs
from .common import (
    build_policy,
    check_context,
    check_fsdp,
    frozen_reference,
    gathered_policy,
    policy_options,
    report_skips,
    video_options,
)
from .held_out import held_out_evaluator, held_out_set, last_evaluation
from .run import Result, end_of_run, end_of_step, open_run, resume_state, setup


@dataclass
class Config:
    """Options of `mirl dpo` (one line of doc each, the CLI's flags)."""

    model: str = "gpt-nano"  # preset or saved model folder (usually an SFT checkpoint)
    data: str = ""  # TRL preference data (.jsonl, .parquet, datasets folder); empty = sample from --task
    split: str = "train"  # the split of --data to read (a datasets folder or hub dataset with several)
    data_config: str = ""  # the configuration (subset) of a hub dataset --data
    revision: str = ""  # the hub revision (branch, tag, commit) of a hub dataset --data
    model_revision: str = ""  # the hub revision (branch, tag, commit) of a hub model --model
    task: str = "arith"  # task for sampled-and-verified pairs and for held-out evaluation ("" = none)
    chat: str = choice("auto", "yes", "no")  # built-in task through the model's chat template (auto: if it has one)
    loss: str = "dpo"  # loss name or weighted mix, e.g. "mio" or "dpo:1,sft:0.2"
    beta: float = 0.1  # temperature of the implicit critic T = beta * (logp - logp_ref)
    neg_mix: float = 0.5  # weight of the chosen response in the negative mixture (mio, dv, js, nwj)
    label_smoothing: float = 0.1  # robust DPO: assumed preference-flip rate
    simpo_gamma: float = 0.5  # SimPO target margin
    ipo_length_normalize: bool = True  # IPO on per-token log-ratios (TRL's choice)
    logp_agg: str = choice("sum", "mean")  # sequence log-prob: sum over response tokens, or token mean ("mean")
    ref_mode: str = choice("precompute", "model")  # precompute (no reference model in memory) or model (a frozen copy)
    n_prompts: int = 512  # task prompts to sample pairs from
    k: int = 8  # samples per prompt when making pairs
    sample_temperature: float = 1.0  # sampling temperature when making pairs
    max_len: int = 64  # prompt + response tokens
    steps: int = 200  # optimizer steps
    batch_size: int = 32  # pairs per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4  # peak learning rate
    warmup_steps: int = 10  # linear warmup (optimizer steps)
    min_lr_ratio: float = 0.1  # cosine decay floor as a fraction of lr (1 = constant after warmup)
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    probe_every: int = 5  # every N steps log log-probs of a fixed set of 256 pairs, as trained (probe/*; 0 = off)
    chosen_drop_warn: float = 2.0  # warn when mean chosen logp fell this many nats while the margin grew
    seed: int = 0  # seed of initialisation, data order and sampling
    threads: int = 2  # torch CPU threads
    out_dir: str = "runs/dpo"  # run folder: config.json, metrics.jsonl, tb/, checkpoint/, final/, report/
    save_every: int = 0  # checkpoint every N steps (0 = only at the end)
    resume: bool = False  # continue from out_dir/checkpoint
    stop_at_step: int = 0  # end the run after this step as if interrupted (0 = run to the end)
    eval_n: int = 200  # held-out task prompts for greedy accuracy at the end (0 = skip)
    eval_benchmark: str = ""  # held-out set: a benchmark (gsm8k, math500, aime24, aime25, amc23) instead of the task
    max_new_tokens: int = 40  # generation length for sampling and evaluation
    # -- options every training recipe has (the same names, types, defaults and docs: tests/test_recipes.py)
    lora_r: int = 0  # LoRA rank (0 = full fine-tuning)
    lora_alpha: int = 16  # LoRA scaling alpha
    lora_dropout: float = 0.0  # dropout on the LoRA path
    lora_targets: str = ""  # comma-separated module names (default: every linear layer of the blocks)
    save_adapter_only: bool = False  # with LoRA: save the adapters alone instead of merged weights
    device: str = "auto"  # auto (a GPU when there is one; torchrun: the rank's) | cpu | cuda | cuda:N
    bf16: bool | None = None  # bf16 autocast for the training forward and backward (auto: on for a bf16 GPU)
    dtype: str = choice("float32", "bfloat16")  # frozen copies (reference, teacher, reward model): float32 | bfloat16
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


def pairs_fingerprint(pairs: list[tuple]) -> str:
    """SHA-256 of the encoded pairs' token ids: cached reference log-probs belong to exactly these pairs."""
    import hashlib

    h = hashlib.sha256()
    for c, r in pairs:
        h.update(json.dumps([c[0], c[1], r[0], r[1]]).encode())
    return h.hexdigest()


class PairLogps(NamedTuple):
    """Sequence log-probs of a batch of pairs from one forward: chosen, rejected (N,) each, their response
    lengths (N,) and the number of tokens that went through the model."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    n_tokens: int


def pair_forward(policy, pairs: list[tuple], pad_id: int, average: bool) -> PairLogps:
    """One forward over chosen + rejected stacked. The LM head runs only on response positions, in chunks (no
    (2N, T, V) logits), when the model allows."""
    seqs = [c for c, _ in pairs] + [r for _, r in pairs]
    ids, attn, resp = pad_batch(seqs, pad_id, device=policy.device)
    images = batch_images(seqs)
    out = policy(ids, attn, images=images, output="hidden_and_head")
    if out.head_weight is not None:
        seq, lengths = fused_sequence_logps(out.hidden, out.head_weight, ids, resp, average=average)
    else:
        _, seq, lengths = sequence_logps(out.logits, ids, resp, average=average)
    n = len(pairs)
    return PairLogps(seq[:n], seq[n:], lengths[:n], lengths[n:], int(attn.sum()))


@torch.no_grad()
def all_pair_logps(policy, pairs: list[tuple], pad_id: int, average: bool, batch_size: int = 64, bf16: bool = False):
    """Sequence log-probs of every pair under `policy`: (chosen (n,), rejected (n,)). bf16: under the same
    bf16 autocast as the training forward, so that a precomputed reference equals the policy at step 0."""
    was = policy.training
    policy.eval()
    cs, rs = [], []
    for s in range(0, len(pairs), batch_size):
        with autocast(policy, bf16):
            out = pair_forward(policy, pairs[s : s + batch_size], pad_id, average)
        c, r = out.chosen, out.rejected
        cs.append(c)
        rs.append(r)
    policy.train(was)
    return torch.cat(cs), torch.cat(rs)


def pair_positive(n: int, device) -> torch.Tensor:
    """(n, 2): each pair as a group of two, the chosen response (first) positive."""
    return torch.tensor([[True, False]], device=device).expand(n, 2)


def load_reference_logps(ref_file: Path, pairs: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached reference log-probs of a run being resumed: (chosen (n,), rejected (n,)). A damaged or
    truncated file, or one of other pairs, is an error naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(ref_file), "pt") as f:
            saved_fp = (f.metadata() or {}).get("pairs")
        saved = load_file(str(ref_file))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(
            f"{ref_file}: cannot read the cached reference log-probs ({str(e).splitlines()[0][:200]}); the file is "
            "damaged or truncated: delete it and resume with the same --model (the reference log-probs are then "
            "computed again from it, before the checkpoint is loaded)"
        ) from e
    if saved_fp != pairs_fingerprint(pairs):
        raise ValueError(
            f"--resume: the preference pairs differ from those the run started with ({ref_file} "
            "holds the reference log-probs of those); resume with the same data, or start a new run"
        )
    chosen, rejected = saved.get("chosen"), saved.get("rejected")
    n = len(pairs)
    if chosen is None or rejected is None or chosen.shape != (n,) or rejected.shape != (n,):
        raise ValueError(f"{ref_file}: expected 'chosen' and 'rejected' log-probs of {n} pairs each")
    return chosen, rejected


def preference_data(cfg: Config, policy, task, skips: SkipCounter) -> tuple[list[dict], dict]:
    """The preference records of a run: --data read (rows that cannot be used are counted in skips), or pairs
    sampled from the policy on the task's training prompts and verified. -> (records, the sampling's counts)."""
    if cfg.data:
        rows = load_rows(cfg.data, cfg.split, cfg.data_config, cfg.revision)
        return preference_records(rows, policy.tokenizer, skips, video_options(cfg)), {}
    if task is None:
        raise ValueError("preference training needs --data or --task")
    data, stats = sample_pairs(
        policy,
        task,
        task.examples("train", cfg.n_prompts, cfg.seed),
        k=cfg.k,
        temperature=cfg.sample_temperature,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed,
    )
    console.print(f"sampled pairs: {stats}")
    return data, stats


def precomputed_reference(policy, pairs: list[tuple], ref_file: Path, *, resume: bool, average: bool, bf16: bool):
    """The reference log-probs of every pair, (chosen (n,), rejected (n,)): the policy's before training (the
    policy at step 0 is the reference), computed once and cached in ref_file, or read back from it on resume."""
    if resume and ref_file.exists():
        return tuple(x.to(policy.device) for x in load_reference_logps(ref_file, pairs))
    chosen, rejected = all_pair_logps(policy, pairs, policy.tokenizer.pad_token_id, average, bf16=bf16)
    if dist.is_main():  # written whole or not at all: a run killed here leaves no half file
        tmp = ref_file.with_name(ref_file.name + ".tmp")
        save_file({"chosen": chosen, "rejected": rejected}, str(tmp), metadata={"pairs": pairs_fingerprint(pairs)})
        os.replace(tmp, ref_file)
    return chosen, rejected


def reference_logps(ref_model, ref_all, batch: list[tuple], mb: list[int], out: PairLogps, *, average, bf16):
    """The reference's log-probs of a micro-batch (pairs `batch`, indices `mb`), (chosen (N,), rejected (N,)): a
    forward of the frozen copy (ref_model), the precomputed ones (ref_all), or zeros when no loss term needs them."""
    if ref_model is not None:
        with torch.no_grad(), autocast(ref_model, bf16):  # the reference under the policy's arithmetic
            ref = pair_forward(ref_model, batch, ref_model.tokenizer.pad_token_id, average)
        return ref.chosen, ref.rejected
    if ref_all is not None:
        return ref_all[0][mb], ref_all[1][mb]
    return torch.zeros_like(out.chosen), torch.zeros_like(out.rejected)


def pair_loss(terms, out: PairLogps, ref: tuple, *, beta: float, options: dict, average: bool, n_global: int):
    """The weighted loss terms of a micro-batch of pairs, summed over its pairs and divided by n_global (the pairs
    of the global batch) -> (loss, per-pair metrics). One call shape for every loss: each pair is a group of two
    with the chosen response first. With logp_agg=mean the log-probs are token means already: no second division
    by the lengths."""
    pc, pr = out.chosen, out.rejected
    per_ex, metrics = preference_loss(
        terms,
        torch.stack([pc, pr], 1),
        torch.stack(list(ref), 1),
        pair_positive(len(pc), pc.device),
        beta=beta,
        options=options,
        lengths=None if average else torch.stack([out.chosen_lengths, out.rejected_lengths], 1),
    )
    loss = mean_over_examples(per_ex, global_count=n_global)
    return loss, {**metrics, "logps/chosen": pc.detach(), "logps/rejected": pr.detach()}


def probe_summary(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """The probe pairs' mean chosen and rejected log-probs and their mean mass pi(w) + pi(l)."""
    return {
        "chosen_logps": float(chosen.mean()),
        "rejected_logps": float(rejected.mean()),
        "mass": float((chosen.exp() + rejected.exp()).mean()),
    }


def probe_change(start: tuple, end: tuple) -> dict:
    """The probe pairs' mean log-prob change over the run, chosen and rejected, from (chosen, rejected) log-probs at
    the start and at the end, and their values at the start."""
    return {
        "chosen_logp_change": float((end[0] - start[0]).mean()),
        "rejected_logp_change": float((end[1] - start[1]).mean()),
        "probe_start": probe_summary(*start),
    }


def warn_chosen_decline(step: int, first: dict, row: dict, threshold: float) -> bool:
    """Warn when the mean chosen log-prob fell more than threshold nats below its first step's while the margin
    grew (DPO's likelihood-decline failure mode). -> whether it warned."""
    drop = first["logps/chosen"] - row["logps/chosen"]
    if not (drop > threshold and row.get("rewards/margins", 0.0) > first.get("rewards/margins", 0.0)):
        return False
    warn(
        f"step {step}: mean chosen log-prob fell {drop:.2f} nats from its start while the margin grew (DPO's "
        "likelihood-decline failure mode; MIO targets it)"
    )
    return True


def train(cfg: Config, model=None, data: list[dict] | None = None) -> Result:
    """data: optional [{'prompt', 'chosen', 'rejected'}] strings; model: optional Policy."""
    # ---- setup -------------------------------------------------------------------------------------
    terms = parse_loss_spec(cfg.loss)
    if cfg.ref_mode not in ("precompute", "model"):
        raise ValueError(f"ref_mode must be 'precompute' or 'model', got {cfg.ref_mode!r}")
    if cfg.logp_agg not in ("sum", "mean"):
        raise ValueError(f"logp_agg must be 'sum' or 'mean', got {cfg.logp_agg!r}")
    cfg = setup(cfg)
    policy = build_policy(model, cfg.model, **policy_options(cfg))
    check_context(policy, cfg.max_len, cfg.model)
    tok = policy.tokenizer
    task = make_task(cfg.task, tok, cfg.chat) if cfg.task else None
    pair_stats, skips = {}, SkipCounter()
    if data is None:
        data, pair_stats = preference_data(cfg, policy, task, skips)
    pairs = encode_pairs(policy, data, cfg.max_len, skips)
    if not pairs:
        made = f"; pairs sampled from --task: {pair_stats}" if pair_stats else ""
        raise ValueError(f"no usable preference pairs ({skips.report()}{made})")
    average = cfg.logp_agg == "mean"
    options = {
        "neg_mix": cfg.neg_mix,
        "label_smoothing": cfg.label_smoothing,
        "gamma": cfg.simpo_gamma,
        "length_normalize": cfg.ipo_length_normalize,
    }
    needs_ref = any(get_loss(n).needs_reference for n, _ in terms)

    # the reference: log-probs computed once (policy at step 0 = reference), or a frozen copy
    ref_model = frozen_reference(policy, cfg.dtype) if needs_ref and cfg.ref_mode == "model" else None
    ref_all = None
    if needs_ref and ref_model is None:
        ref_file = Path(cfg.out_dir) / "ref_logps.safetensors"
        ref_all = precomputed_reference(policy, pairs, ref_file, resume=cfg.resume, average=average, bf16=cfg.bf16)
    # fixed pairs for the start/end log-prob change, under the training arithmetic (bf16 autocast with --bf16); the
    # start is the precomputed reference's first rows where there is one (the same numbers: step 0's policy, in the
    # same batches, as 256 is a multiple of all_pair_logps' batch size)
    probe = pairs[: min(len(pairs), 256)]
    probe_logps = lambda: all_pair_logps(policy, probe, tok.pad_token_id, average, bf16=cfg.bf16)
    probe_start = probe_logps() if ref_all is None else tuple(x[: len(probe)] for x in ref_all)  # (chosen, rejected)
    probe_end = None

    check_fsdp(cfg.fsdp, lora_r=cfg.lora_r > 0, resume=cfg.resume)
    model_fwd = dist.wrap(policy, cfg.fsdp)  # DDP (or FSDP2) under torchrun, the policy itself otherwise
    optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay)  # after FSDP2 sharding, which replaces params
    start, evals = resume_state(cfg.out_dir, policy, optimizer) if cfg.resume else (0, [])
    test = task.examples("test", cfg.eval_n, cfg.seed) if task is not None and cfg.eval_n else []
    eval_task, test = held_out_set(policy, task, test, benchmark=cfg.eval_benchmark, chat=cfg.chat, n=cfg.eval_n,
                                   max_new_tokens=cfg.max_new_tokens)  # fmt: skip

    # ---- derived values: the global batch, the schedule, when to save and stop -----------------------------
    n_global = cfg.batch_size * cfg.grad_accum * dist.world_size()  # pairs per optimizer step
    schedule = Schedule(cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio, cfg.max_grad_norm)
    run = open_run(cfg, desc=cfg.loss, show=("loss", "logps/chosen", "rewards/margins"), start=start, evals=evals)
    save = lambda s: save_checkpoint(cfg.out_dir, policy, optimizer, s, {"evals": run.evals})
    first, warned = None, False
    policy.train()

    # ---- training loop -----------------------------------------------------------------------------
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        # the global batch is batch_size x grad_accum x ranks; this rank takes its shard
        idx = dist.shard(batch_indices(len(pairs), n_global, step, cfg.seed))
        sums: dict[str, float] = {}
        n_tok = 0
        with phase("update", step + 1, (2 * len(idx), cfg.max_len)):
            for m in range(cfg.grad_accum):
                mb = idx[m * cfg.batch_size : (m + 1) * cfg.batch_size]
                batch = [pairs[i] for i in mb]
                with autocast(policy, cfg.bf16):
                    out = pair_forward(model_fwd, batch, tok.pad_token_id, average)
                n_tok += out.n_tokens
                ref = reference_logps(ref_model, ref_all, batch, mb, out, average=average, bf16=cfg.bf16)
                loss, metrics = pair_loss(
                    terms, out, ref, beta=cfg.beta, options=options, average=average, n_global=n_global
                )
                loss.backward()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v.float().sum())
                sums["loss"] = sums.get("loss", 0.0) + loss.item()
        grad_norm, lr = optimizer_step(policy, optimizer, step, schedule)
        dt = time.perf_counter() - t0
        # every rank's loss carries a factor world (exact DDP gradients); metrics are sums over the global batch
        row = {k: dist.all_sum(v) / (dist.world_size() if k == "loss" else n_global) for k, v in sums.items()}
        row.update({"lr": lr, "grad_norm": grad_norm, "tokens_per_s": dist.all_sum(n_tok) / dt})
        first = first or row
        warned = warned or warn_chosen_decline(step + 1, first, row, cfg.chosen_drop_warn)
        if cfg.probe_every and ((step + 1) % cfg.probe_every == 0 or step == 0):
            # the same pairs every time: a clean curve of chosen / rejected log-probs (batch means are noisy)
            probe_end = probe_logps()
            row.update({f"probe/{k}": v for k, v in probe_summary(*probe_end).items()})
        else:
            probe_end = None  # stale: the end's probe is taken after the loop
        if end_of_step(run, step + 1, row, t_step=t0, save=save):
            break
    if run.main:
        report_skips(skips, cfg.out_dir)

    # ---- summary, save, evaluate (rank 0) ----------------------------------------------------------
    probe_end = probe_logps() if probe_end is None else probe_end  # the last step's probe when it took one
    summary = {"pairs": len(pairs), "pair_sampling": pair_stats, "skipped": skips.counts}
    summary.update(probe_change(probe_start, probe_end), warned_chosen_decline=warned)
    policy = gathered_policy(policy, cfg)
    final_eval = held_out_evaluator(policy, eval_task, test, run=run, max_new_tokens=cfg.max_new_tokens)
    summary.update(
        end_of_run(
            run,
            policy,
            merged=not cfg.save_adapter_only,
            evaluate=final_eval and (lambda: final_eval(run.steps, f"after {cfg.loss}")),
            report=cfg.report,
            task=eval_task,
            examples=eval_task.examples("test", 8, cfg.seed) if eval_task is not None else data,
            max_new_tokens=cfg.max_new_tokens,
        )
    )
    if test and run.evals and run.cadence.finishes and run.main:
        summary["eval"] = last_evaluation(run.evals, len(test))
    summary["config"] = asdict(cfg)
    return Result(policy, run.history, summary)
