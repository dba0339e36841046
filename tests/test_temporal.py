"""GRPO's --temporal-contrast (T-GRPO, Video-R1 arXiv 2503.21776; mirl/rollout/temporal.py): the rule by hand, the
shuffled clips, the bonus in the rewards before every advantage estimator, and one GRPO step on the motion task."""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from mirl.advantages import ESTIMATORS, RoundRewards, outcome_advantages
from mirl.models import load_policy
from mirl.models.vision import Video
from mirl.options import ConfigError
from mirl.rewards import RewardSet
from mirl.rewards.registry import REWARDS, register_reward
from mirl.rollout.groups import Groups, group_advantages, groups_with_signal
from mirl.rollout.temporal import (
    check_videos,
    clip_seed,
    frame_permutation,
    has_video,
    is_correct,
    shuffled_clip,
    shuffled_example,
    temporal_bonus,
    temporal_contrast,
)


def _in_order(example) -> bool:
    """Whether a clip made by _clip (frame i: grey level base + 10 i) is in time order (a row without one: True)."""
    if not example.get("images"):
        return True
    levels = [int(np.asarray(f)[0, 0, 0]) for f in example["images"][0].frames]
    return levels == sorted(levels)


if "test_in_order_even" not in REWARDS:

    @register_reward("test_in_order_even")
    def _in_order_even(prompts, completions, example, **_):
        """1 for the even rows of a batch whose clip is in time order, else 0: an ordered group of 4 has p = 1/2,
        a shuffled one p~ = 0, whatever was sampled."""
        return [float(i % 2 == 0 and _in_order(e)) for i, e in enumerate(example)]


if "test_motion_in_order_even" not in REWARDS:

    @register_reward("test_motion_in_order_even")
    def _motion_in_order_even(prompts, completions, images, answer, **_):
        """For the motion task: 1 for the even rows whose square moves the way of the answer frame after frame
        (the clip in order), else 0."""
        from test_video import torus_steps  # tests/ is on the path (pytest's rootdir insertion)

        from mirl.data.tasks.video import DIRECTIONS

        out = []
        for i, (clip, direction) in enumerate(zip(images, answer)):
            dx, dy = DIRECTIONS[direction]
            moves = [mx * dx + my * dy for mx, my in torus_steps(clip[0])]
            out.append(float(i % 2 == 0 and all(m > 0 for m in moves)))
        return out


def _clip(n=4, base=0) -> Video:
    """n frames of 32x32 grey, frame i at level base + 10 i, 2 fps."""
    frames = tuple(Image.new("RGB", (32, 32), (base + 10 * i,) * 3) for i in range(n))
    return Video(frames, tuple(i / 2 for i in range(n)))


B = lambda *xs: torch.tensor(xs, dtype=torch.bool)  # noqa: E731


# ---- the rule, by hand ----------------------------------------------------------------------------------------
def test_the_rule_by_hand():
    """G = 4 ordered and K = 2 shuffled responses per prompt, five prompts, the fourth without a video:
    0: ordered 1110 (p = 3/4), shuffled 10 (p~ = 1/2): 3/4 > 1/2, its three correct answers get alpha
    1: ordered 1000 (p = 1/4), shuffled 11 (p~ = 1):   no bonus (the model answers better shuffled)
    2: ordered 0000 (p = 0),   shuffled 00 (p~ = 0):   no bonus (0 > 0 fails, and no answer is correct)
    3: no video (not contrasted): no bonus, and it has no shuffled responses
    4: ordered 0101 (p = 1/2), shuffled 00 (p~ = 0):   the two correct answers get alpha"""
    correct = B(1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 1)
    shuffled = B(1, 0, 1, 1, 0, 0, 0, 0)
    contrasted = B(1, 1, 1, 0, 1)
    r = temporal_bonus(correct, shuffled, contrasted, 4, 2, alpha=0.3)
    a = 0.3
    expected = [a, a, a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, a, 0, a]
    assert r.bonus.tolist() == pytest.approx(expected, abs=0)
    assert r.ordered_acc.tolist() == [0.75, 0.25, 0.0, 0.5]
    assert r.shuffled_acc.tolist() == [0.5, 1.0, 0.0, 0.0]
    assert r.on.tolist() == [True, False, False, True]


def test_equal_accuracy_gets_no_bonus_unless_the_ratio_allows_it():
    """p = p~ = 1/2: the paper's p > p~ fails; with ratio 0.8 (Video-R1's code: p >= 0.8 p~) 1/2 > 2/5 holds. At
    exact equality p = 0.8 p~ (p = 2/5... here 4/5 of 1/2 is 2/5, p = 2/5 with G = 5) the strict test fails where the
    code's >= would pass (the documented departure)."""
    correct, shuffled, one = B(1, 1, 0, 0), B(1, 0), B(1)
    assert temporal_bonus(correct, shuffled, one, 4, 2, alpha=0.3).bonus.tolist() == [0.0] * 4
    assert temporal_bonus(correct, shuffled, one, 4, 2, alpha=0.3, ratio=0.8).bonus.tolist() == [0.3, 0.3, 0, 0]
    p_two_fifths = B(1, 1, 0, 0, 0)  # p = 2/5 = 0.8 x 1/2
    assert temporal_bonus(p_two_fifths, shuffled, one, 5, 2, alpha=0.3, ratio=0.8).bonus.sum() == 0
    # no shuffled answer correct and some ordered one: always a bonus, at any ratio
    assert temporal_bonus(B(0, 1), B(0, 0, 0), one, 2, 3, alpha=0.5, ratio=5.0).bonus.tolist() == [0.0, 0.5]


def test_the_rule_equals_a_plain_loop():
    """Vectorised equals a plain loop over prompts, on random layouts."""
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n, G, K = 6, 4, 3
        contrasted = torch.rand(n, generator=g) < 0.7
        m = int(contrasted.sum())
        correct = torch.rand(n * G, generator=g) < 0.5
        shuffled = torch.rand(m * K, generator=g) < 0.5
        r = temporal_bonus(correct, shuffled, contrasted, G, K, alpha=0.3, ratio=0.8)
        expected, j = [], 0
        for i in range(n):
            rows = correct[i * G : (i + 1) * G].tolist()
            on = False
            if contrasted[i]:
                p, q = sum(rows) / G, sum(shuffled[j * K : (j + 1) * K].tolist()) / K
                on, j = p > 0.8 * q, j + 1
            expected += [0.3 if (on and c) else 0.0 for c in rows]
        assert r.bonus.tolist() == pytest.approx(expected, abs=1e-12)


def test_the_rule_checks_its_layout():
    with pytest.raises(ValueError, match="are not 2 groups of 4"):
        temporal_bonus(B(1, 0, 1), B(), B(0, 0), 4, 2)
    with pytest.raises(ValueError, match="shuffled responses are not 1 groups of 2"):
        temporal_bonus(B(1, 0), B(1), B(1), 2, 2)


def test_correct_is_the_first_function_above_a_tenth():
    """As Video-R1's code: the first (accuracy) reward > 0.1; NaN (no function applied) is not correct."""
    per_fn = torch.tensor([[1.0, 0.0], [0.1, 5.0], [0.11, 0.0], [float("nan"), 1.0], [0.0, 1.0]], dtype=torch.float64)
    assert is_correct(per_fn).tolist() == [True, False, True, False, False]


# ---- the shuffled copies ---------------------------------------------------------------------------------------
def test_permutations_are_never_the_identity_and_deterministic():
    """For 2 to 6 frames: a permutation, never the identity, the same for the same seed; over seeds every one of
    the 3! - 1 = 5 non-identity orders of 3 frames appears (uniform among them: each about 1/5 of 1000)."""
    for n in range(2, 7):
        for seed in range(200):
            perm = frame_permutation(n, seed)
            assert sorted(perm) == list(range(n)) and perm != list(range(n))
            assert frame_permutation(n, seed) == perm
    assert frame_permutation(1, 3) == [0] and frame_permutation(0, 3) == []
    counts = {}
    for seed in range(1000):
        p = tuple(frame_permutation(3, seed))
        counts[p] = counts.get(p, 0) + 1
    assert set(counts) == set(itertools.permutations(range(3))) - {(0, 1, 2)}
    assert all(120 < c < 280 for c in counts.values()), counts


def test_shuffled_clips_move_the_frames_and_keep_the_times():
    clip = _clip(4)
    seed = clip_seed(0, 0, "<video>which way:", clip)
    out = shuffled_clip(clip, seed)
    perm = frame_permutation(4, seed)
    assert out.times == clip.times and perm != [0, 1, 2, 3]
    assert [int(np.asarray(f)[0, 0, 0]) for f in out.frames] == [10 * j for j in perm]
    # the seed depends on the run's seed, the step, the prompt and the pixels
    seeds = {clip_seed(s, t, p, c) for s, t, p, c in [(0, 0, "a", clip), (1, 0, "a", clip), (0, 1, "a", clip),
                                                     (0, 0, "b", clip), (0, 0, "a", _clip(4, 5))]}  # fmt: skip
    assert len(seeds) == 5


def test_shuffled_examples_only_where_there_is_a_clip_of_two_frames():
    """A clip of >= 2 frames is shuffled, a still image beside it is kept; a text row, an image row and a clip of
    one frame have nothing to shuffle (None: the run skips and counts them)."""
    still = Image.new("RGB", (32, 32), (1, 2, 3))
    row = {"prompt": "<image><video>which way:", "images": [still, _clip(4)], "answer": "up"}
    out = shuffled_example(row, seed=0, step=3)
    assert out["images"][0] is still and out["answer"] == "up" and row["images"][1] is not out["images"][1]
    assert not _in_order({"images": [out["images"][1]]}) and _in_order({"images": [row["images"][1]]})
    assert shuffled_example(row, seed=0, step=3)["images"][1].frames == out["images"][1].frames  # deterministic
    for bare in ({"prompt": "1+1="}, {"prompt": "<image>x", "images": [still]}, {"prompt": "x", "images": [_clip(1)]}):
        assert shuffled_example(bare, 0, 0) is None and not has_video(bare)


# ---- the options and the checks --------------------------------------------------------------------------------
def test_options_are_checked_by_name():
    kw = dict(alpha=0.3, samples=0, ratio=1.0, group_size=8, seed=0)
    assert temporal_contrast(False, **kw) is None
    c = temporal_contrast(True, **kw)
    assert (c.alpha, c.samples, c.ratio) == (0.3, 4, 1.0)  # K = G // 2, as Video-R1
    assert temporal_contrast(True, **{**kw, "group_size": 2, "samples": 0}).samples == 1
    assert temporal_contrast(True, **{**kw, "samples": 3}).samples == 3
    bad = [
        (dict(alpha=0.0), "--temporal-contrast-alpha 0.0: must be a finite number > 0"),
        (dict(alpha=float("nan")), "--temporal-contrast-alpha nan"),
        (dict(samples=-1), "--temporal-contrast-samples -1: must be an integer >= 0"),
        (dict(ratio=-0.5), "--temporal-contrast-ratio -0.5: must be a finite number >= 0"),
    ]
    for change, words in bad:
        with pytest.raises(ConfigError, match=words):
            temporal_contrast(True, **{**kw, **change})
    with pytest.raises(ConfigError, match="--temporal-contrast-alpha 0.5 has no effect: it needs --temporal-contrast"):
        temporal_contrast(False, **{**kw, "alpha": 0.5})
    with pytest.raises(ConfigError, match="does not take --env"):
        temporal_contrast(True, **kw, env=True)
    with pytest.raises(ConfigError, match="needs an image\\+text model"):
        check_videos(c, [{"prompt": "x", "images": [_clip(4)]}], is_vlm=False)
    with pytest.raises(ConfigError, match="none of the 2 prompts has one"):
        check_videos(c, [{"prompt": "x"}, {"prompt": "y", "images": [_clip(1)]}], is_vlm=True)
    check_videos(c, [{"prompt": "x"}, {"prompt": "y", "images": [_clip(2)]}], is_vlm=True)  # one is enough
    check_videos(None, [], is_vlm=False)  # off: nothing to check


# ---- a round with the bonus, and every advantage estimator on it ---------------------------------------------
def test_a_round_gets_the_bonus_before_every_advantage_estimator():
    """Two prompts with a 4-frame clip and one text prompt, G = 4, K = 2, reward test_in_order_even: each ordered
    group is 1010 (p = 1/2), each shuffled group 00 (p~ = 0), so the even rows of the video groups get 0.3 (reward
    1.3) and the text group none. The estimators read the rewards with the bonus: RLOO by hand for a video group,
    1.3 - 1.3/3 = 0.8667 and 0 - 2.6/3 = -0.8667 (without the bonus 2/3 and -2/3); GRPO without scaling (Dr. GRPO)
    1.3 - 0.65 = 0.65; GDPO reads the first function's column, which has the bonus too."""
    torch.manual_seed(0)
    policy = load_policy("vlm-nano", seed=0)
    examples = [
        {"prompt": "<video>which way:", "images": [_clip(4)]},
        {"prompt": "which way:"},
        {"prompt": "<video>which way:", "images": [_clip(4, 5)]},
    ]
    rs = RewardSet([("test_in_order_even", REWARDS["test_in_order_even"], 1.0)])
    contrast = temporal_contrast(True, alpha=0.3, samples=2, ratio=1.0, group_size=4, seed=0)
    g = torch.Generator().manual_seed(0)
    sb = contrast(policy, examples, rs, group_size=4, max_new_tokens=2, temperature=1.0, generator=g, step=0)
    assert sb.rewards.tolist() == pytest.approx([1.3, 0, 1.3, 0, 1, 0, 1, 0, 1.3, 0, 1.3, 0])
    assert sb.per_fn[:, 0].tolist() == pytest.approx(sb.rewards.tolist())
    assert len(sb.batch.texts) == 12  # the shuffled responses are not in the batch trained on
    m = sb.metrics
    assert (m["temporal/ordered_acc"], m["temporal/shuffled_acc"], m["temporal/bonus_share"]) == (0.5, 0.0, 1.0)
    assert m["temporal/skipped"] == 1.0
    groups = Groups([(sb, groups_with_signal(sb.rewards, 4))], 0, 0, 0.0, 0.0)
    for name in ESTIMATORS:
        _, adv = group_advantages(groups, rs.weights, estimator=name, group_size=4, scale="group")
        lengths = sb.batch.response_mask.sum(1)
        ref = outcome_advantages(name, RoundRewards(sb.rewards, sb.per_fn, rs.weights, lengths, 4, "group"))
        assert torch.allclose(adv, ref.float())
    _, rloo = group_advantages(groups, rs.weights, estimator="rloo", group_size=4, scale="group")
    assert rloo[:4].tolist() == pytest.approx([2.6 / 3, -2.6 / 3, 2.6 / 3, -2.6 / 3], abs=1e-6)
    assert rloo[4:8].tolist() == pytest.approx([2 / 3, -2 / 3, 2 / 3, -2 / 3], abs=1e-6)
    _, dr = group_advantages(groups, rs.weights, estimator="group", group_size=4, scale="none")
    assert dr[:4].tolist() == pytest.approx([0.65, -0.65, 0.65, -0.65], abs=1e-6)
    rs.close()


def test_row_seeded_sampling_gives_the_shuffled_rows_their_own_seeds():
    """With row seeds (torchrun, --row-seeded-sampling) the round runs, and the same seeds give the same samples."""
    from mirl.rollout.sample import row_seeds

    policy = load_policy("vlm-nano", seed=0)
    examples = [{"prompt": "<video>which way:", "images": [_clip(4)]}]
    rs = RewardSet([("test_in_order_even", REWARDS["test_in_order_even"], 1.0)])
    contrast = temporal_contrast(True, alpha=0.3, samples=3, ratio=1.0, group_size=2, seed=5)
    run = lambda: contrast(policy, examples, rs, group_size=2, max_new_tokens=3, temperature=1.0, step=1,  # noqa: E731
                           seeds=row_seeds(5, 1, [0], 2))  # fmt: skip
    a, b = run(), run()
    assert a.batch.texts == b.batch.texts and a.rewards.tolist() == pytest.approx([1.3, 0.0])
    rs.close()


# ---- one GRPO step ---------------------------------------------------------------------------------------------
def test_one_grpo_step_with_temporal_contrast_on_motion(tmp_path, monkeypatch):
    """mirl grpo --task motion --temporal-contrast on the tiny VLM: the reward test_motion_in_order_even makes every
    ordered group 10 (p = 1/2) and every shuffled one 00 (p~ = 0), so the step logs ordered_acc 1/2, shuffled_acc
    0 and bonus_share 1; the update trains on the P x G = 4 ordered rows only (not the P x K = 2 shuffled ones), and
    the video modules change with most of the rest."""
    from mirl.recipes import grpo

    seen = {}
    real = grpo.grpo_update

    def spy(policy, optimizer, batch, adv, **kw):
        seen["rows"] = len(batch)
        return real(policy, optimizer, batch, adv, **kw)

    monkeypatch.setattr(grpo, "grpo_update", spy)
    policy = load_policy("vlm-nano", seed=0)
    before = {k: v.detach().clone() for k, v in policy.model.named_parameters()}
    cfg = grpo.Config(task="motion", reward="test_motion_in_order_even", temporal_contrast=True, group_size=2,
                      prompts_per_step=2, steps=1, max_new_tokens=4, eval_n=0, max_len=64, threads=1, seed=0,
                      report=False, out_dir=str(tmp_path / "g"))  # fmt: skip
    res = grpo.train(cfg, model=policy)
    row = res.history[0]
    assert seen["rows"] == 4
    assert (row["temporal/ordered_acc"], row["temporal/shuffled_acc"], row["temporal/bonus_share"]) == (0.5, 0, 1)
    assert row["temporal/skipped"] == 0
    assert row["reward/mean"] == 0.5  # the logged reward is the verifier's, before the bonus
    changed = {k for k, v in policy.model.named_parameters() if not torch.equal(v, before[k])}
    assert "frame_merge.weight" in changed and len(changed) > len(before) // 2
