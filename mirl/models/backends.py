"""The two model families under the Policy facade (models/facade.py), behind one interface, `Backend`:

    TinyBackend   the built-in tiny GPT and tiny VLM (models/tiny_lm.py, models/tiny_vlm.py)
    HFBackend     any transformers causal LM or image-text model (models/hf.py)

The facade owns the model, the PEFT wrapper and FSDP2; a backend only knows its family's calling convention:
positions, image keyword arguments, the cache, the fused-head forward, saving. `base` is the model under any
PEFT wrapper, `model` the training model (wrapped or not); the facade decides which each call gets.
"""

from __future__ import annotations

import inspect
import itertools
import json
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn
from safetensors.torch import save_model

from .decode import StaticCache, hf_cache_layers, hf_decoder, tiny_decoder, to_static
from .files import ModelFileError, load_error_reason, load_weights
from .hf import save_hf

# transformers model types whose logits are exactly lm_head(model(...).last_hidden_state): no scaling,
# soft-capping or multiplier after the head (Granite's logits_scaling, Falcon-H1's lm_head_multiplier,
# Gemma-2's final_logit_softcapping, Cohere's logit_scale, MiniCPM's scale_width would be lost). Any other
# model takes the plain path (full logits from its own forward); tests/test_models.py checks both.
FUSED_HEAD_MODEL_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "qwen2_vl",
        "qwen2_5_vl",
        "phi3",
        "olmo2",
        "smollm3",
    }
)


# rotary embeddings whose frequencies do not depend on the forward's length (dynamic NTK and LongRoPE choose theirs
# from the longest position in the call, so a prompt run alone would get other ones): shared_hidden_and_head
STATIC_ROPE = frozenset({"default", "linear", "llama3", "yarn"})


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B, T) positions counting real tokens from 0 (padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def mrope_row(kinds: list[int], pictures: dict, merge: int) -> torch.Tensor:
    """Qwen2-VL's and Qwen2.5-VL's M-RoPE positions (3, n) of one row of n tokens, as Qwen's original code and vLLM
    compute them. kinds[i] is 0 for a text token, 1 for an image placeholder, 2 for a video placeholder;
    pictures[1] and pictures[2] iterate over the (t, h, w, seconds per temporal patch, tokens per second) of the
    images and the videos in order (images and Qwen2-VL: 1, 1). Text runs 1-D on all three axes; a picture's tokens
    are start + (floor(t x seconds x tokens per second), h, w) over its grid merged by `merge`; text after it starts
    one past the largest position so far on any axis. (transformers 5.25's get_rope_index starts it past the
    picture's spatial extent instead: the same for images, not for a clip longer in time than in space.)

    >>> mrope_row([0, 2, 2, 2, 2, 0], {2: iter([(4, 2, 2, 1.5, 2)])}, 2).tolist()  # 4 pairs of 1x1 merged patches
    [[0, 1, 4, 7, 10, 11], [0, 1, 1, 1, 1, 11], [0, 1, 1, 1, 1, 11]]
    """
    out, start = [], 0
    for kind, run in itertools.groupby(kinds):
        left = len(list(run))
        if kind == 0:
            out.append(torch.arange(start, start + left).expand(3, -1))
            start += left
            continue
        while left > 0:  # a run of placeholders may hold several pictures
            t, h, w, seconds, per_second = next(pictures[kind])
            h, w = h // merge, w // merge
            tt = (torch.arange(t, dtype=torch.float64) * (seconds * per_second)).long()  # vLLM's float64 order
            pos = torch.stack(torch.meshgrid(tt, torch.arange(h), torch.arange(w), indexing="ij")).reshape(3, -1)
            out.append(pos + start)
            start = int(out[-1].max()) + 1
            left -= t * h * w
    return torch.cat(out, 1) if out else torch.zeros(3, 0, dtype=torch.long)


class Backend(Protocol):
    """What the Policy facade asks of a model family (TinyBackend, HFBackend)."""

    name: str  # 'tiny' or 'hf' (Policy.kind)
    lora_targets: list[str] | str  # PEFT's target_modules when --lora-targets is not given
    peft_kwargs: dict  # further LoraConfig arguments
    mrope: bool  # positions are Qwen2-VL's 3-D M-RoPE ones
    serves_vllm: bool  # vLLM has an implementation of the model (rollout/engine.py: VLLMEngine)

    def positions(self, base, input_ids, attention_mask, images, cache) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(position ids of the new tokens, rope deltas or None), from the mask (and the cache when decoding)."""

    def image_kwargs(self, images) -> dict:
        """The model's keyword arguments for a batch of image inputs."""

    def step(self, model, input_ids, attention_mask, position_ids, deltas, cache, use_cache, image_kw):
        """One forward with the cache -> (logits (B, T, V), the new cache)."""

    def select_rows(self, cache, rows: torch.Tensor):
        """The cache of these batch rows only, or None when this cache cannot be cut."""

    def to_static(self, base, cache, attention_mask, new_tokens: int) -> StaticCache | None:
        """The prefill's cache copied into a preallocated one (models/decode.py), or None where not supported."""

    def logits_and_hidden(self, model, input_ids, attention_mask, position_ids, image_kw):
        """-> (logits (B, T, V), last hidden state (B, T, C))."""

    def hidden_and_head(self, base, input_ids, attention_mask, position_ids, image_kw):
        """(last hidden state (B, T, C), head weight (V, C)) when the logits are exactly hidden @ W^T, else None."""

    def shared_hidden_and_head(self, base, input_ids, attention_mask, position_ids, shared):
        """hidden_and_head with each shared prompt (logps.SharedPrompt) run once and its keys and values reused by
        the rows that repeat it: the same (hidden, head weight), or None where this backend cannot."""

    def enable_activation_checkpointing(self, base) -> None:
        """Recompute block activations in the backward."""

    def max_seq_len(self, base) -> int:
        """The model's context length."""

    def hidden_size(self, base) -> int:
        """The width of the last hidden state."""

    def save(self, model, tokenizer, vision, path: Path) -> None:
        """The model (LoRA already merged), its tokenizer and image processor into the folder `path`."""

    def load_weights(self, model, folder: Path) -> None:
        """Weights saved by save() (a checkpoint's model/ folder) into `model`."""


class TinyBackend:
    """The built-in tiny GPT and tiny VLM: positions from the mask, images as one tensor."""

    name = "tiny"
    lora_targets = ["qkv", "proj", "fc", "fc_out"]
    peft_kwargs: dict = {}
    mrope = False
    serves_vllm = False  # no vLLM implementation of the tiny models

    def positions(self, base, input_ids, attention_mask, images, cache):
        """(position ids of the new tokens (B, T), None)."""
        return positions_from_mask(attention_mask)[:, -input_ids.shape[1] :], None

    def image_kwargs(self, images) -> dict:
        """The model's keyword arguments for a batch of image inputs."""
        return {"images": images}

    def step(self, model, input_ids, attention_mask, position_ids, deltas, cache, use_cache, image_kw):
        """-> (logits, cache)."""
        return model(input_ids, attention_mask, position_ids, cache, **image_kw)

    def select_rows(self, cache, rows: torch.Tensor):
        """The cache of these batch rows only (a list of (keys, values) per block, each (B, H, S, D))."""
        return [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in cache]

    def to_static(self, base, cache, attention_mask, new_tokens: int) -> StaticCache | None:
        """The prefill's cache copied into a preallocated one, with the decode weights (models/decode.py)."""
        decoder = tiny_decoder(getattr(base, "lm", base), attention_mask.shape[0])
        return None if decoder is None else to_static(cache, attention_mask, new_tokens, decoder)

    def logits_and_hidden(self, model, input_ids, attention_mask, position_ids, image_kw):
        """-> (logits (B, T, V), last hidden state (B, T, C))."""
        logits, _, hidden = model(input_ids, attention_mask, position_ids, None, return_hidden=True, **image_kw)
        return logits, hidden

    def hidden_and_head(self, base, input_ids, attention_mask, position_ids, image_kw):
        """(hidden, head weight): the tiny models' logits are exactly hidden @ lm_head.weight^T."""
        _, _, hidden = base(
            input_ids, attention_mask, position_ids, None, return_hidden=True, skip_lm_head=True, **image_kw
        )
        return hidden, base.lm_head.weight

    def shared_hidden_and_head(self, base, input_ids, attention_mask, position_ids, shared):
        """The prompts once, their cache (a list of (keys, values) per block) picked per row, then every row's
        response area over it; None for the tiny VLM (its prompts hold images)."""
        if hasattr(base, "lm"):
            return None
        p, firsts, owner = shared
        _, cache, head = base(
            input_ids[firsts, :p], attention_mask[firsts, :p], position_ids[firsts, :p], None, return_hidden=True,
            skip_lm_head=True,
        )  # fmt: skip
        cache = [(k[owner], v[owner]) for k, v in cache]
        _, _, rest = base(
            input_ids[:, p:], attention_mask, position_ids[:, p:], cache, return_hidden=True, skip_lm_head=True
        )
        return torch.cat([head[owner], rest], 1), base.lm_head.weight

    def enable_activation_checkpointing(self, base) -> None:
        """Recompute block activations in the backward."""
        base.checkpointing = True

    def max_seq_len(self, base) -> int:
        """The model's context length."""
        return base.config.max_seq_len

    def hidden_size(self, base) -> int:
        """The width of the last hidden state."""
        return base.config.n_embd

    def save(self, model, tokenizer, vision, path: Path) -> None:
        """config.json, model.safetensors and tokenizer.json in `path`."""
        (path / "config.json").write_text(json.dumps(model.config.to_dict(), indent=1))
        save_model(model, str(path / "model.safetensors"))
        tokenizer.save_pretrained(path)

    def load_weights(self, model, folder: Path) -> None:
        """Weights saved by save() (a checkpoint's model/ folder) into `model`, strictly."""
        load_weights(model, Path(folder) / "model.safetensors")


class HFBackend:
    """A transformers causal LM or image-text model. Qwen2-VL's and Qwen2.5-VL's 3-D M-RoPE positions are computed
    here: from the model's own rope index at the prefill (images, videos and their frame timing), then the mask count
    plus each row's rope delta."""

    name = "hf"
    lora_targets = "all-linear"
    peft_kwargs = {"task_type": "CAUSAL_LM"}
    serves_vllm = True  # vLLM implements the common transformers architectures (Qwen2, Llama, ...)

    def __init__(self, model):
        self.mrope = getattr(model.config, "model_type", "") in ("qwen2_vl", "qwen2_5_vl")
        # transformers 5 renamed forward's past_key_values (and the output's field) to cache; the old name warns
        # and goes in 5.40. The name the model's own forward declares (read before PEFT wraps it in **kwargs).
        params = inspect.signature(model.forward).parameters
        self.cache_name = "cache" if "cache" in params else "past_key_values"

    def positions(self, base, input_ids, attention_mask, images, cache):
        """(position ids of the new tokens, rope deltas or None); M-RoPE models: (3, B, T) positions."""
        pos = positions_from_mask(attention_mask)[:, -input_ids.shape[1] :]
        if not self.mrope:
            return pos, None
        if cache is not None:  # decoding: text positions continue from each row's rope delta
            deltas = cache[1]
            return (pos + deltas)[None].expand(3, -1, -1), deltas
        if images and ("image_grid_thw" in images or "video_grid_thw" in images):
            return self._rope_index(base.model, input_ids, attention_mask, images)
        return pos[None].expand(3, -1, -1), torch.zeros(pos.shape[0], 1, dtype=pos.dtype, device=pos.device)

    @staticmethod
    def _rope_index(inner, input_ids, attention_mask, images):
        """The M-RoPE positions (3, B, T) of a batch with images and videos (mrope_row: Qwen's original rule, which
        vLLM follows), and each row's rope delta (B, 1): one past its largest position, less its real length, where
        decoding continues. One host read of the token kinds and grids per prefill, none per decoded token."""
        cfg = inner.config
        kinds = (input_ids == cfg.image_token_id).long() + 2 * (input_ids == cfg.video_token_id).long()
        images_thw = images["image_grid_thw"].tolist() if "image_grid_thw" in images else []
        videos_thw = images["video_grid_thw"].tolist() if "video_grid_thw" in images else []
        per_second = getattr(cfg.vision_config, "tokens_per_second", 1)  # Qwen2.5-VL's; Qwen2-VL has none
        seconds = images["second_per_grid_ts"].tolist() if "second_per_grid_ts" in images else [1] * len(videos_thw)
        pictures = {
            1: iter([(*g, 1, 1) for g in images_thw]),
            2: iter([(*g, s, per_second) for g, s in zip(videos_thw, seconds)]),
        }  # the batch's pictures in row order, each row taking its own in turn
        pos = torch.zeros(3, *input_ids.shape, dtype=torch.long)
        deltas = torch.zeros(input_ids.shape[0], 1, dtype=torch.long)
        for b, (row, keep) in enumerate(zip(kinds.cpu(), attention_mask.bool().cpu())):
            row_pos = mrope_row(row[keep].tolist(), pictures, cfg.vision_config.spatial_merge_size)
            pos[:, b, keep] = row_pos
            deltas[b] = row_pos.max() + 1 - row_pos.shape[1] if row_pos.numel() else 0
        return pos.to(input_ids.device), deltas.to(input_ids.device)

    def image_kwargs(self, images) -> dict:
        """The model's keyword arguments for a batch of image inputs (the processor's tensors)."""
        return dict(images)

    def step(self, model, input_ids, attention_mask, position_ids, deltas, cache, use_cache, image_kw):
        """-> (logits, (the model's cache, rope deltas))."""
        past = None if cache is None else cache[0]
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{self.cache_name: past},
            **image_kw,
        )
        return out.logits, (getattr(out, self.cache_name), deltas)

    def select_rows(self, cache, rows: torch.Tensor):
        """The cache of these batch rows only (the transformers cache's batch_select_indices, in place), or None
        for a cache type without it."""
        past, deltas = cache
        if not hasattr(past, "batch_select_indices"):
            return None
        past.batch_select_indices(rows)
        return past, (None if deltas is None else deltas.index_select(0, rows))

    def to_static(self, base, cache, attention_mask, new_tokens: int) -> StaticCache | None:
        """The prefill's cache copied into a preallocated one, for the families the native step reproduces
        (models/decode.py); None for any other model (its own forward and cache are used)."""
        past, deltas = cache
        length, rows = attention_mask.shape[1] + new_tokens, attention_mask.shape[0]
        decoder = hf_decoder(base, length, rows) if hasattr(past, "layers") else None
        if decoder is None:
            return None
        return to_static(hf_cache_layers(past), attention_mask, new_tokens, decoder, deltas)

    def logits_and_hidden(self, model, input_ids, attention_mask, position_ids, image_kw):
        """-> (logits (B, T, V), last hidden state (B, T, C))."""
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            output_hidden_states=True,
            **image_kw,
        )
        return out.logits, out.hidden_states[-1]

    @staticmethod
    def _plain_head(base):
        """The head of an allow-listed model type whose logits are exactly its output (no bias), else None."""
        head = base.get_output_embeddings()
        plain = (
            getattr(base.config, "model_type", "") in FUSED_HEAD_MODEL_TYPES
            and isinstance(head, nn.Linear)
            and head.bias is None
            and hasattr(base, "model")
        )
        return head if plain else None

    def hidden_and_head(self, base, input_ids, attention_mask, position_ids, image_kw):
        """(hidden, head weight) for the allow-listed model types whose logits are exactly the head's output,
        else None."""
        head = self._plain_head(base)
        if head is None:
            return None
        out = base.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **image_kw
        )
        return out.last_hidden_state, head.weight

    def shared_hidden_and_head(self, base, input_ids, attention_mask, position_ids, shared):
        """The prompts once with the model's own cache, which batch_select_indices then repeats per row (gradients
        flow through it), and every row's response area over it, as generation would. None off the plain-head
        models, for M-RoPE positions and length-dependent rotary frequencies (STATIC_ROPE), and under activation
        checkpointing in a training forward (which turns transformers' cache off)."""
        head = self._plain_head(base)
        recompute = getattr(base, "is_gradient_checkpointing", False) and base.training and torch.is_grad_enabled()
        rope = getattr(getattr(base.model, "rotary_emb", None), "rope_type", "default")
        if head is None or self.mrope or recompute or rope not in STATIC_ROPE:
            return None
        p, firsts, owner = shared
        first = base.model(
            input_ids=input_ids[firsts, :p],
            attention_mask=attention_mask[firsts, :p],
            position_ids=position_ids[firsts, :p],
            use_cache=True,
        )
        cache = getattr(first, self.cache_name)
        if not hasattr(cache, "batch_select_indices") or cache.get_seq_length() != p:  # (a cache left off)
            return None
        cache.batch_select_indices(owner)
        rest = base.model(
            input_ids=input_ids[:, p:],
            attention_mask=attention_mask,
            position_ids=position_ids[:, p:],
            use_cache=True,
            **{self.cache_name: cache},
        )
        return torch.cat([first.last_hidden_state[owner], rest.last_hidden_state], 1), head.weight

    def enable_activation_checkpointing(self, base) -> None:
        """transformers' gradient checkpointing (non-reentrant)."""
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def max_seq_len(self, base) -> int:
        """max_position_embeddings (unbounded when the config has none)."""
        return getattr(base.config, "max_position_embeddings", 1 << 20)

    def hidden_size(self, base) -> int:
        """The text model's hidden size."""
        cfg = base.config
        return cfg.text_config.hidden_size if hasattr(cfg, "text_config") else cfg.hidden_size

    def save(self, model, tokenizer, vision, path: Path) -> None:
        """save_pretrained of the model and tokenizer, and of the image processor for a VLM."""
        save_hf(model, tokenizer, path)
        if vision is not None:
            vision.processor.save_pretrained(str(path))

    def load_weights(self, model, folder: Path) -> None:
        """The safetensors shards of a saved folder into `model` (unexpected names are an error)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        sd = {}
        try:
            for f in sorted(Path(folder).glob("*.safetensors")):
                sd.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise ModelFileError(f"{folder}: cannot load the weights ({e})") from e
        try:
            _, unexpected = model.load_state_dict(sd, strict=False)
        except RuntimeError as e:  # size mismatches
            raise ModelFileError(f"{folder}: cannot load the weights ({load_error_reason(e)})") from e
        if unexpected:
            raise ValueError(f"{folder} has unexpected weights: {unexpected[:5]}")
