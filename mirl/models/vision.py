"""Images: loading with errors that name the row, each model family's prompt encoding, NoisyRollout's
perturbation, and batching of image inputs.

Image inputs of one prompt are a dict of tensors whose first dimension counts that prompt's images (or
their patches); a batch concatenates its rows' dicts in row order, which is the order in which the model
fills the image placeholders. Repeating a prompt G times repeats its dict G times, so pixels stay aligned.

    tiny VLM     {'pixel_values': (n, C, H, W)}                  placeholder -> n_image_tokens x <image>
    Qwen2-VL     {'pixel_values': (patches, D), 'image_grid_thw': (n, 3)}
                 placeholder -> <|vision_start|> <|image_pad|> x (t*h*w / merge^2) <|vision_end|>
    LLaVA        {'pixel_values': (n, 3, H, W)}                  placeholder -> <image> x patches

A video (a Video: its frames in time order, data/video.py reads them) rides in a row's image list like an image
and fills the prompt's '<video>' placeholders (the still images fill '<image>'). The tiny VLM takes it as its
frames, padded to an even count by repeating the last one, each pair of frames becoming n_image_tokens tokens:

    tiny VLM     {'pixel_values': (n, C, H, W), 'frame_index': (n,)}   -1 for a still image, t for frame t
                 <video> -> (frames / 2) x n_image_tokens x <image>
    transformers video is not supported yet (a DataError naming the row)
"""

from __future__ import annotations

import io
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError
from .tokenizer import IMAGE_PLACEHOLDER

READABLE_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")  # converted to the model's channels; others refused
VIDEO_PLACEHOLDER = "<video>"  # where a video goes in a prompt (Qwen2-VL's and TRL's word)


@dataclass(frozen=True)
class Video:
    """A clip as the models take it: its frames (PIL images of one size, in time order) and the time of each frame
    in seconds from the start of the file (None for frames given without timing)."""

    frames: tuple
    times: tuple | None = None

    def convert(self, mode: str) -> Video:
        """Every frame converted to a PIL mode ('RGB', 'L'), as Image.convert."""
        return Video(tuple(f.convert(mode) for f in self.frames), self.times)

    def __len__(self) -> int:
        return len(self.frames)


def load_image(x, where: str, base: str | Path = ""):
    """A PIL image from a path (relative to `base`, the data file's folder), {'bytes'|'path'} (datasets'
    Image feature), raw bytes or a PIL image. Missing or unreadable -> DataError naming `where`."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(x, (Image.Image, Video)):  # a Video was decoded and checked when its row was read
        return x
    try:
        if isinstance(x, dict):
            if x.get("bytes"):
                x = x["bytes"]
            elif x.get("path"):
                x = x["path"]
            else:
                raise DataError(f"{where}: image entry has neither 'bytes' nor 'path'")
        if isinstance(x, (bytes, bytearray)):
            img = Image.open(io.BytesIO(x))
        elif isinstance(x, str):
            p = Path(x) if Path(x).is_absolute() or not base else Path(base) / x
            if not p.exists():
                raise DataError(f"{where}: image file {p} does not exist")
            img = Image.open(p)
        else:
            raise DataError(f"{where}: an image must be a path, bytes or a PIL image, got {type(x).__name__}")
        img.load()  # decode now: a truncated file fails here, not in the middle of training
        return img
    except Image.DecompressionBombError as e:
        raise DataError(f"{where}: image too large to open safely ({e})") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{where}: unreadable image ({e})") from e


def check_image(img, where: str, size: int | None = None):
    """Mode must be convertible; with `size`, the image must be size x size."""
    if img.mode not in READABLE_MODES:
        raise DataError(f"{where}: image mode {img.mode!r} is not supported (use one of {', '.join(READABLE_MODES)})")
    if size is not None and img.size != (size, size):
        raise DataError(f"{where}: image is {img.size[0]}x{img.size[1]} pixels but this model takes {size}x{size}")
    return img


def _placeholders(text: str, images: list, where: str) -> str:
    """The prompt with one placeholder per image ('<image>') and per video ('<video>'); a prompt with none gets
    them first, in the row's order (TRL's plain-prompt convention). A count that differs is a DataError."""
    n_videos = sum(isinstance(x, Video) for x in images)
    n_images = len(images) - n_videos
    n, nv = text.count(IMAGE_PLACEHOLDER), text.count(VIDEO_PLACEHOLDER)
    if n == 0 and nv == 0:
        return "".join(VIDEO_PLACEHOLDER if isinstance(x, Video) else IMAGE_PLACEHOLDER for x in images) + text
    if n != n_images:
        raise DataError(
            f"{where}: the prompt has {n} image placeholder(s) {IMAGE_PLACEHOLDER!r} but the row has "
            f"{n_images} image(s)"
        )
    if nv != n_videos:
        raise DataError(
            f"{where}: the prompt has {nv} video placeholder(s) {VIDEO_PLACEHOLDER!r} but the row has "
            f"{n_videos} video(s)"
        )
    return text


def in_prompt_order(text: str, images: list) -> list:
    """The row's images and videos in the order their placeholders appear in `text` (the i-th '<image>' is the i-th
    still image of the row, the i-th '<video>' its i-th video)."""
    stills = iter([x for x in images if not isinstance(x, Video)])
    videos = iter([x for x in images if isinstance(x, Video)])
    marks = re.findall(f"{re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)}", text)
    return [next(videos) if m == VIDEO_PLACEHOLDER else next(stills) for m in marks]


def even_frames(frames: list) -> list:
    """The frames padded to an even count by repeating the last (the tiny VLM merges frames in pairs, as
    Qwen2-VL's temporal patch of 2 does). even_frames([a, b, c]) == [a, b, c, c]"""
    return list(frames) + list(frames[-1:]) * (len(frames) % 2)


class TinyVision:
    """Prompt encoding for the built-in tiny VLM."""

    def __init__(self, config, tokenizer):
        self.cfg, self.tokenizer = config, tokenizer

    def encode(self, text: str, images: list, where: str):
        """Prompt text and its images and videos -> (token ids, image inputs) for the built-in VLM; an '<image>'
        expands to n_image_tokens patch tokens, a '<video>' to n_image_tokens per pair of its frames."""
        import numpy as np

        cfg = self.cfg
        text = _placeholders(text, images, where)
        mode = "RGB" if cfg.channels == 3 else "L"
        arrays, frame_index = [], []
        for i, x in enumerate(in_prompt_order(text, images)):
            if isinstance(x, Video):
                frames = even_frames(self._check_video(x, f"{where} video {i}"))
                at = [f"{where} video {i} frame {t}" for t in range(len(frames))]
                frame_index += range(len(frames))
            else:
                frames, at = [x], [f"{where} image {i}"]
                frame_index.append(-1)
            for img, w in zip(frames, at):
                img = check_image(img, w, cfg.image_size).convert(mode)
                a = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
                arrays.append(a.permute(2, 0, 1) if a.ndim == 3 else a[None])
        pairs = [len(even_frames(v.frames)) // 2 for v in in_prompt_order(text, images) if isinstance(v, Video)]
        pieces = text.split(VIDEO_PLACEHOLDER)
        text = pieces[0] + "".join(IMAGE_PLACEHOLDER * n + rest for n, rest in zip(pairs, pieces[1:]))
        ids = []
        for t in self.tokenizer.encode(text, add_special_tokens=True):
            ids += [t] * cfg.n_image_tokens if t == cfg.image_token_id else [t]
        return ids, {"pixel_values": torch.stack(arrays), "frame_index": torch.tensor(frame_index, dtype=torch.long)}

    def _check_video(self, video: Video, where: str) -> list:
        cap = self.cfg.max_video_frames
        if not len(video):
            raise DataError(f"{where}: the video has no frames")
        if cap == 0:
            raise DataError(f"{where}: this model takes no video (a tiny VLM saved before video support)")
        if len(even_frames(video.frames)) > cap:
            raise DataError(
                f"{where}: the video has {len(video)} frames but this model takes at most {cap} (--video-max-frames)"
            )
        return list(video.frames)

    def tower(self, model):
        """The modules of the vision tower (for freezing)."""
        return model.vision_tower()


class HFVision:
    """Prompt encoding for a transformers VLM through its image processor: Qwen2-VL style (grid of merged
    patches) or LLaVA style (a fixed number of patch tokens)."""

    def __init__(self, config, tokenizer, image_processor):
        self.config, self.tokenizer, self.processor = config, tokenizer, image_processor
        self.kind = "grid" if hasattr(image_processor, "merge_size") else "fixed"
        self.image_token_id = config.image_token_id if hasattr(config, "image_token_id") else config.image_token_index
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)

    def encode(self, text: str, images: list, where: str):
        """Prompt text and its images -> (token ids, the image processor's inputs); each placeholder expands to the
        model's image tokens."""
        if any(isinstance(x, Video) for x in images):
            raise DataError(
                f"{where}: the row has a video, and video through a transformers model's processor is not supported "
                "yet (the tiny VLM takes video: --model vlm-nano)"
            )
        text = _placeholders(text, images, where)
        images = [check_image(img, f"{where} image {i}").convert("RGB") for i, img in enumerate(images)]
        out = self.processor(images=images, return_tensors="pt")
        parts = text.split(IMAGE_PLACEHOLDER)
        pieces = [parts[0]]
        for i, rest in enumerate(parts[1:]):
            if self.kind == "grid":
                n = int(out["image_grid_thw"][i].prod()) // self.processor.merge_size**2
                pieces.append("<|vision_start|>" + self.image_token * n + "<|vision_end|>")
            else:
                pieces.append(self.image_token * self._fixed_count(out["pixel_values"]))
            pieces.append(rest)
        ids = self.tokenizer.encode("".join(pieces), add_special_tokens=True)
        keys = ("pixel_values", "image_grid_thw") if self.kind == "grid" else ("pixel_values",)
        return ids, {k: out[k] for k in keys}

    def _fixed_count(self, pixel_values) -> int:
        vc = self.config.vision_config
        n = (pixel_values.shape[-1] // vc.patch_size) * (pixel_values.shape[-2] // vc.patch_size)
        return n + (1 if getattr(self.config, "vision_feature_select_strategy", "default") == "full" else 0)

    def tower(self, model):
        """The modules of the vision tower (for freezing)."""
        inner = getattr(model, "model", model)
        for name in ("visual", "vision_tower", "vision_model"):
            for owner in (inner, model):
                if hasattr(owner, name):
                    return [getattr(owner, name)]
        raise ValueError(f"cannot find the vision tower of {type(model).__name__}")


def cat_images(items: list[dict | None]) -> dict | None:
    """Concatenate per-row image inputs in row order; None when no row has images."""
    items = [x for x in items if x]
    if not items:
        return None
    return {k: torch.cat([x[k] for x in items]) for k in items[0]}


def select_images(per_row: list | None, rows) -> dict | None:
    """Batched image inputs of the given rows (a tensor or list of indices) of a per-row list."""
    if per_row is None:
        return None
    rows = rows.tolist() if torch.is_tensor(rows) else rows  # (one read of a device index tensor)
    return cat_images([per_row[i] for i in rows])


NOISE_KINDS = ("crop", "noise")


def perturb(img, strength: float, rng: random.Random, kinds: tuple[str, ...] = NOISE_KINDS):
    """NoisyRollout's distortion: a random crop keeping 1 - strength/4 of each side, resized back ("crop"),
    then Gaussian pixel noise of standard deviation strength * 64 on 0..255 ("noise"). strength 0 = the
    image itself. Tasks whose answer is a position (grounding) want "noise" alone: a crop moves the box.
    A Video: every frame gets the same crop and the same noise (one draw of rng), so motion is kept."""
    import numpy as np
    from PIL import Image

    if isinstance(img, Video):
        seed = rng.randrange(1 << 30)
        return Video(tuple(perturb(f, strength, random.Random(seed), kinds) for f in img.frames), img.times)

    bad = [k for k in kinds if k not in NOISE_KINDS]
    if bad:
        raise ValueError(f"unknown perturbation {bad[0]!r}; valid: {', '.join(NOISE_KINDS)}")
    if strength <= 0:
        return img
    w, h = img.size
    out = img
    if "crop" in kinds:
        keep = 1.0 - 0.25 * min(strength, 1.0)
        cw, ch = max(1, round(w * keep)), max(1, round(h * keep))
        x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
        out = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BILINEAR)
    a = np.asarray(out.convert("RGB") if out.mode not in ("L", "RGB") else out, dtype=np.float32)
    if "noise" not in kinds:
        return Image.fromarray(a.astype(np.uint8))
    noise = np.random.default_rng(rng.randrange(1 << 30)).normal(0.0, strength * 64.0, a.shape)
    return Image.fromarray(np.clip(a + noise, 0, 255).astype(np.uint8))
