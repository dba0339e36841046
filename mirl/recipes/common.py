"""Plain helpers the recipes share: the policy to train, its reference, the optimizer step and schedule, the
prompts and rewards of the online recipes, FSDP2 checks and gathering, saving. (The run's lifecycle: run.py.)"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..data.formats import SkipCounter
from ..logging import console
from ..models import load_policy
from ..options import ConfigError, flag


def build_policy(
    model,
    name: str,
    *,
    max_len: int,
    seed: int,
    lora_r: int = 0,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    lora_targets: str = "",
    save_adapter_only: bool = False,
    device: str = "cpu",
    activation_checkpointing: bool | None = None,
    freeze_vision: bool = False,
    compile: bool = False,
    revision: str = "",
):
    """The policy to train, on `device`: `model` when given, else loaded from `name` (a preset or a folder), with
    LoRA adapters, activation checkpointing (None: mirl/device.py decides), a frozen vision tower and compiled
    blocks as asked."""
    from ..device import wants_activation_checkpointing

    if model is None:
        reward_model_note(name, "--model")
    policy = (
        model if model is not None else load_policy(name, max_seq_len=max(256, max_len), seed=seed, revision=revision)
    )
    if save_adapter_only and not (lora_r > 0 or policy.has_lora):
        raise ConfigError("--save-adapter-only needs LoRA adapters (--lora-r > 0)")
    if save_adapter_only and policy.source is None:
        raise ConfigError("--save-adapter-only needs a base model loaded from a folder (not a preset); save merged")
    if lora_r > 0 and not policy.has_lora:
        policy.add_lora(lora_r, lora_alpha, lora_dropout, lora_targets)
    device = torch.device(device)
    policy.to(device)  # (always called: a shadow-device test sees the parameters put on the device here)
    if wants_activation_checkpointing(activation_checkpointing, policy, device):
        policy.enable_activation_checkpointing()
    if freeze_vision:
        policy.freeze_vision()
    if compile and not policy.compile_blocks():
        raise ValueError("--compile found no transformer blocks to compile in this model")
    return policy


def check_context(policy, max_len: int, name: str) -> None:
    """The recipes whose --max-len is the length of the training sequences (sft, dpo, rm): it must fit the
    model's context, or a long row would fail in the middle of training."""
    if max_len > policy.max_seq_len:
        raise ConfigError(
            f"--max-len {max_len}: the model's context is {policy.max_seq_len} tokens ({name}); use --max-len "
            f"{policy.max_seq_len} or less"
        )


def reward_model_note(name: str, option: str) -> None:
    """A reward model folder (saved by mirl rm or prm: a backbone plus reward_head.safetensors) given where a
    policy is wanted loads as its backbone alone: say so, once, naming the head that is dropped."""
    from ..logging import warn

    p = Path(str(name))
    for d in (p, p / "final"):
        if (d / "reward_head.safetensors").exists():
            warn(
                f"{option} {name} is a reward model folder: its backbone is loaded as a policy and its reward head "
                f"({d / 'reward_head.safetensors'}) is dropped (to score with it, use --reward rm:{d})"
            )
            return


def policy_options(cfg) -> dict:
    """The build_policy options of a recipe's Config (every training recipe has these fields)."""
    return dict(
        max_len=cfg.max_len,
        seed=cfg.seed,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        lora_targets=cfg.lora_targets,
        save_adapter_only=cfg.save_adapter_only,
        device=cfg.device,
        activation_checkpointing=cfg.activation_checkpointing,
        freeze_vision=cfg.freeze_vision,
        compile=cfg.compile,
        revision=cfg.model_revision,
    )


class AdapterOffReference:
    """The reference of a LoRA run: the same model with its adapters off, no gradient, no second copy."""

    def __init__(self, policy):
        self.policy = policy
        self.tokenizer = policy.tokenizer

    @property
    def device(self) -> torch.device:
        """The policy's device (the reference is the policy)."""
        return self.policy.device

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), self.policy.reference_context():
            return self.policy(*args, **kwargs)


def frozen_reference(policy, dtype: str = "float32"):
    """A frozen reference policy: adapters switched off under LoRA, else a frozen copy on the policy's device
    (in bf16 with dtype "bfloat16": half the memory)."""
    return AdapterOffReference(policy) if policy.has_lora else frozen_copy(policy, dtype)


def frozen_copy(model, dtype: str = "float32"):
    """A frozen copy of a model (eval mode, no gradients), cast to --dtype's type."""
    import copy

    from ..device import frozen_dtype

    copy_ = copy.deepcopy(model).eval().requires_grad_(False)
    cast = frozen_dtype(dtype)
    return copy_ if cast is None else copy_.to(cast)


def save_final(policy, path, *, merged: bool = True) -> None:
    """The trained model to `path`; a failed write (no space, permissions) is a CheckpointError naming it."""
    from ..checkpoint import CheckpointError

    try:
        policy.save(path, merged=merged)
    except OSError as e:
        raise CheckpointError(f"writing the final model to {path} failed ({e.strerror or e})") from e


def report_skips(skips: SkipCounter, out_dir: str | Path) -> None:
    """Print the skip counts (when any) and write <out_dir>/skips.json."""
    if skips.total or skips.notes:
        console.print(f"[yellow]{skips.report()}[/]")
    (Path(out_dir) / "skips.json").write_text(json.dumps({**skips.counts, **skips.notes}))


def load_prompts(
    policy,
    data,
    *,
    data_path: str,
    split: str,
    data_config: str,
    revision: str,
    task_name: str,
    chat: str,
    n_prompts: int,
    seed: int,
    reward: str,
    reward_timeout_s: float,
    eval_n: int,
    recipe: str,
    max_new_tokens: int = 0,
    dtype: str = "float32",
    env=None,
    video=None,
):
    """The start every online recipe shares: the task, the prompt records (those too long for the model's
    context with max_new_tokens left out, counted and reported), the rewards (their columns checked against
    every row) and the held-out examples. env: an EnvTask (envs/task.py), the task in place of task_name's:
    its own examples unless --data. video: the VideoOptions of --data's videos. -> (task, data, reward_set, test)."""
    from ..data.collate import prompts_that_fit, too_long_message
    from ..data.formats import load_rows, prompt_records
    from ..data.tasks import make_task
    from ..rewards import RewardSet, parse_reward_spec
    from ..rollout.score import check_reward_columns

    task = env if env is not None else make_task(task_name, policy.tokenizer, chat) if task_name else None
    if data is None:
        if data_path:
            data = prompt_records(load_rows(data_path, split, data_config, revision), policy.tokenizer, video)
        elif task is not None:
            data = task.examples("train", n_prompts, seed)
        else:
            raise ValueError(f"{recipe} needs --task or --data")
    if max_new_tokens:
        hint = "lower --max-new-tokens" + (
            ", or raise --max-len (a new tiny model's context)" if policy.source is None else ""
        )
        kept, too_long = prompts_that_fit(policy, data, max_new_tokens)
        if too_long:
            message = too_long_message(too_long, len(data), policy, max_new_tokens, hint)
            if not kept:
                raise ValueError(message)
            from ..logging import warn

            warn(f"{message}; those prompts are skipped")
            data = kept
    spec = parse_reward_spec(reward, task, device=policy.device, dtype=dtype)
    reward_set = RewardSet(spec, timeout_s=reward_timeout_s)
    check_reward_columns(reward_set, data, data_path or task_name)
    reward_set.check_rows(data)
    test = task.examples("test", eval_n, seed) if task is not None and eval_n else []
    return task, data, reward_set, test


def prompt_options(cfg) -> dict:
    """The load_prompts options of an online recipe's Config (grpo, online and ppo have these fields)."""
    return dict(
        data_path=cfg.data,
        split=cfg.split,
        data_config=cfg.data_config,
        revision=cfg.revision,
        task_name=cfg.task,
        chat=cfg.chat,
        n_prompts=cfg.n_prompts,
        seed=cfg.seed,
        reward=cfg.reward,
        reward_timeout_s=cfg.reward_timeout_s,
        eval_n=cfg.eval_n,
        max_new_tokens=cfg.max_new_tokens,
        dtype=cfg.dtype,
        video=video_options(cfg),
    )


def video_options(cfg):
    """The VideoOptions (data/video.py) of a recipe's --video-* options (every training recipe has them)."""
    from ..data.video import VideoOptions

    return VideoOptions(fps=cfg.video_fps, max_frames=cfg.video_max_frames, max_pixels=cfg.video_max_pixels)


def check_fsdp(fsdp: bool, **unsupported: bool) -> None:
    """--fsdp: refuse what it does not support yet, named by its flag: check_fsdp(cfg.fsdp, lora_r=..., ...).
    The held-out evaluation before training runs before the sharding, the one after on the gathered weights."""
    bad = [flag(name) for name, on in unsupported.items() if on]
    if fsdp and bad:
        raise ValueError(f"--fsdp does not support {', '.join(bad)} yet")


def gathered_policy(policy, cfg):
    """After FSDP2 training (cfg.fsdp): every rank gathers the full weights (a collective); rank 0 gets a plain
    copy of the policy on cfg.device (built from cfg.model like the trained one) to save, evaluate and report,
    the others None. Without FSDP2: the policy itself."""
    from .. import distributed as dist

    if not (cfg.fsdp and dist.world_size() > 1):
        return policy
    state = dist.full_state_dict(policy)
    if not dist.is_main():
        return None
    plain = load_policy(cfg.model, max_seq_len=max(256, cfg.max_len), seed=cfg.seed)
    plain.load_state_dict(state)
    return plain.to(cfg.device)


def policy_loss_of(cfg, **fixed):
    """The run's PolicyLoss (losses/policy.py) from a Config's options: --policy-loss with its own options, and
    those of --clip-eps, --clip-eps-high, --importance, --loss-agg, --kl-estimator the recipe has (--max-new-tokens:
    dr_grpo's constant); fixed: what the recipe fixes instead (ppo: loss_agg="bnpo")."""
    from ..losses.policy import TERM_OPTIONS, PolicyLoss, term_options

    own = term_options(cfg.policy_loss, **{k: getattr(cfg, k) for k in TERM_OPTIONS})
    has = {f.name for f in dataclasses.fields(cfg)}
    settings = {k: getattr(cfg, k) for k in ("clip_eps", "importance", "loss_agg", "kl_estimator") if k in has}
    settings["clip_eps_high"] = getattr(cfg, "clip_eps_high", 0.0) or None
    return PolicyLoss(cfg.policy_loss, own, **settings, max_completion_length=cfg.max_new_tokens, **fixed)


def rollout_corrector(is_correction: str, engine: str, mode: str, cap: float):
    """--is-correction as a function built once: correct(trainer logps, sampler logps, mask) -> (weights,
    statistics) (losses/policy.py: rollout_correction), or None when off. auto is sequence for an engine whose
    log-probs are not the trainer's (vllm) and none for mirl's own sampler (its log-probs are the policy's, up to
    the cache's float rounding)."""
    from functools import partial

    from ..losses.policy import rollout_correction

    level = ("sequence" if engine != "local" else "none") if is_correction == "auto" else is_correction
    return None if level == "none" else partial(rollout_correction, level=level, mode=mode, cap=cap)
