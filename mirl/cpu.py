"""What this CPU can do, read from /proc/cpuinfo: its name and flags, and whether it multiplies bf16 natively.

On a CPU without AVX512-BF16 or AMX-BF16 (AMD EPYC with AVX2, older Intel), torch emulates bf16 matmul:
measured on such a machine, about 100x slower than float32 (0.8 GFLOP/s against 60-127), so `--bf16` there
is a trap. `bf16_warning()` says so once, when a recipe is asked for bf16 on such a CPU.
"""

from __future__ import annotations

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
