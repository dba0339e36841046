"""Procedural video tasks with a verifier, deterministic by seed: which way does the square move, and in how many
frames does it show?

    motion[:level]   4 frames of 32x32 RGB: a coloured square moves a fixed step per frame along one axis, which the
                     prompt names; the answer is the way along it
                     prompt "<video>left or right:"   solution "right"   score 1 when the first direction word is right
        level 1      a step of 4 px per frame (12 px over the clip), nothing else in the picture
        level 2      a step of 2 px, and a still square of another colour (the model must find the one that moves)
        level 3      a step of 1 px, the still square, and Gaussian pixel noise (standard deviation 24 of 255)

Only the order of the frames tells the answer. The picture is a torus (a square leaving one edge comes back at the
other, drawn in two parts) and the start is uniform on it, so every frame alone is uniform whatever the direction,
and the frames without their order are the same set for a square moving one way from a start as for one moving the
other way from the path's other end: a model that ignores the order scores 0.5 in expectation. Shuffled
(`mirl eval --frame-order shuffled`: any order but the true one, the reversal included, which is a clip of the
other way) a model right on every ordered clip scores about 11/23 = 0.48. The held-out split hashes the scene
(split.py: direction, colours, start, distractor), so train and test scenes are disjoint. The chat form asks in
words ("Does the red square move left or right?") and reads the last direction word.

    count[:level]    8 frames of 32x32 RGB: a coloured square shows in 1 to 4 of them (any frames), the rest lack it
                     prompt "<video>count red:"   solution "3"   score 1 when the first integer is the count
        level 1      the square at one place whenever it shows, nothing else in the picture
        level 2      a square of another colour shows in its own 1 to 4 frames, at its own place (not to count)
        level 3      both squares at a new place in every frame they show, and Gaussian pixel noise (std 24 of 255)

A single frame holds the square or not: the same frame is in clips of every count, so only the whole clip tells the
answer (8 frames take 64 tokens of gpt-nano's 256). The split hashes the scene (colours, the frames that hold each
square, their places). The chat form asks "In how many frames of the video does the red square appear?" and reads
the last number of the prose (digits or a word, one to eight).
"""

from __future__ import annotations

import random
import re

from ...models.vision import Video
from .split import sample_split
from .visual import COLOURS, SIZE

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
AXES = {"left": ("left", "right"), "right": ("left", "right"), "up": ("up", "down"), "down": ("up", "down")}
LEVELS = {1: (4, False, 0.0), 2: (2, True, 0.0), 3: (1, True, 24.0)}  # level -> (step px, distractor, noise std)
N_FRAMES = 4
SQUARE = 6  # side of the squares in pixels
DIRECTION_RE = re.compile("|".join(DIRECTIONS))


def square_path(direction: str, start: tuple[int, int], step: int, n_frames: int = N_FRAMES) -> list[tuple[int, int]]:
    """The top-left corner of the square in each frame, on the torus of the picture (coordinates modulo SIZE).

    >>> square_path("up", (5, 20), 4, 3)
    [(5, 20), (5, 16), (5, 12)]
    >>> square_path("left", (2, 7), 4, 3)
    [(2, 7), (30, 7), (26, 7)]
    """
    dx, dy = DIRECTIONS[direction]
    return [((start[0] + dx * step * t) % SIZE, (start[1] + dy * step * t) % SIZE) for t in range(n_frames)]


def render_frames(path, colour: str, distractor: dict | None, noise: float, rng: random.Random) -> list:
    """The clip's frames: black, the still distractor (if any), the moving square at each corner of `path` (wrapping
    round the edges), noise."""
    import numpy as np
    from PIL import Image

    noise_rng = np.random.default_rng(rng.randrange(1 << 30))
    frames = []
    for x, y in path:
        a = np.zeros((SIZE, SIZE, 3), dtype=np.float32)
        if distractor is not None:
            dx, dy = distractor["at"]
            a[dy : dy + SQUARE, dx : dx + SQUARE] = COLOURS[distractor["colour"]]
        a[np.ix_((y + np.arange(SQUARE)) % SIZE, (x + np.arange(SQUARE)) % SIZE)] = COLOURS[colour]
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
        x0, y0 = rng.randrange(SIZE), rng.randrange(SIZE)  # uniform on the torus: no frame alone tells the way
        path = square_path(direction, (x0, y0), step)
        distractor = None
        if with_distractor:
            other = rng.choice([c for c in COLOURS if c != colour])
            distractor = {"colour": other, "at": (rng.randint(0, SIZE - SQUARE), rng.randint(0, SIZE - SQUARE))}
        frames = render_frames(path, colour, distractor, noise, rng)
        return {
            "prompt": f"<video>{' or '.join(AXES[direction])}:",
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
        """The other way along the clip's axis (for synthetic preference pairs)."""
        return next(d for d in AXES[example["answer"]] if d != example["answer"])

    # ---- the chat form (chat.py) ----
    @staticmethod
    def chat_question(example: dict) -> str:
        """The question in words, the video first."""
        return f"<video>Does the {example['colour']} square move {' or '.join(AXES[example['answer']])}?"

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


# ---- count: in how many frames does the square show? -----------------------------------------------------------
COUNT_LEVELS = {1: (False, False, 0.0), 2: (True, False, 0.0), 3: (True, True, 24.0)}  # (distractor, moving, noise)
COUNT_FRAMES = 8
MAX_COUNT = 4
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
INT_RE = re.compile(r"-?\d+")
NUMBER_RE = re.compile(r"\d+|\b(?:" + "|".join(NUMBER_WORDS) + r")\b")


def render_count_frames(squares: list[dict], noise: float, rng: random.Random, n_frames: int = COUNT_FRAMES) -> list:
    """The clip's frames: black, each square {'colour', 'at': {frame: (x, y)}} drawn in the frames it names, noise.

    >>> frames = render_count_frames([{"colour": "red", "at": {0: (2, 3), 2: (2, 3)}}], 0.0, random.Random(0), 3)
    >>> [f.getpixel((4, 5)) for f in frames]
    [(230, 40, 40), (0, 0, 0), (230, 40, 40)]
    """
    import numpy as np
    from PIL import Image

    noise_rng = np.random.default_rng(rng.randrange(1 << 30))
    frames = []
    for t in range(n_frames):
        a = np.zeros((SIZE, SIZE, 3), dtype=np.float32)
        for sq in squares:
            if t in sq["at"]:
                x, y = sq["at"][t]
                a[y : y + SQUARE, x : x + SQUARE] = COLOURS[sq["colour"]]
        if noise:
            a = a + noise_rng.normal(0.0, noise, a.shape)
        frames.append(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB"))
    return frames


def _place(rng: random.Random, avoid: tuple[int, int] | None) -> tuple[int, int]:
    """A top-left corner for a square, not overlapping the square at `avoid` (if any)."""
    while True:
        x, y = rng.randint(0, SIZE - SQUARE), rng.randint(0, SIZE - SQUARE)
        if avoid is None or abs(x - avoid[0]) >= SQUARE or abs(y - avoid[1]) >= SQUARE:
            return x, y


class CountTask:
    """A clip in which a coloured square shows in some frames and not others; the answer is in how many."""

    score_columns = ("answer",)  # the fields of an example that score() reads
    success_threshold = 1.0

    def __init__(self, level: int = 1):
        if level not in COUNT_LEVELS:
            raise ValueError(f"count level must be one of {', '.join(map(str, COUNT_LEVELS))}, got {level!r}")
        self.level = level
        self.name = "count" if level == 1 else f"count:{level}"

    def _problem(self, rng: random.Random) -> dict:
        with_distractor, moving, noise = COUNT_LEVELS[self.level]
        colour = rng.choice(list(COLOURS))
        count = rng.randint(1, MAX_COUNT)
        shown = sorted(rng.sample(range(COUNT_FRAMES), count))
        still = _place(rng, None)
        target = {"colour": colour, "at": {t: _place(rng, None) if moving else still for t in shown}}
        squares = [target]
        if with_distractor:
            other = rng.choice([c for c in COLOURS if c != colour])
            d_still = _place(rng, still)
            d_shown = sorted(rng.sample(range(COUNT_FRAMES), rng.randint(1, MAX_COUNT)))
            at = {t: _place(rng, target["at"].get(t)) if moving else d_still for t in d_shown}
            squares.append({"colour": other, "at": at})
        frames = render_count_frames(squares, noise, rng)
        return {
            "prompt": f"<video>count {colour}:",
            "images": [Video(tuple(frames), tuple(t / 2.0 for t in range(COUNT_FRAMES)))],  # as if sampled at 2 fps
            "answer": str(count),
            "solution": str(count),
            "colour": colour,
            "difficulty": float(self.level),
            "split_key": "count " + " ".join(f"{sq['colour']} {sorted(sq['at'].items())}" for sq in squares),
        }

    def examples(self, split: str, n: int, seed: int = 0) -> list[dict]:
        """n examples of the split ('train' or 'test'), deterministic in seed; the levels share one split."""
        return sample_split(self._problem, "count", split, n, seed)

    @staticmethod
    def extract(completion: str) -> str | None:
        """The first integer in the completion, or None."""
        m = INT_RE.search(completion)
        return m.group(0) if m else None

    def score(self, completion: str, example: dict) -> float:
        """1.0 when the first integer is the count."""
        got = self.extract(completion)
        return float(got is not None and int(got) == int(example["answer"]))

    @staticmethod
    def wrong_solution(example: dict, rng: random.Random) -> str:
        """Another count from 1 to 4 (for synthetic preference pairs)."""
        return str(rng.choice([k for k in range(1, MAX_COUNT + 1) if k != int(example["answer"])]))

    # ---- the chat form (chat.py) ----
    @staticmethod
    def chat_question(example: dict) -> str:
        """The question in words, the video first."""
        return f"<video>In how many frames of the video does the {example['colour']} square appear?"

    @staticmethod
    def chat_answer(example: dict, solution: str) -> str:
        """The answer in prose."""
        frames = "frame" if solution == "1" else "frames"
        return f"The {example['colour']} square appears in {solution} {frames}."

    @staticmethod
    def chat_extract(completion: str) -> str | None:
        """The last number of the prose (digits, or a word from zero to eight) as digits, or None."""
        found = NUMBER_RE.findall(completion.lower())
        if not found:
            return None
        last = found[-1]
        return str(NUMBER_WORDS.index(last)) if last in NUMBER_WORDS else str(int(last))

    def chat_score(self, completion: str, example: dict) -> float:
        """1.0 when the last number of the prose is the count."""
        return float(self.chat_extract(completion) == example["answer"])
