"""Online contrastive fine-tuning, where the two seeds meet (docs/algorithms.md §3): sample K responses per prompt
from the current policy, verify them, and train with a preference loss on what was sampled.

    pair losses (mio, dpo, ...):  (correct, incorrect) pairs drawn from each group
    group losses (group_js, ...): the whole group; positives = responses with reward >= positive_threshold
    reward-weighted (nca, infonca): the whole group with its scalar rewards, targets softmax(reward / alpha)
The reference is the starting policy (a frozen copy). Prompts whose K samples all agree carry no
contrast: they are skipped and counted (groups/all_correct, groups/all_wrong; for the reward-weighted losses,
groups/all_equal: equal rewards give uniform targets, which hold no reward information).

    mirl online --model runs/sft/final --task arith --loss mio --time-budget-s 240
    mirl online --model runs/sft/final --task arith --loss nca --alpha 0.1
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch

from .. import distributed as dist
from ..device import phase
from ..envs.task import EnvTask
from ..logging import TRACKERS, console
from ..logps import response_logps
from ..losses import get_loss, mean_over_examples, parse_loss_spec, preference_loss
from ..optim import optimizer_step
from ..options import ConfigError, choice, choice_list
from ..rollout.engine import ENGINES
from ..rollout.score import UpdateBatch, pack_rows
from .common import (
    build_policy,
    check_fsdp,
    frozen_reference,
    load_prompts,
    policy_options,
    prompt_options,
)
from .held_out import held_out_set
from .rl import finish_loop, sample_step, start_loop
from .run import Result, end_of_step, setup

ALPHA = 0.1  # --alpha's default; the rule its value must pass (options.check_config reads it beside the field)
ALPHA_RULE = (lambda v: not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
              "a finite number >= 0")  # fmt: skip


@dataclass
class Config:
    """Options of `mirl online` (one line of doc each, the CLI's flags)."""

    model: str = "gpt-nano"  # preset or saved model folder (usually an SFT checkpoint)
    task: str = "arith"  # task for prompts, the 'task' reward and held-out evaluation
    chat: str = choice("auto", "yes", "no")  # built-in task through the model's chat template (auto: if it has one)
    data: str = ""  # prompt dataset with 'prompt' and reward columns (overrides task prompts)
    split: str = "train"  # the split of --data to read (a datasets folder or hub dataset with several)
    data_config: str = ""  # the configuration (subset) of a hub dataset --data
    revision: str = ""  # the hub revision (branch, tag, commit) of a hub dataset --data
    model_revision: str = ""  # the hub revision (branch, tag, commit) of a hub model --model
    n_prompts: int = 5000  # training prompts generated from the task
    reward: str = "task"  # reward spec, as in grpo
    env: str = ""  # multi-turn episodes in an environment: calc, guess, python, zoom, file.py:Class, module:Class
    max_turns: int = 4  # --env: model turns per episode at most (--max-new-tokens: each turn's limit)
    max_episode_tokens: int = 0  # --env: tokens after the opening, turns and replies together (0 = turns x limit)
    tool_timeout_s: float = 10.0  # --env: a tool call, reset or step running longer is a counted fault
    reward_timeout_s: float = 10.0  # reward calls running longer are cut off and counted
    positive_threshold: float = 1.0  # a response is a positive when its reward is at least this
    loss: str = "mio"  # pair loss (mio, dpo, ... or a weighted mix) or a group loss (group_js, ...; nca, infonca)
    beta: float = 0.1  # critic temperature
    neg_mix: float = 0.5  # weight of the chosen response in the negative mixture (mio, dv, js, nwj)
    label_smoothing: float = 0.1  # robust DPO flip rate
    alpha: float = field(default=ALPHA, metadata={"rule": ALPHA_RULE})  # nca, infonca: the temperature of the
    # reward targets softmax(reward / alpha) over the group (0: equal weight on its best responses)
    k: int = 8  # samples per prompt
    pairs_per_prompt: int = 2  # (correct, incorrect) pairs drawn per prompt for pair losses
    prompts_per_step: int = 16  # prompts per step
    steps: int = 200  # steps (one generation batch and one optimizer step each)
    time_budget_s: float = 0.0  # stop after this many seconds of training (0 = no limit)
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus sampling
    engine: str = choice("local", among=ENGINES)  # what samples: mirl's own sampler or vllm (docs/speed.md)
    vllm_memory: float = 0.3  # --engine vllm: the share of GPU memory vLLM takes (on a CPU: of RAM, for its KV cache)
    max_new_tokens: int = 40  # response length limit
    max_len: int = 128  # model context for new tiny models
    lr: float = 2e-5  # learning rate
    warmup_steps: int = 0  # linear warmup (optimizer steps)
    min_lr_ratio: float = 1.0  # cosine decay floor as a fraction of lr (1 = constant after warmup)
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    seed: int = 0  # seed of initialisation, data order and sampling
    threads: int = 2  # torch CPU threads
    out_dir: str = "runs/online"  # run folder: config.json, metrics.jsonl, tb/, checkpoint/, final/, report/
    save_every: int = 0  # checkpoint every N steps (0 = only at the end)
    resume: bool = False  # continue from out_dir/checkpoint
    stop_at_step: int = 0  # end the run after this step as if interrupted (0 = run to the end)
    eval_n: int = 200  # held-out prompts evaluated before and after (0 = skip)
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


def seq_logps(policy, batch: UpdateBatch, bf16: bool = False) -> torch.Tensor:
    """Sequence log-probs (B,) of the batch's responses (summed over response tokens) at temperature 1."""
    lp, _ = response_logps(policy, batch.ids, batch.attn, batch.n_resp, 1.0, images=batch.row_images(), bf16=bf16)
    return (lp * batch.resp_mask).sum(-1)


def group_outcomes(rewards: torch.Tensor, k: int, threshold: float):
    """(scored, positive, negative), each (P, K) bool, from rewards (P * K,): an unscorable (NaN) response is no
    outcome, neither a positive nor a negative."""
    scored = ~torch.isnan(rewards).view(-1, k)
    positive = (torch.nan_to_num(rewards, nan=0.0) >= threshold).view(-1, k) & scored
    return scored, positive, scored & ~positive


def contrastive_loss(policy, ref_model, sb, usable, outcomes, terms, *, cfg: Config, step: int, mine, options):
    """The algorithm of this recipe: the preference loss on what was sampled. Group losses take the usable
    groups whole, (U, K); pair losses take pairs_per_prompt (correct, incorrect) pairs drawn from each usable
    group, both sides in one forward. -> (per_example_loss, metrics)."""
    scored, positive, negative = outcomes
    pad = policy.tokenizer.pad_token_id
    if get_loss(terms[0][0]).kind == "group":
        rows = [(sb.batch, p * cfg.k + j) for p in usable for j in range(cfg.k)]
        batch = pack_rows(rows, pad)
        lp = seq_logps(policy, batch, cfg.bf16).view(len(usable), cfg.k)
        with torch.no_grad():
            ref = seq_logps(ref_model, batch, cfg.bf16).view(len(usable), cfg.k)
        rewards = sb.rewards.view(-1, cfg.k)[usable]  # (U, K) scalar rewards, NaN unscored: nca, infonca read them
        return preference_loss(
            terms, lp, ref, positive[usable], beta=cfg.beta, options=options, mask=scored[usable], rewards=rewards
        )
    pairs = []
    for p in usable:
        good = [p * cfg.k + j for j in range(cfg.k) if positive[p, j]]
        bad = [p * cfg.k + j for j in range(cfg.k) if negative[p, j]]
        rng = random.Random(f"{cfg.seed}/{step}/{mine[p]}")  # per prompt: the same on any rank layout
        pairs += [(rng.choice(good), rng.choice(bad)) for _ in range(cfg.pairs_per_prompt)]
    rows = [(sb.batch, c) for c, _ in pairs] + [(sb.batch, r) for _, r in pairs]
    batch = pack_rows(rows, pad)
    lp = seq_logps(policy, batch, cfg.bf16)
    with torch.no_grad():
        ref = seq_logps(ref_model, batch, cfg.bf16)
    n, lengths = len(pairs), batch.resp_mask.sum(1).float()
    per_ex, metrics = preference_loss(
        terms,
        torch.stack([lp[:n], lp[n:]], 1),
        torch.stack([ref[:n], ref[n:]], 1),
        torch.tensor([[True, False]], device=lp.device).expand(n, 2),
        beta=cfg.beta,
        options=options,
        lengths=torch.stack([lengths[:n], lengths[n:]], 1),
    )
    return per_ex, {**metrics, "logps/chosen": lp[:n].detach(), "logps/rejected": lp[n:].detach()}


def usable_groups(outcomes, rewards: torch.Tensor | None = None) -> tuple[list[int], dict]:
    """The groups a loss learns from, and the step's counts. Binary losses: the groups with both a positive and a
    negative (counts: all correct, all wrong, used, unscorable responses). Reward-weighted losses (rewards (P, K)
    given): the groups whose scored rewards are not all equal (counts: all equal, used, unscorable). Equal
    rewards would give uniform targets, which hold no reward information: infonca's loss then only pulls the
    group's T toward one another, nca's pulls each T toward 0 (the reference); such groups are skipped, as the
    binary losses skip all-correct and all-wrong ones and GRPO gives them zero advantage."""
    scored, positive, negative = outcomes
    if rewards is None:
        n_pos, n_neg = positive.sum(1), negative.sum(1)
        ok = (n_pos > 0) & (n_neg > 0)
        counts = {
            "all_correct": int(((n_pos > 0) & (n_neg == 0)).sum()),
            "all_wrong": int(((n_pos == 0) & (n_neg > 0)).sum()),
        }
    else:
        high = rewards.masked_fill(~scored, float("-inf")).max(1).values
        low = rewards.masked_fill(~scored, float("inf")).min(1).values
        ok = high > low  # at least two scored responses, not all alike
        counts = {"all_equal": int((scored.any(1) & ~ok).sum())}
    usable = [p for p in range(scored.shape[0]) if bool(ok[p])]
    return usable, {**counts, "used": len(usable), "unscorable": int((~scored).sum())}


def train(cfg: Config, model=None, data: list[dict] | None = None) -> Result:
    """data: optional prompt records [{'prompt', ...reward columns}]; model: optional Policy."""
    # ---- setup -------------------------------------------------------------------------------------
    terms = parse_loss_spec(cfg.loss)
    group = get_loss(terms[0][0]).kind == "group"
    weighted = any(get_loss(n).reads_rewards for n, _ in terms)  # nca, infonca: groups by their scalar rewards
    if cfg.alpha != ALPHA and not weighted:
        raise ConfigError(f"--alpha {cfg.alpha!r} has no effect: it needs a reward-weighted --loss (nca, infonca)")
    check_fsdp(cfg.fsdp, lora_r=cfg.lora_r > 0, resume=cfg.resume, eval_every=bool(cfg.eval_every or cfg.eval_every_s))
    cfg = setup(cfg)
    policy = build_policy(model, cfg.model, **policy_options(cfg))
    env = EnvTask.of(cfg, policy.tokenizer) if cfg.env else None  # with --env, reward 'task' is the env's
    options = {**prompt_options(cfg), "reward": "env" if env and cfg.reward == "task" else cfg.reward}
    task, data, reward_set, test = load_prompts(policy, data, **options, recipe="online", env=env)
    eval_task, test = held_out_set(policy, task, test, benchmark=cfg.eval_benchmark, chat=cfg.chat, n=cfg.eval_n,
                                   max_new_tokens=cfg.max_new_tokens)  # fmt: skip
    world = dist.world_size()
    ref_model = frozen_reference(policy, cfg.dtype)
    options = {"neg_mix": cfg.neg_mix, "label_smoothing": cfg.label_smoothing, "alpha": cfg.alpha}

    # ---- derived values: the schedule, the run ------------------------------------------------------------
    name = f"online {cfg.loss}"
    loop = start_loop(
        cfg,
        policy,
        eval_task,
        test,
        desc=name,
        show=("reward/mean",),
        before=f"before {name}",
        optimizer_steps=cfg.steps,
        engine=cfg.engine,
        vllm_memory=cfg.vllm_memory,
        row_seeded=cfg.row_seeded_sampling,
    )
    run, engine = loop.run, loop.engine
    sampling = dict(prompts_per_step=cfg.prompts_per_step, seed=cfg.seed, group_size=cfg.k,
                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)  # fmt: skip
    skipped = ("all_equal",) if weighted else ("all_correct", "all_wrong")  # the groups' counts, run-long
    counts = dict.fromkeys((*skipped, "used", "unscorable"), 0)

    # ---- training loop -----------------------------------------------------------------------------
    for step in range(run.start, cfg.steps):
        t0 = time.perf_counter()
        # -- rollout and score: K samples per prompt of this rank's share of the global batch
        sb, mine = sample_step(loop, policy, data, reward_set, step, log_completions=cfg.log_completions,
                               rollout=env and env.rollout, **sampling)  # fmt: skip
        # -- outcomes: groups with both a positive and a negative (reward-weighted: unequal rewards) are usable;
        # the others are counted
        outcomes = group_outcomes(sb.rewards, cfg.k, cfg.positive_threshold)
        usable, step_counts = usable_groups(outcomes, sb.rewards.view(-1, cfg.k) if weighted else None)
        for k, v in step_counts.items():
            counts[k] += v
        row = {
            **{k: dist.all_mean(v) for k, v in sb.metrics.items()},
            "time/generation_s": sb.gen_s,
            "time/scoring_s": sb.score_s,
            **{f"groups/{k}": step_counts[k] for k in (*skipped, "used")},
        }
        # -- update: every rank steps when any rank has a usable group (a rank without one adds zero gradient)
        n_examples = dist.all_sum(len(usable) * (1 if group else cfg.pairs_per_prompt))
        if n_examples:
            loss, metrics, n_tokens = torch.zeros(()), {}, 0
            engine.sleep()  # a colocated engine frees its device memory for the update
            if usable:
                with phase("update", step + 1, tuple(sb.batch.response_ids.shape)):
                    per_ex, metrics = contrastive_loss(
                        policy, ref_model, sb, usable, outcomes, terms, cfg=cfg, step=step, mine=mine, options=options
                    )
                    loss = mean_over_examples(per_ex, global_count=n_examples)
                    loss.backward()
                n_tokens = int(sb.batch.prompt_mask.sum() + sb.batch.response_mask.sum())
            elif cfg.fsdp and world > 1:  # FSDP2 reduces gradients inside the backward: every rank takes one
                dummy = pack_rows([(sb.batch, 0)], policy.tokenizer.pad_token_id)
                (seq_logps(policy, dummy, cfg.bf16).sum() * 0.0).backward()
            grad_norm, lr = optimizer_step(policy, loop.optimizer, step, loop.schedule, sync_grads=True)
            engine.wake()  # (vLLM on CUDA slept through the update)
            engine.sync(policy)  # the next rollout samples from the updated weights
            # each rank's loss carries world / global count: their sum over ranks / world is the global mean
            row.update(
                {
                    "loss": dist.all_sum(loss.item()) / world,
                    "grad_norm": grad_norm,
                    "lr": lr,
                    **{k: float(v.float().mean()) for k, v in metrics.items()},
                    "tokens_per_s": n_tokens / (time.perf_counter() - t0),
                }
            )
        if end_of_step(run, step + 1, row, t_step=t0, save=loop.save, evaluate=loop.evaluate):
            break

    # ---- evaluate and save -------------------------------------------------------------------------
    said = ", ".join(f"{counts[k]} {k.replace('_', ' ')}" for k in skipped)
    console.print(f"groups skipped: {said}; {counts['used']} used")
    policy, summary = finish_loop(loop, cfg, policy, eval_task, test, data, after=f"after {name}")
    summary.update({"groups": counts, "reward_faults": reward_set.faults, "env_faults": env and env.faults})
    return Result(policy, run.history, summary)
