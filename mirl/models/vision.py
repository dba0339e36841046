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
    Qwen2-VL     {'pixel_values_videos': (patches, D), 'video_grid_thw': (n, 3)}   frames padded to even, t = frames / 2
                 <video> -> <|vision_start|> <|video_pad|> x (t*h*w / merge^2) <|vision_end|>
    Qwen2.5-VL   the same and {'second_per_grid_ts': (n,)}: seconds per pair of frames (M-RoPE's time axis)
    LLaVA        takes no video (a DataError naming the row)

A row with images and a video has both sets of keys; a batch concatenates each key over the rows that have it.
"""

from __future__ import annotations

import io
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError
from .tokenizer import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER  # noqa: F401 (others import it from here)

READABLE_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")  # converted to the model's channels; others refused


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
    patches; images and videos) or LLaVA style (a fixed number of patch tokens; images only).

    Video (Qwen2-VL, Qwen2.5-VL): transformers' video processor for these models needs torchvision, which does not
    load beside every torch build, so mirl makes its outputs itself from the image processor, which already does
    the per-frame part: each frame is resized (smart_resize within the processor's min/max pixels), rescaled and
    normalised as an image, then consecutive frames are paired into temporal patches exactly as the video
    processor's patchify lays them out (the frames padded to a multiple of temporal_patch_size by repeating the
    last one). The only departure: the resize is PIL's bicubic, not torchvision's, and the size limits are the
    image processor's (Qwen2-VL's and Qwen2.5-VL's releases give the video processor the same ones through their
    one preprocessor_config.json); frames already a multiple of 28 pixels within the limits are not resized at all
    and give the video processor's tensors exactly (tests/test_video_hf.py). Qwen2.5-VL's frame timing,
    second_per_grid_ts = temporal_patch_size / (frames per second), comes from the Video's frame times (frames
    without times: 2 per second, Qwen's default rate)."""

    DEFAULT_FPS = 2.0  # frames per second of a clip given without frame times (qwen-vl-utils' default)

    def __init__(self, config, tokenizer, image_processor):
        self.config, self.tokenizer, self.processor = config, tokenizer, image_processor
        self.kind = "grid" if hasattr(image_processor, "merge_size") else "fixed"
        self.image_token_id = config.image_token_id if hasattr(config, "image_token_id") else config.image_token_index
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.video_token_id = getattr(config, "video_token_id", None) if self.kind == "grid" else None
        self.video_token = None if self.video_token_id is None else tokenizer.convert_ids_to_tokens(self.video_token_id)
        # Qwen2.5-VL spaces a clip's temporal positions by its frame timing; Qwen2-VL has no such setting
        self.timed = getattr(getattr(config, "vision_config", None), "tokens_per_second", None) is not None
        text_cfg = getattr(config, "text_config", config)
        self.context = getattr(text_cfg, "max_position_embeddings", None)

    def encode(self, text: str, images: list, where: str):
        """Prompt text and its images and videos -> (token ids, the model's image and video inputs); each '<image>'
        expands to the model's image tokens, each '<video>' to its video tokens."""
        text = _placeholders(text, images, where)
        items = in_prompt_order(text, images)
        stills = [x for x in items if not isinstance(x, Video)]
        videos = [x for x in items if isinstance(x, Video)]
        if videos and self.video_token is None:
            raise DataError(
                f"{where}: the row has a video, and this model ({getattr(self.config, 'model_type', '?')}) takes "
                "images only: video goes through Qwen2-VL and Qwen2.5-VL, or the tiny VLM (--model vlm-nano)"
            )
        inputs, counts = {}, []
        if stills:
            stills = [check_image(img, f"{where} image {i}").convert("RGB") for i, img in enumerate(stills)]
            out = self._process(stills, where)
            if self.kind == "grid":
                inputs = {k: out[k] for k in ("pixel_values", "image_grid_thw")}
                counts = [int(g.prod()) // self.processor.merge_size**2 for g in out["image_grid_thw"]]
            else:
                inputs = {"pixel_values": out["pixel_values"]}
                counts = [self._fixed_count(out["pixel_values"])] * len(stills)
        if videos:
            clips = [self._video(v, f"{where} video {i}") for i, v in enumerate(videos)]
            inputs["pixel_values_videos"] = torch.cat([c[0] for c in clips])
            inputs["video_grid_thw"] = torch.stack([c[1] for c in clips])
            if self.timed:
                inputs["second_per_grid_ts"] = torch.tensor([c[2] for c in clips], dtype=torch.float32)
        image_counts = iter(counts)
        video_counts = iter(int(g.prod()) // self.processor.merge_size**2 for g in inputs.get("video_grid_thw", []))
        pieces = re.split(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})", text)
        for i in range(1, len(pieces), 2):
            if pieces[i] == VIDEO_PLACEHOLDER:
                pieces[i] = "<|vision_start|>" + self.video_token * next(video_counts) + "<|vision_end|>"
            elif self.kind == "grid":
                pieces[i] = "<|vision_start|>" + self.image_token * next(image_counts) + "<|vision_end|>"
            else:
                pieces[i] = self.image_token * next(image_counts)
        ids = self.tokenizer.encode("".join(pieces), add_special_tokens=True)
        if videos and self.context is not None and len(ids) > self.context:
            sizes = ", ".join(f"{len(v)} frames at {v.frames[0].size[0]}x{v.frames[0].size[1]}" for v in videos)
            raise DataError(
                f"{where}: the prompt with its video tokens is {len(ids)} tokens ({sizes}) but the model's context is "
                f"{self.context}: lower --video-max-frames or --video-max-pixels"
            )
        return ids, inputs

    def _process(self, frames: list, where: str):
        """The image processor's outputs for PIL images; its refusals (an aspect ratio over 200) name `where`."""
        try:
            return self.processor(images=frames, return_tensors="pt")
        except ValueError as e:
            raise DataError(f"{where}: the image processor refuses it ({e})") from e

    def _video(self, video: Video, where: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """A clip -> (pixel_values_videos (T * h * w, C * tp * p * p), video_grid_thw (3,) = (T, h, w), seconds per
        temporal patch), as Qwen2-VL's video processor makes them (class docstring)."""
        if not len(video):
            raise DataError(f"{where}: the video has no frames")
        proc = self.processor
        tp, p = proc.temporal_patch_size, proc.patch_size
        frames = [check_image(f, f"{where} frame {t}").convert("RGB") for t, f in enumerate(video.frames)]
        if len({f.size for f in frames}) > 1:
            raise DataError(f"{where}: the frames differ in size")
        frames += frames[-1:] * (-len(frames) % tp)  # the video processor's padding to whole temporal patches
        out = self._process(frames, where)
        n, (_, gh, gw) = len(frames), out["image_grid_thw"][0].tolist()
        # the image processor repeats each frame tp times within a patch (C, tp, p, p): keep one copy per frame,
        # then put tp consecutive frames in those places, the video processor's (T, h*w, C, tp, p, p) order
        x = out["pixel_values"].view(n, gh * gw, 3, tp, p, p)[:, :, :, 0]
        x = x.view(n // tp, tp, gh * gw, 3, p, p).permute(0, 2, 3, 1, 4, 5)
        grid = torch.tensor([n // tp, gh, gw], dtype=out["image_grid_thw"].dtype)
        times = video.times
        span = times[-1] - times[0] if times and len(times) > 1 else 0.0
        fps = (len(times) - 1) / span if span > 0 else self.DEFAULT_FPS
        return x.reshape(n // tp * gh * gw, -1), grid, tp / fps

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
    """Concatenate per-row image inputs in row order, key by key; None when no row has images. A key some rows lack
    (a transformers VLM's video inputs in a batch whose other rows have images only) joins the rows that have it:
    the model fills its image and its video placeholders each in their own order."""
    items = [x for x in items if x]
    if not items:
        return None
    keys = list(dict.fromkeys(k for x in items for k in x))
    return {k: torch.cat([x[k] for x in items if k in x]) for k in keys}


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
