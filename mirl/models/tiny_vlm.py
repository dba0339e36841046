"""A tiny vision-language model for CPU: a small conv image encoder and an MLP projector whose outputs
replace the image-placeholder tokens of the tiny GPT's input (LLaVA's recipe, at toy scale).

    image (C, H, W) -> conv 3x3 -> GELU -> conv patch x patch, stride patch -> GELU   (D, H/p, W/p)
                    -> flatten to H/p * W/p tokens + learned patch positions -> MLP projector -> (N_img, n_embd)
    input_ids: BOS, <image> x N_img, text ...   the N_img placeholder embeddings are replaced in order

Presets: vlm-nano (gpt-nano text model, 32x32 RGB images, patch 8 -> 16 image tokens), vlm-micro (gpt-micro);
vlm-nano-std and vlm-micro-std standardise each image first (pixel_norm "image": mean 0, std 1 per image).
The image size is fixed by the config; the processor (models/vision.py) refuses other sizes.

Video (max_video_frames > 0, every preset: 16). A clip's frames go through the same patch encoder, one by one; frame
t's tokens get a learned frame-position embedding e_t, and each pair of frames (2k, 2k+1) is merged into one
group of n_image_tokens tokens by a linear map of the two frames' features side by side (a temporal patch of 2, as
Qwen2-VL's; an odd clip repeats its last frame), then projected like an image:

    frames (F, C, H, W) -> encoder + patch positions -> (F, P, D) + e_t -> [f_2k ; f_2k+1] W_merge -> (F/2, P, D)
                        -> MLP projector -> (F/2 * P, n_embd)       placeholders: <video> -> F/2 * P x <image>

so 8 frames of 32x32 take 64 tokens of gpt-nano's 256. Order is visible twice: inside a pair through W_merge
(which side a frame sits on) and across pairs through e_t and the text model's positions; a clip and its frames
shuffled give different features. W_merge starts as the mean of the pair ([I/2, I/2]) and e_t at zero (neither
draws from the random generator, so image runs are unchanged), so an untrained model sees a still clip of one
image x as x itself. The frame times (data/video.py) are not used: the frames are taken as evenly spaced.
--freeze-vision freezes the per-frame encoder; e_t and W_merge train with the projector. A config.json without
max_video_frames (a folder saved before video) loads as 0: no video modules, images as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .tiny_lm import PRESETS, TinyGPT, TinyGPTConfig

# preset -> (text model preset, pixel_norm). The -std presets standardise each image: a faint detail on a dark
# image (the zoom environment's digit) then reaches the encoder at full contrast instead of as a 1e-3 change.
VLM_PRESETS = {
    "vlm-nano": ("gpt-nano", "none"),
    "vlm-micro": ("gpt-micro", "none"),
    "vlm-mini": ("gpt-mini", "none"),
    "vlm-nano-std": ("gpt-nano", "image"),
    "vlm-micro-std": ("gpt-micro", "image"),
}
PIXEL_NORMS = ("none", "image")


@dataclass
class TinyVLMConfig(TinyGPTConfig):
    """Sizes of the built-in image+text model: the GPT's, the image size and patching."""

    image_size: int = 32  # square images of this many pixels a side
    channels: int = 3  # 3 = RGB, 1 = grayscale
    patch: int = 8  # image tokens = (image_size / patch) ** 2
    vision_dim: int = 64  # width of the image encoder
    image_token_id: int = -1  # the tokenizer's <image> id
    pixel_norm: str = "none"  # none: pixels in [0, 1] as they are | image: each image standardised (mean 0, std 1)
    max_video_frames: int = 0  # the longest clip in frames (its frame-position embeddings); 0: no video
    model_type: str = "mirl-tiny-vlm"

    def __post_init__(self):
        super().__post_init__()
        if self.image_size % self.patch:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch {self.patch}")
        if self.max_video_frames < 0 or self.max_video_frames % 2:
            raise ValueError(f"max_video_frames {self.max_video_frames} must be even and >= 0 (frames go in pairs)")
        if self.pixel_norm not in PIXEL_NORMS:
            raise ValueError(f"pixel_norm {self.pixel_norm!r} is not one of {', '.join(PIXEL_NORMS)}")

    @property
    def n_image_tokens(self) -> int:
        """Tokens one image becomes (one per patch)."""
        return (self.image_size // self.patch) ** 2


PRESET_VIDEO_FRAMES = 16  # the frame-position embeddings of a preset: clips of at most 16 frames (128 tokens)


def vlm_preset_config(name: str, vocab_size: int, image_token_id: int, max_seq_len: int = 256) -> TinyVLMConfig:
    """The config of a tiny VLM preset."""
    if name not in VLM_PRESETS:
        raise ValueError(f"unknown tiny VLM preset {name!r}; valid: {', '.join(VLM_PRESETS)}")
    text, pixel_norm = VLM_PRESETS[name]
    return TinyVLMConfig(
        vocab_size=vocab_size,
        depth=PRESETS[text],
        max_seq_len=max_seq_len,
        image_token_id=image_token_id,
        pixel_norm=pixel_norm,
        max_video_frames=PRESET_VIDEO_FRAMES,
    )


class TinyVLM(nn.Module):
    """The tiny GPT with a patch encoder and projector whose outputs replace the image placeholders."""

    def __init__(self, cfg: TinyVLMConfig):
        super().__init__()
        self.config = cfg
        self.lm = TinyGPT(cfg)
        d = cfg.vision_dim
        self.vision = nn.Sequential(
            nn.Conv2d(cfg.channels, d // 2, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(d // 2, d, cfg.patch, stride=cfg.patch),
            nn.GELU(),
        )
        self.patch_pos = nn.Parameter(torch.randn(cfg.n_image_tokens, d) * 0.02)
        self.projector = nn.Sequential(nn.Linear(d, cfg.n_embd), nn.GELU(), nn.Linear(cfg.n_embd, cfg.n_embd))
        if cfg.max_video_frames:  # deterministic starts, no draw from the random generator (see the docstring)
            self.frame_pos = nn.Parameter(torch.zeros(cfg.max_video_frames, d))
            self.frame_merge = nn.utils.skip_init(nn.Linear, 2 * d, d)
            with torch.no_grad():
                self.frame_merge.weight.copy_(torch.cat([torch.eye(d), torch.eye(d)], 1) / 2)
                self.frame_merge.bias.zero_()

    # the text model's attributes the Policy reads
    @property
    def lm_head(self):
        """The language model's output layer."""
        return self.lm.lm_head

    @property
    def checkpointing(self) -> bool:
        """Whether block activations are recomputed in the backward."""
        return self.lm.checkpointing

    @checkpointing.setter
    def checkpointing(self, value: bool) -> None:
        """Whether block activations are recomputed in the backward."""
        self.lm.checkpointing = value

    def vision_tower(self) -> list[nn.Module | nn.Parameter]:
        """The patch encoder (frozen by --freeze-vision)."""
        return [self.vision, self.patch_pos]

    def image_features(self, pixel_values: torch.Tensor, frame_index: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> (N, n_image_tokens, n_embd); with frame_index (N,) (-1: a still image, t: frame
        t of a clip of an even number of frames, in order) -> (N - frames / 2, n_image_tokens, n_embd)."""
        x = pixel_values.to(self.patch_pos.dtype)
        if self.config.pixel_norm == "image":  # per image: invariant to its brightness and contrast
            mean, std = x.mean((1, 2, 3), keepdim=True), x.std((1, 2, 3), keepdim=True, unbiased=False)
            x = (x - mean) / (std + 1e-5)
        x = self.vision(x)  # (N, D, h, w)
        x = x.flatten(2).transpose(1, 2) + self.patch_pos  # (N, P, D)
        if frame_index is not None and bool((frame_index >= 0).any()):
            x = self.merge_frames(x, frame_index.to(x.device))
        return self.projector(x)

    def merge_frames(self, x: torch.Tensor, frame_index: torch.Tensor) -> torch.Tensor:
        """Per-image tokens (N, P, D) -> (N - frames / 2, P, D): frame t gets e_t, frames 2k and 2k+1 of a clip
        become one group [f_2k ; f_2k+1] W_merge in the place of frame 2k; still images (-1) pass as they are."""
        if not self.config.max_video_frames:
            raise ValueError("this tiny VLM takes no video (max_video_frames is 0)")
        is_frame = (frame_index >= 0)[:, None, None]  # (N, 1, 1)
        x = x + self.frame_pos[frame_index.clamp(min=0)][:, None] * is_frame
        pairs = self.frame_merge(torch.cat([x, torch.roll(x, -1, 0)], -1))  # row i with row i + 1
        x = torch.where(is_frame, pairs, x)
        return x[(frame_index < 0) | (frame_index % 2 == 0)]

    def forward(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        images=None,
        return_hidden: bool = False,
        skip_lm_head: bool = False,
    ):
        """As TinyGPT.forward; images = {'pixel_values': (N, C, H, W)[, 'frame_index': (N,)]} for the N images and
        video frames of the batch, in the order their placeholders appear (row by row). Without images placeholders
        are plain tokens."""
        emb = self.lm.wte(input_ids)
        if images is not None and images.get("pixel_values") is not None:
            feats = self.image_features(images["pixel_values"], images.get("frame_index"))
            slots = input_ids == self.config.image_token_id
            if int(slots.sum()) != feats.shape[0] * feats.shape[1]:
                raise ValueError(
                    f"{int(slots.sum())} image-token slots in the batch but {feats.shape[0]} images x "
                    f"{feats.shape[1]} tokens: images and placeholders are out of step"
                )
            emb = emb.masked_scatter(slots[..., None], feats.reshape(-1, feats.shape[-1]).to(emb.dtype))
        return self.lm(
            input_ids,
            attention_mask,
            position_ids,
            past_key_values,
            inputs_embeds=emb,
            return_hidden=return_hidden,
            skip_lm_head=skip_lm_head,
        )
