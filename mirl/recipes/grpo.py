"""GRPO and its variants: sample a group of G responses per prompt, score them with verifiable rewards,
normalise rewards within the group, and take clipped policy-gradient steps (Shao et al. 2024).

    A_i = (r_i - mean(r)) / (std(r) + eps)         scale_rewards=group (batch | none = Dr. GRPO)
    loss = clipped surrogate + beta * KL_k3         losses/policy.py, aggregation by loss_agg
Switches: Dr. GRPO (--loss-agg dr_grpo --scale-rewards none), DAPO (--clip-eps-high 0.28 --loss-agg dapo
--dynamic-sampling --reward task,overlong), GSPO (--importance sequence), RLOO (--advantage rloo), a KL
schedule (--beta 0.04 --kl-schedule linear --beta-final 0), several passes per batch (--num-iterations),
--mask-truncated, NoisyRollout for image prompts (--noisy-rollout 0.5 --noise-strength 0.5: half of each group
sampled on perturbed images, the update on the clean ones, strength annealed linearly to 0 over
--noise-anneal-steps). With beta = 0 no reference model is kept in memory.
Departures from the papers: the "old" log-probs of the first pass are the current ones (ratio 1), as in
TRL; with several passes or minibatches they are recomputed once per batch by a forward without gradient
at temperature T (not the sampler's top-k/top-p-filtered record), so at lr 0 every ratio is 1.

    mirl grpo --model runs/sft/final --task arith --time-budget-s 240
    mirl grpo --model runs/sft/final --task rg:basic_arithmetic --reward task
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import distributed as dist
from ..advantages import group_advantages, nanstd_over_ranks, rloo
from ..checkpoint import load_checkpoint, save_checkpoint
from ..data.collate import batch_indices
from ..logging import MetricLogger, console
from ..logps import response_logps
from ..losses.policy import clipped_policy_loss
from ..models.vision import NOISE_KINDS, select_images
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
    data: str = ""  # prompt dataset (.jsonl/.parquet/folder) with 'prompt' and reward columns; overrides task prompts
    split: str = "train"  # the split to read when --data is a datasets folder with several
    n_prompts: int = 5000  # training prompts generated from the task
    reward: str = "task"  # reward spec: names with weights, e.g. "task:1,format:0.1", "accuracy", "rm:<folder>"
    reward_timeout_s: float = 10.0  # a reward call running longer is cut off, counted and reported
    group_size: int = 8  # G responses per prompt
    prompts_per_step: int = 16  # prompts per generation batch
    steps: int = 200  # generation batches (optimizer steps = steps * num_iterations * minibatches)
    time_budget_s: float = 0.0  # stop after this many seconds of training (0 = no limit)
    advantage: str = "group"  # group (GRPO) or rloo
    scale_rewards: str = "group"  # group | batch | none (Dr. GRPO)
    loss_agg: str = "grpo"  # grpo | bnpo | dapo | dr_grpo
    importance: str = "token"  # token (GRPO) or sequence (GSPO)
    clip_eps: float = 0.2  # lower clip range (and upper, unless clip_eps_high is set)
    clip_eps_high: float = 0.0  # upper clip range for clip-higher (DAPO 0.28); 0 = clip_eps
    beta: float = 0.0  # KL coefficient (0 = no reference model in memory)
    kl_estimator: str = "k3"  # k1 | k2 | k3
    kl_schedule: str = "constant"  # constant | linear | cosine, from beta to beta_final over the run
    beta_final: float = 0.0  # KL coefficient at the end of a schedule
    num_iterations: int = 1  # optimisation passes over each generation batch
    minibatches: int = 1  # optimizer steps per pass (the batch split into this many parts)
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal and refill (DAPO)
    max_refills: int = 4  # dynamic sampling: extra generation rounds per step at most
    mask_truncated: bool = False  # no loss on responses that hit max_new_tokens
    temperature: float = 1.0  # sampling temperature (log-probs in the update use the same)
    top_p: float = 1.0  # nucleus sampling
    top_k: int = 0  # top-k sampling (0 = off)
    max_new_tokens: int = 40  # response length limit
    ignore_eos: bool = False  # always generate max_new_tokens (benchmarks)
    noisy_rollout: float = 0.0  # NoisyRollout: fraction of each group sampled on perturbed images (0 = off)
    noise_strength: float = 0.5  # initial perturbation strength (crop 1 - s/4 of each side, pixel noise s * 64)
    noise_anneal_steps: int = 0  # strength falls linearly to 0 over this many steps (0 = over all steps)
    row_seeded_sampling: bool = False  # each row's sampling noise from (seed, step, prompt, sample): the same
    # samples whatever the rank layout (always on under torchrun)
    noise_kinds: str = "crop,noise"  # perturbations: crop and/or noise (grounding: noise; a crop moves the box)
    max_len: int = 128  # model context for new tiny models
    lr: float = 5e-5  # learning rate (constant after warmup unless min_lr_ratio < 1)
    warmup_steps: int = 0  # linear warmup (optimizer steps)
    min_lr_ratio: float = 1.0  # cosine decay floor; 1.0 = constant
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    seed: int = 0  # seed
    threads: int = 2  # torch CPU threads
    out_dir: str = "runs/grpo"  # run folder
    save_every: int = 0  # checkpoint every N steps (0 = only at the end)
    resume: bool = False  # continue from out_dir/checkpoint
    stop_at_step: int = 0  # end the run after this step as if interrupted (0 = run to the end)
    eval_n: int = 200  # held-out prompts evaluated (greedy) before and after training (0 = skip)
    eval_every: int = 0  # also evaluate every N steps (0 = only before and after)
    eval_every_s: float = 0.0  # also evaluate every N seconds of training (evaluations excluded; 0 = off)


def kl_coef(cfg: Config, step: int) -> float:
    if cfg.kl_schedule == "constant":
        return cfg.beta
    frac = min(1.0, step / max(1, cfg.steps - 1))
    if cfg.kl_schedule == "linear":
        return cfg.beta + (cfg.beta_final - cfg.beta) * frac
    if cfg.kl_schedule == "cosine":
        return cfg.beta_final + (cfg.beta - cfg.beta_final) * 0.5 * (1 + math.cos(math.pi * frac))
    raise ValueError(f"kl_schedule must be constant, linear or cosine, got {cfg.kl_schedule!r}")


def noise_strength(cfg: Config, step: int) -> float:
    """NoisyRollout's perturbation strength at `step`: linear annealing from noise_strength to 0."""
    horizon = cfg.noise_anneal_steps or cfg.steps
    return cfg.noise_strength * max(0.0, 1.0 - step / max(1, horizon))


def groups_with_signal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(P,) bool: groups whose scorable (non-NaN) rewards are not all equal; NaN is no outcome, so a group
    [nan, 1, 1, 1] has no signal, nor has a group with fewer than two scorable rewards."""
    r = rewards.view(-1, group_size)
    ok = ~torch.isnan(r)
    hi = torch.where(ok, r, float("-inf")).max(1).values
    lo = torch.where(ok, r, float("inf")).min(1).values
    return (ok.sum(1) >= 2) & ((hi - lo) > 1e-9)


def train(cfg: Config, model=None, data: list[dict] | None = None) -> Result:
    """data: optional prompt records [{'prompt', ...reward columns}]; model: optional Policy."""
    # ---- setup -------------------------------------------------------------------------------------
    if cfg.group_size < 2:
        raise ValueError(f"group_size must be at least 2 (a group of 1 has no baseline), got {cfg.group_size}")
    kl_coef(cfg, 0)
    policy, task, data, reward_set, test = online_setup(cfg, model, data, "grpo")
    tok = policy.tokenizer
    world, main = dist.world_size(), dist.is_main()
    if world > 1 and cfg.dynamic_sampling:
        raise ValueError("--dynamic-sampling under torchrun is not supported yet (ranks would refill unevenly)")
    seeded = cfg.row_seeded_sampling or world > 1
    ref_model = None
    if cfg.beta > 0 or cfg.beta_final > 0:
        ref_model = frozen_reference(policy)
    optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay)
    gen = torch.Generator(device=policy.device).manual_seed(cfg.seed)
    noise_rng = random.Random(cfg.seed)
    n_noisy = round(cfg.noisy_rollout * cfg.group_size)
    kinds = tuple(k.strip() for k in cfg.noise_kinds.split(",") if k.strip())
    if any(k not in NOISE_KINDS for k in kinds):
        raise ValueError(f"--noise-kinds {cfg.noise_kinds!r}: each must be one of {', '.join(NOISE_KINDS)}")
    if cfg.noisy_rollout and not policy.is_vlm:
        raise ValueError("--noisy-rollout perturbs images: it needs an image+text model and image prompts")
    start, evals = 0, []
    if cfg.resume:
        state = load_checkpoint(cfg.out_dir, policy, optimizer)
        start, evals = state["step"], state.get("evals", [])
        gen.set_state(torch.tensor(state["gen_rng"], dtype=torch.uint8))
        console.print(f"resumed from {cfg.out_dir}/checkpoint at step {start}")
    if main and test and not cfg.resume:
        held_out_accuracy(policy, task, test, cfg, evals, 0, "before GRPO")
    if cfg.fsdp and world > 1:  # FSDP2 after the evaluation before training (rank 0 alone runs that one)
        dist.wrap(policy, fsdp=True)
        optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay)
    opt_steps_per_step = cfg.num_iterations * cfg.minibatches
    lr_cfg = copy.copy(cfg)
    lr_cfg.steps = cfg.steps * opt_steps_per_step
    log = (
        MetricLogger(
            cfg.out_dir, cfg.steps, desc="grpo", resume=cfg.resume, start_step=start, show=("reward/mean", "kl")
        )
        if main
        else None
    )
    history, t_train, n_samples = [], time.perf_counter(), 0
    skipped = {"zero_signal_groups": 0, "refill_rounds": 0}

    # ---- training loop -----------------------------------------------------------------------------
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        # -- rollout and score (dynamic sampling: keep groups whose rewards differ, refill the rest)
        kept, rounds, gen_s, score_s, zero_groups, metrics = [], 0, 0.0, 0.0, 0, {}
        while True:
            round_id = step * (cfg.max_refills + 1) + rounds
            idx = batch_indices(len(data), cfg.prompts_per_step, round_id, cfg.seed)
            mine = dist.shard(list(range(len(idx))))  # this rank's positions in the global batch
            seeds = row_seeds(cfg.seed, round_id, mine, cfg.group_size) if seeded else None
            noisy = (n_noisy, noise_strength(cfg, step), noise_rng, kinds) if n_noisy else None
            sb = rollout_and_score(
                policy,
                [data[idx[i]] for i in mine],
                reward_set,
                group_size=cfg.group_size,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                top_k=cfg.top_k,
                generator=gen,
                ignore_eos=cfg.ignore_eos,
                noisy=noisy,
                seeds=seeds,
            )
            gen_s, score_s = gen_s + sb.gen_s, score_s + sb.score_s
            n_samples += len(sb.batch.texts)
            metrics = metrics or sb.metrics
            signal = groups_with_signal(sb.rewards, cfg.group_size)  # (P,)
            zero_groups += int((~signal).sum())
            kept.append((sb, signal))
            n_kept = sum(int(s.sum()) for _, s in kept) * world
            if not cfg.dynamic_sampling or n_kept >= cfg.prompts_per_step or rounds >= cfg.max_refills:
                break
            rounds += 1
        skipped["zero_signal_groups"] += zero_groups
        skipped["refill_rounds"] += rounds
        # -- advantages, per generation round (groups never mix across rounds)
        parts = []
        for sb, signal in kept:
            batch_std = nanstd_over_ranks(sb.rewards) if cfg.scale_rewards == "batch" else None
            adv = (
                group_advantages(sb.rewards, cfg.group_size, cfg.scale_rewards, batch_std=batch_std)
                if cfg.advantage == "group"
                else rloo(sb.rewards, cfg.group_size)
            )
            keep_rows = signal.repeat_interleave(cfg.group_size)
            parts.append((sb, adv.float(), keep_rows if cfg.dynamic_sampling else torch.ones_like(keep_rows)))
        rows = [(sb.batch, i, adv[i]) for sb, adv, keep in parts for i in torch.nonzero(keep).flatten().tolist()]
        if not rows:  # nothing to learn from in this step (all groups had equal rewards): counted, logged
            row = {**metrics, "skipped_step": 1.0}
            history.append({"step": step + 1, **row})
            if main:
                log.log(step + 1, row)
            if out_of_time(cfg, t_train, evals):
                if main and checkpoint_due(cfg, step + 1, stopping=True):
                    save_checkpoint(
                        cfg.out_dir, policy, optimizer, step + 1, {"gen_rng": gen.get_state().tolist(), "evals": evals}
                    )
                break
            continue
        ids, attn, resp_mask, old_lp, truncated, images = pack_rows([(b, i) for b, i, _ in rows], tok.pad_token_id)
        adv = torch.stack([a for _, _, a in rows])
        n_resp = resp_mask.shape[1]
        loss_mask = resp_mask * (~truncated).unsqueeze(1) if cfg.mask_truncated else resp_mask
        beta = kl_coef(cfg, step)
        ref_lp = None
        if ref_model is not None and beta > 0:
            with torch.no_grad():
                ref_lp, _ = response_logps(
                    ref_model,
                    ids,
                    attn,
                    n_resp,
                    cfg.temperature,
                    bf16=cfg.bf16,
                    images=select_images(images, torch.arange(len(rows))),
                )
        if cfg.num_iterations > 1 or cfg.minibatches > 1:
            # "old" log-probs for later passes are recomputed as the update computes them (softmax(logits / T),
            # one full forward), as TRL and veRL do: the sampler's record is of the top-k/top-p-renormalised
            # distribution, of perturbed pixels for noisy rows, of the cached decoding arithmetic (and not under
            # bf16 autocast); any of these would make the ratio differ from 1 at an unchanged policy
            with torch.no_grad():
                old_lp, _ = response_logps(
                    policy,
                    ids,
                    attn,
                    n_resp,
                    cfg.temperature,
                    bf16=cfg.bf16,
                    images=select_images(images, torch.arange(len(rows))),
                )
        # -- update: num_iterations passes x minibatches
        t_up = time.perf_counter()
        b = ids.shape[0]
        agg_global = dist.all_sum(float(loss_mask.sum())) if cfg.loss_agg == "dapo" else None
        stats: dict[str, float] = {}
        for it in range(cfg.num_iterations):
            # minibatches of one permutation of the global batch (the same under torchrun as in one process)
            for j, mb in enumerate(dist.minibatches(b, cfg.minibatches, cfg.seed + step * 131 + it)):
                # torchrun: this rank's part of a minibatch may be empty; it still runs a forward and a backward
                # (on one row, weight 0) so that FSDP2's and the loss's collectives meet the other ranks'
                fwd = mb if len(mb) else torch.arange(1)
                lp, ent = response_logps(
                    policy,
                    ids[fwd],
                    attn[fwd],
                    n_resp,
                    cfg.temperature,
                    with_entropy=True,
                    bf16=cfg.bf16,
                    images=select_images(images, fwd),
                )
                anchor = lp.sum() * 0.0
                lp, ent = lp[: len(mb)], ent[: len(mb)]
                old = lp.detach() if it == 0 and cfg.minibatches == 1 else old_lp[mb]
                g = None
                if agg_global is not None:
                    # the generation batch's global token count, shared out over the optimizer steps
                    g = agg_global * dist.all_sum(len(mb)) / (b * world)
                loss, m = clipped_policy_loss(
                    lp,
                    old,
                    adv[mb],
                    loss_mask[mb],
                    clip_eps=cfg.clip_eps,
                    clip_eps_high=cfg.clip_eps_high or None,
                    importance=cfg.importance,
                    beta=beta,
                    ref_logps=None if ref_lp is None else ref_lp[mb],
                    kl_estimator=cfg.kl_estimator,
                    loss_agg=cfg.loss_agg,
                    max_completion_length=cfg.max_new_tokens,
                    global_count=g,
                )
                (loss + anchor).backward()
                opt_step = (step * cfg.num_iterations + it) * cfg.minibatches + j
                grad_norm, lr = optimizer_step(policy, optimizer, opt_step, lr_cfg, sync_grads=True)
                ent_mean = float((ent * loss_mask[mb]).sum() / loss_mask[mb].sum().clamp(min=1))
                for k, v in {
                    "loss": dist.all_sum(loss.item()) / world,
                    "grad_norm": grad_norm,
                    "entropy": ent_mean,
                    **{k: float(v) for k, v in m.items()},
                }.items():
                    stats[k] = stats.get(k, 0.0) + v / opt_steps_per_step
        up_s = time.perf_counter() - t_up
        dt = time.perf_counter() - t0
        lengths = resp_mask.sum(1).float()
        row = {
            **metrics,
            **stats,
            "lr": lr,
            "beta": beta,
            **({"noise_strength": noise_strength(cfg, step)} if n_noisy else {}),
            "advantages/mean": float(adv.mean()),
            "advantages/std": float(adv.std()),
            "advantages/max": float(adv.max()),
            "advantages/min": float(adv.min()),
            "completions/mean_length": float(lengths.mean()),
            "completions/truncated_frac": float(truncated.float().mean()),
            "groups/zero_signal_frac": zero_groups / (cfg.prompts_per_step * (rounds + 1)),
            "tokens_per_s": float(attn.sum()) / dt,
            "time/generation_s": gen_s,
            "time/scoring_s": score_s,
            "time/update_s": up_s,
            "time/step_s": dt,
        }
        row.update({k: dist.all_mean(v) for k, v in metrics.items()})  # reward statistics over all ranks
        if main and test and eval_due(cfg, step + 1, t_train, evals):
            row["eval/accuracy"] = held_out_accuracy(
                policy, task, test, cfg, evals, step + 1, f"at step {step + 1}", t_train, n_samples
            )
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

    # ---- evaluate and save (rank 0) ----------------------------------------------------------------
    policy = gathered_policy(policy, cfg)  # FSDP2: the full weights on rank 0 (every rank takes part)
    summary = {
        "steps": start + len(history),
        "train_seconds": time.perf_counter() - t_train,
        "skips": skipped,
        "reward_faults": reward_set.faults,
    }
    if main and not (cfg.stop_at_step and cfg.stop_at_step < cfg.steps):
        save_final(policy, cfg, Path(cfg.out_dir) / "final")
        if test:
            held_out_accuracy(policy, task, test, cfg, evals, summary["steps"], "after GRPO", t_train, n_samples)
    summary["evals"] = evals
    if reward_set.faults:
        console.print(f"[yellow]reward faults: {reward_set.faults}[/]")
    if main:
        finish_run(cfg, policy, task, test or data)
    dist.barrier()
    summary["config"] = asdict(cfg)
    return Result(policy, history, summary)
