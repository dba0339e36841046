"""mirl: preference optimisation (DPO family, MIO, MI estimators) and reinforcement fine-tuning.

The functional core (losses, log-probs, advantages, rewards) is pure tensor code; recipes in
`mirl.recipes` are short training loops on top of it.
"""

__version__ = "0.1.0"


def _inductor_cache_per_capability() -> None:
    """Under ATEN_CPU_CAPABILITY, give torch.compile's inductor a cache folder of that capability's own: its cache
    does not key the C++ kernels it generates by the capability, so kernels built for AVX-512 were reused under
    avx2 (NaN gradients with --compile) and under default (a C++ compile error), measured with torch 2.13 on an
    AVX-512 Xeon. Replaced: an unset folder, torch's default one (which torch writes into the environment once
    inductor is imported) and another capability's folder of this scheme (inherited from a parent process); any
    other TORCHINDUCTOR_CACHE_DIR is the user's and is left alone. Per user, as torch's own folder is."""
    import getpass
    import os
    import re
    import tempfile

    cap = os.environ.get("ATEN_CPU_CAPABILITY")
    if not cap:
        return
    try:
        user = re.sub(r'[\\/:*?"<>|]', "_", getpass.getuser())
    except (KeyError, OSError):  # no name for this uid (containers)
        user = f"uid_{os.getuid()}"
    base = os.path.join(tempfile.gettempdir(), f"torchinductor_{user}")
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if (
        current is None
        or os.path.abspath(current) == base
        or os.path.basename(current).startswith(f"torchinductor_{user}_mirl_")
    ):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{base}_mirl_{cap}"


_inductor_cache_per_capability()
