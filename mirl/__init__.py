"""mirl: preference optimisation (DPO family, MIO, MI estimators) and reinforcement fine-tuning.

The functional core (losses, log-probs, advantages, rewards) is pure tensor code; recipes in
`mirl.recipes` are short training loops on top of it.
"""

__version__ = "0.1.0"


def _inductor_cache_per_capability() -> None:
    """Under ATEN_CPU_CAPABILITY, give torch.compile's inductor a cache folder of that capability's own, before
    torch imports inductor (which fixes some of its paths then): its cache does not key the C++ kernels it
    generates by the capability, so kernels built for AVX-512 were reused under avx2 (NaN gradients with
    --compile) and under default (a C++ compile error), measured with torch 2.13 on an AVX-512 Xeon. An explicit
    TORCHINDUCTOR_CACHE_DIR is left alone."""
    import os
    import tempfile

    cap = os.environ.get("ATEN_CPU_CAPABILITY")
    if cap and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"torchinductor_mirl_{cap}")


_inductor_cache_per_capability()
