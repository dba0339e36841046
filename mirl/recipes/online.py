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

import torch

from .. import distributed as dist
from ..checkpoint import save_checkpoint
from ..data.collate import batch_indices
from ..device import phase
from ..logging import TRACKERS, console
from ..logps import response_logps
from ..losses import get_loss, mean_over_examples, parse_loss_spec, preference_loss
from ..optim import Schedule, make_optimizer, optimizer_step
from ..options import choice, choice_list
from ..rollout.engine import ENGINES, make_engine
from ..rollout.sample import row_seeds
from ..rollout.score import UpdateBatch, pack_rows, rollout_and_score
from .common import (
    build_policy,
    check_fsdp,
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
        return preference_loss(terms, lp, ref, positive[usable], beta=cfg.beta, options=options, mask=scored[usable])
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


def usable_groups(outcomes) -> tuple[list[int], dict]:
    """The groups with both a positive and a negative, and the step's counts (all correct, all wrong, used,
    unscorable responses)."""
    scored, positive, negative = outcomes
    n_pos, n_neg = positive.sum(1), negative.sum(1)
    usable = [p for p in range(positive.shape[0]) if int(n_pos[p]) > 0 and int(n_neg[p]) > 0]
    return usable, {
        "all_correct": int(((n_pos > 0) & (n_neg == 0)).sum()),
        "all_wrong": int(((n_pos == 0) & (n_neg > 0)).sum()),
        "used": len(usable),
        "unscorable": int((~scored).sum()),
    }


def train(cfg: Config, model=None, data: list[dict] | None = None) -> Result:
    """data: optional prompt records [{'prompt', ...reward columns}]; model: optional Policy."""
    # ---- setup -------------------------------------------------------------------------------------
    terms = parse_loss_spec(cfg.loss)
    group = get_loss(terms[0][0]).kind == "group"
    check_fsdp(cfg.fsdp, lora_r=cfg.lora_r > 0, resume=cfg.resume, eval_every=bool(cfg.eval_every or cfg.eval_every_s))
    cfg = setup(cfg)
    policy = build_policy(model, cfg.model, **policy_options(cfg))
    task, data, reward_set, test = load_prompts(policy, data, **prompt_options(cfg), recipe="online")
    world = dist.world_size()
    ref_model = frozen_reference(policy, cfg.dtype)
    optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay)
    gen = torch.Generator(device=policy.device).manual_seed(cfg.seed)
    options = {"neg_mix": cfg.neg_mix, "label_smoothing": cfg.label_smoothing}
    start, evals = resume_state(cfg.out_dir, policy, optimizer, gen) if cfg.resume else (0, [])
    if dist.is_main() and test and not cfg.resume:
        held_out_evaluator(policy, task, test, run=None, evals=evals, max_new_tokens=cfg.max_new_tokens)(
            0, f"before online {cfg.loss}"
        )
    if cfg.fsdp and world > 1:  # FSDP2 after the evaluation before training (rank 0 alone runs that one)
        dist.wrap(policy, fsdp=True)
        optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay)

    # ---- derived values: the schedule, when to save, evaluate and stop ------------------------------------
    seeded = cfg.row_seeded_sampling or world > 1  # per-row sampling noise: the same samples on any rank layout
    sampling = dict(
        group_size=cfg.k, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, generator=gen
    )
    engine = make_engine(cfg.engine, policy, out_dir=cfg.out_dir, memory=cfg.vllm_memory, seed=cfg.seed)
    sampling["engine"] = engine
    schedule = Schedule(cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio, cfg.max_grad_norm)
    cadence = Cadence(
        cfg.steps, cfg.save_every, cfg.eval_every, cfg.eval_every_s, cfg.time_budget_s, cfg.stop_at_step, not cfg.fsdp
    )
    name, show = f"online {cfg.loss}", ("reward/mean",)
    run = Run(
        cfg.out_dir,
        cadence,
        desc=name,
        show=show,
        resume=cfg.resume,
        start=start,
        evals=evals,
        report_to=cfg.report_to,
        log_every=cfg.log_every,
        config=asdict(cfg),
    )
    evaluate = held_out_evaluator(policy, task, test, run=run, max_new_tokens=cfg.max_new_tokens)
    extra = lambda: {"gen_rng": gen.get_state().tolist(), "evals": run.evals}
    save = lambda step: save_checkpoint(cfg.out_dir, policy, optimizer, step, extra())
    counts = {"all_correct": 0, "all_wrong": 0, "used": 0, "unscorable": 0}

    # ---- training loop -----------------------------------------------------------------------------
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        # -- rollout and score: K samples per prompt of this rank's share of the global batch
        idx = batch_indices(len(data), cfg.prompts_per_step, step, cfg.seed)
        mine = dist.shard(list(range(len(idx))))  # this rank's positions in the global batch
        seeds = row_seeds(cfg.seed, step, mine, cfg.k) if seeded else None
        with phase("rollout", step + 1, (cfg.prompts_per_step * cfg.k, cfg.max_new_tokens)):
            sb = rollout_and_score(policy, [data[idx[i]] for i in mine], reward_set, seeds=seeds, **sampling)
        run.log_completions(step + 1, sb, reward_set.names, cfg.log_completions)
        run.count_samples(sb)
        # -- outcomes: groups with both a positive and a negative are usable; the others are counted
        outcomes = group_outcomes(sb.rewards, cfg.k, cfg.positive_threshold)
        usable, step_counts = usable_groups(outcomes)
        for k, v in step_counts.items():
            counts[k] += v
        row = {
            **{k: dist.all_mean(v) for k, v in sb.metrics.items()},
            "time/generation_s": sb.gen_s,
            "time/scoring_s": sb.score_s,
            **{f"groups/{k}": step_counts[k] for k in ("all_correct", "all_wrong", "used")},
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
            grad_norm, lr = optimizer_step(policy, optimizer, step, schedule, sync_grads=True)
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
        if end_of_step(run, step + 1, row, t_step=t0, save=save, evaluate=evaluate):
            break

    engine.close()

    # ---- evaluate and save -------------------------------------------------------------------------
    policy = gathered_policy(policy, cfg)
    console.print(
        f"groups skipped: {counts['all_correct']} all correct, {counts['all_wrong']} all wrong; {counts['used']} used"
    )
    final_eval = held_out_evaluator(policy, task, test, run=run, max_new_tokens=cfg.max_new_tokens)
    summary = end_of_run(
        run,
        policy,
        merged=not cfg.save_adapter_only,
        report=cfg.report,
        task=task,
        examples=test or data,
        max_new_tokens=cfg.max_new_tokens,
        evaluate=final_eval and (lambda: final_eval(run.steps, f"after online {cfg.loss}")),
    )
    summary.update({"groups": counts, "reward_faults": reward_set.faults, "config": asdict(cfg)})
    return Result(policy, run.history, summary)
