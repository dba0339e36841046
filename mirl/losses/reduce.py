"""The one named reduction: a per-token (or per-sequence) loss and its mask -> a scalar.

Modes:
    token_mean   sum(loss * mask) / (number of unmasked tokens in the *global* batch)
    seq_mean     mean over sequences of (per-sequence token mean); global sequence count
    seq_sum      mean over sequences of (per-sequence token sum); global sequence count
    constant     sum(loss * mask) / (constant * global number of sequences)     (Dr. GRPO's normaliser)

Under torch.distributed the divisor is the global count (all-reduced), and the result is multiplied
by world size, so that DDP's gradient averaging over ranks gives exactly the gradient of one process
that holds the whole batch. Gradient accumulation passes `num_micro=` the number of micro-batches and
`global_count=` the count over all of them, for the same reason.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

Tensor = torch.Tensor
MODES = ("token_mean", "seq_mean", "seq_sum", "constant")


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_sum(x: Tensor) -> Tensor:
    """Sum of a count over all ranks (a no-op in one process). Not differentiable: counts only."""
    x = x.detach().clone()
    if _world() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def gather_all(x: Tensor) -> Tensor:
    """Every rank's 1-D tensor x (their lengths may differ), concatenated in rank order; x in one process.
    all_gather needs one size on every rank: each pads to the longest, and the padding is cut off again."""
    world = _world()
    if world == 1:
        return x
    x = x.detach().reshape(-1)
    n = torch.tensor([x.numel()], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    if max(sizes) == 0:
        return x
    padded = torch.zeros(max(sizes), dtype=x.dtype, device=x.device)
    padded[: x.numel()] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def masked_reduce(
    loss: Tensor,
    mask: Tensor,
    mode: str = "token_mean",
    *,
    constant: float | None = None,
    global_count: Tensor | float | None = None,
) -> Tensor:
    """Reduce loss (B, T) under mask (B, T) to a scalar; see the module docstring for the modes.

    global_count overrides the divisor (tokens for token_mean, sequences otherwise) when the caller
    already knows it over all ranks and micro-batches.
    """
    if mode not in MODES:
        raise ValueError(f"unknown reduction {mode!r}; valid: {', '.join(MODES)}")
    mask = mask.to(loss.dtype)
    world = _world()
    if mode == "token_mean":
        total = (loss * mask).sum()
        count = global_count if global_count is not None else global_sum(mask.sum())
    else:
        per_seq = (loss * mask).sum(-1)  # (B,)
        if mode == "seq_mean":
            per_seq = per_seq / mask.sum(-1).clamp(min=1)
        elif mode == "constant":
            if constant is None or constant <= 0:
                raise ValueError("reduction 'constant' needs a positive constant (e.g. max response length)")
            per_seq = per_seq / constant
        total = per_seq.sum()
        count = (
            global_count
            if global_count is not None
            else global_sum(torch.tensor(float(loss.shape[0]), device=loss.device))
        )
    count = torch.as_tensor(count, dtype=loss.dtype, device=loss.device).clamp(min=1)
    return total * world / count


def mean_over_examples(per_example: Tensor, *, global_count: Tensor | float | None = None) -> Tensor:
    """Mean of a per-example loss (N,) over the global batch (sequence-level losses such as DPO)."""
    ones = torch.ones_like(per_example).unsqueeze(-1)
    return masked_reduce(per_example.unsqueeze(-1), ones, "seq_sum", global_count=global_count)
