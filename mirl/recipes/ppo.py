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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .. import distributed as dist
from ..advantages import last_index, masked_gae, whiten
from ..device import autocast, phase
from ..envs.task import EnvTask
from ..logging import TRACKERS
from ..logps import entropy_from_logits, response_logps, token_logps
from ..losses.coefs import KLCoef
from ..losses.policy import (
    IS_MODES,
    KL_ESTIMATORS,
    PolicyLoss,
    clipped_value_loss,
    kl_estimate,
    policy_terms,
)
from ..models.heads import ScalarHead
from ..optim import Schedule, optimizer_step
from ..options import choice, choice_list, term_option
from ..rollout.engine import ENGINES
from ..rollout.score import UpdateBatch, pack_rows
from .common import (
    build_policy,
    check_fsdp,
    frozen_reference,
    load_prompts,
    policy_loss_of,
    policy_options,
    prompt_options,
    rollout_corrector,
)
from .held_out import held_out_set
from .rl import Passes, finish_loop, sample_step, start_loop
from .run import Result, end_of_step, setup


@dataclass
class Config:
    """Options of `mirl ppo` (one line of doc each, the CLI's flags)."""

    model: str = "gpt-nano"  # preset or saved model folder (usually an SFT checkpoint)
    task: str = "arith"  # task for prompts, the 'task' reward and held-out evaluation
    chat: str = choice("auto", "yes", "no")  # built-in task through the model's chat template (auto: if it has one)
    data: str = ""  # prompt dataset with 'prompt' and reward columns (overrides task prompts)
    split: str = "train"  # the split of --data to read (a datasets folder or hub dataset with several)
    data_config: str = ""  # the configuration (subset) of a hub dataset --data
    revision: str = ""  # the hub revision (branch, tag, commit) of a hub dataset --data
    model_revision: str = ""  # the hub revision (branch, tag, commit) of a hub model --model
    n_prompts: int = 5000  # training prompts generated from the task
    reward: str = "task"  # reward spec: verifiers ("task", "accuracy", ...) or "rm:<folder>"
    env: str = ""  # multi-turn episodes in an environment: calc, guess, python, zoom, file.py:Class, module:Class
    max_turns: int = 4  # --env: model turns per episode at most (--max-new-tokens: each turn's limit)
    max_episode_tokens: int = 0  # --env: tokens after the opening, turns and replies together (0 = turns x limit)
    tool_timeout_s: float = 10.0  # --env: a tool call, reset or step running longer is a counted fault
    reward_timeout_s: float = 10.0  # reward calls running longer are cut off and counted
    critic: str = choice("head", "separate")  # head (value head on the policy) or separate (own copy of the model)
    samples_per_prompt: int = 4  # responses per prompt
    prompts_per_step: int = 32  # prompts per rollout
    steps: int = 200  # rollouts
    time_budget_s: float = 0.0  # stop after this many seconds (0 = no limit)
    ppo_epochs: int = 2  # passes over each rollout
    minibatches: int = 2  # optimizer steps per pass
    clip_eps: float = 0.2  # policy clip range
    policy_loss: str = choice("clip", among=policy_terms())  # the policy-gradient term (losses/policy.py, docs/rl.md)
    dual_clip_c: float = term_option("dual_clip", 3.0, above=1.0)  # dual_clip: the bound -c A on tokens with A < 0
    cispo_cap: float = term_option("cispo", 5.0, at_least=1.0)  # cispo: the cap on the detached importance weight
    sapo_tau_pos: float = term_option("sapo", 1.0, above=0.0)  # sapo: gate temperature for positive advantages
    sapo_tau_neg: float = term_option("sapo", 1.05, above=0.0)  # sapo: gate temperature for negative advantages
    gmpo_eps: float = term_option("gmpo", 0.4, above=0.0)  # gmpo: each token's log-ratio clipped to [-eps, eps]
    value_clip: float = 0.2  # value clip range
    vf_coef: float = 0.5  # value loss weight
    beta: float = 0.02  # per-token KL penalty coefficient (0 = none, no reference model)
    kl_target: float = 0.0  # adaptive KL controller: beta moves towards this mean per-token KL (0 = fixed beta)
    kl_horizon: float = 10000.0  # adaptive KL: samples over which beta may change by 20% (Ziegler et al.)
    kl_estimator: str = choice("k1", among=KL_ESTIMATORS)  # estimator of the per-token KL in the reward
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    temperature: float = 1.0  # sampling temperature
    engine: str = choice("local", among=ENGINES)  # what samples: mirl's own sampler or vllm (docs/speed.md)
    vllm_memory: float = 0.3  # --engine vllm: the share of GPU memory vLLM takes (on a CPU: of RAM, for its KV cache)
    is_correction: str = choice("auto", "none", "token", "sequence")  # rollout/train mismatch (auto: sequence if vllm)
    is_mode: str = choice("mask", among=IS_MODES)  # truncate: capped at --is-cap; mask: above it set to 0 (TRL's)
    is_cap: float = 3.0  # the importance weights' bound
    max_new_tokens: int = 40  # response length limit
    max_len: int = 128  # context of new tiny models
    lr: float = 5e-5  # learning rate (policy and critic)
    warmup_steps: int = 0  # linear warmup (optimizer steps)
    min_lr_ratio: float = 1.0  # cosine decay floor as a fraction of lr (1 = constant after warmup)
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    seed: int = 0  # seed of initialisation, data order and sampling
    threads: int = 2  # torch CPU threads
    out_dir: str = "runs/ppo"  # run folder: config.json, metrics.jsonl, tb/, checkpoint/, final/, report/
    save_every: int = 0  # checkpoint every N steps (0 = only at the end)
    resume: bool = False  # continue from out_dir/checkpoint
    stop_at_step: int = 0  # end the run after this step as if interrupted (0 = run to the end)
    eval_n: int = 200  # held-out prompts evaluated before and after
    eval_benchmark: str = ""  # held-out set: a benchmark (gsm8k, math500, aime24, aime25, amc23) instead of the task
    eval_every: int = 0  # also evaluate every N steps
    row_seeded_sampling: bool = False  # sampling noise per row from (seed, step, prompt, sample): rank-layout free
    eval_every_s: float = 0.0  # also evaluate every N seconds of training (evaluations excluded; 0 = off)
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
    log_completions: int = 0  # every --log-every steps, N sampled completions to samples.jsonl, report, trackers
    allow_config_change: bool = False  # with --resume: continue although options differ from the run's


class Critic(nn.Module):
    """V(s_t) for every position: a head on the policy's hidden states, or on a separate backbone."""

    def __init__(self, policy, separate: bool):
        super().__init__()
        self.backbone = copy.deepcopy(policy) if separate else None
        self.head = ScalarHead(policy.hidden_size)

    def forward(self, hidden_from_policy, ids, attn, images=None):
        """Values (B, T): the head on the policy's hidden states, or on the separate backbone's."""
        if self.backbone is None:
            return self.head(hidden_from_policy)
        h = self.backbone(ids, attn, images=images, output="logits_and_hidden").hidden
        return self.head(h)


def _forward(policy, critic, ids, attn, n_resp, temperature, images=None, bf16: bool = False):
    """Response log-probs, entropies and values: (B, R) each. V at token t is read at the position that
    predicts it (the state before the token). bf16: forward under bf16 autocast, log-softmax and values
    in float32."""
    with autocast(policy, bf16):
        out = policy(ids, attn, images=images, output="logits_and_hidden")
        logits, hidden = out.logits, out.hidden
        values = critic(hidden, ids, attn, images)[:, -n_resp - 1 : -1]
    logits, values = logits[:, -n_resp - 1 : -1].float(), values.float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    lp = token_logps(logits, ids[:, -n_resp:])
    return lp, entropy_from_logits(logits), values


@dataclass
class PPOTargets:
    """What the update trains towards, computed once per rollout without gradient (rollout_targets). Each (B, R)
    but is_stats."""

    old_logps: torch.Tensor  # the policy's log-probs before the update
    old_values: torch.Tensor  # the critic's values before the update
    advantages: torch.Tensor  # GAE, whitened
    returns: torch.Tensor  # the value targets
    loss_mask: torch.Tensor  # response tokens of scorable responses
    kl: torch.Tensor  # per-token KL to the reference (0 without one)
    is_weights: torch.Tensor | None  # the rollout correction's weights (None when off)
    is_stats: dict  # and its statistics


def rollout_targets(
    policy, critic, ref_model, batch: UpdateBatch, rewards: torch.Tensor, beta: float, *, passes: Passes,
    kl_estimator: str, gamma: float, lam: float, correct=None,
) -> PPOTargets:  # fmt: skip
    """Before the update (no gradient): old log-probs and values, the per-token rewards (the score at the last
    token, -beta KL on every token), GAE advantages (whitened) and returns. An unscorable (NaN) response is
    no outcome: its rows leave the loss mask. beta: the KL coefficient of this step (--beta, or the adaptive
    controller's). passes: the update's temperature and bf16. correct: the rollout correction (None: off;
    common.rollout_corrector)."""
    t, bf16, resp = passes.temperature, passes.bf16, batch.resp_mask
    loss_mask = resp * (~torch.isnan(rewards)).unsqueeze(1).to(resp.dtype)
    score = torch.nan_to_num(rewards, nan=0.0).float()  # (B,)
    with torch.no_grad():
        old_lp, _, old_values = _forward(
            policy, critic, batch.ids, batch.attn, batch.n_resp, t, batch.row_images(), bf16=bf16
        )
        kl = torch.zeros_like(old_lp)
        if ref_model is not None:
            ref_lp, _ = response_logps(
                ref_model, batch.ids, batch.attn, batch.n_resp, t, bf16=bf16, images=batch.row_images()
            )
            kl = kl_estimate(old_lp, ref_lp, kl_estimator) * resp
        token_rewards = -beta * kl
        last = last_index(resp)  # the model's last token (an episode's, past the environment's replies)
        token_rewards[torch.arange(len(last), device=last.device), last] += score
        adv, returns = masked_gae(token_rewards, old_values, resp, gamma, lam)  # over the model's tokens
        adv = whiten(adv, loss_mask)
    is_weights, is_stats = None, {}
    if correct is not None:  # the sampler's log-probs are not the trainer's (vLLM, bf16): weight by trainer / sampler
        is_weights, is_stats = correct(old_lp, batch.old_logps, loss_mask)
    return PPOTargets(old_lp, old_values, adv, returns, loss_mask, kl, is_weights, is_stats)


def ppo_update(
    policy,
    critic,
    both,
    optimizer,
    batch: UpdateBatch,
    targets: PPOTargets,
    *,
    loss_fn: PolicyLoss,
    passes: Passes,
    step: int,
    schedule: Schedule,
    vf_coef: float,
    value_clip: float,
) -> tuple[dict, float]:
    """`passes` over the rollout (Passes: epochs x minibatches optimizer steps) of the policy loss plus vf_coef x
    the value loss clipped at value_clip. -> (metrics averaged over the optimizer steps, the last lr)."""
    old_lp, old_values, adv = targets.old_logps, targets.old_values, targets.advantages
    returns, loss_mask, is_weights = targets.returns, targets.loss_mask, targets.is_weights
    world, n_opt, stats = dist.world_size(), passes.optimizer_steps, {}
    for _, opt_step, mb, fwd in passes(len(batch), step, batch.ids.device):
        lp, ent, values = _forward(
            policy,
            critic,
            batch.ids[fwd],
            batch.attn[fwd],
            batch.n_resp,
            passes.temperature,
            batch.row_images(fwd),
            bf16=passes.bf16,
        )
        anchor = (lp.sum() + values.sum()) * 0.0
        lp, ent, values = lp[: len(mb)], ent[: len(mb)], values[: len(mb)]
        pg_loss, m = loss_fn(
            lp, old_lp[mb], adv[mb], loss_mask[mb], is_weights=None if is_weights is None else is_weights[mb]
        )
        v_loss = clipped_value_loss(values, old_values[mb], returns[mb], loss_mask[mb], clip_range=value_clip)
        loss = pg_loss + vf_coef * v_loss
        (loss + anchor).backward()
        grad_norm, lr = optimizer_step(both, optimizer, opt_step, schedule, sync_grads=True)
        mask = loss_mask[mb].float()
        for k, v in {
            "loss": dist.all_sum(loss.item()) / world,
            "policy_loss": pg_loss.item(),
            "value_loss": v_loss.item(),
            "grad_norm": grad_norm,
            "entropy": float((ent * mask).sum() / mask.sum().clamp(min=1)),
            **{k: float(v) for k, v in m.items()},
        }.items():
            stats[k] = stats.get(k, 0.0) + v / n_opt
    return stats, lr


def train(cfg: Config, model=None, data: list[dict] | None = None) -> Result:
    """data: optional prompt records [{'prompt', ...reward columns}]; model: optional Policy."""
    # ---- setup -------------------------------------------------------------------------------------
    if cfg.critic not in ("head", "separate"):
        raise ValueError(f"critic must be 'head' or 'separate', got {cfg.critic!r}")
    check_fsdp(
        cfg.fsdp,
        lora_r=cfg.lora_r > 0,
        resume=cfg.resume,
        eval_every=bool(cfg.eval_every or cfg.eval_every_s),
        critic=cfg.critic == "separate",
    )
    cfg = setup(cfg)
    policy = build_policy(model, cfg.model, **policy_options(cfg))
    env = EnvTask.of(cfg, policy.tokenizer) if cfg.env else None  # with --env, reward 'task' is the env's
    options = {**prompt_options(cfg), "reward": "env" if env and cfg.reward == "task" else cfg.reward}
    task, data, reward_set, test = load_prompts(policy, data, **options, recipe="ppo", env=env)
    eval_task, test = held_out_set(policy, task, test, benchmark=cfg.eval_benchmark, chat=cfg.chat, n=cfg.eval_n,
                                   max_new_tokens=cfg.max_new_tokens)  # fmt: skip
    world = dist.world_size()
    ref_model = frozen_reference(policy, cfg.dtype) if cfg.beta > 0 else None
    critic = Critic(policy, cfg.critic == "separate").to(policy.device)
    both = nn.ModuleDict({"policy": policy, "critic": critic})
    kl_coef = KLCoef(cfg.beta, target=cfg.kl_target, horizon=cfg.kl_horizon)  # saved with checkpoints
    critic_file = lambda d: save_file(_contiguous(critic.state_dict()), str(Path(d) / "critic.safetensors"))

    # ---- derived values: the loss, the passes, the schedule over all optimizer steps, the run ---------------
    passes = Passes(cfg.ppo_epochs, cfg.minibatches, cfg.seed, 7919, cfg.temperature, cfg.bf16)
    loop = start_loop(
        cfg,
        policy,
        eval_task,
        test,
        desc="ppo",
        show=("reward/mean", "kl"),
        before="before PPO",
        optimizer_steps=cfg.steps * passes.optimizer_steps,
        trained=both,
        keep=(kl_coef,),
        write_extra=critic_file,
        engine=cfg.engine,
        vllm_memory=cfg.vllm_memory,
        row_seeded=cfg.row_seeded_sampling,
    )
    if cfg.resume:
        critic.load_state_dict(load_file(str(Path(cfg.out_dir) / "checkpoint" / "critic.safetensors")))
    run, engine = loop.run, loop.engine
    loss_fn = policy_loss_of(cfg, loss_agg="bnpo")  # the term on tokens, PPO's token mean
    correct = rollout_corrector(cfg.is_correction, cfg.engine, cfg.is_mode, cfg.is_cap)
    target_options = dict(passes=passes, kl_estimator=cfg.kl_estimator, gamma=cfg.gamma, lam=cfg.lam, correct=correct)
    sampling = dict(prompts_per_step=cfg.prompts_per_step, seed=cfg.seed, group_size=cfg.samples_per_prompt,
                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)  # fmt: skip

    # ---- training loop -----------------------------------------------------------------------------
    for step in range(run.start, cfg.steps):
        t0 = time.perf_counter()
        # -- rollout and score: samples_per_prompt responses to each of this rank's prompts
        sb, _ = sample_step(loop, policy, data, reward_set, step, log_completions=cfg.log_completions,
                            rollout=env and env.rollout, **sampling)  # fmt: skip
        batch = pack_rows([(sb.batch, i) for i in range(len(sb.batch.texts))], policy.tokenizer.pad_token_id)
        # -- old log-probs, values, KL-penalised rewards, GAE (no gradient), then the PPO epochs
        beta = kl_coef.at(0.0)
        with phase("reference", step + 1, batch.ids.shape):
            targets = rollout_targets(policy, critic, ref_model, batch, sb.rewards, beta, **target_options)
        t_up = time.perf_counter()
        engine.sleep()  # a colocated engine frees its device memory for the update
        with phase("update", step + 1, batch.ids.shape):
            stats, lr = ppo_update(
                policy, critic, both, loop.optimizer, batch, targets, loss_fn=loss_fn, passes=passes, step=step,
                schedule=loop.schedule, vf_coef=cfg.vf_coef, value_clip=cfg.value_clip,
            )  # fmt: skip
        engine.wake()  # (vLLM on CUDA slept through the update)
        engine.sync(policy)  # the next rollout samples from the updated weights
        dt, rmask, kl, old_values = time.perf_counter() - t0, batch.resp_mask.float(), targets.kl, targets.old_values
        row = {
            **sb.metrics,
            **stats,
            "lr": lr,
            "kl": float((kl * rmask).sum() / rmask.sum().clamp(min=1)),
            "values/mean": float((old_values * rmask).sum() / rmask.sum()),
            "completions/mean_length": float(rmask.sum(1).mean()),
            "completions/truncated_frac": float(batch.truncated.float().mean()),
            "tokens_per_s": float(batch.attn.sum()) / dt,
            "time/generation_s": sb.gen_s,
            "time/scoring_s": sb.score_s,
            "time/update_s": time.perf_counter() - t_up,
            **targets.is_stats,
        }
        row.update({k: dist.all_mean(v) for k, v in sb.metrics.items()})  # reward statistics over all ranks
        row["beta"] = beta
        if kl_coef.adaptive:  # the controller, on this rollout's KL to the reference (all ranks)
            kl_coef.update(beta, dist.all_mean(row["kl"]), len(batch) * world)
        if end_of_step(run, step + 1, row, t_step=t0, save=loop.save, evaluate=loop.evaluate):
            break

    # ---- evaluate and save -------------------------------------------------------------------------
    policy, summary = finish_loop(loop, cfg, policy, eval_task, test, data, after="after PPO", extra_save=critic_file)
    summary.update({"reward_faults": reward_set.faults, "env_faults": env and env.faults})
    return Result(policy, run.history, summary)


def _contiguous(sd):
    """Tensors for safetensors: contiguous, and shared ones (tied embeddings) cloned."""
    seen, out = set(), {}
    for k, v in sd.items():
        out[k] = v.detach().clone().contiguous() if v.data_ptr() in seen else v.detach().contiguous()
        seen.add(v.data_ptr())
    return out
