"""On-policy distillation: the student samples responses to the prompts, and the loss on each of its
response tokens is the divergence from the teacher's next-token distribution there (losses/distill.py:
reverse KL by default, or the generalised JSD with --jsd-beta), a token mean over the batch. The teacher is
frozen and must share the student's tokenizer. The task's reward of the student's samples is logged, not
trained on.

    mirl distill --teacher runs/teacher/final --model runs/student/final --task arith --steps 300
    mirl distill --teacher runs/vlm_teacher/final --model vlm-nano --task shapes
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .. import distributed as dist
from ..device import autocast, phase, place_frozen
from ..logging import TRACKERS
from ..logps import head_logits
from ..losses.distill import generalized_jsd
from ..losses.reduce import masked_reduce
from ..models.policy import load_policy
from ..optim import optimizer_step
from ..options import ConfigError, choice, choice_list
from ..rollout.score import pack_rows
from .common import (
    build_policy,
    check_fsdp,
    load_prompts,
    policy_options,
    prompt_options,
    reward_model_note,
)
from .held_out import held_out_evaluator, held_out_set
from .rl import finish_loop, sample_step, start_loop
from .run import Result, end_of_step, setup


@dataclass
class Config:
    """Options of `mirl distill` (one line of doc each, the CLI's flags)."""

    model: str = "gpt-nano"  # the student: preset or saved model folder
    teacher: str = ""  # the teacher: a saved model folder (or preset) with the student's tokenizer
    task: str = "arith"  # task for prompts, the logged reward and held-out evaluation
    chat: str = choice("auto", "yes", "no")  # built-in task through the model's chat template (auto: if it has one)
    data: str = ""  # prompt dataset (.jsonl/.parquet/folder) with a 'prompt' column; overrides task prompts
    split: str = "train"  # the split of --data to read (a datasets folder or hub dataset with several)
    data_config: str = ""  # the configuration (subset) of a hub dataset --data
    revision: str = ""  # the hub revision (branch, tag, commit) of a hub dataset --data
    model_revision: str = ""  # the hub revision (branch, tag, commit) of a hub model --model
    n_prompts: int = 5000  # training prompts generated from the task
    reward: str = "task"  # reward spec of the logged (not trained on) reward of the student's samples
    reward_timeout_s: float = 10.0  # a reward call running longer is cut off, counted and reported
    jsd_beta: float = 1.0  # the divergence: 1 = reverse KL(student || teacher), 0 = forward KL, between: JSD
    samples_per_prompt: int = 1  # student samples per prompt
    prompts_per_step: int = 32  # prompts per step (one generation batch and one optimizer step each)
    steps: int = 200  # optimizer steps
    time_budget_s: float = 0.0  # stop after this many seconds of training (0 = no limit)
    temperature: float = 1.0  # sampling temperature (and the temperature of both distributions in the loss)
    max_new_tokens: int = 40  # response length limit
    max_len: int = 128  # model context for new tiny models
    lr: float = 1e-4  # learning rate
    warmup_steps: int = 0  # linear warmup (optimizer steps)
    min_lr_ratio: float = 1.0  # cosine decay floor as a fraction of lr (1 = constant after warmup)
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    seed: int = 0  # seed of initialisation, data order and sampling
    threads: int = 2  # torch CPU threads
    out_dir: str = "runs/distill"  # run folder: config.json, metrics.jsonl, tb/, checkpoint/, final/, report/
    save_every: int = 0  # checkpoint every N steps (0 = only at the end)
    resume: bool = False  # continue from out_dir/checkpoint
    stop_at_step: int = 0  # end the run after this step as if interrupted (0 = run to the end)
    eval_n: int = 200  # held-out prompts evaluated (greedy) before and after, for the student and the teacher
    eval_benchmark: str = ""  # held-out set: a benchmark (gsm8k, math500, aime24, aime25, amc23) instead of the task
    eval_every: int = 0  # also evaluate every N steps (0 = only before and after)
    eval_every_s: float = 0.0  # also evaluate every N seconds of training (evaluations excluded; 0 = off)
    row_seeded_sampling: bool = False  # sampling noise per row from (seed, step, prompt, sample): rank-layout free
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


def response_logits(policy, ids, attn, n_resp: int, images=None, bf16: bool = False) -> torch.Tensor:
    """The logits (B, R, V) that predict the last n_resp tokens (only those positions go through the head)."""
    with autocast(policy, bf16):
        out = policy(ids, attn, images=images, output="hidden_and_head")
    return head_logits(out, n_resp)


def distill_loss(student, teacher, batch, *, beta: float, temperature: float, bf16: bool = False, global_count=None):
    """The token mean over the batch's response tokens of the divergence student -> teacher (losses/distill.py),
    and the sampled reverse-KL estimate log p_s - log p_t of the student's own tokens (a diagnostic)."""
    images = batch.row_images()
    s = response_logits(student, batch.ids, batch.attn, batch.n_resp, images, bf16)
    with torch.no_grad():
        t = response_logits(teacher, batch.ids, batch.attn, batch.n_resp, images, bf16)
    per_token = generalized_jsd(s, t, beta=beta, temperature=temperature)
    mask = batch.resp_mask.to(per_token.dtype)
    loss = masked_reduce(per_token, mask, "token_mean", global_count=global_count)
    tok = batch.ids[:, -batch.n_resp :].unsqueeze(-1)
    with torch.no_grad():
        lp_s = torch.log_softmax(s / temperature, -1).gather(-1, tok).squeeze(-1)
        lp_t = torch.log_softmax(t / temperature, -1).gather(-1, tok).squeeze(-1)
        sampled = float(((lp_s - lp_t) * mask).sum() / mask.sum().clamp(min=1))
    return loss, {"divergence": float(loss.detach()), "reverse_kl_sampled": sampled}


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers give the same ids (vocabulary size, special tokens, a probe text)."""
    probe = "Question: 12+7=? Answer: 19. The quick brown fox, 0123456789."
    return (
        len(a) == len(b)
        and a.encode(probe) == b.encode(probe)
        and (a.eos_token_id, a.pad_token_id) == (b.eos_token_id, b.pad_token_id)
    )


def same_model(a: str, b: str) -> bool:
    """Whether two --model values name the same model: the same preset (built alike from the seed), or the
    same folder (a run folder and its final/ alike)."""
    from pathlib import Path

    def where(x: str):
        p = Path(x).expanduser()
        if not p.exists():
            return x
        p = p.resolve()  # a run folder loads as its final/ (models/policy.py: load_policy)
        run = p.is_dir() and not any(p.glob("*.safetensors")) and (p / "final" / "config.json").exists()
        return p / "final" if run else p

    return where(a) == where(b)


def train(cfg: Config, model=None, data: list[dict] | None = None, teacher=None) -> Result:
    """data: optional prompt records [{'prompt', ...}]; model: optional student Policy; teacher: optional Policy."""
    # ---- setup -------------------------------------------------------------------------------------
    if not cfg.teacher and teacher is None:
        raise ConfigError("--teacher is required: a saved model folder (or preset) to distil from")
    if not 0.0 <= cfg.jsd_beta <= 1.0:
        raise ConfigError(f"--jsd-beta {cfg.jsd_beta!r}: must be a number in [0, 1]")
    if teacher is None and model is None and same_model(cfg.teacher, cfg.model):
        raise ConfigError(
            f"--teacher {cfg.teacher!r} is the student (--model {cfg.model!r}): the divergence between a model and "
            "itself is 0 and nothing would be learned; distil from a stronger model"
        )
    check_fsdp(cfg.fsdp, lora_r=cfg.lora_r > 0, resume=cfg.resume, eval_every=bool(cfg.eval_every or cfg.eval_every_s))
    cfg = setup(cfg)
    policy = build_policy(model, cfg.model, **policy_options(cfg))
    if teacher is None:
        reward_model_note(cfg.teacher, "--teacher")
        teacher = load_policy(cfg.teacher, max_seq_len=cfg.max_len, seed=cfg.seed)
    if policy.is_vlm != teacher.is_vlm:
        raise ConfigError("--teacher and --model must both take images, or neither")
    if not same_tokenizer(policy.tokenizer, teacher.tokenizer):
        raise ConfigError(
            f"--teacher {cfg.teacher!r} and --model {cfg.model!r} have different tokenizers: on-policy "
            "distillation compares their next-token distributions token by token"
        )
    teacher = place_frozen(teacher, policy.device, cfg.dtype)
    task, data, reward_set, test = load_prompts(policy, data, **prompt_options(cfg), recipe="distill")
    eval_task, test = held_out_set(policy, task, test, benchmark=cfg.eval_benchmark, chat=cfg.chat, n=cfg.eval_n,
                                   max_new_tokens=cfg.max_new_tokens)  # fmt: skip
    world = dist.world_size()
    teacher_eval = []
    if dist.is_main() and test and not cfg.resume:
        held_out_evaluator(teacher, eval_task, test, run=None, evals=teacher_eval, max_new_tokens=cfg.max_new_tokens)(
            0, "teacher"
        )

    # ---- derived values: the schedule, the run ------------------------------------------------------------
    loop = start_loop(
        cfg,
        policy,
        eval_task,
        test,
        desc="distill",
        show=("divergence", "reward/mean"),
        before="student before distillation",
        optimizer_steps=cfg.steps,
        row_seeded=cfg.row_seeded_sampling,
    )
    run = loop.run
    sampling = dict(prompts_per_step=cfg.prompts_per_step, seed=cfg.seed, group_size=cfg.samples_per_prompt,
                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)  # fmt: skip

    # ---- training loop -----------------------------------------------------------------------------
    for step in range(run.start, cfg.steps):
        t0 = time.perf_counter()
        # -- the student samples this rank's share of the global batch
        sb, _ = sample_step(loop, policy, data, reward_set, step, log_completions=cfg.log_completions, **sampling)
        batch = pack_rows([(sb.batch, i) for i in range(len(sb.batch.texts))], policy.tokenizer.pad_token_id)
        # -- the divergence to the teacher on the student's tokens, a token mean over all ranks' tokens
        t_up = time.perf_counter()
        n_tokens = dist.all_sum(float(batch.resp_mask.sum()))
        with phase("update", step + 1, batch.ids.shape):
            loss, m = distill_loss(
                policy,
                teacher,
                batch,
                beta=cfg.jsd_beta,
                temperature=cfg.temperature,
                bf16=cfg.bf16,
                global_count=n_tokens,
            )
            loss.backward()
        grad_norm, lr = optimizer_step(policy, loop.optimizer, step, loop.schedule, sync_grads=True)
        rmask = batch.resp_mask.float()
        row = {
            **{k: dist.all_mean(v) for k, v in sb.metrics.items()},
            # each rank's loss carries world / global token count: their sum over ranks / world is the global mean
            "loss": dist.all_sum(loss.item()) / world,
            "divergence": dist.all_sum(m["divergence"]) / world,
            "reverse_kl_sampled": dist.all_mean(m["reverse_kl_sampled"]),
            "grad_norm": grad_norm,
            "lr": lr,
            "completions/mean_length": float(rmask.sum(1).mean()),
            "tokens_per_s": float(batch.attn.sum()) / (time.perf_counter() - t0),
            "time/generation_s": sb.gen_s,
            "time/update_s": time.perf_counter() - t_up,
        }
        if end_of_step(run, step + 1, row, t_step=t0, save=loop.save, evaluate=loop.evaluate):
            break

    # ---- evaluate and save -------------------------------------------------------------------------
    policy, summary = finish_loop(loop, cfg, policy, eval_task, test, data, after="student after distillation")
    summary.update({"teacher_evals": teacher_eval, "reward_faults": reward_set.faults})
    return Result(policy, run.history, summary)
