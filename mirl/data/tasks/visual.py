"""Procedural image + text tasks with verifiers, deterministic by seed; 32x32 RGB images.

    digits      two handwritten digits (scikit-learn's 8x8 digits, upscaled 2x) side by side:
                prompt "<image>add:"   solution "3+8=11|11"   (read the digits, then add)
                held out: the test split draws only from every fifth scan of the dataset, so test
                handwriting is never seen in training
    shapes      1-4 shapes (circle, square, triangle) in colours on a 3x3 grid:
                prompt "<image>count square:"   solution "2"
    grounding   2-3 shapes of distinct colours: the box of the asked one, in pixels
                prompt "<image>box red circle:"   solution "[4,10,12,18]"   score = IoU (success >= 0.5)
                grounding:pair: only (colour, kind) pairs are distinct (the words must be bound together)

The split of shapes and grounding hashes the scene (split.py), so train and test scenes are disjoint.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

from .arith import ArithTask
from .split import sample_split

SIZE = 32
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (60, 90, 240),
    "yellow": (230, 220, 40),
    "white": (240, 240, 240),
}
KINDS = ("circle", "square", "triangle")
INT_RE = re.compile(r"-?\d+")
BOX_RE = re.compile(
    r"[\[(]\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,"
    r"\s*(-?\d+(?:\.\d+)?)\s*[\])]"
)


@lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits  # bundled with scikit-learn: nothing is downloaded

    d = load_digits()
    return d.images, d.target


def _digit_pool(split: str) -> list[int]:
    images, _ = _digits()
    return [i for i in range(len(images)) if (i % 5 == 0) == (split == "test")]


def digit_image(i: int, j: int):
    """Scans i and j of the digits dataset side by side on a 32x32 black RGB image."""
    import numpy as np
    from PIL import Image

    images, _ = _digits()
    canvas = np.zeros((SIZE, SIZE), dtype=np.uint8)
    for k, idx in enumerate((i, j)):
        big = np.kron(images[idx] * (255.0 / 16.0), np.ones((2, 2))).astype(np.uint8)  # 16x16
        canvas[8:24, 16 * k : 16 * k + 16] = big
    return Image.fromarray(canvas, mode="L").convert("RGB")


class DigitArithTask:
    """An image of two digits; the answer is their sum (an image+text task)."""

    score_columns = ("answer",)  # the fields of an example that score() reads
    name = "digits"
    success_threshold = 1.0

    def examples(self, split: str, n: int, seed: int = 0) -> list[dict]:
        """n examples of the split ('train' or 'test'), deterministic in seed."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        _, labels = _digits()
        pool = _digit_pool(split)
        rng = random.Random(f"digits-{split}-{seed}")
        out = []
        for _ in range(n):
            i, j = rng.choice(pool), rng.choice(pool)
            a, b = int(labels[i]), int(labels[j])
            out.append(
                {
                    "prompt": "<image>add:",
                    "images": [digit_image(i, j)],
                    "answer": str(a + b),
                    "solution": f"{a}+{b}={a + b}|{a + b}",
                    "digits": [a, b],
                    "scans": [i, j],
                }
            )
        return out

    # the answer after '|', as in the text arithmetic task
    extract = staticmethod(ArithTask.extract)
    score = ArithTask.score


def _scene(rng: random.Random, n: int, distinct: str = "") -> list[dict]:
    """n shapes in distinct cells of a 3x3 grid (cells of ~10 px), sizes 6-8 px, jittered.
    distinct: "" (repeats allowed), "pair" (no two shapes of the same colour and kind) or "colour"."""
    cells = rng.sample(range(9), n)
    used, shapes = set(), []
    for c in cells:
        while True:
            kind, colour = rng.choice(KINDS), rng.choice(list(COLOURS))
            key = colour if distinct == "colour" else (kind, colour)
            if not distinct or key not in used:
                break
        used.add(key)
        s = rng.randint(6, 8)
        x0 = (c % 3) * 10 + 1 + rng.randint(0, 9 - s)
        y0 = (c // 3) * 10 + 1 + rng.randint(0, 9 - s)
        shapes.append({"kind": kind, "colour": colour, "box": [x0, y0, x0 + s, y0 + s]})
    return shapes


def draw_scene(shapes: list[dict]):
    """A small RGB image of coloured shapes at the given boxes."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
    d = ImageDraw.Draw(img)
    for sh in shapes:
        x0, y0, x1, y1 = sh["box"]
        fill = COLOURS[sh["colour"]]
        if sh["kind"] == "circle":
            d.ellipse((x0, y0, x1, y1), fill=fill)
        elif sh["kind"] == "square":
            d.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            d.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return img


class ShapeCountTask:
    """Images of 1-4 shapes; the question asks how many of one kind there are."""

    score_columns = ("answer",)  # the fields of an example that score() reads
    name = "shapes"
    success_threshold = 1.0

    def _problem(self, rng: random.Random) -> dict:
        shapes = _scene(rng, rng.randint(1, 4))
        kind = rng.choice(KINDS)
        count = sum(s["kind"] == kind for s in shapes)
        key = f"count {kind} {shapes}"
        return {
            "prompt": f"<image>count {kind}:",
            "images": [draw_scene(shapes)],
            "answer": str(count),
            "solution": str(count),
            "split_key": key,
        }

    def examples(self, split: str, n: int, seed: int = 0) -> list[dict]:
        """n examples of the split ('train' or 'test'), deterministic in seed."""
        return sample_split(self._problem, self.name, split, n, seed)

    @staticmethod
    def extract(completion: str) -> str | None:
        """The first integer in the completion, or None."""
        m = INT_RE.search(completion)
        return m.group(0) if m else None

    def score(self, completion: str, example: dict) -> float:
        """1.0 when the extracted count equals the answer."""
        got = self.extract(completion)
        return float(got is not None and int(got) == int(example["answer"]))


def parse_box(text: str) -> list[float] | None:
    """The first '[x1,y1,x2,y2]' (or parentheses) in the text, corners put in order; None if absent."""
    m = BOX_RE.search(text)
    if not m:
        return None
    x1, y1, x2, y2 = (float(v) for v in m.groups())
    return [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]


def box_iou(a, b) -> float:
    """Intersection over union of boxes [x1, y1, x2, y2] (continuous coordinates)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class GroundingTask:
    """distinct="colour" (default, `grounding`): the shapes of a scene have distinct colours, so the colour
    word alone names the target; distinct="pair" (`grounding:pair`): only the (colour, kind) pairs are
    distinct, so a scene can hold a red square next to a red circle and a blue circle and the model must
    bind both words to one shape."""

    score_columns = ("box",)  # the fields of an example that score() reads

    success_threshold = 0.5  # accuracy = IoU >= 0.5; the mean score is the mean IoU

    def __init__(self, distinct: str = "colour"):
        if distinct not in ("colour", "pair"):
            raise ValueError(f"grounding variant must be 'colour' or 'pair', got {distinct!r}")
        self.distinct = distinct
        self.name = "grounding" if distinct == "colour" else "grounding:pair"

    def _problem(self, rng: random.Random) -> dict:
        shapes = _scene(rng, rng.randint(2, 3), distinct=self.distinct)
        target = rng.choice(shapes)
        box = target["box"]
        answer = "[" + ",".join(str(v) for v in box) + "]"
        return {
            "prompt": f"<image>box {target['colour']} {target['kind']}:",
            "images": [draw_scene(shapes)],
            "answer": answer,
            "solution": answer,
            "box": box,
            "shapes": shapes,
            "split_key": f"box {target} {shapes}",
        }

    def examples(self, split: str, n: int, seed: int = 0) -> list[dict]:
        # one split name for both variants: `grounding:pair` draws the very scenes the task drew before it
        # had variants, so earlier runs and checkpoints keep their held-out set
        """n scenes of the split with the asked shape's box, deterministic in seed."""
        return sample_split(self._problem, "grounding", split, n, seed)

    def score(self, completion: str, example: dict) -> float:
        """The IoU of the first box in the completion with the asked shape's box (0 when there is none)."""
        pred = parse_box(completion)
        return 0.0 if pred is None else box_iou(pred, example["box"])

    @staticmethod
    def breakdown(completions: list[str], examples: list[dict]) -> dict:
        """Where the boxes land: on the asked shape (the shape it overlaps most), on another shape, on no
        shape, or no box at all (fractions), and the mean IoU of the boxes on the asked shape. {} when the
        examples do not carry their scene ('shapes')."""
        if not all("shapes" in e for e in examples):
            return {}
        counts = {"on_target": 0, "on_other": 0, "off_shapes": 0, "no_box": 0}
        target_ious = []
        for c, e in zip(completions, examples):
            pred = parse_box(c)
            if pred is None:
                counts["no_box"] += 1
                continue
            ious = [box_iou(pred, s["box"]) for s in e["shapes"]]
            best = max(range(len(ious)), key=ious.__getitem__)
            if ious[best] == 0.0:
                counts["off_shapes"] += 1
            elif e["shapes"][best]["box"] == e["box"]:
                counts["on_target"] += 1
                target_ious.append(ious[best])
            else:
                counts["on_other"] += 1
        n = max(1, len(examples))
        out = {f"boxes/{k}": v / n for k, v in counts.items()}
        out["boxes/iou_on_target"] = sum(target_ious) / max(1, len(target_ious))
        return out
