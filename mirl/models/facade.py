"""The one Policy interface every recipe uses, over a Backend (models/backends.py: the built-in tiny models or
a transformers model):

    policy.encode_prompt(text, images, where) -> (ids, image inputs or None)
    policy(input_ids (B,T), attention_mask (B,T), images=None, output="logits") -> PolicyOutput (.logits (B, T, V))
    policy.step(input_ids, attention_mask, cache, images=None) -> (logits, cache)   # incremental, generation
    policy.save(dir)     (loading: models/policy.py, load_policy(dir or preset))

Positions are always derived from the attention mask, so left padding, right padding and cached
generation agree (Qwen2-VL's 3-D M-RoPE positions: from its own rope index at the prefill, then the
mask count plus each row's rope delta). `images` (models/vision.py: a dict of tensors for the batch's
images in placeholder order) is accepted everywhere; a text-only model rejects a non-empty one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from ..logps import SharedPrompt
from .backends import Backend
from .decode import StaticCache, decode_step
from .tokenizer import IMAGE_PLACEHOLDER, eos_token_ids
from .vision import VIDEO_PLACEHOLDER, Video


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


class Policy(nn.Module):
    """The one interface every recipe uses, over two backends: the built-in tiny models (TinyBackend) and
    transformers models (HFBackend), as vision is split into TinyVision and HFVision."""

    def __init__(self, model: nn.Module, tokenizer, backend: Backend, vision=None):
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
        return self.backend.mrope

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
        Each image placeholder '<image>' becomes the model's image tokens, each '<video>' a video's (an item of
        `images` that is a models/vision.py Video); bad images raise DataError."""
        from ..errors import DataError

        images = [] if images is None else list(images)
        if not images:
            if self.is_vlm and IMAGE_PLACEHOLDER in text:
                raise DataError(
                    f"{where}: the prompt has {text.count(IMAGE_PLACEHOLDER)} image placeholder(s) "
                    "but the row has no images"
                )
            if self.is_vlm and VIDEO_PLACEHOLDER in text:
                raise DataError(
                    f"{where}: the prompt has {text.count(VIDEO_PLACEHOLDER)} video placeholder(s) "
                    "but the row has no video"
                )
            return self.tokenizer.encode(text, add_special_tokens=True), None
        if not self.is_vlm:
            n_videos = sum(isinstance(x, Video) for x in images)
            what = f"{len(images) - n_videos} image(s)"
            what = f"{n_videos} video(s) and {what}" if n_videos else what
            raise DataError(
                f"{where}: the row has {what} but the model is text-only "
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
        """Token ids generation must not produce: the image (and video) placeholders of a VLM."""
        if not self.is_vlm:
            return []
        tid = getattr(self.vision, "image_token_id", None)
        if tid is None:
            tid = self.vision.cfg.image_token_id
        video = getattr(self.vision, "video_token_id", None)  # a transformers VLM's video placeholder
        return [tid] if video is None else [tid, video]

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
    def forward(
        self, input_ids, attention_mask=None, images=None, output: str = "logits", shared: SharedPrompt | None = None
    ) -> PolicyOutput:
        """One full forward (no cache) -> PolicyOutput with the fields `output` asks for (see PolicyOutput).
        Going through forward() keeps DDP's gradient hooks in play for every output. shared (shared_prompts): rows
        that repeat a prompt (a GRPO group) take its keys and values from one prefix forward per prompt, for
        "hidden_and_head" of text rows where the backend can (the same hidden states; otherwise ignored)."""
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        images = self._images_here(images)
        position_ids, deltas = self.backend.positions(self._base(), input_ids, attention_mask, images, None)
        kw = self._image_kwargs(images)
        if shared is not None and output == "hidden_and_head" and not images and not self.sharded and not self._drops():
            fused = self.backend.shared_hidden_and_head(self._base(), input_ids, attention_mask, position_ids, shared)
            if fused is not None:
                return PolicyOutput(hidden=fused[0], head_weight=fused[1])
        if output == "hidden_and_head" and not self.sharded:  # FSDP2: the head weight is sharded outside
            fused = self.backend.hidden_and_head(self._base(), input_ids, attention_mask, position_ids, kw)
            if fused is not None:
                return PolicyOutput(hidden=fused[0], head_weight=fused[1])
        if output == "logits_and_hidden":
            logits, hidden = self.backend.logits_and_hidden(self.model, input_ids, attention_mask, position_ids, kw)
            return PolicyOutput(logits=logits, hidden=hidden)
        logits, _ = self.backend.step(self.model, input_ids, attention_mask, position_ids, deltas, None, False, kw)
        return PolicyOutput(logits=logits)

    def _drops(self) -> bool:
        """Dropout is drawn in this forward (training, a dropout module or attention dropout above 0): rows sharing
        a prompt's forward would share its draws, so they do not."""
        if not self.training:
            return False
        attention = getattr(getattr(self._base(), "config", None), "attention_dropout", 0.0) or 0.0
        return attention > 0 or any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.model.modules())

    def step(self, input_ids, attention_mask, cache=None, use_cache: bool = True, images=None):
        """One incremental forward for generation -> (logits, cache). attention_mask covers cached and new
        tokens: (B, S + T). Images go with the step that holds their placeholders (the prefill). A StaticCache
        (start_decode) takes one token per row per step, or a conversation's next turn at once (rollout/turns.py),
        decoded in place."""
        if isinstance(cache, StaticCache):
            return decode_step(cache.decoder, input_ids, attention_mask, cache), cache
        images = self._images_here(images)
        position_ids, deltas = self.backend.positions(self._base(), input_ids, attention_mask, images, cache)
        kw = self._image_kwargs(images)
        return self.backend.step(self.model, input_ids, attention_mask, position_ids, deltas, cache, use_cache, kw)

    def start_decode(
        self, input_ids, attention_mask, new_tokens: int, images=None, static: bool = True, shared=None
    ) -> tuple:
        """The prefill through the model's own forward -> (logits, cache). static: the cache is then copied into
        a preallocated one with room for `new_tokens`, and step() decodes on it in place (models/decode.py),
        where the backend can (not under FSDP2, whose hooks sit on the blocks' forward). shared (SharedPrompt over
        the whole width): rows that repeat a prompt (a group's samples) prefill it once and copy its cache, for
        text rows where the backend's cache can be cut; the logits are then the last position's, (B, 1, V)."""
        logits = cache = None
        if shared is not None and not images:
            logits, cache = self.step(input_ids[shared.firsts], attention_mask[shared.firsts])
            cache = self.select_rows(cache, shared.owner)  # each row's own copy of its prompt's keys and values
            logits = logits[:, -1:][shared.owner]  # (decoding reads the last position's only)
        if cache is None:
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
