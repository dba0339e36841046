"""Online contrastive fine-tuning, where the two seeds meet (docs/algorithms.md §3): sample K responses per prompt
from the current policy, verify them, and train with a preference loss on what was sampled.

    pair losses (mio, dpo, ...):  (correct, incorrect) pairs drawn from each group
    group losses (group_js, ...): the whole group; positives = responses with reward >= positive_threshold
The reference is the starting policy (a frozen copy). Prompts whose K samples all agree carry no
contrast: they are skipped and counted (groups/all_correct, groups/all_wrong).

    mirl online --model runs/sft/final --task arith --loss mio --time-budget-s 240
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import distributed as dist
from ..checkpoint import load_checkpoint, save_checkpoint
from ..data.collate import batch_indices
from ..logging import MetricLogger, console
from ..logps import response_logps
from ..losses import get_loss, mean_over_examples, parse_loss_spec, preference_loss
from ..models.vision import cat_images
from ..optim import make_optimizer
from ..rollout.sample import row_seeds
from ..rollout.score import pack_rows, rollout_and_score
from .common import (
    ModelArgs,
    Result,
    checkpoint_due,
    eval_due,
    finish_run,
    frozen_reference,
    gathered_policy,
    halt_if_signalled,
    held_out_accuracy,
    online_setup,
    optimizer_step,
    out_of_time,
    save_final,
    stop_signal,
)


@dataclass
class Config(ModelArgs):
    model: str = "gpt-nano"  # preset or saved model folder (usually an SFT checkpoint)
    task: str = "arith"  # task for prompts, the 'task' reward and held-out evaluation
    data: str = ""  # prompt dataset with 'prompt' and reward columns (overrides task prompts)
    split: str = "train"  # the split to read when --data is a datasets folder with several
    n_prompts: int = 5000  # training prompts generated from the task
    reward: str = "task"  # reward spec, as in grpo
    reward_timeout_s: float = 10.0  # reward calls running longer are cut off and counted
    positive_threshold: float = 1.0  # a response is a positive when its reward is at least this
    loss: str = "mio"  # pair loss (mio, dpo, ... or a weighted mix) or a group loss (group_js, group_dv, ...)
    beta: float = 0.1  # critic temperature
    neg_mix: float = 0.5  # weight of the chosen response in the negative mixture (mio, dv, js, nwj)
    label_smoothing: float = 0.1  # robust DPO flip rate
    k: int = 8  # samples per prompt
    pairs_per_prompt: int = 2  # (correct, incorrect) pairs drawn per prompt for pair losses
    prompts_per_step: int = 16  # prompts per step
    steps: int = 200  # steps (one generation batch and one optimizer step each)
    time_budget_s: float = 0.0  # stop after this many seconds of training (0 = no limit)
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus sampling
    max_new_tokens: int = 40  # response length limit
    max_len: int = 128  # model context for new tiny models
    lr: float = 2e-5  # learning rate
    warmup_steps: int = 0  # linear warmup
    min_lr_ratio: float = 1.0  # cosine floor (1 = constant)
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    max_grad_norm: float = 1.0  # gradient clipping
    seed: int = 0  # seed
    threads: int = 2  # torch CPU threads
    out_dir: str = "runs/online"  # run folder
    save_every: int = 0  # checkpoint every N steps (0 = only at the end)
    resume: bool = False  # continue from out_dir/checkpoint
    stop_at_step: int = 0  # end after this step as if interrupted
    eval_n: int = 200  # held-out prompts evaluated before and after (0 = skip)
    eval_every: int = 0  # also evaluate every N steps
    row_seeded_sampling: bool = False  # sampling noise per row from (seed, step, prompt, sample): rank-layout free
    eval_every_s: float = 0.0  # also evaluate every N seconds of training (evaluations excluded; 0 = off)


def seq_logps(policy, ids, attn, resp, images=None, bf16: bool = False):
    lp, _ = response_logps(policy, ids, attn, resp.shape[1], 1.0, images=cat_images(images or []), bf16=bf16)
    return (lp * resp).sum(-1)


def train(cfg: Config, model=None, data: list[dict] | None = None) -> Result:
    # ---- setup -------------------------------------------------------------------------------------
    terms = parse_loss_spec(cfg.loss)
    group = get_loss(terms[0][0]).kind == "group"
    if cfg.k < 2:
        raise ValueError(f"k must be at least 2 to contrast samples, got {cfg.k}")
    policy, task, data, reward_set, test = online_setup(cfg, model, data, "online")
    tok = policy.tokenizer
    world, main = dist.world_size(), dist.is_main()
    seeded = cfg.row_seeded_sampling or world > 1
    ref_model = frozen_reference(policy)
    optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay)
    gen = torch.Generator(device=policy.device).manual_seed(cfg.seed)
    options = {"neg_mix": cfg.neg_mix, "label_smoothing": cfg.label_smoothing}
    start, evals = 0, []
    if cfg.resume:
        state = load_checkpoint(cfg.out_dir, policy, optimizer)
        start, evals = state["step"], state.get("evals", [])
        gen.set_state(torch.tensor(state["gen_rng"], dtype=torch.uint8))
    if main and test and not cfg.resume:
        held_out_accuracy(policy, task, test, cfg, evals, 0, f"before online {cfg.loss}")
    if cfg.fsdp and world > 1:  # FSDP2 after the evaluation before training (rank 0 alone runs that one)
        dist.wrap(policy, fsdp=True)
        optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay)
    log = (
        MetricLogger(
            cfg.out_dir,
            cfg.steps,
            desc=f"online {cfg.loss}",
            resume=cfg.resume,
            start_step=start,
            show=("reward/mean",),
        )
        if main
        else None
    )
    history, t_train, n_samples = [], time.perf_counter(), 0
    counts = {"all_correct": 0, "all_wrong": 0, "used": 0, "unscorable": 0}

    # ---- training loop -----------------------------------------------------------------------------
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        idx = batch_indices(len(data), cfg.prompts_per_step, step, cfg.seed)
        mine = dist.shard(list(range(len(idx))))  # this rank's positions in the global batch
        sb = rollout_and_score(
            policy,
            [data[idx[i]] for i in mine],
            reward_set,
            group_size=cfg.k,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            generator=gen,
            seeds=row_seeds(cfg.seed, step, mine, cfg.k) if seeded else None,
        )
        n_samples += len(sb.batch.texts)
        # an unscorable (NaN) response is no outcome: neither a positive nor a negative, left out of its group
        scored = ~torch.isnan(sb.rewards).view(-1, cfg.k)  # (P, K)
        positive = (torch.nan_to_num(sb.rewards, nan=0.0) >= cfg.positive_threshold).view(-1, cfg.k) & scored
        negative = scored & ~positive
        n_pos, n_neg = positive.sum(1), negative.sum(1)
        all_correct = int(((n_pos > 0) & (n_neg == 0)).sum())
        all_wrong = int(((n_pos == 0) & (n_neg > 0)).sum())
        counts["all_correct"] += all_correct
        counts["all_wrong"] += all_wrong
        counts["unscorable"] += int((~scored).sum())
        usable = [p for p in range(positive.shape[0]) if int(n_pos[p]) > 0 and int(n_neg[p]) > 0]
        counts["used"] += len(usable)
        row = {
            **{k: dist.all_mean(v) for k, v in sb.metrics.items()},
            "groups/all_correct": all_correct,
            "groups/all_wrong": all_wrong,
            "groups/used": len(usable),
            "time/generation_s": sb.gen_s,
            "time/scoring_s": sb.score_s,
        }
        # every rank takes the step when any rank has a usable group (a rank without one adds zero gradient)
        n_examples = dist.all_sum(len(usable) * (1 if group else cfg.pairs_per_prompt))
        if n_examples:
            if group:  # whole groups: (U, K) sequence log-probs
                rows = [(sb.batch, p * cfg.k + j) for p in usable for j in range(cfg.k)]
                ids, attn, resp, _, _, images = pack_rows(rows, tok.pad_token_id)
                lp = seq_logps(policy, ids, attn, resp, images, cfg.bf16).view(len(usable), cfg.k)
                with torch.no_grad():
                    ref = seq_logps(ref_model, ids, attn, resp, images, cfg.bf16).view(len(usable), cfg.k)
                per_ex, metrics = preference_loss(
                    terms, lp, ref, positive[usable], beta=cfg.beta, options=options, mask=scored[usable]
                )
            else:  # (correct, incorrect) pairs drawn from each usable group; one forward for both sides
                pairs = []
                for p in usable:
                    good = [p * cfg.k + j for j in range(cfg.k) if positive[p, j]]
                    bad = [p * cfg.k + j for j in range(cfg.k) if negative[p, j]]
                    rng = random.Random(f"{cfg.seed}/{step}/{mine[p]}")  # per prompt: the same on any rank layout
                    pairs += [(rng.choice(good), rng.choice(bad)) for _ in range(cfg.pairs_per_prompt)]
                rows = [(sb.batch, c) for c, _ in pairs] + [(sb.batch, r) for _, r in pairs]
                ids, attn, resp, _, _, images = pack_rows(rows, tok.pad_token_id)
                lp = seq_logps(policy, ids, attn, resp, images, cfg.bf16)
                with torch.no_grad():
                    ref = seq_logps(ref_model, ids, attn, resp, images, cfg.bf16)
                n = len(pairs)
                lengths = resp.sum(1).float()
                per_ex, metrics = preference_loss(
                    terms,
                    torch.stack([lp[:n], lp[n:]], 1),
                    torch.stack([ref[:n], ref[n:]], 1),
                    torch.tensor([[True, False]]).expand(n, 2),
                    beta=cfg.beta,
                    options=options,
                    lengths=torch.stack([lengths[:n], lengths[n:]], 1),
                )
                metrics = {**metrics, "logps/chosen": lp[:n].detach(), "logps/rejected": lp[n:].detach()}
            loss = mean_over_examples(per_ex, global_count=n_examples) if usable else None
            if loss is not None:
                loss.backward()
            elif cfg.fsdp and world > 1:  # FSDP2 reduces gradients inside the backward: every rank takes one
                dummy = pack_rows([(sb.batch, 0)], tok.pad_token_id)
                (seq_logps(policy, *dummy[:3], dummy[5], cfg.bf16).sum() * 0.0).backward()
            grad_norm, lr = optimizer_step(policy, optimizer, step, cfg, sync_grads=True)
            if loss is None:  # this rank had nothing usable: its zero gradient went into the average
                loss, metrics, attn = torch.zeros(()), {}, torch.zeros(0)
            # each rank's loss carries world / global count: their sum over ranks / world is the global mean
            row.update(
                {
                    "loss": dist.all_sum(loss.item()) / world,
                    "grad_norm": grad_norm,
                    "lr": lr,
                    **{k: float(v.float().mean()) for k, v in metrics.items()},
                    "tokens_per_s": float(attn.sum()) / (time.perf_counter() - t0),
                }
            )
        if main and test and eval_due(cfg, step + 1, t_train, evals):
            row["eval/accuracy"] = held_out_accuracy(
                policy, task, test, cfg, evals, step + 1, f"at step {step + 1}", t_train, n_samples
            )
        row["time/step_s"] = time.perf_counter() - t0
        history.append({"step": step + 1, **row})
        halt = stop_signal()  # SIGINT / SIGTERM: save this step, then stop
        stop = halt is not None or dist.all_sum(float(out_of_time(cfg, t_train, evals))) > 0  # all ranks alike
        if main:
            log.log(step + 1, row)
        if main and checkpoint_due(cfg, step + 1, stop):
            save_checkpoint(
                cfg.out_dir, policy, optimizer, step + 1, {"gen_rng": gen.get_state().tolist(), "evals": evals}
            )
        halt_if_signalled(cfg, step + 1, halt)
        if (cfg.stop_at_step and step + 1 >= cfg.stop_at_step) or stop:
            break
    if main:
        log.close()

    # ---- evaluate and save -------------------------------------------------------------------------
    policy = gathered_policy(policy, cfg)  # FSDP2: the full weights on rank 0 (every rank takes part)
    summary = {
        "steps": start + len(history),
        "train_seconds": time.perf_counter() - t_train,
        "groups": counts,
        "reward_faults": reward_set.faults,
    }
    console.print(
        f"groups skipped: {counts['all_correct']} all correct, {counts['all_wrong']} all wrong; {counts['used']} used"
    )
    if main and not (cfg.stop_at_step and cfg.stop_at_step < cfg.steps):
        save_final(policy, cfg, Path(cfg.out_dir) / "final")
        if test:
            held_out_accuracy(
                policy, task, test, cfg, evals, summary["steps"], f"after online {cfg.loss}", t_train, n_samples
            )
    summary["evals"] = evals
    if main:
        finish_run(cfg, policy, task, test or data)
    dist.barrier()
    summary["config"] = asdict(cfg)
    return Result(policy, history, summary)
