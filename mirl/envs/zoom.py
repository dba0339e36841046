"""The `zoom` environment: a visual question whose detail is too small at the model's resolution, and a tool that
returns the zoomed region as an image in its reply (images in tool results, for the tiny VLM and transformers
VLMs alike).

The scene is a 64x64 source image: a handwritten digit (scikit-learn's 8x8 scans drawn at 16x16, the held-out
split drawing only from every fifth scan as the `digits` task does) in one of the four 32x32 quadrants, at one of
the quadrant's four 16x16 corners, added to faint noise; every digit is drawn with the same total ink (its
mean intensity scaled to INK). The model sees the scene as a 32x32 image with the detail of 4x4 (each 16x16 block of
the source averaged, drawn as an 8x8 block): the digit is one block, as bright as any other digit's, which shows
where it is but nothing of which digit. `zoom(quadrant)` ("tl", "tr", "bl", "br") answers with that quadrant at
full resolution, 32x32, where the digit is 16x16 on 2x2 of the tiny VLM's 8x8 patches (as in the `digits` task).
The reward is 1 when the final answer's last number is the digit. (Measured, docs/agents.md: with more detail in
the scene, 2x2 blocks of the digit, a model taught to answer from the scene alone read 65% of the digits.)"""

from __future__ import annotations

import random

from ..data.tasks.split import sample_split
from .base import Step
from .builtin import last_number
from .tools import tool_from_function

QUADRANTS = {"tl": (0, 0), "tr": (0, 32), "bl": (32, 0), "br": (32, 32)}
INK = 40.0  # every digit's mean intensity over its 16x16 square, added to the noise (0-255; the faintest scan
# then peaks at 221, so nothing is clipped)


def zoom_problem(rng: random.Random, split: str = "train") -> dict:
    """One scene: the digit scan, its quadrant and its place in it, and the noise seed."""
    from ..data.tasks.visual import _digit_pool, _digits

    pool = _digit_pool(split)
    scan = pool[rng.randrange(len(pool))]
    quadrant = rng.choice(sorted(QUADRANTS))
    y, x = 16 * rng.randrange(2), 16 * rng.randrange(2)
    label = int(_digits()[1][scan])
    key = f"{scan}/{quadrant}/{y}/{x}"  # (split.py hashes it: train and test scenes are disjoint)
    return {"prompt": "<image>digit?", "answer": str(label), "scan": scan, "quadrant": quadrant, "at": [y, x],
            "noise": rng.randrange(2**31), "split_key": key}  # fmt: skip


def source_image(example: dict):
    """The 64x64 grey source image of a scene (numpy uint8)."""
    import numpy as np

    from ..data.tasks.visual import _digits

    rng = np.random.default_rng(example["noise"])
    canvas = rng.integers(0, 13, size=(64, 64)).astype(np.float32)  # faint noise, 0-12
    digit = np.kron(_digits()[0][example["scan"]], np.ones((2, 2)))  # 16x16
    digit = digit * (INK / digit.mean())  # the same total ink for every digit
    oy, ox = QUADRANTS[example["quadrant"]]
    y, x = example["at"]
    where = (slice(oy + y, oy + y + 16), slice(ox + x, ox + x + 16))
    canvas[where] += digit  # added: the digit's block has the same mean whichever digit it is
    return canvas.clip(0, 255).astype(np.uint8)


def _rgb(array):
    from PIL import Image

    return Image.fromarray(array).convert("RGB")


def scene_image(example: dict):
    """What the model sees: 32x32 pixels with the detail of 4x4 (each 16x16 block of the source averaged, each
    average drawn as an 8x8 block): the digit is one block of the same brightness whichever digit it is."""
    a = source_image(example).astype("float32")
    small = a.reshape(4, 16, 4, 16).mean((1, 3)).round()
    return _rgb(small.repeat(8, 0).repeat(8, 1).astype("uint8"))


class ZoomEnv:
    """Read the small digit: zoom into the quadrant that holds it, then answer."""

    def __init__(self):
        self.example = None
        self.tools = [tool_from_function(self.zoom)]

    @staticmethod
    def examples(split: str, n: int, seed: int) -> list[dict]:
        """n scenes of the split (train and test disjoint: distinct scans), each with its image."""
        rows = sample_split(lambda rng: zoom_problem(rng, split), "zoom", split, n, seed)
        return [{**r, "images": [scene_image(r)]} for r in rows]

    def demonstrations(self, n: int, seed: int = 0) -> list[dict]:
        """SFT records of n training scenes solved with the tool, in the plain protocol (the text an episode's
        tokens decode to, each '<image>' where the episode has that image's tokens): two per scene, so that the
        model learns to zoom into the digit's quadrant and to read the crop, never to write a result itself.

            {"prompt": "<image>digit?\\n", "images": [scene], "completion": "<zoom>tr</zoom>"}
            {"prompt": "<image>digit?\\n<zoom>tr</zoom><result><image></result>", "images": [scene, crop],
             "completion": "7"}

        SFT appends EOS to each completion: the answer's EOS ends the episode as in a rollout; the EOS after a
        call is never reached in an episode, whose turn stops at `</zoom>`."""
        from ..rollout.episodes import with_placeholders
        from .protocol import Renderer  # the plain protocol's text needs no tokenizer

        renderer, out = Renderer(None, self.tools, chat=False), []
        for i, e in enumerate(self.examples("train", n, seed)):
            opening = renderer.opening_text([with_placeholders(m) for m in self.reset(e)])
            call = renderer.call_text("zoom", {"quadrant": e["quadrant"]})
            crop = self.zoom(e["quadrant"])
            reply = with_placeholders({"role": "tool", "name": "zoom", **crop})
            result = renderer.reply_text([reply], False)
            where, scene = f"zoom demonstration #{i}", e["images"][0]
            out.append({"prompt": opening, "images": [scene], "completion": call, "where": where + " (call)"})
            out.append({"prompt": opening + call + result, "images": [scene, *crop["images"]],
                        "completion": e["answer"], "where": where + " (answer)"})  # fmt: skip
        return out

    def zoom(self, quadrant: str) -> dict:
        """Zoom into a quarter of the image: it comes back at full resolution.

        Args:
            quadrant: which quarter: tl, tr, bl or br (top/bottom, left/right)
        """
        q = quadrant.strip().lower()
        if q not in QUADRANTS:
            return {"content": f"no quadrant {quadrant!r}: use tl, tr, bl or br"}
        oy, ox = QUADRANTS[q]
        return {"content": "", "images": [_rgb(source_image(self.example)[oy : oy + 32, ox : ox + 32])]}

    def reset(self, example: dict) -> list[dict]:
        """The scene and the question."""
        self.example = example
        return [{"role": "user", "content": example["prompt"], "images": list(example["images"])}]

    def step(self, message: str) -> Step:
        """The answer: reward 1 when its last number is the digit."""
        return Step(reward=float(last_number(message) == int(self.example["answer"])), done=True)

    def finish(self) -> float:
        """No answer within the limits: 0."""
        return 0.0
