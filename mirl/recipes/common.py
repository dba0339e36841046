"""Small pieces every recipe shares word for word: run setup, data, the optimizer step, saving."""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

import torch

from ..data.formats import SkipCounter
from ..logging import console
from ..models import load_policy
from ..optim import clip_grad, lr_at, set_lr


def setup(cfg) -> None:
    """Threads, seeds. Few threads by default: oversubscribing a small CPU makes every step slower."""
    torch.set_num_threads(max(1, cfg.threads))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out_dir) / "config.json").write_text(json.dumps(asdict(cfg), indent=1))


def get_policy(cfg, model):
    if model is not None:
        return model
    return load_policy(cfg.model, max_seq_len=max(256, cfg.max_len), seed=cfg.seed)


def optimizer_step(policy, optimizer, step: int, cfg) -> tuple[float, float]:
    """Clip, step, zero grads; set the learning rate for `step`. Returns (grad_norm, lr)."""
    lr = lr_at(step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
               min_lr_ratio=cfg.min_lr_ratio)
    set_lr(optimizer, lr)
    grad_norm = clip_grad(policy, cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def report_skips(skips: SkipCounter, out_dir: str | Path) -> None:
    if skips.total:
        console.print(f"[yellow]{skips.report()}[/]")
    (Path(out_dir) / "skips.json").write_text(json.dumps(skips.counts))
