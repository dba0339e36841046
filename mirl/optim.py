"""AdamW, the learning-rate schedule (linear warmup, then cosine to min_lr_ratio * lr) and the one optimizer
step every recipe takes (average over ranks, schedule, clip, step; TrainingDiverged before a non-finite update)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step `step` (0-based); a pure function of the step, so resume is exact."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999)):
    """AdamW with weight decay on matrices only: torch's fused kernel on CUDA when every parameter is a plain CUDA
    float tensor, the foreach form otherwise. Not fused on a CPU although it is 5x faster there (0.09 against
    0.45 s a step at 135M parameters): its CPU kernel rounds differently under each of ATen's instruction sets
    (AVX-512, AVX2, plain), and a seeded run's sampled tokens then part ways between CPU kinds (the pinned GRPO
    curve's third step moved 1.3% under AVX2 and 4.5% under the plain kernels, against 0.1% with foreach:
    tests/test_pinned_curves.py). foreach kernels cannot mix FSDP2's DTensors with whole tensors: then neither."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    sharded = {hasattr(p, "full_tensor") for p in params}
    if sharded == {False} and params and all(p.device.type == "cuda" and p.is_floating_point() for p in params):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=len(sharded) == 1)


def set_lr(optimizer, value: float) -> None:
    """Set the learning rate of every parameter group."""
    for g in optimizer.param_groups:
        g["lr"] = value


def clip_grad(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the gradients' global L2 norm to max_norm (0 = no clipping) -> the norm before clipping.
    FSDP2-sharded gradients (DTensors) and whole ones (a small head kept outside the sharding) are measured
    apart and combined, since one foreach norm cannot take both."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    groups = [
        [p.grad for p in params if hasattr(p.grad, "full_tensor")],
        [p.grad for p in params if not hasattr(p.grad, "full_tensor")],
    ]
    norms = []
    for grads in groups:
        if grads:
            n = torch.nn.utils.get_total_norm(grads)
            norms.append(n.full_tensor() if hasattr(n, "full_tensor") else n)
    total = float(torch.linalg.vector_norm(torch.stack(norms))) if len(norms) > 1 else float(norms[0])
    if max_norm and max_norm > 0:
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for grads in groups:
                for g in grads:
                    g.mul_(coef)
    return total


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN or infinite: the run stops before the bad update."""


@dataclass(frozen=True)
class Schedule:
    """The optimizer's settings over a run: linear warmup, then cosine decay to min_lr_ratio * lr over
    total_steps optimizer steps; gradients clipped to max_grad_norm (0 = off)."""

    lr: float
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float
    max_grad_norm: float


def optimizer_step(
    policy, optimizer, step: int, schedule: Schedule, *, sync_grads: bool = False
) -> tuple[float, float]:
    """One optimizer step (0-based `step`): average gradients over ranks when sync_grads (the recipes that do
    not use DDP), set the scheduled learning rate, clip, step, zero the gradients. -> (grad_norm before
    clipping, lr). A non-finite gradient norm raises TrainingDiverged before the update."""
    from .distributed import average_gradients

    if sync_grads:
        average_gradients(policy)
    s = schedule
    lr = lr_at(step, lr=s.lr, warmup_steps=s.warmup_steps, total_steps=s.total_steps, min_lr_ratio=s.min_lr_ratio)
    set_lr(optimizer, lr)
    grad_norm = clip_grad(policy, s.max_grad_norm)
    if not math.isfinite(grad_norm):  # every rank sees the same (averaged) gradients: all stop here together
        raise TrainingDiverged(
            f"optimizer step {step + 1}: the gradient norm is {grad_norm} (a non-finite loss or gradient; lr "
            f"{lr:g}); stopped before applying it. Nothing was saved over the last good checkpoint (if any) and "
            "no final/ was written"
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr
