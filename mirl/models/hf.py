"""Any transformers causal LM, or image-text model (AutoModelForImageTextToText with its image processor),
with its tokenizer and chat template: by local folder, or by hub id through transformers' own download and
cache (lazy import).

    load_hf("runs/sft/final")                          # a folder: nothing is downloaded
    load_hf("Qwen/Qwen2.5-0.5B-Instruct", revision="main")   # a hub id: the Hugging Face cache, or the hub
"""

from __future__ import annotations

import re
from pathlib import Path

import torch


def is_hf_dir(path: str | Path) -> bool:
    """Whether `path` is a folder with a config.json (a transformers model folder)."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").exists()


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# endings of files, never of hub repository names: 'data/x.jsonl' is a mistyped path, not a dataset id
FILE_SUFFIXES = frozenset(
    ".jsonl .json .parquet .arrow .csv .tsv .txt .yaml .yml .safetensors .bin .pt .pth .gguf .py .zip .gz".split()
)
RUN_PARTS = frozenset({"final", "checkpoint", "model", "runs"})  # the names of mirl's run folders


def looks_local(name: str) -> bool:
    """Whether `name` reads as a local path rather than a hub id: it starts with ./ ../ / ~, ends with a file
    extension, has more than one '/', starts with an existing local folder, or names a mirl run folder
    ('sftrun/final', 'runs/x')."""
    if name.startswith(("./", "../", "/", "~", ".\\")) or "\\" in name or name in (".", ".."):
        return True
    if Path(name).suffix.lower() in FILE_SUFFIXES:
        return True
    parts = name.split("/")
    if len(parts) != 2:
        return True
    return Path(parts[0]).is_dir() or parts[0] in RUN_PARTS or parts[1] in RUN_PARTS


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a hub repository id ('owner/name') and is neither an existing local path nor one
    that looks local (looks_local): a mistyped path gets 'no such file or folder', not a download hint."""
    return bool(HUB_ID.match(name)) and not Path(name).exists() and ".." not in name and not looks_local(name)


def is_vlm_dir(path: str | Path) -> bool:
    """Whether the folder's config has a vision part (an image+text model)."""
    import json

    cfg = json.loads((Path(path) / "config.json").read_text())
    return "vision_config" in cfg


def offline_hint(name: str, kind: str, error: Exception) -> str:
    """The one line for a hub id that cannot be had: not cached and no hub (offline, or no network)."""
    import os

    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    why = "HF_HUB_OFFLINE is set" if offline else f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    where = "--repo-type dataset " if kind == "dataset" else ""
    return (
        f"{kind} {name!r} is not in the Hugging Face cache and the hub cannot be reached ({why}), and there is no "
        f"local file or folder of that name: download it on a machine with network (hf download {where}{name}) "
        f"and copy the cache, or pass a local {'file or folder' if kind == 'dataset' else 'folder'}"
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model")


def check_tokenizer_files(path: str | Path) -> None:
    """A local transformers folder must hold its tokenizer: without one, AutoTokenizer makes an empty one and
    every text encodes to nothing (a run would train on nothing at loss 0). FileNotFoundError naming the folder."""
    p = Path(path)
    if not any((p / f).exists() for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{p}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): copy the tokenizer of the model it "
            "was trained from into the folder (tokenizer.save_pretrained(folder))"
        )


def check_tokenizer(tokenizer, path: str) -> None:
    """A tokenizer that encodes text to nothing (an empty vocabulary) is refused, naming the model."""
    if len(tokenizer) < 2 or not tokenizer.encode("a 1", add_special_tokens=False):
        raise ValueError(
            f"{path}: its tokenizer has {len(tokenizer)} token(s) and encodes text to nothing: the tokenizer files "
            "are missing or empty; copy the tokenizer of the model it was trained from into the folder"
        )


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32, revision: str = ""):
    """(model, tokenizer, image processor or None) from a local folder saved with save_pretrained (nothing is
    downloaded), or from a hub id (the Hugging Face cache, else the hub; `revision`: a branch, tag or commit)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = str(path)
    kw = {"local_files_only": True} if Path(path).is_dir() else {"revision": revision or None}
    if Path(path).is_dir():
        check_tokenizer_files(path)
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    check_tokenizer(tokenizer, path)
    image_processor = None
    vlm = is_vlm_dir(path) if Path(path).is_dir() else hasattr(AutoConfig.from_pretrained(path, **kw), "vision_config")
    if vlm:
        from transformers import AutoImageProcessor, AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **kw)
        image_processor = AutoImageProcessor.from_pretrained(path, **kw)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer, image_processor


def save_hf(model, tokenizer, path: str | Path) -> None:
    """save_pretrained of the model (safetensors) and of its tokenizer."""
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
