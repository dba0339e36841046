"""PPO with a learned critic (Schulman et al. 2017; the RLHF form of Ouyang et al. 2022).

Per response o of a prompt: the verifier's (or reward model's) score r arrives at the last token, and
every token pays a KL penalty to the reference:
    r_t = -beta (logp_t - ref_logp_t) + [t = last] r
    A, R = GAE(r, V; gamma, lam), advantages whitened over the batch
    loss = clipped surrogate (token mean) + vf_coef * clipped value loss
The critic is a value head on the policy's last hidden state (critic=head, shared trunk) or a separate
copy of the starting model with its own head (critic=separate).

    mirl ppo --model runs/sft/final --task arith --time-budget-s 240
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .. import distributed as dist
from ..advantages import gae, whiten
from ..checkpoint import load_checkpoint, save_checkpoint
from ..data.collate import batch_indices
from ..logging import MetricLogger
from ..logps import entropy_from_logits, response_logps, token_logps
from ..losses.policy import clipped_policy_loss, clipped_value_loss, kl_estimate
from ..models.heads import ScalarHead
from ..models.vision import select_images
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
    reward: str = "task"  # reward spec: verifiers ("task", "accuracy", ...) or "rm:<folder>"
    reward_timeout_s: float = 10.0  # reward calls running longer are cut off and counted
    critic: str = "head"  # head (value head on the policy) or separate (own copy of the model)
    samples_per_prompt: int = 4  # responses per prompt
    prompts_per_step: int = 32  # prompts per rollout
    steps: int = 200  # rollouts
    time_budget_s: float = 0.0  # stop after this many seconds (0 = no limit)
    ppo_epochs: int = 2  # passes over each rollout
    minibatches: int = 2  # optimizer steps per pass
    clip_eps: float = 0.2  # policy clip range
    value_clip: float = 0.2  # value clip range
    vf_coef: float = 0.5  # value loss weight
    beta: float = 0.02  # per-token KL penalty coefficient (0 = none, no reference model)
    kl_estimator: str = "k1"  # estimator of the per-token KL in the reward
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    temperature: float = 1.0  # sampling temperature
    max_new_tokens: int = 40  # response length limit
    max_len: int = 128  # context of new tiny models
    lr: float = 5e-5  # learning rate (policy and critic)
    warmup_steps: int = 0  # warmup (optimizer steps)
    min_lr_ratio: float = 1.0  # cosine floor (1 = constant)
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    max_grad_norm: float = 1.0  # gradient clipping
    seed: int = 0  # seed
    threads: int = 2  # torch CPU threads
    out_dir: str = "runs/ppo"  # run folder
    save_every: int = 0  # checkpoint every N rollouts
    resume: bool = False  # continue from out_dir/checkpoint
    stop_at_step: int = 0  # end after this step as if interrupted
    eval_n: int = 200  # held-out prompts evaluated before and after
    eval_every: int = 0  # also evaluate every N steps
    row_seeded_sampling: bool = False  # sampling noise per row from (seed, step, prompt, sample): rank-layout free
    eval_every_s: float = 0.0  # also evaluate every N seconds of training (evaluations excluded; 0 = off)


class Critic(nn.Module):
    """V(s_t) for every position: a head on the policy's hidden states, or on a separate backbone."""

    def __init__(self, policy, separate: bool):
        super().__init__()
        self.backbone = copy.deepcopy(policy) if separate else None
        self.head = ScalarHead(policy.hidden_size)

    def forward(self, hidden_from_policy, ids, attn, images=None):
        if self.backbone is None:
            return self.head(hidden_from_policy)
        _, h = self.backbone(ids, attn, images=images, return_hidden=True)
        return self.head(h)


def _forward(policy, critic, ids, attn, n_resp, temperature, images=None, bf16: bool = False):
    """Response log-probs, entropies and values: (B, R) each. V at token t is read at the position that
    predicts it (the state before the token). bf16: forward under bf16 autocast, log-softmax and values
    in float32."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits, hidden = policy(ids, attn, images=images, return_hidden=True)
        values = critic(hidden, ids, attn, images)[:, -n_resp - 1 : -1]
    logits, values = logits[:, -n_resp - 1 : -1].float(), values.float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    lp = token_logps(logits, ids[:, -n_resp:])
    return lp, entropy_from_logits(logits), values


def train(cfg: Config, model=None, data: list[dict] | None = None) -> Result:
    # ---- setup -------------------------------------------------------------------------------------
    if cfg.critic not in ("head", "separate"):
        raise ValueError(f"critic must be 'head' or 'separate', got {cfg.critic!r}")
    policy, task, data, reward_set, test = online_setup(cfg, model, data, "ppo")
    tok = policy.tokenizer
    world, main = dist.world_size(), dist.is_main()
    seeded = cfg.row_seeded_sampling or world > 1
    ref_model = frozen_reference(policy) if cfg.beta > 0 else None
    critic = Critic(policy, cfg.critic == "separate")
    both = nn.ModuleDict({"policy": policy, "critic": critic})
    optimizer = make_optimizer(both, cfg.lr, cfg.weight_decay)
    gen = torch.Generator(device=policy.device).manual_seed(cfg.seed)
    start, evals = 0, []
    if cfg.resume:
        state = load_checkpoint(cfg.out_dir, policy, optimizer)
        critic.load_state_dict(load_file(str(Path(cfg.out_dir) / "checkpoint" / "critic.safetensors")))
        start, evals = state["step"], state.get("evals", [])
        gen.set_state(torch.tensor(state["gen_rng"], dtype=torch.uint8))
    if main and test and not cfg.resume:
        held_out_accuracy(policy, task, test, cfg, evals, 0, "before PPO")
    if cfg.fsdp and world > 1:  # FSDP2 after the evaluation before training (rank 0 alone runs that one)
        dist.wrap(policy, fsdp=True)
        optimizer = make_optimizer(both, cfg.lr, cfg.weight_decay)
    lr_cfg = copy.copy(cfg)
    lr_cfg.steps = cfg.steps * cfg.ppo_epochs * cfg.minibatches
    log = (
        MetricLogger(
            cfg.out_dir, cfg.steps, desc="ppo", resume=cfg.resume, start_step=start, show=("reward/mean", "kl")
        )
        if main
        else None
    )
    history, t_train, n_samples = [], time.perf_counter(), 0

    # ---- training loop -----------------------------------------------------------------------------
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        idx = batch_indices(len(data), cfg.prompts_per_step, step, cfg.seed)
        mine = dist.shard(list(range(len(idx))))  # this rank's positions in the global batch
        seeds = row_seeds(cfg.seed, step, mine, cfg.samples_per_prompt) if seeded else None
        sb = rollout_and_score(
            policy,
            [data[idx[i]] for i in mine],
            reward_set,
            group_size=cfg.samples_per_prompt,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            generator=gen,
            seeds=seeds,
        )
        n_samples += len(sb.batch.texts)
        ids, attn, resp, _, truncated, images = pack_rows(
            [(sb.batch, i) for i in range(len(sb.batch.texts))], tok.pad_token_id
        )
        everything = torch.arange(len(ids))
        n_resp = resp.shape[1]
        # an unscorable (NaN) response is no outcome: left out of the update (policy and value losses), counted
        scored = ~torch.isnan(sb.rewards)  # (B,)
        score = torch.nan_to_num(sb.rewards, nan=0.0).float()  # (B,)
        loss_mask = resp * scored.unsqueeze(1).to(resp.dtype)
        # -- old log-probs, values, reference, per-token rewards, GAE (no gradient)
        with torch.no_grad():
            old_lp, _, old_values = _forward(
                policy, critic, ids, attn, n_resp, cfg.temperature, select_images(images, everything), bf16=cfg.bf16
            )
            kl = torch.zeros_like(old_lp)
            if ref_model is not None:
                ref_lp, _ = response_logps(
                    ref_model,
                    ids,
                    attn,
                    n_resp,
                    cfg.temperature,
                    bf16=cfg.bf16,
                    images=select_images(images, everything),
                )
                kl = kl_estimate(old_lp, ref_lp, cfg.kl_estimator) * resp
            token_rewards = -cfg.beta * kl
            last = (resp.sum(1) - 1).clamp(min=0)
            token_rewards[torch.arange(len(last)), last] += score
            adv, returns = gae(token_rewards, old_values, resp, cfg.gamma, cfg.lam)
            adv = whiten(adv, loss_mask)
        # -- PPO epochs
        t_up = time.perf_counter()
        stats: dict[str, float] = {}
        n_opt = cfg.ppo_epochs * cfg.minibatches
        for ep in range(cfg.ppo_epochs):
            # minibatches of one permutation of the global batch (the same under torchrun as in one process)
            for j, mb in enumerate(dist.minibatches(len(ids), cfg.minibatches, cfg.seed + 7919 * step + ep)):
                # torchrun: this rank's part of a minibatch may be empty; it still runs a forward and a backward
                # (on one row, weight 0) so that FSDP2's and the loss's collectives meet the other ranks'
                fwd = mb if len(mb) else torch.arange(1)
                lp, ent, values = _forward(
                    policy,
                    critic,
                    ids[fwd],
                    attn[fwd],
                    n_resp,
                    cfg.temperature,
                    select_images(images, fwd),
                    bf16=cfg.bf16,
                )
                anchor = (lp.sum() + values.sum()) * 0.0
                lp, ent, values = lp[: len(mb)], ent[: len(mb)], values[: len(mb)]
                pg_loss, m = clipped_policy_loss(
                    lp, old_lp[mb], adv[mb], loss_mask[mb], clip_eps=cfg.clip_eps, loss_agg="bnpo"
                )
                v_loss = clipped_value_loss(
                    values, old_values[mb], returns[mb], loss_mask[mb], clip_range=cfg.value_clip
                )
                loss = pg_loss + cfg.vf_coef * v_loss
                (loss + anchor).backward()
                grad_norm, lr = optimizer_step(
                    both, optimizer, (step * cfg.ppo_epochs + ep) * cfg.minibatches + j, lr_cfg, sync_grads=True
                )
                mask = loss_mask[mb].float()
                upd = {
                    "loss": dist.all_sum(loss.item()) / world,
                    "policy_loss": pg_loss.item(),
                    "value_loss": v_loss.item(),
                    "grad_norm": grad_norm,
                    "entropy": float((ent * mask).sum() / mask.sum().clamp(min=1)),
                    **{k: float(v) for k, v in m.items()},
                }
                for k, v in upd.items():
                    stats[k] = stats.get(k, 0.0) + v / n_opt
        dt = time.perf_counter() - t0
        rmask = resp.float()
        row = {
            **sb.metrics,
            **stats,
            "lr": lr,
            "kl": float((kl * rmask).sum() / rmask.sum().clamp(min=1)),
            "values/mean": float((old_values * rmask).sum() / rmask.sum()),
            "completions/mean_length": float(rmask.sum(1).mean()),
            "completions/truncated_frac": float(truncated.float().mean()),
            "tokens_per_s": float(attn.sum()) / dt,
            "time/generation_s": sb.gen_s,
            "time/scoring_s": sb.score_s,
            "time/update_s": time.perf_counter() - t_up,
        }
        row.update({k: dist.all_mean(v) for k, v in sb.metrics.items()})  # reward statistics over all ranks
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
                cfg.out_dir,
                policy,
                optimizer,
                step + 1,
                {"gen_rng": gen.get_state().tolist(), "evals": evals},
                write_extra=lambda d: save_file(_contiguous(critic.state_dict()), str(d / "critic.safetensors")),
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
        "reward_faults": reward_set.faults,
    }
    if main and not (cfg.stop_at_step and cfg.stop_at_step < cfg.steps):
        save_final(policy, cfg, Path(cfg.out_dir) / "final")
        save_file(_contiguous(critic.state_dict()), str(Path(cfg.out_dir) / "final" / "critic.safetensors"))
        if test:
            held_out_accuracy(policy, task, test, cfg, evals, summary["steps"], "after PPO", t_train, n_samples)
    summary["evals"] = evals
    if main:
        finish_run(cfg, policy, task, test or data)
    dist.barrier()
    summary["config"] = asdict(cfg)
    return Result(policy, history, summary)


def _contiguous(sd):
    """Tensors for safetensors: contiguous, and shared ones (tied embeddings) cloned."""
    seen, out = set(), {}
    for k, v in sd.items():
        out[k] = v.detach().clone().contiguous() if v.data_ptr() in seen else v.detach().contiguous()
        seen.add(v.data_ptr())
    return out
