"""Reading a saved model's files: a missing, truncated or invalid file is a ModelFileError that names it.

Shared by the backends (models/backends.py: load_weights) and the loaders (models/policy.py), and by the
checkpoint reader (checkpoint.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn
from safetensors.torch import load_model

from .tokenizer import CharTokenizer


class ModelFileError(ValueError):
    """A model or checkpoint file that is missing, truncated or invalid; the message names the file."""


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`; a missing or invalid file is a ModelFileError naming it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ModelFileError(f"{path}: missing ({what})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: invalid JSON in the {what} ({e})") from e
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: the {what} must be a JSON object")
    return data


def load_weights(model: nn.Module, file: Path) -> None:
    """safetensors weights into `model` (strict); missing, truncated or mismatched -> ModelFileError."""
    from safetensors import SafetensorError

    if not Path(file).exists():
        raise ModelFileError(f"{file}: missing (the model's weights)")
    try:
        load_model(model, str(file))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ModelFileError(f"{file}: cannot load the weights ({load_error_reason(e)})") from e


def load_error_reason(e: Exception) -> str:
    """The reason of a failed weight load in one line: torch's 'Error(s) in loading state_dict for X:' heading
    is followed by the lines that say what (size mismatch for ..., missing keys ...); keep those."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        shown = "; ".join(lines[1:4]) + (f"; and {len(lines) - 4} more" if len(lines) > 4 else "")
        return f"{lines[0]} {shown}; the weights and config.json are of different model sizes"
    return (lines[0] if lines else type(e).__name__)[:300]


def read_tokenizer(path: Path) -> CharTokenizer:
    """The character tokenizer of a tiny-model folder; a missing or invalid tokenizer.json is named."""
    data = read_json(Path(path) / "tokenizer.json", "tokenizer")
    try:
        return CharTokenizer.from_pretrained(path)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(
            f"{Path(path) / 'tokenizer.json'}: not a valid {data.get('type', 'mirl')} tokenizer ({e})"
        ) from e
