"""GRPO and its variants: sample a group of G responses per prompt (or G multi-turn episodes in an
environment, --env), score them with verifiable rewards, normalise rewards within the group, and take
clipped policy-gradient steps (Shao et al. 2024).

    A_i = (r_i - mean(r)) / (std(r) + eps)         --advantage (advantages.ESTIMATORS), --scale-rewards
    loss = policy term + beta * KL_k3               --policy-loss (losses/policy.py), aggregation by --loss-agg
The variants as switches (Dr. GRPO, DAPO, GSPO, RLOO, CISPO, SAPO, GMPO, KL schedules, NoisyRollout, the 80/20
rule, Video-R1's temporal contrast): docs/rl.md. With beta = 0 no reference model is kept in memory. Departures
from the papers: the "old" log-probs of the first pass are the current ones (ratio 1), as in TRL; with several
passes or minibatches they are recomputed once per batch by a forward without gradient at temperature T (not the
sampler's filtered record), so at lr 0 every ratio is 1.

    mirl grpo --model runs/sft/final --task arith --time-budget-s 240
    mirl grpo --model runs/sft/final --env calc --max-turns 3
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from .. import distributed as dist
from ..advantages import ESTIMATORS
from ..device import phase
from ..envs.task import EnvTask
from ..logging import TRACKERS, console
from ..logps import response_logps
from ..losses.coefs import EntropyCoef, KLCoef
from ..losses.policy import AGGREGATIONS, IS_MODES, KL_ESTIMATORS, PolicyLoss, policy_terms, top_entropy_mask
from ..losses.reduce import masked_reduce
from ..optim import Schedule, optimizer_step
from ..options import ConfigError, choice, choice_list, term_option
from ..rollout.engine import ENGINES
from ..rollout.groups import NoisyRollout, group_advantages, sample_groups, step_rewards
from ..rollout.prompts import SAMPLERS, PromptSampler
from ..rollout.score import UpdateBatch, pack_rows
from ..rollout.temporal import ALPHA, RATIO, check_videos, temporal_contrast
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
from .rl import Passes, finish_loop, start_loop
from .run import Result, end_of_step, setup


@dataclass
class Config:
    """Options of `mirl grpo` (one line of doc each, the CLI's flags)."""

    model: str = "gpt-nano"  # preset or saved model folder (usually an SFT checkpoint)
    task: str = "arith"  # task for prompts, the 'task' reward and held-out evaluation
    chat: str = choice("auto", "yes", "no")  # built-in task through the model's chat template (auto: if it has one)
    data: str = ""  # prompt dataset (.jsonl/.parquet/folder) with 'prompt' and reward columns; overrides task prompts
    split: str = "train"  # the split of --data to read (a datasets folder or hub dataset with several)
    data_config: str = ""  # the configuration (subset) of a hub dataset --data
    revision: str = ""  # the hub revision (branch, tag, commit) of a hub dataset --data
    model_revision: str = ""  # the hub revision (branch, tag, commit) of a hub model --model
    n_prompts: int = 5000  # training prompts generated from the task
    reward: str = "task"  # reward spec: names with weights, e.g. "task:1,format:0.1", "accuracy", "rm:<folder>"
    env: str = ""  # multi-turn episodes in an environment: calc, guess, python, zoom, file.py:Class, module:Class
    max_turns: int = 4  # --env: model turns per episode at most (--max-new-tokens: each turn's limit)
    max_episode_tokens: int = 0  # --env: tokens after the opening, turns and replies together (0 = turns x limit)
    tool_timeout_s: float = 10.0  # --env: a tool call, reset or step running longer is a counted fault
    reward_timeout_s: float = 10.0  # a reward call running longer is cut off, counted and reported
    group_size: int = 8  # G responses per prompt
    prompts_per_step: int = 16  # prompts per generation batch
    steps: int = 200  # generation batches (optimizer steps = steps * num_iterations * minibatches)
    time_budget_s: float = 0.0  # stop after this many seconds of training (0 = no limit)
    advantage: str = choice("group", among=ESTIMATORS)  # group (GRPO), rloo, REINFORCE++, GDPO: advantages.py
    step_rewards: bool = False  # step-wise rewards (StepGRPO): the task's step verifier -> token advantages
    step_baseline: str = choice("position", "group")  # --step-rewards: step k vs the group's step k, or all steps
    scale_rewards: str = choice("group", "batch", "none")  # the spread that divides the advantages (none: Dr. GRPO)
    loss_agg: str = choice("grpo", among=AGGREGATIONS)  # how the per-token losses become one (docs/rl.md)
    importance: str = choice("token", "sequence")  # token (GRPO) or sequence (GSPO)
    clip_eps: float = 0.2  # lower clip range (and upper, unless clip_eps_high is set)
    clip_eps_high: float = 0.0  # upper clip range for clip-higher (DAPO 0.28); 0 = clip_eps
    policy_loss: str = choice("clip", among=policy_terms())  # the policy-gradient term (losses/policy.py, docs/rl.md)
    dual_clip_c: float = term_option("dual_clip", 3.0, above=1.0)  # dual_clip: the bound -c A on tokens with A < 0
    cispo_cap: float = term_option("cispo", 5.0, at_least=1.0)  # cispo: the cap on the detached importance weight
    sapo_tau_pos: float = term_option("sapo", 1.0, above=0.0)  # sapo: gate temperature for positive advantages
    sapo_tau_neg: float = term_option("sapo", 1.05, above=0.0)  # sapo: gate temperature for negative advantages
    gmpo_eps: float = term_option("gmpo", 0.4, above=0.0)  # gmpo: each token's log-ratio clipped to [-eps, eps]
    beta: float = 0.0  # KL coefficient (0 = no reference model in memory)
    kl_estimator: str = choice("k3", among=KL_ESTIMATORS)  # the per-token KL estimator (Schulman's)
    kl_schedule: str = choice("constant", "linear", "cosine")  # beta over the run: constant, or from beta to beta_final
    beta_final: float = 0.0  # KL coefficient at the end of a schedule
    kl_target: float = 0.0  # adaptive KL controller: beta moves towards this mean per-token KL (0 = off)
    kl_horizon: float = 10000.0  # adaptive KL: samples over which beta may change by 20% (Ziegler et al.)
    entropy_coef: float = 0.0  # entropy bonus: loss - coef x mean token entropy (0 = off)
    entropy_target: float = 0.0  # adaptive entropy control (Skywork-OR1): bonus only at or below this entropy (0 = off)
    entropy_coef_delta: float = 0.005  # adaptive entropy control: the coefficient's change per step
    entropy_coef_max: float = 0.05  # adaptive entropy control: the coefficient's upper bound
    top_entropy_quantile: float = 1.0  # train only this highest-entropy fraction of tokens (0.2: the 80/20 rule)
    num_iterations: int = 1  # optimisation passes over each generation batch
    minibatches: int = 1  # optimizer steps per pass (the batch split into this many parts)
    prompt_sampler: str = choice("uniform", among=SAMPLERS)  # curriculum: easy to hard; pass-rate: 0 < rate < 1
    curriculum_stages: int = 3  # curriculum: stages, evenly over the run (stage k: the easiest (k+1)/n prompts)
    pass_rate_oversample: int = 4  # pass-rate: candidates drawn per prompt kept
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal and refill (DAPO)
    max_refills: int = 4  # dynamic sampling: extra generation rounds per step at most
    mask_truncated: bool = False  # no loss on responses that hit max_new_tokens
    temperature: float = 1.0  # sampling temperature (log-probs in the update use the same)
    top_p: float = 1.0  # nucleus sampling
    top_k: int = 0  # top-k sampling (0 = off)
    max_new_tokens: int = 40  # response length limit
    ignore_eos: bool = False  # always generate max_new_tokens (benchmarks)
    engine: str = choice("local", among=ENGINES)  # what samples: mirl's own sampler or vllm (docs/speed.md)
    vllm_memory: float = 0.3  # --engine vllm: the share of GPU memory vLLM takes (on a CPU: of RAM, for its KV cache)
    is_correction: str = choice("auto", "none", "token", "sequence")  # rollout/train mismatch (auto: sequence if vllm)
    is_mode: str = choice("mask", among=IS_MODES)  # truncate: capped at --is-cap; mask: above it set to 0 (TRL's)
    is_cap: float = 3.0  # the importance weights' bound
    noisy_rollout: float = 0.0  # NoisyRollout: fraction of each group sampled on perturbed images (0 = off)
    noise_strength: float = 0.5  # initial perturbation strength (crop 1 - s/4 of each side, pixel noise s * 64)
    noise_anneal_steps: int = 0  # strength falls linearly to 0 over this many steps (0 = over all steps)
    row_seeded_sampling: bool = False  # each row's sampling noise from (seed, step, prompt, sample): the same
    # samples whatever the rank layout (always on under torchrun)
    noise_kinds: str = choice_list("crop,noise", "crop", "noise")  # image perturbations (grounding: noise only)
    temporal_contrast: bool = False  # T-GRPO (Video-R1): also sample on shuffled frames; a bonus if order helps
    temporal_contrast_alpha: float = ALPHA  # --temporal-contrast: the bonus on each correct ordered response's reward
    temporal_contrast_samples: int = 0  # --temporal-contrast: shuffled-frame samples per prompt, untrained (0: G/2)
    temporal_contrast_ratio: float = RATIO  # --temporal-contrast: the bonus when p > ratio x p~ (Video-R1's code: 0.8)
    max_len: int = 128  # model context for new tiny models
    lr: float = 5e-5  # learning rate (constant after warmup unless min_lr_ratio < 1)
    warmup_steps: int = 0  # linear warmup (optimizer steps)
    min_lr_ratio: float = 1.0  # cosine decay floor as a fraction of lr (1 = constant after warmup)
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    seed: int = 0  # seed of initialisation, data order and sampling
    threads: int = 2  # torch CPU threads
    out_dir: str = "runs/grpo"  # run folder: config.json, metrics.jsonl, tb/, checkpoint/, final/, report/
    save_every: int = 0  # checkpoint every N steps (0 = only at the end)
    resume: bool = False  # continue from out_dir/checkpoint
    stop_at_step: int = 0  # end the run after this step as if interrupted (0 = run to the end)
    eval_n: int = 200  # held-out prompts evaluated (greedy) before and after training (0 = skip)
    eval_benchmark: str = ""  # held-out set: a benchmark (gsm8k, math500, aime24, aime25, amc23) instead of the task
    eval_every: int = 0  # also evaluate every N steps (0 = only before and after)
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


def grpo_update(
    policy,
    optimizer,
    batch: UpdateBatch,
    adv,
    *,
    loss_fn: PolicyLoss,
    passes: Passes,
    step: int,
    schedule: Schedule,
    beta: float = 0.0,
    ref_model=None,
    entropy_coef: float = 0.0,
    correct=None,
    mask_truncated: bool = False,
    top_entropy_quantile: float = 1.0,
) -> tuple[dict, float]:
    """`passes` over the batch (Passes: passes x minibatches optimizer steps) of the policy loss (+ beta KL to the
    reference, whose log-probs are taken once; - entropy_coef x the mean token entropy over every rank's response
    tokens; the policy term on the top_entropy_quantile of every rank's tokens only). correct(trainer logps,
    sampler logps, mask): the rollout correction's weights and statistics (None: off). mask_truncated: no loss on
    truncated responses. -> (metrics averaged over the optimizer steps, the last lr)."""
    t, bf16 = passes.temperature, passes.bf16
    whole = lambda model: response_logps(model, batch.ids, batch.attn, batch.n_resp, t, bf16=bf16,
                                         images=batch.row_images())[0]  # fmt: skip
    ref_logps = None
    if ref_model is not None and beta > 0:
        with torch.no_grad(), phase("reference", step + 1, batch.ids.shape):
            ref_logps = whole(ref_model)
    world, b, n_opt = dist.world_size(), len(batch), passes.optimizer_steps
    loss_mask = batch.resp_mask * (~batch.truncated).unsqueeze(1) if mask_truncated else batch.resp_mask
    old_logps = batch.old_logps
    if n_opt > 1:
        # "old" log-probs for later passes are recomputed as the update computes them (softmax(logits / T),
        # one full forward), as TRL and veRL do: the sampler's record is of the top-k/top-p-renormalised
        # distribution, of perturbed pixels for noisy rows, of the cached decoding arithmetic (and not under
        # bf16 autocast); any of these would make the ratio differ from 1 at an unchanged policy
        with torch.no_grad():
            old_logps = whole(policy)
    agg_global = dist.all_sum(float(loss_mask.sum())) if loss_fn.loss_agg == "dapo" else None
    stats: dict[str, float] = {}
    for p, opt_step, mb, fwd in passes(b, step, batch.ids.device):
        lp, ent = response_logps(
            policy,
            batch.ids[fwd],
            batch.attn[fwd],
            batch.n_resp,
            t,
            with_entropy=True,
            bf16=bf16,
            images=batch.row_images(fwd),
            entropy_grad=entropy_coef > 0,
        )
        anchor = lp.sum() * 0.0
        lp, ent = lp[: len(mb)], ent[: len(mb)]
        old = lp.detach() if p == 0 and passes.minibatches == 1 else old_logps[mb]
        # the sampler's log-probs are not the trainer's (vLLM, bf16): weight by trainer / sampler, from the
        # trainer's log-probs before this update (the "old" ones)
        is_weights, is_stats = correct(old, batch.old_logps[mb], loss_mask[mb]) if correct else (None, {})
        # the 80/20 rule: the policy-gradient term on the minibatch's highest-entropy tokens (of every rank) only
        pg_mask = top_entropy_mask(ent.detach(), loss_mask[mb], top_entropy_quantile)
        lm = loss_mask[mb].to(ent.dtype)
        # dapo: the generation batch's global token count, shared out over the optimizer steps
        g = None if agg_global is None else agg_global * dist.all_sum(len(mb)) / (b * world)
        loss, m = loss_fn(
            lp,
            old,
            adv[mb],
            lm,
            beta=beta,
            ref_logps=None if ref_logps is None else ref_logps[mb],
            global_count=g,
            is_weights=is_weights,
            pg_mask=pg_mask if top_entropy_quantile < 1 else None,
        )
        if entropy_coef > 0:  # the bonus, a token mean over every rank's response tokens (with its gradient)
            loss = loss - entropy_coef * masked_reduce(ent, lm, "token_mean")
        (loss + anchor).backward()
        grad_norm, lr = optimizer_step(policy, optimizer, opt_step, schedule, sync_grads=True)
        n_tokens = max(1.0, dist.all_sum(float(lm.sum())))  # the minibatch's, over every rank
        ent_mean = dist.all_sum(float((ent.detach() * lm).sum())) / n_tokens
        kept = dist.all_sum(float(pg_mask.sum())) / n_tokens
        for k, v in {
            "loss": dist.all_sum(loss.item()) / world,
            "grad_norm": grad_norm,
            "entropy": ent_mean,
            "tokens/trained_frac": kept,
            **{k: float(v) for k, v in m.items()},
            **is_stats,
        }.items():
            stats[k] = stats.get(k, 0.0) + v / n_opt
    return stats, lr


def group_sampling(cfg: Config, seeded: bool, generator) -> tuple[dict, NoisyRollout | None]:
    """sample_groups' options for this run (the prompt batches, dynamic sampling, the sampler's settings) and
    the NoisyRollout, if any (the last noisy_rollout x G samples of each group drawn on perturbed images)."""
    n_noisy, anneal = round(cfg.noisy_rollout * cfg.group_size), cfg.noise_anneal_steps or cfg.steps
    kinds = tuple(k.strip() for k in cfg.noise_kinds.split(",") if k.strip())
    noisy = NoisyRollout(n_noisy, cfg.noise_strength, anneal, kinds, random.Random(cfg.seed)) if n_noisy else None
    options = dict(
        prompts_per_step=cfg.prompts_per_step,
        group_size=cfg.group_size,
        seed=cfg.seed,
        row_seeded=seeded,
        dynamic=cfg.dynamic_sampling,
        max_refills=cfg.max_refills,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        ignore_eos=cfg.ignore_eos,
        noisy=noisy,
        generator=generator,
    )
    return options, noisy


def check_and_step_rewards(cfg: Config, policy, task, world: int):
    """The checks that need the loaded policy and task; with --step-rewards the function of a scored rollout ->
    its token advantages (from the task's step verifier), else None."""
    if world > 1 and cfg.dynamic_sampling:
        raise ValueError("--dynamic-sampling under torchrun is not supported yet (ranks would refill unevenly)")
    if cfg.noisy_rollout and not policy.is_vlm:
        raise ValueError("--noisy-rollout perturbs images: it needs an image+text model and image prompts")
    if cfg.step_rewards and cfg.advantage != "group":
        raise ConfigError("--step-rewards makes its own token advantages: use --advantage group (the default)")
    return (
        step_rewards(task, cfg.task, policy.tokenizer, cfg.group_size, cfg.step_baseline) if cfg.step_rewards else None
    )


def train(cfg: Config, model=None, data: list[dict] | None = None) -> Result:
    """data: optional prompt records [{'prompt', ...reward columns}]; model: optional Policy."""
    # ---- setup -------------------------------------------------------------------------------------
    evaluating = bool(cfg.eval_every or cfg.eval_every_s)
    check_fsdp(cfg.fsdp, lora_r=cfg.lora_r > 0, resume=cfg.resume, eval_every=evaluating,
               dynamic_sampling=cfg.dynamic_sampling)  # fmt: skip
    contrast = temporal_contrast(cfg.temporal_contrast, alpha=cfg.temporal_contrast_alpha,
                                 samples=cfg.temporal_contrast_samples, ratio=cfg.temporal_contrast_ratio,
                                 group_size=cfg.group_size, seed=cfg.seed, env=bool(cfg.env))  # fmt: skip
    cfg = setup(cfg)
    policy = build_policy(model, cfg.model, **policy_options(cfg))
    env = EnvTask.of(cfg, policy.tokenizer) if cfg.env else None  # with --env, reward 'task' is the env's
    options = {**prompt_options(cfg), "reward": "env" if env and cfg.reward == "task" else cfg.reward}
    task, data, reward_set, test = load_prompts(policy, data, **options, recipe="grpo", env=env)
    eval_task, test = held_out_set(policy, task, test, benchmark=cfg.eval_benchmark, chat=cfg.chat, n=cfg.eval_n,
                                   max_new_tokens=cfg.max_new_tokens)  # fmt: skip
    check_videos(contrast, data, is_vlm=policy.is_vlm)
    world = dist.world_size()
    steps = check_and_step_rewards(cfg, policy, task, world)
    ref_model = frozen_reference(policy, cfg.dtype) if cfg.beta > 0 or cfg.beta_final > 0 else None  # none at beta 0
    # the KL and entropy coefficients over the run (schedules, adaptive controllers) and the prompt sampler's
    # pass rates: saved with checkpoints
    kl_coef = KLCoef(cfg.beta, cfg.kl_schedule, cfg.beta_final, cfg.kl_target, cfg.kl_horizon)
    ent_coef = EntropyCoef(cfg.entropy_coef, cfg.entropy_target, cfg.entropy_coef_delta, cfg.entropy_coef_max)
    sampler = PromptSampler(cfg.prompt_sampler, data, prompts_per_step=cfg.prompts_per_step, seed=cfg.seed,
                            stages=cfg.curriculum_stages, oversample=cfg.pass_rate_oversample)  # fmt: skip

    # ---- derived values: the loss, the passes, the schedule over all optimizer steps, the run ---------------
    passes = Passes(cfg.num_iterations, cfg.minibatches, cfg.seed, 131, cfg.temperature, cfg.bf16)
    loop = start_loop(cfg, policy, eval_task, test, desc="grpo", show=("reward/mean", "kl"), before="before GRPO",
                      optimizer_steps=cfg.steps * passes.optimizer_steps, keep=(kl_coef, ent_coef, sampler),
                      engine=cfg.engine, vllm_memory=cfg.vllm_memory, row_seeded=cfg.row_seeded_sampling)  # fmt: skip
    run, engine = loop.run, loop.engine
    groups_of, noisy = group_sampling(cfg, loop.seeded, loop.generator)
    update_options = dict(
        loss_fn=policy_loss_of(cfg),
        passes=passes,
        schedule=loop.schedule,
        ref_model=ref_model,
        correct=rollout_corrector(cfg.is_correction, cfg.engine, cfg.is_mode, cfg.is_cap),
        mask_truncated=cfg.mask_truncated,
        top_entropy_quantile=cfg.top_entropy_quantile,
    )
    advantage_options = dict(estimator=cfg.advantage, group_size=cfg.group_size, scale=cfg.scale_rewards,
                             dynamic=cfg.dynamic_sampling, steps=steps)  # fmt: skip
    skipped = {"zero_signal_groups": 0, "refill_rounds": 0}

    # ---- training loop -----------------------------------------------------------------------------
    for step in range(run.start, cfg.steps):
        t0 = time.perf_counter()
        progress = run.progress(step)  # steps or seconds, whichever ends the run: the curriculum and KL schedules
        # -- rollout and score (dynamic sampling: keep groups whose rewards differ, refill the rest)
        with phase("rollout", step + 1, (cfg.prompts_per_step * cfg.group_size, cfg.max_new_tokens)):
            groups = sample_groups(
                policy, data, reward_set, step=step, progress=progress, engine=engine, sampler=sampler,
                rollout=(env and env.rollout) or contrast, **groups_of
            )  # fmt: skip
        run.log_completions(step + 1, groups.rounds[0][0], reward_set.names, cfg.log_completions)
        for sb, _ in groups.rounds:  # every round's responses count, refills included
            run.count_samples(sb)
        skipped["zero_signal_groups"] += groups.zero_signal
        skipped["refill_rounds"] += groups.refills
        # -- advantages, then the update: num_iterations passes x minibatches
        rows, adv = group_advantages(groups, reward_set.weights, **advantage_options)
        # no rows: every group's rewards were equal
        row = {**groups.metrics, **sampler.metrics(progress), "skipped_step": float(not rows)}
        if rows:
            batch = pack_rows(rows, policy.tokenizer.pad_token_id)
            adv = adv[:, : batch.n_resp] if adv.dim() == 2 else adv  # token advantages: the response area
            beta, ent_now, bonus_coef = kl_coef.at(progress), ent_coef.coef, ent_coef.bonus()
            t_up = time.perf_counter()
            engine.sleep()  # a colocated engine frees its device memory for the update
            with phase("update", step + 1, batch.ids.shape):
                stats, lr = grpo_update(
                    policy, loop.optimizer, batch, adv, step=step, beta=beta, entropy_coef=bonus_coef, **update_options
                )
            row.update(
                {
                    **stats,
                    **batch.metrics(adv),
                    "lr": lr,
                    "beta": beta,
                    "entropy_coef": ent_now,
                    "entropy_bonus_coef": bonus_coef,
                    "groups/zero_signal_frac": groups.zero_signal / (cfg.prompts_per_step * (groups.refills + 1)),
                    "tokens_per_s": float(batch.attn.sum()) / (time.perf_counter() - t0),
                    "time/generation_s": groups.gen_s,
                    "time/scoring_s": groups.score_s,
                    "time/update_s": time.perf_counter() - t_up,
                }
            )
            engine.wake()  # (vLLM on CUDA slept through the update)
            engine.sync(policy)  # the next rollout samples from the updated weights
            row.update({"noise_strength": noisy.strength_at(step)} if noisy else {})
            if kl_coef.adaptive:  # the controller, on the KL this update measured (all ranks)
                kl_coef.update(beta, dist.all_mean(stats["kl"]), len(batch) * world)
            if ent_coef.adaptive:  # adaptive entropy control, on this update's mean entropy (all ranks)
                ent_coef.update(dist.all_mean(stats["entropy"]))
            row.update({k: dist.all_mean(v) for k, v in groups.metrics.items()})  # reward statistics, all ranks
        if end_of_step(run, step + 1, row, t_step=t0, save=loop.save, evaluate=loop.evaluate):
            break

    # ---- evaluate and save (rank 0) ----------------------------------------------------------------
    policy, summary = finish_loop(loop, cfg, policy, eval_task, test, data, after="after GRPO")
    if reward_set.faults:
        console.print(f"[yellow]reward faults: {reward_set.faults}[/]")
    summary.update({"skips": skipped, "reward_faults": reward_set.faults, "env_faults": env and env.faults})
    return Result(policy, run.history, summary)
