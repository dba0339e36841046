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

import random
import time
from dataclasses import asdict, dataclass

import torch

from .. import distributed as dist
from ..advantages import ESTIMATORS, RoundRewards, outcome_advantages, process_advantages
from ..checkpoint import save_checkpoint
from ..device import phase
from ..logging import TRACKERS, console
from ..logps import response_logps
from ..losses.coefs import EntropyCoef, KLCoef
from ..losses.policy import (
    AGGREGATIONS,
    IS_MODES,
    KL_ESTIMATORS,
    TERM_OPTIONS,
    PolicyLoss,
    policy_terms,
    rollout_correction,
    term_options,
    top_entropy_mask,
)
from ..losses.reduce import masked_reduce
from ..models.tokenizer import tokens_at_chars
from ..optim import Schedule, make_optimizer, optimizer_step
from ..options import ConfigError, choice, choice_list, term_option
from ..rollout.engine import ENGINES, make_engine
from ..rollout.groups import NoisyRollout, sample_groups
from ..rollout.prompts import SAMPLERS, PromptSampler
from ..rollout.score import UpdateBatch, pack_rows
from .common import (
    build_policy,
    check_fsdp,
    correction_level,
    frozen_reference,
    gathered_policy,
    load_prompts,
    policy_options,
    prompt_options,
)
from .held_out import held_out_evaluator
from .run import (
    Cadence,
    Result,
    Run,
    end_of_run,
    end_of_step,
    resume_state,
    setup,
)


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
    compile: bool = False  # torch.compile each transformer block (in place); the first steps compile
    fsdp: bool = False  # under torchrun: FSDP2 (fully_shard per block): parameters, grads, optimizer state sharded
    report: bool = True  # at the end: <out_dir>/report/index.html (metric plots, config, sample completions)
    report_to: str = choice_list("tensorboard", *TRACKERS, "none")  # experiment trackers, comma-separated (or none)
    log_every: int = 1  # metrics to the trackers every N steps (metrics.jsonl gets every step)
    log_completions: int = 0  # every --log-every steps, N sampled completions to samples.jsonl, report, trackers
    allow_config_change: bool = False  # with --resume: continue although options differ from the run's


def minibatch_seed(seed: int, step: int, pass_: int) -> int:
    """The seed of the minibatch permutation of pass `pass_` over step `step`'s batch."""
    return seed + step * 131 + pass_


def step_advantages(task, sb, group_size: int, tokenizer, baseline: str = "position") -> torch.Tensor:
    """Token advantages (B, R) of a scored rollout from the task's step verifier (step_scores: each step's end
    in characters and its reward), the character offsets mapped to response tokens; the tokens after the last step
    (EOS, text after the answer) take the answer step's advantage."""
    rewards, ends = [], []
    lengths = sb.batch.response_mask.sum(1).tolist()  # (responses are right-padded: the first n tokens)
    for text, example, ids, n in zip(sb.batch.texts, sb.examples, sb.batch.response_ids.tolist(), lengths):
        steps = task.step_scores(text, example)
        ends.append(tokens_at_chars(tokenizer, ids[:n], [e for e, _ in steps]))
        rewards.append([r for _, r in steps])
    width = sb.batch.response_ids.shape[1]
    device = sb.batch.response_ids.device
    return process_advantages(rewards, ends, group_size, width, baseline=baseline, lengths=lengths, device=device)


def advantages(cfg: Config, groups, weights: torch.Tensor, steps=None) -> tuple[list, torch.Tensor]:
    """The rows trained on (with dynamic sampling: the groups with signal of every round, dropped *before* any
    batch statistics, as veRL's DAPO) and their group-normalised, RLOO, REINFORCE++ or GDPO advantages (weights:
    the reward functions', for GDPO), over those rows together; or token advantages from step rewards (steps: a
    function of a scored rollout -> (B, R), per group). -> (rows [(rollout, index)], advantages (B,) or (B, R))."""
    rows, rewards, per_fn, lengths, token_adv = [], [], [], [], []
    for sb, signal in groups.rounds:
        n = len(sb.rewards)
        every = torch.ones(n, dtype=torch.bool, device=sb.rewards.device)
        keep = signal.repeat_interleave(cfg.group_size) if cfg.dynamic_sampling else every
        rows += [(sb.batch, i) for i in torch.nonzero(keep).flatten().tolist()]
        if steps is not None:
            token_adv += list(steps(sb).float()[keep])
        else:
            rewards.append(sb.rewards[keep])
            per_fn.append(sb.per_fn[keep])
            lengths.append(sb.batch.response_mask.sum(1)[keep])
    if steps is not None:  # rounds of different response widths padded to the longest
        width = max((len(x) for x in token_adv), default=0)
        token_adv = [torch.nn.functional.pad(x, (0, width - len(x))) for x in token_adv]
        return rows, (torch.stack(token_adv) if token_adv else torch.zeros(0, device=sb.rewards.device))
    kept = RoundRewards(
        torch.cat(rewards), torch.cat(per_fn), weights, torch.cat(lengths), cfg.group_size, cfg.scale_rewards
    )
    return rows, outcome_advantages(cfg.advantage, kept).float()


def grpo_update(
    policy,
    optimizer,
    batch: UpdateBatch,
    adv,
    *,
    cfg: Config,
    loss_fn: PolicyLoss,
    step: int,
    beta: float,
    ref_model,
    schedule: Schedule,
    entropy_coef: float = 0.0,
) -> tuple[dict, float]:
    """num_iterations passes over the batch, each in `minibatches` optimizer steps of the clipped surrogate
    (+ beta KL to the reference, whose log-probs are taken once; - entropy_coef x the mean token entropy over
    every rank's response tokens; the policy term on the top-entropy quantile of every rank's tokens only, with
    --top-entropy-quantile). -> (metrics averaged over the optimizer steps, the last lr)."""
    ref_logps = None
    if ref_model is not None and beta > 0:
        with torch.no_grad(), phase("reference", step + 1, batch.ids.shape):
            ref_logps, _ = response_logps(
                ref_model,
                batch.ids,
                batch.attn,
                batch.n_resp,
                cfg.temperature,
                bf16=cfg.bf16,
                images=batch.row_images(),
            )
    world, b, n_opt = dist.world_size(), len(batch), cfg.num_iterations * cfg.minibatches
    loss_mask = batch.resp_mask * (~batch.truncated).unsqueeze(1) if cfg.mask_truncated else batch.resp_mask
    old_logps = batch.old_logps
    level = correction_level(cfg.is_correction, cfg.engine)
    correct = lambda trainer, rows: rollout_correction(
        trainer, batch.old_logps[rows], loss_mask[rows], level=level, mode=cfg.is_mode, cap=cfg.is_cap
    )
    if n_opt > 1:
        # "old" log-probs for later passes are recomputed as the update computes them (softmax(logits / T),
        # one full forward), as TRL and veRL do: the sampler's record is of the top-k/top-p-renormalised
        # distribution, of perturbed pixels for noisy rows, of the cached decoding arithmetic (and not under
        # bf16 autocast); any of these would make the ratio differ from 1 at an unchanged policy
        with torch.no_grad():
            old_logps, _ = response_logps(
                policy, batch.ids, batch.attn, batch.n_resp, cfg.temperature, bf16=cfg.bf16, images=batch.row_images()
            )
    agg_global = dist.all_sum(float(loss_mask.sum())) if cfg.loss_agg == "dapo" else None
    stats: dict[str, float] = {}
    for it in range(cfg.num_iterations):
        # minibatches of one permutation of the global batch (the same under torchrun as in one process)
        seed = minibatch_seed(cfg.seed, step, it)
        for j, mb in enumerate(dist.minibatches(b, cfg.minibatches, seed, batch.ids.device)):
            # torchrun: this rank's part of a minibatch may be empty; it still runs a forward and a backward
            # (on one row, weight 0) so that FSDP2's and the loss's collectives meet the other ranks'
            fwd = mb if len(mb) else torch.arange(1, device=mb.device)
            lp, ent = response_logps(
                policy,
                batch.ids[fwd],
                batch.attn[fwd],
                batch.n_resp,
                cfg.temperature,
                with_entropy=True,
                bf16=cfg.bf16,
                images=batch.row_images(fwd),
                entropy_grad=entropy_coef > 0,
            )
            anchor = lp.sum() * 0.0
            lp, ent = lp[: len(mb)], ent[: len(mb)]
            old = lp.detach() if it == 0 and cfg.minibatches == 1 else old_logps[mb]
            # the sampler's log-probs are not the trainer's (vLLM, bf16): weight by trainer / sampler, from the
            # trainer's log-probs before this update (the "old" ones)
            is_weights, is_stats = correct(old, mb) if level != "none" else (None, {})
            # the 80/20 rule: the policy-gradient term on the minibatch's highest-entropy tokens (of every rank) only
            pg_mask = top_entropy_mask(ent.detach(), loss_mask[mb], cfg.top_entropy_quantile)
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
                pg_mask=pg_mask if cfg.top_entropy_quantile < 1 else None,
            )
            if entropy_coef > 0:  # the bonus, a token mean over every rank's response tokens (with its gradient)
                loss = loss - entropy_coef * masked_reduce(ent, lm, "token_mean")
            (loss + anchor).backward()
            opt_step = (step * cfg.num_iterations + it) * cfg.minibatches + j
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


def group_sampling(cfg: Config, world: int, generator) -> tuple[dict, NoisyRollout | None]:
    """sample_groups' options for this run (the prompt batches, dynamic sampling, the sampler's settings) and
    the NoisyRollout, if any (the last noisy_rollout x G samples of each group drawn on perturbed images)."""
    n_noisy = round(cfg.noisy_rollout * cfg.group_size)
    kinds = tuple(k.strip() for k in cfg.noise_kinds.split(",") if k.strip())
    anneal = cfg.noise_anneal_steps or cfg.steps
    noisy = NoisyRollout(n_noisy, cfg.noise_strength, anneal, kinds, random.Random(cfg.seed)) if n_noisy else None
    seeded = cfg.row_seeded_sampling or world > 1  # per-row sampling noise: the same samples on any rank layout
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


def batch_metrics(batch: UpdateBatch, adv: torch.Tensor) -> dict:
    """The update batch's diagnostics: advantage statistics, response lengths, the truncated fraction."""
    lengths = batch.resp_mask.sum(1).float()
    adv = adv[batch.resp_mask.bool()] if adv.dim() == 2 else adv  # token advantages: response tokens only
    return {
        "advantages/mean": float(adv.mean()),
        "advantages/std": float(adv.std()),
        "advantages/max": float(adv.max()),
        "advantages/min": float(adv.min()),
        "completions/mean_length": float(lengths.mean()),
        "completions/truncated_frac": float(batch.truncated.float().mean()),
    }


def train(cfg: Config, model=None, data: list[dict] | None = None) -> Result:
    """data: optional prompt records [{'prompt', ...reward columns}]; model: optional Policy."""
    # ---- setup -------------------------------------------------------------------------------------
    if cfg.kl_target > 0 and (cfg.beta <= 0 or cfg.kl_schedule != "constant"):
        raise ConfigError("--kl-target (the adaptive KL controller) needs --beta > 0 and --kl-schedule constant")
    evaluating = bool(cfg.eval_every or cfg.eval_every_s)
    check_fsdp(
        cfg.fsdp, lora_r=cfg.lora_r > 0, resume=cfg.resume, eval_every=evaluating, dynamic_sampling=cfg.dynamic_sampling
    )
    cfg = setup(cfg)
    policy = build_policy(model, cfg.model, **policy_options(cfg))
    task, data, reward_set, test = load_prompts(policy, data, **prompt_options(cfg), recipe="grpo")
    world = dist.world_size()
    if world > 1 and cfg.dynamic_sampling:
        raise ValueError("--dynamic-sampling under torchrun is not supported yet (ranks would refill unevenly)")
    if cfg.noisy_rollout and cfg.engine != "local":
        raise ConfigError("--noisy-rollout samples from perturbed pixels: it needs --engine local")
    if cfg.noisy_rollout and not policy.is_vlm:
        raise ValueError("--noisy-rollout perturbs images: it needs an image+text model and image prompts")
    steps = None
    if cfg.step_rewards:
        if task is None or not hasattr(task, "step_scores"):
            raise ConfigError(
                f"--step-rewards needs a task with a step verifier (the compact arith tasks); {cfg.task!r} "
                "has none (a chat-template task is scored on its prose answer)"
            )
        if cfg.advantage != "group":
            raise ConfigError("--step-rewards makes its own token advantages: use --advantage group (the default)")
        steps = lambda sb: step_advantages(task, sb, cfg.group_size, policy.tokenizer, cfg.step_baseline)
    ref_model = frozen_reference(policy, cfg.dtype) if cfg.beta > 0 or cfg.beta_final > 0 else None  # none at beta 0
    optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay)
    gen = torch.Generator(device=policy.device).manual_seed(cfg.seed)
    # the KL and entropy coefficients over the run (schedules, adaptive controllers), saved with checkpoints
    kl_coef = KLCoef(cfg.beta, cfg.kl_schedule, cfg.beta_final, cfg.kl_target, cfg.kl_horizon)
    ent_coef = EntropyCoef(cfg.entropy_coef, cfg.entropy_target, cfg.entropy_coef_delta, cfg.entropy_coef_max)
    saved = {**kl_coef.state(), **ent_coef.state(), "pass_rates": {}}
    start, evals = resume_state(cfg.out_dir, policy, optimizer, gen, saved) if cfg.resume else (0, [])
    kl_coef.load(saved)
    ent_coef.load(saved)
    sampler = PromptSampler(
        cfg.prompt_sampler,
        data,
        prompts_per_step=cfg.prompts_per_step,
        seed=cfg.seed,
        stages=cfg.curriculum_stages,
        oversample=cfg.pass_rate_oversample,
    )
    sampler.load(saved["pass_rates"])  # the tracker's rates at the checkpoint (resume)
    if dist.is_main() and test and not cfg.resume:
        held_out_evaluator(policy, task, test, run=None, evals=evals, max_new_tokens=cfg.max_new_tokens)(
            0, "before GRPO"
        )
    if cfg.fsdp and world > 1:  # FSDP2 after the evaluation before training (rank 0 alone runs that one)
        dist.wrap(policy, fsdp=True)
        optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay)

    # ---- derived values: the schedule over all optimizer steps, when to save, evaluate and stop ----------
    groups_of, noisy = group_sampling(cfg, world, gen)
    engine = make_engine(cfg.engine, policy, out_dir=cfg.out_dir, memory=cfg.vllm_memory, seed=cfg.seed)
    optimizer_steps = cfg.steps * cfg.num_iterations * cfg.minibatches  # the learning-rate schedule's length
    schedule = Schedule(cfg.lr, cfg.warmup_steps, optimizer_steps, cfg.min_lr_ratio, cfg.max_grad_norm)
    own = {k: getattr(cfg, k) for k in TERM_OPTIONS}  # the term's own options among them (losses/policy.py)
    loss_fn = PolicyLoss(
        cfg.policy_loss,
        term_options(cfg.policy_loss, **own),
        cfg.clip_eps,
        cfg.clip_eps_high or None,
        cfg.importance,
        cfg.loss_agg,
        cfg.kl_estimator,
        cfg.max_new_tokens,
    )
    cadence = Cadence(
        cfg.steps, cfg.save_every, cfg.eval_every, cfg.eval_every_s, cfg.time_budget_s, cfg.stop_at_step, not cfg.fsdp
    )
    show = ("reward/mean", "kl")
    run = Run(
        cfg.out_dir,
        cadence,
        desc="grpo",
        show=show,
        resume=cfg.resume,
        start=start,
        evals=evals,
        report_to=cfg.report_to,
        log_every=cfg.log_every,
        config=asdict(cfg),
    )
    evaluate = held_out_evaluator(policy, task, test, run=run, max_new_tokens=cfg.max_new_tokens)
    extra = lambda: {
        "gen_rng": gen.get_state().tolist(),
        "evals": run.evals,
        "pass_rates": sampler.state(),
        **kl_coef.state(),
        **ent_coef.state(),
    }
    save = lambda step: save_checkpoint(cfg.out_dir, policy, optimizer, step, extra())
    skipped = {"zero_signal_groups": 0, "refill_rounds": 0}

    # ---- training loop -----------------------------------------------------------------------------
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        progress = run.progress(step)  # steps or seconds, whichever ends the run: the curriculum and KL schedules
        # -- rollout and score (dynamic sampling: keep groups whose rewards differ, refill the rest)
        with phase("rollout", step + 1, (cfg.prompts_per_step * cfg.group_size, cfg.max_new_tokens)):
            groups = sample_groups(
                policy, data, reward_set, step=step, progress=progress, engine=engine, sampler=sampler, **groups_of
            )
        run.log_completions(step + 1, groups.rounds[0][0], reward_set.names, cfg.log_completions)
        for sb, _ in groups.rounds:  # every round's responses count, refills included
            run.count_samples(sb)
        skipped["zero_signal_groups"] += groups.zero_signal
        skipped["refill_rounds"] += groups.refills
        # -- advantages, then the update: num_iterations passes x minibatches
        rows, adv = advantages(cfg, groups, reward_set.weights, steps)
        row = {
            **groups.metrics,
            **sampler.metrics(progress),
            "skipped_step": float(not rows),
        }  # no rows: every group's rewards were equal
        if rows:
            batch = pack_rows(rows, policy.tokenizer.pad_token_id)
            adv = adv[:, : batch.n_resp] if adv.dim() == 2 else adv  # token advantages: the response area
            beta, ent_now, bonus_coef = kl_coef.at(progress), ent_coef.coef, ent_coef.bonus()
            t_up = time.perf_counter()
            engine.sleep()  # a colocated engine frees its device memory for the update
            with phase("update", step + 1, batch.ids.shape):
                stats, lr = grpo_update(
                    policy,
                    optimizer,
                    batch,
                    adv,
                    cfg=cfg,
                    loss_fn=loss_fn,
                    step=step,
                    beta=beta,
                    ref_model=ref_model,
                    schedule=schedule,
                    entropy_coef=bonus_coef,
                )
            row.update(
                {
                    **stats,
                    **batch_metrics(batch, adv),
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
        if end_of_step(run, step + 1, row, t_step=t0, save=save, evaluate=evaluate):
            break

    engine.close()

    # ---- evaluate and save (rank 0) ----------------------------------------------------------------
    policy = gathered_policy(policy, cfg)
    final_eval = held_out_evaluator(policy, task, test, run=run, max_new_tokens=cfg.max_new_tokens)
    summary = end_of_run(
        run,
        policy,
        merged=not cfg.save_adapter_only,
        report=cfg.report,
        task=task,
        examples=test or data,
        max_new_tokens=cfg.max_new_tokens,
        evaluate=final_eval and (lambda: final_eval(run.steps, "after GRPO")),
    )
    if reward_set.faults:
        console.print(f"[yellow]reward faults: {reward_set.faults}[/]")
    summary.update({"skips": skipped, "reward_faults": reward_set.faults, "config": asdict(cfg)})
    return Result(policy, run.history, summary)
