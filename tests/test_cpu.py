"""bf16 on a CPU without native bf16 matmul is named before a run wastes its time on it."""

import pytest
import torch

from mirl.cpu import MIN_PACKED_ELEMENTS, bf16_warning, cpu_info, cpu_vendor, decode_products, native_bf16

EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx avx2 fma bmi2
"""
XEON = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile
"""


def test_cpu_flags_are_read_from_cpuinfo():
    assert cpu_info(EPYC) == ("AMD EPYC 7B13", {"fpu", "sse2", "avx", "avx2", "fma", "bmi2"})
    assert not native_bf16(cpu_info(EPYC)[1]) and native_bf16(cpu_info(XEON)[1])
    assert native_bf16({"amx_bf16"}) and native_bf16({"avx512_bf16"})
    assert cpu_info("") == ("unknown", set())


def test_bf16_is_named_only_where_it_is_emulated():
    msg = bf16_warning("cpu", EPYC)
    assert msg.startswith("--bf16 on this CPU (AMD EPYC 7B13) without native bf16 matmul")
    assert "100x slower" in msg
    assert bf16_warning("cpu", XEON) is None
    assert bf16_warning("cuda", EPYC) is None
    assert bf16_warning("cpu", "") is None  # flags unknown: no guess


def test_a_bf16_run_on_such_a_cpu_warns_and_still_trains(tmp_path, monkeypatch, capsys):
    import mirl.cpu
    from mirl.recipes import sft

    real = mirl.cpu.cpu_info
    monkeypatch.setattr(mirl.cpu, "cpu_info", lambda text=None: real(EPYC))
    res = sft.train(
        sft.Config(task="arith:1", steps=2, bf16=True, eval_n=0, threads=1, report=False, out_dir=str(tmp_path / "s"))
    )
    assert len(res.history) == 2
    assert "without native bf16 matmul" in capsys.readouterr().err


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")
def test_the_decode_products_go_through_onednn_on_x86():
    """MKL's sgemm on a non-Intel CPU is its generic path (3.9x slower for SmolLM2's decode products, mirl/cpu.py),
    and oneDNN's prepacked weights were the faster on the Intel Xeon too: every x86 CPU takes oneDNN, naming why;
    off x86 torch's matmul."""
    assert cpu_vendor(EPYC) == "AuthenticAMD" and cpu_vendor(XEON) == "GenuineIntel" and cpu_vendor("") == "unknown"
    amd = decode_products(EPYC, "x86_64", mkl=True)
    assert (amd.head, amd.layers, amd.min_elements) == (True, True, MIN_PACKED_ELEMENTS)
    assert "generic path on AuthenticAMD" in amd.why
    intel = decode_products(XEON, "x86_64", mkl=True)
    assert (intel.head, intel.layers) == (True, True) and "Intel" in intel.why
    assert "without MKL" in decode_products(XEON, "x86_64", mkl=False).why
    arm = decode_products(EPYC, "aarch64", mkl=True)
    assert not (arm.head or arm.layers)


def test_each_aten_capability_gets_its_own_inductor_cache(tmp_path):
    """torch's inductor cache does not key its generated C++ kernels by ATEN_CPU_CAPABILITY (kernels built for
    AVX-512 reused under avx2 gave NaN gradients with --compile): importing mirl under a capability points inductor
    at a folder of that capability's own (what torch's cache_dir() then returns), also when inductor was imported
    first (torch writes its default folder into the environment) and when a parent process left another
    capability's folder; a folder the user chose is left alone."""
    import os
    import subprocess
    import sys

    show = "import os, {} mirl; from torch._inductor.runtime.cache_dir_utils import cache_dir; print(cache_dir())"
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "ATEN_CPU_CAPABILITY")}

    def run(first="", **extra):
        return subprocess.run(
            [sys.executable, "-c", show.format(first)], env={**env, **extra}, capture_output=True, text=True, check=True
        ).stdout.strip()

    avx2 = run(ATEN_CPU_CAPABILITY="avx2")
    assert os.path.basename(avx2).startswith("torchinductor_") and avx2.endswith("_mirl_avx2")
    assert run("torch._dynamo,", ATEN_CPU_CAPABILITY="avx2") == avx2  # inductor imported before mirl
    default = run(ATEN_CPU_CAPABILITY="default", TORCHINDUCTOR_CACHE_DIR=avx2)  # a parent's avx2 folder
    assert default == avx2[: -len("avx2")] + "default"
    assert run(ATEN_CPU_CAPABILITY="avx2", TORCHINDUCTOR_CACHE_DIR=str(tmp_path)) == str(tmp_path)
    assert "_mirl_" not in run()  # no capability set: torch's own folder
