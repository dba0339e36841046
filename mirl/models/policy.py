"""The one Policy interface every recipe uses, over the built-in tiny GPT or a transformers model.

    policy(input_ids (B,T), attention_mask (B,T), images=None) -> logits (B, T, V)
    policy.step(input_ids, attention_mask, cache) -> (logits, cache)   # incremental, for generation
    policy.save(dir) / load_policy(dir or preset)

Positions are always derived from the attention mask, so left padding, right padding and cached
generation agree. `images` is accepted everywhere; a text-only model rejects a non-empty one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_model, save_model

from .hf import is_hf_dir, load_hf, save_hf
from .tiny_lm import PRESETS, TinyGPT, TinyGPTConfig, preset_config
from .tokenizer import CharTokenizer


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B, T) positions counting real tokens from 0 (padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class Policy(nn.Module):
    def __init__(self, model: nn.Module, tokenizer, kind: str):
        super().__init__()
        if kind not in ("tiny", "hf"):
            raise ValueError(f"policy kind must be 'tiny' or 'hf', got {kind!r}")
        self.model, self.tokenizer, self.kind = model, tokenizer, kind

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_seq_len(self) -> int:
        if self.kind == "tiny":
            return self.model.config.max_seq_len
        return getattr(self.model.config, "max_position_embeddings", 1 << 20)

    def forward(self, input_ids, attention_mask=None, images=None, return_hidden: bool = False):
        """-> logits (B, T, V), or (logits, hidden (B, T, C)) with return_hidden (value and reward heads)."""
        if images is not None and len(images):
            raise ValueError("this policy is text-only; it cannot take images")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not return_hidden:
            logits, _ = self.step(input_ids, attention_mask, None, use_cache=False)
            return logits
        position_ids = positions_from_mask(attention_mask)
        if self.kind == "tiny":
            logits, _, hidden = self.model(input_ids, attention_mask, position_ids, None, return_hidden=True)
            return logits, hidden
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False, output_hidden_states=True)
        return out.logits, out.hidden_states[-1]

    @property
    def hidden_size(self) -> int:
        return self.model.config.n_embd if self.kind == "tiny" else self.model.config.hidden_size

    def step(self, input_ids, attention_mask, cache=None, use_cache: bool = True):
        """One incremental forward. attention_mask covers cached and new tokens: (B, S+T)."""
        t = input_ids.shape[1]
        position_ids = positions_from_mask(attention_mask)[:, -t:]
        if self.kind == "tiny":
            return self.model(input_ids, attention_mask, position_ids, cache)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=use_cache)
        return out.logits, out.past_key_values

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.kind == "hf":
            save_hf(self.model, self.tokenizer, path)
            return
        (path / "config.json").write_text(json.dumps(self.model.config.to_dict(), indent=1))
        save_model(self.model, str(path / "model.safetensors"))
        self.tokenizer.save_pretrained(path)


def new_tiny_policy(preset: str = "gpt-nano", max_seq_len: int = 256, seed: int | None = None) -> Policy:
    tok = CharTokenizer()
    if seed is not None:
        torch.manual_seed(seed)
    return Policy(TinyGPT(preset_config(preset, tok.vocab_size, max_seq_len)), tok, "tiny")


def load_policy(name_or_path: str | Path, *, dtype: torch.dtype = torch.float32, max_seq_len: int = 256,
                seed: int | None = None) -> Policy:
    """A preset name ('gpt-nano', 'gpt-d3') builds a fresh tiny GPT; a folder loads a saved policy."""
    s = str(name_or_path)
    if s in PRESETS or (s.startswith("gpt-d") and s[5:].isdigit()):
        return new_tiny_policy(s, max_seq_len, seed)
    path = Path(s)
    if not path.exists():
        raise FileNotFoundError(f"model {s!r} is neither a preset ({', '.join(PRESETS)}, gpt-d<N>) "
                                "nor an existing folder")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path} has no config.json: not a saved model folder")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("model_type") == "mirl-tiny-gpt":
        model = TinyGPT(TinyGPTConfig(**cfg))
        load_model(model, str(path / "model.safetensors"))
        return Policy(model.to(dtype), CharTokenizer.from_pretrained(path), "tiny")
    if is_hf_dir(path):
        model, tok = load_hf(path, dtype)
        return Policy(model, tok, "hf")
    raise ValueError(f"cannot load a model from {path}")
