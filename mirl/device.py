"""Where a run computes: `--device auto|cpu|cuda|cuda:N`, the precision that goes with it, and device memory.

auto is the rank's local GPU under torchrun, else CUDA device 0 when there is one, else the CPU. On a GPU that
multiplies bf16 natively, bf16 autocast is the default (fp32 master weights; `--no-bf16` turns it off); on a
CPU it is off (most CPUs emulate bf16 matmul, mirl/cpu.py). Activation checkpointing is the default for a
transformers model above ACTIVATION_CHECKPOINTING_PARAMS parameters on a GPU. A CUDA out-of-memory error in
any phase of a step becomes one line naming the phase, the step, the batch shape and the options that lower
memory (DeviceOutOfMemory, raised by `phase`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

from .logps import autocast, device_of  # noqa: F401 (the recipes import them from here)
from .options import ConfigError

ACTIVATION_CHECKPOINTING_PARAMS = 1_000_000_000  # auto: on above this many parameters (on a GPU)
LOWER_MEMORY = (
    "--prompts-per-step or --max-new-tokens, raise --minibatches, or turn on --activation-checkpointing or LoRA "
    "(--lora-r 16)"
)


def resolve_device(spec: str) -> torch.device:
    """--device's value -> a torch.device; a CUDA device that is not there is a ConfigError naming the option."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    try:
        device = torch.device(spec)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {spec!r}: allowed are auto, cpu, cuda and cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: this machine has no CUDA GPU that torch can use (use --device cpu)")
        if device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(
                f"--device {spec}: under torchrun every rank takes its own GPU (LOCAL_RANK); use --device cuda or auto"
            )
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", "0"))
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", index)
    return device


def bf16_default(device: torch.device) -> bool:
    """--bf16 when not given: on for a CUDA GPU with native bf16 (Ampere and later), off elsewhere."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolved(cfg):
    """A recipe's Config with its automatic values made concrete: device (a torch.device string) and bf16 (when
    None). Fields a Config lacks are left alone."""
    names = {f.name for f in dataclasses.fields(cfg)}
    if "device" not in names:
        return cfg
    device = resolve_device(cfg.device)
    changes = {"device": str(device)}
    if "bf16" in names and cfg.bf16 is None:
        changes["bf16"] = bf16_default(device)
    return dataclasses.replace(cfg, **changes)


def frozen_dtype(name: str) -> torch.dtype | None:
    """--dtype: the dtype of frozen copies (reference, teacher, reward model); None keeps float32."""
    return {"float32": None, "bfloat16": torch.bfloat16}[name]


def place_frozen(model, device, dtype: str = "float32"):
    """A frozen model (teacher, reward model) in eval mode without gradients on `device`, in --dtype's type."""
    model = model.eval().requires_grad_(False).to(torch.device(device))
    cast = frozen_dtype(dtype)
    return model if cast is None else model.to(cast)


def wants_activation_checkpointing(option: bool | None, policy, device: torch.device) -> bool:
    """--activation-checkpointing when not given: on for a transformers model above about 1B parameters on a GPU."""
    if option is not None:
        return option
    if device.type != "cuda" or policy.kind != "hf":
        return False
    return sum(p.numel() for p in policy.parameters()) > ACTIVATION_CHECKPOINTING_PARAMS


def reset_peak_memory(device: torch.device) -> None:
    """Start a step's peak device memory count (CUDA; nothing on a CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> dict:
    """{'memory/peak_gb': the step's peak allocated device memory} on CUDA, {} on a CPU."""
    if device.type != "cuda":
        return {}
    return {"memory/peak_gb": torch.cuda.max_memory_allocated(device) / 2**30}


def free_cached(device: torch.device) -> None:
    """Give the caching allocator's free blocks back (CUDA), between a rollout with a large KV cache and the update."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


class DeviceOutOfMemory(RuntimeError):
    """A CUDA out-of-memory error in a phase of a step, said in one line with the options that lower memory."""


@contextlib.contextmanager
def phase(name: str, step: int, shape=None):
    """Around one phase of a step (rollout, reference, update): a CUDA out-of-memory error inside becomes
    DeviceOutOfMemory naming the phase, the 1-based step and the batch shape (rows x tokens)."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        shown = "" if shape is None else f", batch {' x '.join(str(int(s)) for s in shape)}"
        raise DeviceOutOfMemory(
            f"out of GPU memory in the {name} of step {step}{shown}; to use less, lower {LOWER_MEMORY}"
        ) from e
