"""Temporal contrast (T-GRPO, Video-R1: Feng et al. 2025, arXiv 2503.21776), GRPO's `--temporal-contrast`: reward a
correct answer more when the model answers better with the frames in order than shuffled.

For each prompt with a video, besides its G responses on the ordered frames, K more are sampled on the same prompt
with the frames of each clip shuffled (one permutation per clip and step, never the identity; the frame times stay
where they were, so only the pictures move). With p and p~ the fractions of correct answers among the G ordered and
the K shuffled responses (a response is correct when the first reward function of --reward scores above 0.1):

    r_i <- r_i + alpha    for each correct ordered response i, when p > ratio x p~        (else r_i unchanged)

The paper's eq. (1) gives the bonus r_t = alpha when p > p~, alpha = 0.3, to the correct responses; its code
(tulerfeng/Video-R1, open_r1/trainer/grpo_trainer.py) samples K = G // 2 shuffled responses per prompt from one
torch.randperm of the frames, counts accuracy as the first (accuracy) reward > 0.1, tests p >= 0.8 p~ and adds
0.3 to the accuracy reward of the correct ones before the group statistics. The shuffled responses are scored,
never trained on (nor are they here). Departures: the test is p > ratio x p~ with ratio = 1 by default (the
paper's); --temporal-contrast-ratio 0.8 is the code's test except at exact equality p = 0.8 p~ > 0. The
permutation is never the identity (torch.randperm may draw it: with 4 frames 1 prompt in 24 would contrast the
video with itself). The bonus is added to the total reward (what group, rloo and REINFORCE++ read) and to the
first function's column (what GDPO reads, normalising each function in its group), after any NoisyRollout: every
one of the G responses counts in p, perturbed or not. A prompt without a video of at least 2 frames (an image or
text row in a mixed data set, as Video-R1's image rows) gets no shuffled samples and no bonus, and is counted
(temporal/skipped); a run where no prompt has one is an error (check_videos).

    mirl grpo --model runs/motion-sft/final --task motion --temporal-contrast --temporal-contrast-alpha 0.3

Logged per step: temporal/ordered_acc and temporal/shuffled_acc (mean p and p~ over the contrasted prompts; NaN
when a step has none), temporal/bonus_share (the fraction of them whose correct answers got the bonus),
temporal/skipped (prompts without a video).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace

import torch

from ..models.vision import Video
from .sample import row_seeds
from .score import ScoredBatch, rollout_and_score

ALPHA = 0.3  # the paper's temporal reward
RATIO = 1.0  # the paper's test p > p~ (Video-R1's code: p >= 0.8 p~)
CORRECT_ABOVE = 0.1  # Video-R1's code: a response is correct when its accuracy reward is above 0.1
MIN_FRAMES = 2  # a clip of one frame has no order to shuffle


@dataclass
class TemporalBonus:
    """The rule's result for one generation round of N prompts, M of them contrasted (shapes below)."""

    bonus: torch.Tensor  # (N * G,) added to each ordered response's reward
    ordered_acc: torch.Tensor  # (M,) p of each contrasted prompt
    shuffled_acc: torch.Tensor  # (M,) p~ of each contrasted prompt
    on: torch.Tensor  # (M,) bool: p > ratio x p~ (its correct answers got the bonus)


def temporal_bonus(
    correct: torch.Tensor,
    shuffled_correct: torch.Tensor,
    contrasted: torch.Tensor,
    group_size: int,
    shuffled_size: int,
    *,
    alpha: float = ALPHA,
    ratio: float = RATIO,
) -> TemporalBonus:
    """T-GRPO's temporal reward. correct (N * G,) bool: the ordered responses, a prompt's G adjacent; contrasted
    (N,) bool: the prompts that had shuffled samples; shuffled_correct (M * K,) bool: their K shuffled responses
    each, in the order of the contrasted prompts (M = contrasted.sum()). A contrasted prompt's correct responses get
    alpha when p > ratio x p~; every other response gets 0.

    >>> r = temporal_bonus(torch.tensor([1, 1, 0, 0], dtype=torch.bool), torch.tensor([1, 0], dtype=torch.bool),
    ...                    torch.tensor([True]), 4, 2, alpha=0.3)        # p = 1/2 = p~: no bonus
    >>> r.bonus.tolist()
    [0.0, 0.0, 0.0, 0.0]
    """
    n = contrasted.numel()
    if correct.numel() != n * group_size:
        raise ValueError(f"{correct.numel()} ordered responses are not {n} groups of {group_size}")
    m = int(contrasted.sum())
    if shuffled_correct.numel() != m * shuffled_size:
        raise ValueError(f"{shuffled_correct.numel()} shuffled responses are not {m} groups of {shuffled_size}")
    ordered = correct.view(n, group_size).to(torch.float64)  # (N, G)
    p = ordered.mean(1)[contrasted]  # (M,)
    p_shuffled = shuffled_correct.view(m, shuffled_size).to(torch.float64).mean(1)  # (M,)
    on = p > ratio * p_shuffled  # (M,)
    gets = torch.zeros(n, dtype=torch.bool, device=correct.device)
    gets[contrasted] = on
    bonus = alpha * (ordered * gets.unsqueeze(1)).reshape(-1)  # (N * G,)
    return TemporalBonus(bonus, p, p_shuffled, on)


def frame_permutation(n: int, seed: int) -> list[int]:
    """A permutation of range(n) drawn uniformly among those that are not the identity (n >= 2; n < 2: the
    identity, the only one), deterministic in seed: frame i of the shuffled clip is frame perm[i] of the clip.

    >>> frame_permutation(2, 0)
    [1, 0]
    """
    import random

    rng = random.Random(seed)
    order = list(range(n))
    if n < MIN_FRAMES:
        return order
    while True:  # rejection: at most 2 draws expected (n = 2), about 1 for n >= 3
        perm = rng.sample(order, n)
        if perm != order:
            return perm


def clip_seed(seed: int, step: int, prompt, video: Video) -> int:
    """The seed of a clip's permutation at `step`: a CRC-32 of the run's seed, the step, the prompt and the frames'
    pixels, so that every clip is shuffled its own way, the same way whichever rank or batch it is in."""
    h = zlib.crc32(f"{seed} {step} {prompt!r} {len(video)}".encode())
    for f in video.frames:
        h = zlib.crc32(f.tobytes(), h)
    return h


def shuffled_clip(video: Video, seed: int) -> Video:
    """The clip with its frames permuted (frame_permutation of seed); the frame times stay in place."""
    perm = frame_permutation(len(video), seed)
    return Video(tuple(video.frames[j] for j in perm), video.times)


def has_video(example: dict) -> bool:
    """Whether a prompt record has a clip of at least 2 frames in its images (what --temporal-contrast shuffles)."""
    return any(isinstance(x, Video) and len(x) >= MIN_FRAMES for x in example.get("images") or ())


def shuffled_example(example: dict, seed: int, step: int) -> dict | None:
    """The prompt record with every clip of at least 2 frames shuffled (clip_seed), other images unchanged; None
    when it has no such clip."""
    if not has_video(example):
        return None
    images = [
        shuffled_clip(x, clip_seed(seed, step, example["prompt"], x))
        if isinstance(x, Video) and len(x) >= MIN_FRAMES
        else x
        for x in example["images"]
    ]
    return {**example, "images": images}


def reordered_example(example: dict, order: str, seed: int) -> dict:
    """The prompt record with every clip of at least 2 frames in `order` (mirl eval --frame-order): 'as-is',
    'reversed', or 'shuffled' (shuffled_example's permutation at step 0, never the identity); the frame times stay.

    >>> ex = {"prompt": "<video>x", "images": [Video(("a", "b", "c"), (0.0, 0.5, 1.0))]}
    >>> reordered_example(ex, "reversed", 0)["images"][0]
    Video(frames=('c', 'b', 'a'), times=(0.0, 0.5, 1.0))
    """
    if order == "as-is" or not has_video(example):
        return example
    if order == "shuffled":
        return shuffled_example(example, seed, 0)
    images = [Video(x.frames[::-1], x.times) if isinstance(x, Video) else x for x in example["images"]]
    return {**example, "images": images}


def is_correct(per_fn: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the first reward function's score is above CORRECT_ABOVE (None/NaN: not correct). per_fn (B, F)."""
    return torch.nan_to_num(per_fn[:, 0], nan=-math.inf) > CORRECT_ABOVE


@dataclass
class TemporalContrast:
    """A round's rollout (rollout_and_score's signature) with T-GRPO's shuffled samples and bonus: sample_groups'
    `rollout=`, so the bonus is in the rewards before dynamic sampling's signal test, the prompt sampler's pass
    rates and every advantage estimator."""

    alpha: float
    samples: int  # K shuffled responses per prompt
    ratio: float
    seed: int

    def __call__(self, policy, examples: list[dict], reward_set, *, group_size: int, step: int = 0, seeds=None,
                 generator=None, engine=None, noisy=None, **sampling) -> ScoredBatch:  # fmt: skip
        """Sample and score the G ordered responses per prompt, then K on shuffled frames for the prompts with a
        video; -> the ordered ScoredBatch with the bonus in its rewards and the temporal/* metrics."""
        common = dict(generator=generator, engine=engine, step=step, **sampling)
        sb = rollout_and_score(
            policy, examples, reward_set, group_size=group_size, seeds=seeds, noisy=noisy, **common
        )  # fmt: skip
        shuffled = [shuffled_example(e, self.seed, step) for e in examples]
        contrasted = torch.tensor([s is not None for s in shuffled], dtype=torch.bool)
        shuffled_correct, gen_s, score_s = torch.zeros(0, dtype=torch.bool), 0.0, 0.0
        if contrasted.any():
            # row-seeded sampling: the shuffled rows' noise from the ordered group's first seed (layout-free)
            first = None if seeds is None else seeds.view(-1, group_size)[:, 0][contrasted.to(seeds.device)]
            sseeds = None if first is None else row_seeds(self.seed ^ 0x5F3759DF, step, first.tolist(), self.samples)
            ssb = rollout_and_score(
                policy, [s for s in shuffled if s is not None], reward_set, group_size=self.samples,
                seeds=None if sseeds is None else sseeds.to(seeds.device), noisy=None, **common
            )  # fmt: skip
            shuffled_correct, gen_s, score_s = is_correct(ssb.per_fn).cpu(), ssb.gen_s, ssb.score_s
        tb = temporal_bonus(is_correct(sb.per_fn).cpu(), shuffled_correct, contrasted, group_size, self.samples,
                            alpha=self.alpha, ratio=self.ratio)  # fmt: skip
        bonus = tb.bonus.to(sb.rewards.device, sb.rewards.dtype)
        per_fn = sb.per_fn.clone()
        per_fn[:, 0] += bonus.to(per_fn.dtype)
        mean = lambda x: float(x.float().mean()) if len(x) else float("nan")  # noqa: E731
        metrics = {
            **sb.metrics,
            "temporal/ordered_acc": mean(tb.ordered_acc),
            "temporal/shuffled_acc": mean(tb.shuffled_acc),
            "temporal/bonus_share": mean(tb.on),
            "temporal/skipped": float((~contrasted).sum()),
        }
        return replace(sb, rewards=sb.rewards + bonus, per_fn=per_fn, metrics=metrics, gen_s=sb.gen_s + gen_s,
                       score_s=sb.score_s + score_s)  # fmt: skip


def temporal_contrast(
    enabled: bool, *, alpha: float, samples: int, ratio: float, group_size: int, seed: int, env: bool = False
) -> TemporalContrast | None:
    """--temporal-contrast's rollout, or None when off; bad values, the knobs given without the switch and the
    switch with --env (`env`: multi-turn episodes) are a ConfigError naming the option. samples 0: G // 2 (Video-R1's),
    at least 1."""
    from ..options import ConfigError

    knobs = {"alpha": (alpha, ALPHA), "samples": (samples, 0), "ratio": (ratio, RATIO)}
    if not enabled:
        for name, (value, default) in knobs.items():
            if value != default:
                raise ConfigError(
                    f"--temporal-contrast-{name} {value!r} has no effect: it needs --temporal-contrast"
                )  # fmt: skip
        return None
    if env:
        raise ConfigError("--temporal-contrast shuffles a prompt's video frames: it does not take --env episodes")
    finite = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    if not finite(alpha) or alpha <= 0:
        raise ConfigError(f"--temporal-contrast-alpha {alpha!r}: must be a finite number > 0 (the paper's 0.3)")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
        raise ConfigError(f"--temporal-contrast-samples {samples!r}: must be an integer >= 0 (0: half the group)")
    if not finite(ratio) or ratio < 0:
        raise ConfigError(f"--temporal-contrast-ratio {ratio!r}: must be a finite number >= 0 (the paper's 1)")
    return TemporalContrast(alpha, samples or max(1, group_size // 2), ratio, seed)


def check_videos(contrast: TemporalContrast | None, data: list[dict], *, is_vlm: bool) -> None:
    """The checks that need the loaded policy and prompts: --temporal-contrast shuffles the frames of a prompt's
    clip, so it needs an image+text model and at least one prompt with a clip of 2 or more frames (the others are
    skipped and counted while training)."""
    from ..options import ConfigError

    if contrast is None:
        return
    if not is_vlm:
        raise ConfigError("--temporal-contrast shuffles video frames: it needs an image+text model (vlm-nano, a VLM)")
    if not any(has_video(e) for e in data):
        raise ConfigError(
            f"--temporal-contrast needs prompts with a video of at least {MIN_FRAMES} frames: none of the "
            f"{len(data)} prompts has one (--task motion, or --data with a 'video' column)"
        )
