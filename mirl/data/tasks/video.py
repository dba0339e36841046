"""A procedural video task with a verifier, deterministic by seed: which way does the square move?

    motion[:level]   4 frames of 32x32 RGB: a coloured square moves a fixed step per frame, left, right, up or down
                     prompt "<video>which way:"   solution "right"   score 1 when the first direction word is right
        level 1      a step of 4 px per frame (12 px over the clip), nothing else in the picture
        level 2      a step of 2 px, and a still square of another colour (the model must find the one that moves)
        level 3      a step of 1 px, the still square, and Gaussian pixel noise (standard deviation 24 of 255)

Every frame alone is a square somewhere: only the order of the frames tells the direction (the frames reversed are
the opposite answer), so a model that ignores frame order is at chance (1/4). The held-out split hashes the scene
(split.py: direction, colours, start, distractor), so train and test scenes are disjoint. The chat form asks in
words ("Which way does the red square move: left, right, up or down?") and reads the last direction word.
"""

from __future__ import annotations

import random
import re

from ...models.vision import Video
from .split import sample_split
from .visual import COLOURS, SIZE

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
LEVELS = {1: (4, False, 0.0), 2: (2, True, 0.0), 3: (1, True, 24.0)}  # level -> (step px, distractor, noise std)
N_FRAMES = 4
SQUARE = 6  # side of the squares in pixels
DIRECTION_RE = re.compile("|".join(DIRECTIONS))


def square_path(direction: str, start: tuple[int, int], step: int, n_frames: int = N_FRAMES) -> list[tuple[int, int]]:
    """The top-left corner of the square in each frame.

    >>> square_path("up", (5, 20), 4, 3)
    [(5, 20), (5, 16), (5, 12)]
    """
    dx, dy = DIRECTIONS[direction]
    return [(start[0] + dx * step * t, start[1] + dy * step * t) for t in range(n_frames)]


def render_frames(path, colour: str, distractor: dict | None, noise: float, rng: random.Random) -> list:
    """The clip's frames: black, the still distractor (if any), the moving square at each corner of `path`, noise."""
    import numpy as np
    from PIL import Image

    noise_rng = np.random.default_rng(rng.randrange(1 << 30))
    frames = []
    for x, y in path:
        a = np.zeros((SIZE, SIZE, 3), dtype=np.float32)
        if distractor is not None:
            dx, dy = distractor["at"]
            a[dy : dy + SQUARE, dx : dx + SQUARE] = COLOURS[distractor["colour"]]
        a[y : y + SQUARE, x : x + SQUARE] = COLOURS[colour]
        if noise:
            a = a + noise_rng.normal(0.0, noise, a.shape)
        frames.append(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB"))
    return frames


class MotionTask:
    """A clip of a moving square; the answer is the direction it moves (a video + text task)."""

    score_columns = ("answer",)  # the fields of an example that score() reads
    success_threshold = 1.0

    def __init__(self, level: int = 1):
        if level not in LEVELS:
            raise ValueError(f"motion level must be one of {', '.join(map(str, LEVELS))}, got {level!r}")
        self.level = level
        self.name = "motion" if level == 1 else f"motion:{level}"

    def _problem(self, rng: random.Random) -> dict:
        step, with_distractor, noise = LEVELS[self.level]
        direction = rng.choice(list(DIRECTIONS))
        colour = rng.choice(list(COLOURS))
        travel = step * (N_FRAMES - 1)
        dx, dy = DIRECTIONS[direction]
        # the start leaves room for the whole path inside the picture
        x0 = rng.randint(travel if dx < 0 else 0, SIZE - SQUARE - (travel if dx > 0 else 0))
        y0 = rng.randint(travel if dy < 0 else 0, SIZE - SQUARE - (travel if dy > 0 else 0))
        path = square_path(direction, (x0, y0), step)
        distractor = None
        if with_distractor:
            other = rng.choice([c for c in COLOURS if c != colour])
            distractor = {"colour": other, "at": (rng.randint(0, SIZE - SQUARE), rng.randint(0, SIZE - SQUARE))}
        frames = render_frames(path, colour, distractor, noise, rng)
        return {
            "prompt": "<video>which way:",
            "images": [Video(tuple(frames), tuple(t / 2.0 for t in range(N_FRAMES)))],  # as if sampled at 2 fps
            "answer": direction,
            "solution": direction,
            "colour": colour,
            "difficulty": float(self.level),
            "split_key": f"motion {direction} {colour} {path[0]} {step} {distractor}",
        }

    def examples(self, split: str, n: int, seed: int = 0) -> list[dict]:
        """n examples of the split ('train' or 'test'), deterministic in seed; the levels share one split."""
        return sample_split(self._problem, "motion", split, n, seed)

    @staticmethod
    def extract(completion: str) -> str | None:
        """The first direction word (left, right, up, down) in the completion, lower-cased, or None."""
        m = DIRECTION_RE.search(completion.lower())
        return m.group(0) if m else None

    def score(self, completion: str, example: dict) -> float:
        """1.0 when the first direction word is the answer."""
        return float(self.extract(completion) == example["answer"])

    @staticmethod
    def wrong_solution(example: dict, rng: random.Random) -> str:
        """Another direction (for synthetic preference pairs)."""
        return rng.choice([d for d in DIRECTIONS if d != example["answer"]])

    # ---- the chat form (chat.py) ----
    @staticmethod
    def chat_question(example: dict) -> str:
        """The question in words, the video first."""
        return f"<video>Which way does the {example['colour']} square move: left, right, up or down?"

    @staticmethod
    def chat_answer(example: dict, solution: str) -> str:
        """The answer in prose."""
        return f"The {example['colour']} square moves {solution}."

    @staticmethod
    def chat_extract(completion: str) -> str | None:
        """The last direction word of the prose, lower-cased, or None."""
        found = DIRECTION_RE.findall(completion.lower())
        return found[-1] if found else None

    def chat_score(self, completion: str, example: dict) -> float:
        """1.0 when the last direction word of the prose is the answer."""
        return float(self.chat_extract(completion) == example["answer"])
