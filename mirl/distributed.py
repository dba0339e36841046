"""torch.distributed in one place: init() -> (rank, world, device); helpers that are no-ops in one process.

Under `torchrun --nproc-per-node N -m mirl <recipe> ...` every rank builds the same model (same seed),
takes its shard of each global batch, and gradients are averaged over ranks (DDP for sft and dpo,
average_gradients for the online recipes, or FSDP2 with --fsdp). Losses divide by the *global* token or
sequence count (losses/reduce.py), so N ranks take the same steps as one process with the whole batch.
gloo on CPU, NCCL on CUDA. Only rank 0 logs, evaluates and saves.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init(device: torch.device | None = None) -> tuple[int, int, torch.device]:
    """Join torch.distributed when torchrun launched this process: NCCL when the run computes on CUDA, gloo on
    the CPU (device None: CUDA when there is one). -> (rank, world, device)."""
    cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if cuda and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def shutdown(ok: bool = True) -> None:
    """End the process group at the end of a command (a no-op in one process). After a success the ranks meet
    at a barrier first, so that none exits while another still talks to it (a rank leaving with gloo's
    threads alive can abort with "terminate called without an active exception")."""
    if dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()


def world_size() -> int:
    """The number of processes (1 without torchrun)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this is rank 0 (the one that logs, evaluates and saves)."""
    return rank() == 0


def comm_device() -> torch.device:
    """Where the tensors of a collective must be: the rank's GPU under NCCL, the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(x: float | int) -> float:
    """Sum of a Python number over ranks."""
    if not dist.is_initialized():
        return x
    t = torch.tensor(float(x), dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return t.item()


def all_max(x: float) -> float:
    """Largest of a Python number over ranks."""
    if not dist.is_initialized():
        return x
    t = torch.tensor(float(x), dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def shard(indices: list[int]) -> list[int]:
    """This rank's contiguous share of a global batch (rank r of N takes the r-th of N equal parts)."""
    n, r = world_size(), rank()
    if n == 1:
        return indices
    if len(indices) % n:
        raise ValueError(f"global batch of {len(indices)} does not split over {n} ranks")
    size = len(indices) // n
    return indices[r * size : (r + 1) * size]


def wrap(model: torch.nn.Module, fsdp: bool = False) -> torch.nn.Module:
    """DDP around the model when distributed; the model itself otherwise. fsdp: FSDP2 instead, in place
    (fully_shard on every transformer block, then on the policy's inner model as the root): parameters,
    gradients and optimizer state are sharded over the ranks, so build the optimizer after this call."""
    if not dist.is_initialized():
        return model
    if fsdp:
        model.shard()  # the policy shards itself: its blocks, then its inner model as the root
        if is_main():
            print(f"FSDP2: {len(model.blocks())} blocks and the root sharded over {world_size()} ranks", flush=True)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model)


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if dist.is_initialized():
        dist.barrier()


def average_gradients(model: torch.nn.Module) -> None:
    """Average the gradients of every trainable parameter over ranks (a parameter without a gradient on
    this rank counts as zeros). The recipes whose ranks may differ in what they backpropagate (online RL:
    a rank can draw no usable group) use this instead of DDP; losses already carry world / global count
    (losses/reduce.py), so the average is the gradient of the global loss. A no-op in one process."""
    if not dist.is_initialized():
        return
    # FSDP2-sharded parameters (DTensors) were reduce-scattered in the backward already
    params = [p for p in model.parameters() if p.requires_grad and not hasattr(p, "full_tensor")]
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world_size()
    i = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[i : i + n].view_as(p))
        i += n


def all_mean(x: float) -> float:
    """Mean of a Python number over ranks (metrics)."""
    return all_sum(x) / world_size()


def minibatches(n_local: int, n_chunks: int, seed: int, device=None) -> list[torch.Tensor]:
    """This rank's row indices for each minibatch of one global random permutation of all ranks' rows
    (rank r holds global rows r * n_local ... (r + 1) * n_local - 1): N ranks take the same minibatches as one
    process with the whole batch. A rank's part of a minibatch may be empty. The permutation is drawn on the
    host (the same on every device), the indices moved to `device`. Each minibatch's rows in ascending order: a
    group's rows stay together, so the update's forward shares their prompt (logps.shared_prompts)."""
    r = rank()
    perm = torch.randperm(n_local * world_size(), generator=torch.Generator().manual_seed(seed))
    lo = r * n_local
    return [(c[(c >= lo) & (c < lo + n_local)] - lo).sort().values.to(device) for c in perm.chunk(n_chunks)]


def full_state_dict(model: torch.nn.Module) -> dict:
    """The whole (unsharded) state dict of an FSDP2 model, on CPU; a collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
