"""Any transformers causal LM, or image-text model (AutoModelForImageTextToText with its image processor),
with its tokenizer and chat template, by local path (lazy import)."""

from __future__ import annotations

from pathlib import Path

import torch


def is_hf_dir(path: str | Path) -> bool:
    """Whether `path` is a folder with a config.json (a transformers model folder)."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").exists()


def is_vlm_dir(path: str | Path) -> bool:
    """Whether the folder's config has a vision part (an image+text model)."""
    import json

    cfg = json.loads((Path(path) / "config.json").read_text())
    return "vision_config" in cfg


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, image processor or None) from a local folder saved with save_pretrained.
    Nothing is downloaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    image_processor = None
    if is_vlm_dir(path):
        from transformers import AutoImageProcessor, AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True)
        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer, image_processor


def save_hf(model, tokenizer, path: str | Path) -> None:
    """save_pretrained of the model (safetensors) and of its tokenizer."""
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
