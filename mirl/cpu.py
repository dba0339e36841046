"""What this CPU can do, read from /proc/cpuinfo: its name and flags, and whether it multiplies bf16 natively.

On a CPU without AVX512-BF16 or AMX-BF16 (AMD EPYC with AVX2, older Intel), torch emulates bf16 matmul:
measured on such a machine, about 100x slower than float32 (0.8 GFLOP/s against 60-127), so `--bf16` there
is a trap. `bf16_warning()` says so once, when a recipe is asked for bf16 on such a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_info(text: str | None = None) -> tuple[str, set[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo (or the given text); ('unknown', set())
    where there is none (macOS, Windows)."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "unknown", set()
    name, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name == "unknown":
            name = value.strip()
        if key.strip() in ("flags", "Features") and not flags:
            flags = set(value.split())
    return name, flags


def native_bf16(flags: set[str]) -> bool:
    """Whether the flags include a native bf16 matmul instruction set (AVX512-BF16 or AMX-BF16)."""
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def bf16_warning(device_type: str = "cpu", text: str | None = None) -> str | None:
    """The warning for bf16 on a CPU without native bf16 matmul, or None (CUDA, a CPU that has it, or flags
    that cannot be read)."""
    if device_type != "cpu":
        return None
    name, flags = cpu_info(text)
    if not flags or native_bf16(flags):
        return None
    return (
        f"--bf16 on this CPU ({name}) without native bf16 matmul (no {' or '.join(NATIVE_BF16_FLAGS)} flag): "
        "torch emulates it, about 100x slower than float32 on such CPUs; drop --bf16 to train in float32"
    )


def cpu_vendor(text: str | None = None) -> str:
    """The vendor_id of the first processor in /proc/cpuinfo (GenuineIntel, AuthenticAMD, ...), else 'unknown'."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "unknown"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id":
            return value.strip()
    return "unknown"


@dataclass(frozen=True)
class DecodeProducts:
    """Which of the decode step's float32 matrix products (models/decode.py) go through oneDNN with a weight
    prepacked once per generation instead of MKL: the vocabulary head, the layers' products, those of at least
    min_elements weights; `why` says so in the bench's CPU line."""

    head: bool
    layers: bool
    min_elements: int
    why: str


# a product's weight below this stays with MKL: the tiny models' 64-wide layers, where a call's overhead dominates
MIN_PACKED_ELEMENTS = 1 << 18


def decode_products(text: str | None = None, machine: str | None = None, mkl: bool | None = None) -> DecodeProducts:
    """The decode step's choice of matrix library on this CPU (bench/profile_decode.py times each).

    torch's float32 matmul on x86 is MKL's sgemm, which dispatches on the CPU vendor: on any vendor but Intel
    (AMD) MKL takes its generic path, 3.9x slower for SmolLM2's decode products (105.2 against 27.3 ms a step,
    forced on a Xeon with bench/mkl_other_vendor.c), while oneDNN dispatches on the instruction set and stays at
    23.9 ms. On the Intel Xeon too, a whole decode step (16 rows, 2 threads, weights streamed from memory) is
    faster with every product through oneDNN's prepacked weights: 65.9-69.0 against 78.4-84.1 ms. So every
    product of min_elements or more goes through oneDNN on x86; off x86, or without oneDNN, torch's matmul."""
    import platform

    import torch

    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return DecodeProducts(False, False, 0, f"decode products: torch's matmul ({machine}, no oneDNN path)")
    vendor = cpu_vendor(text)
    mkl = torch.backends.mkl.is_available() if mkl is None else mkl
    if not mkl:
        why = "torch without MKL"
    elif vendor == "GenuineIntel":
        why = "faster than MKL's path for Intel"
    elif vendor == "unknown":
        why = "CPU vendor unknown: MKL may take its generic path"
    else:
        why = f"MKL takes its generic path on {vendor} CPUs"
    return DecodeProducts(True, True, MIN_PACKED_ELEMENTS, f"decode products: oneDNN, weights prepacked ({why})")


@cache
def this_cpu_decode_products() -> DecodeProducts:
    """decode_products() of this machine, read once."""
    return decode_products()
