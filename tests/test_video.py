"""Video: frame sampling by hand, a real file written and read back with PyAV, bad video named, the tiny VLM over
frames (placeholders, the pair merge by hand, frame order), the motion task, and one step of every recipe on it."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from mirl.data.formats import DataError, completion_records, load_rows, prompt_records
from mirl.data.tasks import make_task
from mirl.data.tasks.video import AXES, DIRECTIONS, SIZE, MotionTask, render_frames, square_path
from mirl.data.video import VideoOptions, capped_size, frame_count, read_video, sample_indices, spaced_indices
from mirl.models import load_policy
from mirl.models.vision import Video, perturb
from mirl.rewards.registry import REWARDS, register_reward

if "test_alternate" not in REWARDS:

    @register_reward("test_alternate")
    def _alternate(prompts, completions, **_):
        """1, 0, 1, 0, ...: every group of an even size has a positive and a negative."""
        return [float(i % 2 == 0) for i in range(len(completions))]


def _frame(colour=(200, 30, 30), size=32):
    return Image.new("RGB", (size, size), colour)


def _bar_clip(path, n=25, rate=10, size=64):
    """A clip of n frames at `rate` fps: a white bar 4 px wide whose left edge is at column 2 * i in frame i."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=rate)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(n):
            a = np.zeros((size, size, 3), np.uint8)
            a[:, 2 * i : 2 * i + 4] = 255
            for packet in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)


# ---- frame sampling -------------------------------------------------------------------------------------------
def test_frame_sampling_by_hand():
    """count (qwen-vl-utils' smart_nframes) = duration * fps, at least 4, at most max_frames and the frame count
    floored to even, floored to even; index i of k is round(i * (n - 1) / (k - 1)), half up."""
    # 90 frames at 30 fps = 3 s; at 2 fps 6 frames: i * 89 / 5 = 0, 17.8, 35.6, 53.4, 71.2, 89
    assert frame_count(90, 30.0, 2.0, 8) == 6
    assert sample_indices(90, 30.0, 2.0, 8) == [0, 18, 36, 53, 71, 89]
    # 2.6 s at 2 fps wants 5.2: floored to even, 4: i * 77 / 3 = 0, 25.67, 51.33, 77
    assert sample_indices(78, 30.0, 2.0, 8) == [0, 26, 51, 77]
    # 10 s at 2 fps wants 20, capped at 8: i * 299 / 7 = 0, 42.71, 85.43, 128.14, 170.86, 213.57, 256.29, 299
    assert sample_indices(300, 30.0, 2.0, 8) == [0, 43, 85, 128, 171, 214, 256, 299]
    assert frame_count(300, 30.0, 2.0, 7) == 6  # the cap floored to even
    # a short clip: 5 frames at 30 fps is 1/6 s, 1/3 frame at 2 fps: raised to 4, i * 4 / 3 = 0, 1.33, 2.67, 4
    assert sample_indices(5, 30.0, 2.0, 8) == [0, 1, 3, 4]
    # fewer frames than the rate wants: 3 frames at 1 fps (3 s) want 6 at 2 fps, the clip has 3, floored to 2
    assert sample_indices(3, 1.0, 2.0, 8) == [0, 2]
    # one frame, or a cap of one: one frame
    assert sample_indices(1, 30.0, 2.0, 8) == [0] and sample_indices(90, 30.0, 2.0, 1) == [0]
    assert sample_indices(0, 30.0, 2.0, 8) == []
    assert spaced_indices(10, 4) == [0, 3, 6, 9] and spaced_indices(7, 1) == [0]
    # the pixel cap: one factor for both sides, floored, each side at least 1
    assert capped_size(64, 48, 768) == (32, 24)
    assert capped_size(64, 64, 1024) == (32, 32)
    assert capped_size(32, 32, 0) == (32, 32) and capped_size(32, 32, 5000) == (32, 32)
    assert capped_size(100, 1, 10) == (31, 1)  # scale sqrt(10 / 100) = 0.316


def test_a_video_file_written_with_pyav_is_read_back(tmp_path):
    """25 frames at 10 fps (2.5 s) at 2 fps: 5.0 floored to even = 4 frames, indices i * 24 / 3 = 0, 8, 16, 24 at
    0.0, 0.8, 1.6, 2.4 s; with a cap of 1024 pixels the 64x64 frames become 32x32, and the bar, at column
    2 * index in the file, is at column about index in the frame."""
    _bar_clip(tmp_path / "clip.mp4")
    v = read_video("clip.mp4", "row 1", tmp_path, VideoOptions(fps=2.0, max_frames=8, max_pixels=1024))
    assert len(v) == 4 and v.times == pytest.approx((0.0, 0.8, 1.6, 2.4))
    assert all(f.size == (32, 32) for f in v.frames)
    for f, index in zip(v.frames, (0, 8, 16, 24)):
        column = np.asarray(f.convert("L"), dtype=np.float32).mean(0)  # (32,) brightness per column
        assert abs(int(column.argmax()) - (index + 1)) <= 1  # bar 2*index..2*index+3 at half size: index..index+1
    # the cap on the count (floored to even); the file's own size without a pixel cap
    v = read_video(str(tmp_path / "clip.mp4"), "row 1", "", VideoOptions(fps=10.0, max_frames=3, max_pixels=0))
    assert len(v) == 2 and v.times == pytest.approx((0.0, 2.4)) and v.frames[0].size == (64, 64)
    # through a jsonl row, and into the tiny VLM: 4 frames, 2 pairs of 16 tokens
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"prompt": "<video>which way:", "answer": "right", "video": "clip.mp4"})
    )
    p = load_policy("vlm-nano", seed=0)
    rec = prompt_records(load_rows(tmp_path / "d.jsonl"), p.tokenizer, VideoOptions(max_pixels=1024))[0]
    assert "video" not in rec and isinstance(rec["images"][-1], Video) and len(rec["images"][-1]) == 4
    ids, inputs = p.encode_prompt(rec["prompt"], rec["images"], rec["where"])
    assert inputs["frame_index"].tolist() == [0, 1, 2, 3] and len(ids) == 1 + 2 * 16 + len("which way:")


def test_a_file_without_a_frame_count_in_its_header_is_sampled_from_its_frame_times(tmp_path):
    """An MKV has no frame count in its header (PyAV: stream.frames == 0): every frame is decoded and the frames
    are chosen at the rate their times show. 25 frames at 10 fps at 2 fps: 4 frames, at 0.0, 0.8, 1.6, 2.4 s, as
    the MP4 of the same clip."""
    import av

    _bar_clip(tmp_path / "clip.mkv")
    with av.open(str(tmp_path / "clip.mkv")) as c:
        assert c.streams.video[0].frames == 0
    v = read_video("clip.mkv", "row 1", tmp_path, VideoOptions(fps=2.0, max_frames=8))
    assert len(v) == 4 and v.times == pytest.approx((0.0, 0.8, 1.6, 2.4))


def test_frame_lists_and_arrays(tmp_path):
    frames = [_frame((20 * i, 0, 0)) for i in range(10)]
    for i, f in enumerate(frames):
        f.save(tmp_path / f"f{i}.png")
    v = read_video([f"f{i}.png" for i in range(10)], "row 2", tmp_path, VideoOptions(max_frames=4))
    assert v.times is None and [f.getpixel((0, 0))[0] for f in v.frames] == [0, 60, 120, 180]  # frames 0, 3, 6, 9
    arr = np.zeros((3, 32, 32, 3), np.uint8)
    arr[1] = 100
    v = read_video(arr.tolist(), "row 3")  # as a JSON row holds it
    assert len(v) == 3 and v.frames[1].getpixel((5, 5)) == (100, 100, 100)
    grey = read_video(np.full((2, 8, 8), 7), "row 4")
    assert grey.frames[0].mode == "L" and grey.frames[0].getpixel((0, 0)) == 7


def test_bad_video_is_an_error_naming_the_row(tmp_path):
    (tmp_path / "corrupt.mp4").write_bytes(b"not a video at all" * 20)
    _bar_clip(tmp_path / "ok.mp4", n=6, size=32)
    data = (tmp_path / "ok.mp4").read_bytes()
    (tmp_path / "damaged.mp4").write_bytes(data[:300] + b"\x00" * 200 + data[500:])  # the stream's packets broken
    f = tmp_path / "d.jsonl"
    rows = {
        "missing.mp4": r"d\.jsonl:1 field 'video': video file .*missing\.mp4 does not exist",
        "corrupt.mp4": r"d\.jsonl:1 field 'video': unreadable video .*corrupt\.mp4 \(InvalidDataError",
        "damaged.mp4": r"d\.jsonl:1 field 'video': unreadable video .*damaged\.mp4",
        "[]": r"d\.jsonl:1 field 'video': the video has no frames",
        "[[1, 2]]": r"d\.jsonl:1 field 'video': a frames array must be .* got shape \(1, 2\)",
        "[[[[300, 0, 0]]]]": r"d\.jsonl:1 field 'video': frame values must be numbers from 0 to 255",
        "7": r"d\.jsonl:1 field 'video': a video must be a file path, a list of frame images or .*, got int",
    }
    for value, message in rows.items():
        video = value if value.endswith(".mp4") else json.loads(value)
        f.write_text(json.dumps({"prompt": "<video>x", "completion": "y", "video": video}))
        with pytest.raises(DataError, match=message):
            completion_records(load_rows(f), None)
    with pytest.raises(DataError, match=r"row 5 field 'video': the video has no frames"):
        read_video(np.zeros((0, 32, 32, 3)), "row 5 field 'video'")
    _frame().save(tmp_path / "ok.png")
    with pytest.raises(DataError, match=r"row 6 frame 1: image file .*nope\.png does not exist"):
        read_video(["ok.png", "nope.png"], "row 6", tmp_path)
    with pytest.raises(DataError, match=r"row 7: the frames differ in size \(20x20, 32x32\)"):
        read_video([_frame(), _frame(size=20)], "row 7")


# ---- the tiny VLM over frames ---------------------------------------------------------------------------------
def test_video_placeholders_and_frame_inputs():
    p = load_policy("vlm-nano", seed=0)
    clip = Video(tuple(_frame((40 * i, 0, 0)) for i in range(3)))
    ids, inputs = p.encode_prompt("<video>which way:", [clip], "row 1")
    image = p.tokenizer.image_token_id
    # 3 frames padded to 4 (the last repeated), 2 pairs of 16 tokens
    assert ids[1 : 1 + 32] == [image] * 32 and p.tokenizer.decode(ids) == "which way:" and len(ids) == 43
    assert inputs["frame_index"].tolist() == [0, 1, 2, 3] and torch.equal(
        inputs["pixel_values"][3], inputs["pixel_values"][2]
    )
    # no placeholder: the video goes first; an image and a video fill their own placeholders in prompt order
    assert p.encode_prompt("which way:", [clip])[0] == ids
    ids2, inputs2 = p.encode_prompt("<image> then <video>?", [clip, _frame()], "row 2")  # list order: video, image
    assert inputs2["frame_index"].tolist() == [-1, 0, 1, 2, 3] and ids2[1 : 1 + 16] == [image] * 16
    assert ids2[17 : 17 + 6] == p.tokenizer.encode(" then ") and ids2[23 : 23 + 32] == [image] * 32
    with pytest.raises(DataError, match="row 3: the prompt has 2 video placeholder.*'<video>' but the row has 1 video"):
        p.encode_prompt("<video><video>x", [clip], "row 3")
    with pytest.raises(DataError, match="row 4: the prompt has 1 video placeholder.*no video"):
        p.encode_prompt("<video>x", None, "row 4")
    with pytest.raises(DataError, match="row 5 video 0: the video has 17 frames but this model takes at most 16"):
        p.encode_prompt("<video>x", [Video(tuple([_frame()] * 17))], "row 5")
    with pytest.raises(DataError, match="row 6 video 0 frame 1: image is 20x20 pixels but this model takes 32x32"):
        p.encode_prompt("<video>x", [Video((_frame(), _frame(size=20)))], "row 6")


def test_frame_merge_by_hand_and_a_still_clip_is_its_image():
    """merge_frames: frame t gets e_t, frames 2k and 2k+1 become [f_2k + e_2k ; f_2k+1 + e_2k+1] W + b in frame 2k's
    place, still images pass. At the start (W = [I/2, I/2], e = 0) a clip of one image twice is that image: the
    same logits as the prompt with '<image>'."""
    p = load_policy("vlm-nano", seed=0)
    m = p.model
    x = torch.randn(5, 16, 64)
    idx = torch.tensor([-1, 0, 1, 2, 3])
    with torch.no_grad():
        m.frame_pos.normal_()
        m.frame_merge.weight.normal_(0, 0.1)
        w, b, e = m.frame_merge.weight, m.frame_merge.bias, m.frame_pos
        out = m.merge_frames(x, idx)
        pair = lambda i, j: torch.cat([x[i] + e[i - 1], x[j] + e[j - 1]], -1) @ w.T + b  # noqa: E731
        assert out.shape == (3, 16, 64)
        assert torch.allclose(out[0], x[0]) and torch.allclose(out[1], pair(1, 2), atol=1e-5)
        assert torch.allclose(out[2], pair(3, 4), atol=1e-5)
    fresh = load_policy("vlm-nano", seed=0)
    img = _frame((10, 120, 200))
    a_ids, a_in = fresh.encode_prompt("<image>x", [img])
    v_ids, v_in = fresh.encode_prompt("<video>x", [Video((img, img))])
    assert a_ids == v_ids
    a, v = torch.tensor([a_ids]), torch.tensor([v_ids])
    with torch.no_grad():
        same = fresh(a, torch.ones_like(a), images=a_in).logits, fresh(v, torch.ones_like(v), images=v_in).logits
    assert torch.allclose(*same, atol=1e-5)


def test_frame_order_matters_and_rows_keep_their_own_frames(tmp_path):
    """A clip and the same frames reversed give different logits; in a batch with an image row and a text row a
    video row's logits equal its logits alone; save and load keep the video modules."""
    from mirl.data.collate import batch_images
    from mirl.rollout.sample import left_pad

    p = load_policy("vlm-nano", seed=0)
    frames = [_frame((60 * i, 30, 200 - 60 * i)) for i in range(4)]
    fwd, rev = (p.encode_prompt("<video>which way:", [Video(tuple(f))]) for f in (frames, frames[::-1]))
    x = torch.tensor([fwd[0]])
    with torch.no_grad():
        a = p(x, torch.ones_like(x), images=fwd[1]).logits[0, -1]
        b = p(x, torch.ones_like(x), images=rev[1]).logits[0, -1]
    assert not torch.allclose(a, b, atol=1e-4)
    rows = [fwd, p.encode_prompt("<image>add:", [_frame()]), (p.tokenizer.encode("add: 1", True), None)]
    ids, attn = left_pad([r[0] for r in rows], p.tokenizer.pad_token_id)
    with torch.no_grad():
        together = p(ids, attn, images=batch_images([(r[0], 0, r[1]) if r[1] else (r[0], 0) for r in rows])).logits
    assert torch.allclose(together[0, -1], a, atol=1e-4)
    p.save(tmp_path / "m")
    q = load_policy(tmp_path / "m")
    assert q.model.config.max_video_frames == 16
    with torch.no_grad():
        assert torch.allclose(q(x, torch.ones_like(x), images=fwd[1]).logits[0, -1], a, atol=1e-5)


def test_a_folder_saved_before_video_loads_and_refuses_video(tmp_path):
    from safetensors.torch import load_file, save_file

    p = load_policy("vlm-nano", seed=0)
    p.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["max_video_frames"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    weights = {k: v for k, v in load_file(tmp_path / "m" / "model.safetensors").items() if "frame_" not in k}
    save_file(weights, tmp_path / "m" / "model.safetensors")
    old = load_policy(tmp_path / "m")
    assert old.model.config.max_video_frames == 0 and not hasattr(old.model, "frame_pos")
    ids, inputs = old.encode_prompt("<image>x", [_frame()])
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(
            old(x, torch.ones_like(x), images=inputs).logits, p(x, torch.ones_like(x), images=inputs).logits
        )
    with pytest.raises(DataError, match="row 1 video 0: this model takes no video"):
        old.encode_prompt("<video>x", [Video((_frame(), _frame()))], "row 1")


def test_a_transformers_vlm_without_video_refuses_it_by_name(llava_dir):
    """LLaVA takes images only (Qwen2-VL and Qwen2.5-VL take video: tests/test_video_hf.py)."""
    p = load_policy(llava_dir)
    with pytest.raises(DataError, match=r"row 3: the row has a video, and this model \(llava\) takes images only"):
        p.encode_prompt("<video>x", [Video((_frame(), _frame()))], "row 3")


def test_frame_order_for_eval_by_hand():
    """mirl eval --frame-order: reversed turns each clip around, shuffled permutes it (never the identity), the frame
    times and the other images stay; a clip of one frame and a text prompt are left as they are."""
    from mirl.rollout.temporal import reordered_example

    clip = Video(tuple(_frame((i, 0, 0)) for i in range(4)), (0.0, 0.5, 1.0, 1.5))
    still = _frame((9, 9, 9))
    ex = {"prompt": "<image><video>x", "images": [still, clip]}
    rev = reordered_example(ex, "reversed", 0)["images"]
    assert rev[0] is still and [f.getpixel((0, 0))[0] for f in rev[1].frames] == [3, 2, 1, 0]
    assert rev[1].times == clip.times
    for seed in range(5):
        shuf = reordered_example(ex, "shuffled", seed)["images"][1]
        order = [f.getpixel((0, 0))[0] for f in shuf.frames]
        assert sorted(order) == [0, 1, 2, 3] and order != [0, 1, 2, 3] and shuf.times == clip.times
    assert reordered_example(ex, "as-is", 0) is ex
    one = {"prompt": "<video>x", "images": [Video((still,))]}
    assert reordered_example(one, "reversed", 0) is one and reordered_example({"prompt": "1+1="}, "shuffled", 0)


def test_noisy_rollout_on_frames_keeps_the_motion():
    """Every frame of a clip gets the same crop and the same noise, so the difference between two frames is kept."""
    frames = (_frame((0, 0, 0)), _frame((0, 0, 0)))
    a = np.asarray(frames[0]).copy()
    a[4:10, 4:10] = 255
    b = np.asarray(frames[1]).copy()
    b[4:10, 14:20] = 255
    clip = Video((Image.fromarray(a), Image.fromarray(b)), (0.0, 0.5))
    noisy = perturb(clip, 0.5, random.Random(0), ("noise",))
    assert isinstance(noisy, Video) and noisy.times == clip.times
    na, nb = (np.asarray(f, dtype=np.int32) for f in noisy.frames)
    assert not np.array_equal(na, a)
    # the same noise on both frames: where both frames are black they are equal
    assert np.array_equal(na[20:, :], nb[20:, :])
    assert perturb(clip, 0.0, random.Random(0)).frames == clip.frames


# ---- the motion task ------------------------------------------------------------------------------------------
def square_corner(frame) -> tuple[int, int]:
    """The top-left corner of the one bright square in a noise-free frame, on the torus (it may wrap round an edge)."""
    lit = np.asarray(frame, dtype=np.float32).sum(-1) > 100
    cols, rows = set(np.nonzero(lit.any(0))[0].tolist()), set(np.nonzero(lit.any(1))[0].tolist())
    return next(c for c in cols if (c - 1) % SIZE not in cols), next(r for r in rows if (r - 1) % SIZE not in rows)


def torus_steps(clip) -> list[tuple[int, int]]:
    """The square's moves (dx, dy) between consecutive frames, each the shortest way round the torus."""
    xy = [square_corner(f) for f in clip.frames]
    return [((b[0] - a[0] + SIZE // 2) % SIZE - SIZE // 2, (b[1] - a[1] + SIZE // 2) % SIZE - SIZE // 2)
            for a, b in zip(xy, xy[1:])]  # fmt: skip


def test_motion_task_is_deterministic_verified_and_split():
    t = make_task("motion")
    a, b = t.examples("train", 30, 3), t.examples("train", 30, 3)
    assert [x["answer"] for x in a] == [x["answer"] for x in b]
    assert [list(f.getdata()) for f in a[0]["images"][0].frames] == [
        list(f.getdata()) for f in b[0]["images"][0].frames
    ]
    assert all(t.score(x["solution"], x) == 1.0 for x in a) and {x["answer"] for x in a} == set(DIRECTIONS)
    for ex in a:  # the prompt names the axis; the wrong answer is the other way along it
        axis = ("left", "right") if ex["answer"] in ("left", "right") else ("up", "down")
        assert ex["prompt"] == f"<video>{axis[0]} or {axis[1]}:"
        wrong = MotionTask.wrong_solution(ex, random.Random(0))
        assert wrong in axis and wrong != ex["answer"]
        assert t.score(f"{wrong} {ex['answer']}", ex) == 0.0 and t.score("no idea", ex) == 0.0
    train = {x["split_key"] for x in t.examples("train", 400)}
    test = {x["split_key"] for x in t.examples("test", 200)}
    assert len(test) == 200 and not train & test
    # levels: the step between frames (4, 2, 1 px) the way of the answer, round the torus; a still distractor from 2
    assert square_path("left", (20, 3), 4) == [(20, 3), (16, 3), (12, 3), (8, 3)]
    assert square_path("down", (9, 28), 4) == [(9, 28), (9, 0), (9, 4), (9, 8)]
    for level, step in ((1, 4), (2, 2), (3, 1)):
        for ex in make_task(f"motion:{level}").examples("train", 20):
            assert len(ex["images"][0]) == 4 and ex["difficulty"] == level
            if level < 3 and "None" in ex["split_key"]:  # no distractor, no noise: one square to find
                dx, dy = DIRECTIONS[ex["answer"]]
                assert torus_steps(ex["images"][0]) == [(step * dx, step * dy)] * 3
    with pytest.raises(ValueError, match="level after ':' must be 1, 2 or 3"):
        make_task("motion:4")


def test_motion_needs_the_frame_order_and_has_a_chat_form():
    """The frames without their order say nothing of the way: the clip's frames are, as a set, the frames of a
    square moving the other way from the path's other end (the same scene otherwise), so any model of the frame set
    scores 0.5; and the start is uniform on the torus, so each frame alone is uniform whatever the way."""
    from mirl.data.tasks.chat import ChatTask

    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    t = make_task("motion")
    examples = t.examples("train", 400)
    for ex in examples[:20]:
        clip, step = ex["images"][0], 4
        dx, dy = DIRECTIONS[ex["answer"]]
        x, y = square_corner(clip.frames[0])
        end = ((x + 3 * step * dx) % SIZE, (y + 3 * step * dy) % SIZE)
        back = render_frames(square_path(opposite[ex["answer"]], end, step), ex["colour"], None, 0.0, random.Random(0))
        assert [list(f.getdata()) for f in back[::-1]] == [list(f.getdata()) for f in clip.frames]
        dx, dy = torus_steps(Video(clip.frames[::-1]))[0]  # reversed: a clip of the opposite way
        assert (dx, dy) == tuple(-4 * v for v in DIRECTIONS[ex["answer"]])
    starts = {d: [square_corner(ex["images"][0].frames[0]) for ex in examples if ex["answer"] == d] for d in DIRECTIONS}
    for d, xy in starts.items():  # 400 draws over 32 x 32 starts: both coordinates spread over the whole torus
        assert len(xy) > 60 and min(min(p) for p in xy) < 4 and max(max(p) for p in xy) > SIZE - 5, d
    chat = ChatTask(t, load_policy("vlm-nano").tokenizer)
    ex = chat.examples("test", 2)[0]
    axis = " or ".join(AXES[ex["answer"]])
    assert ex["prompt"].startswith(f"user: <video>Does the {ex['colour']} square move {axis}?")
    assert ex["task_prompt"] == f"<video>{axis}:"
    assert chat.score(ex["solution"], ex) == 1.0 and ex["solution"].endswith(f"moves {ex['answer']}.")
    assert chat.score("Left at first, but then it moves " + opposite[ex["answer"]], ex) == 0.0


# ---- every recipe, one step on video --------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["sft", "dpo", "rm", "grpo", "grpo_noisy", "online", "ppo", "distill"])
def test_one_step_of_every_recipe_on_video(recipe, tmp_path):
    """Each recipe takes a training step on the motion task's clips with the tiny VLM, and the video modules (the
    frame-position embedding and the pair merge) change with the rest."""
    from mirl.recipes import distill, grpo, online, ppo, preference, reward_model, sft

    policy = load_policy("vlm-nano", seed=0)
    video_params = ("frame_pos", "frame_merge.weight")
    before = {k: v.detach().clone() for k, v in policy.model.named_parameters()}
    common = {"out_dir": str(tmp_path / recipe), "threads": 1, "seed": 0, "report": False}
    rl = {"task": "motion", "steps": 1, "prompts_per_step": 2, "max_new_tokens": 4, "eval_n": 2, "max_len": 64}
    task = make_task("motion")
    pairs = [
        {"prompt": e["prompt"], "chosen": e["solution"], "rejected": task.wrong_solution(e, random.Random(i)),
         "images": e["images"]}
        for i, e in enumerate(task.examples("train", 8))
    ]  # fmt: skip
    if recipe == "sft":
        sft.train(sft.Config(task="motion", n_train=8, steps=1, batch_size=4, max_len=64, eval_n=2, max_new_tokens=4,
                             **common), model=policy)  # fmt: skip
    elif recipe == "dpo":
        preference.train(preference.Config(loss="mio", steps=1, batch_size=4, max_len=64, eval_n=0, task="", **common),
                         model=policy, data=pairs)  # fmt: skip
    elif recipe == "rm":
        reward_model.train(reward_model.Config(steps=1, batch_size=4, max_len=64, task="", **common),
                           model=policy, data=pairs[:4], eval_data=pairs[4:])  # fmt: skip
    elif recipe in ("grpo", "grpo_noisy"):
        extra = {"noisy_rollout": 0.5} if recipe == "grpo_noisy" else {}
        grpo.train(grpo.Config(group_size=2, reward="test_alternate", **extra, **rl, **common), model=policy)
    elif recipe == "online":
        res = online.train(online.Config(k=2, reward="test_alternate", loss="mio", **rl, **common), model=policy)
        assert res.summary["groups"]["used"] == 2
    elif recipe == "ppo":
        ppo.train(ppo.Config(samples_per_prompt=2, **rl, **common), model=policy)
    else:
        teacher = load_policy("vlm-nano", seed=1)
        teacher.save(tmp_path / "teacher")
        distill.train(distill.Config(teacher=str(tmp_path / "teacher"), **rl, **common), model=policy)
    changed = {k for k, v in policy.model.named_parameters() if k in before and not torch.equal(v, before[k])}
    assert changed, f"{recipe}: no parameter changed"
    assert all(name in changed for name in video_params), (recipe, sorted(changed)[:5])


def test_cli_sft_grpo_eval_on_motion_and_video_options(tmp_path, capsys):
    """mirl sft / grpo / eval --task motion end to end; --video-* with --data reach the rows; without --data they
    have no effect, which is an error."""
    from mirl.cli import main

    s, g = str(tmp_path / "s"), str(tmp_path / "g")
    small = ["--max-new-tokens", "4", "--eval-n", "4"]
    assert main(["sft", "--model", "vlm-nano", "--task", "motion", "--steps", "1", "--batch-size", "4",
                 "--max-len", "64", "--out-dir", s, *small]) == 0  # fmt: skip
    assert main(["grpo", "--model", f"{s}/final", "--task", "motion", "--steps", "1", "--group-size", "2",
                 "--prompts-per-step", "2", "--noisy-rollout", "0.5", "--out-dir", g, *small]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["eval", "--model", f"{g}/final", "--task", "motion:2", "--n", "4", "--max-new-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == 4 and out["task"] == "motion:2"
    for order in ("reversed", "shuffled"):  # the same prompts with each clip's frames reordered
        assert main(["eval", "--model", f"{g}/final", "--task", "motion", "--n", "4", "--frame-order", order]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 4
    assert main(["eval", "--model", f"{g}/final", "--task", "arith", "--frame-order", "reversed"]) == 2
    assert "--frame-order reversed has no effect: no prompt has a clip" in capsys.readouterr().err
    # --data with a video column: 10 frame images thinned to --video-max-frames 2 (one pair: 16 tokens)
    for i in range(10):
        _frame((20 * i, 0, 0)).save(tmp_path / f"f{i}.png")
    row = {"prompt": "<video>which way:", "completion": "right", "video": [f"f{i}.png" for i in range(10)]}
    (tmp_path / "v.jsonl").write_text("\n".join(json.dumps(row) for _ in range(4)))
    d = str(tmp_path / "d")
    assert main(["sft", "--model", "vlm-nano", "--data", str(tmp_path / "v.jsonl"), "--steps", "1", "--batch-size",
                 "4", "--max-len", "32", "--video-max-frames", "2", "--eval-n", "0", "--out-dir", d]) == 0  # fmt: skip
    # (--max-len 32 holds BOS + 16 + 10 + 6: with the default 8 frames, 64 video tokens would not fit)
    capsys.readouterr()
    argv = ["sft", "--model", "vlm-nano", "--data", str(tmp_path / "v.jsonl"), "--steps", "1", "--batch-size", "4",
            "--max-len", "32", "--eval-n", "0", "--out-dir", d + "2"]  # fmt: skip
    assert main(argv) == 2 and "prompt with its image tokens is 75 tokens" in capsys.readouterr().err
    assert main(["grpo", "--task", "motion", "--video-fps", "1", "--out-dir", str(tmp_path / "x")]) == 2
    assert "--video-fps 1.0 has no effect: it needs --data" in capsys.readouterr().err
    assert main(["sft", "--data", str(tmp_path / "v.jsonl"), "--video-max-frames", "0", "--out-dir", d + "3"]) == 2
    assert "--video-max-frames 0: must be an integer >= 1" in capsys.readouterr().err


# ---- the count task -------------------------------------------------------------------------------------------
def _frames_with(clip, colour) -> int:
    """In how many frames at least half a square (18 of 36 pixels) is near the colour: counted from the pixels."""
    from mirl.data.tasks.visual import COLOURS

    target = np.array(COLOURS[colour], dtype=np.float32)
    near = [(np.linalg.norm(np.asarray(f, dtype=np.float32) - target, axis=-1) < 90).sum() for f in clip.frames]
    return sum(int(n >= 18) for n in near)


def test_count_task_is_deterministic_verified_split_and_counted_from_the_pixels():
    t = make_task("count")
    a, b = t.examples("train", 30, 3), t.examples("train", 30, 3)
    assert [x["answer"] for x in a] == [x["answer"] for x in b]
    assert [list(f.getdata()) for f in a[0]["images"][0].frames] == [
        list(f.getdata()) for f in b[0]["images"][0].frames
    ]
    assert {x["answer"] for x in a} == {"1", "2", "3", "4"} and all(t.score(x["solution"], x) == 1.0 for x in a)
    ex = {"answer": "3"}
    assert t.score("3", ex) == t.score(" 3 frames", ex) == 1.0
    assert t.score("2, no 3", ex) == t.score("three", ex) == t.score("", ex) == 0.0
    assert all(t.wrong_solution(x, random.Random(i)) != x["answer"] for i, x in enumerate(a))
    train = {x["split_key"] for x in t.examples("train", 400)}
    test = {x["split_key"] for x in t.examples("test", 200)}
    assert len(test) == 200 and not train & test
    for level in (1, 2, 3):
        for ex in make_task(f"count:{level}").examples("train", 20, seed=level):
            clip = ex["images"][0]
            assert len(clip) == 8 and ex["difficulty"] == level and ex["prompt"] == f"<video>count {ex['colour']}:"
            assert _frames_with(clip, ex["colour"]) == int(ex["answer"]), (level, ex["split_key"])
    with pytest.raises(ValueError, match="level after ':' must be 1, 2 or 3"):
        make_task("count:0")


def test_count_needs_the_whole_clip_and_has_a_chat_form():
    """One frame holds the square or not: clips of counts 1, 2, 3 and 4 are made of the same two frames."""
    from mirl.data.tasks.chat import ChatTask
    from mirl.data.tasks.video import render_count_frames

    clips = []
    for k in (1, 2, 3, 4):
        sq = {"colour": "red", "at": {t: (5, 9) for t in range(0, 2 * k, 2)}}
        clips.append(render_count_frames([sq], 0.0, random.Random(0)))
    kinds = [{f.tobytes() for f in c} for c in clips]
    assert all(k == kinds[0] for k in kinds) and len(kinds[0]) == 2
    assert [_frames_with(Video(tuple(c), tuple(range(8))), "red") for c in clips] == [1, 2, 3, 4]
    t = make_task("count")
    chat = ChatTask(t, load_policy("vlm-nano").tokenizer)
    ex = chat.examples("test", 2)[0]
    assert ex["prompt"].startswith("user: <video>In how many frames of the video does the")
    assert ex["task_prompt"] == f"<video>count {ex['colour']}:" and chat.score(ex["solution"], ex) == 1.0
    e3 = {**ex, "answer": "3"}
    assert chat.score("Frames 2, 5 and 7 show it: three.", e3) == chat.score("It appears 3 times", e3) == 1.0
    assert chat.score("Three at first glance, but 4.", e3) == chat.score("none", e3) == 0.0
    assert chat.wrong_solution(ex, random.Random(0)).startswith(f"The {ex['colour']} square appears in")


def test_cli_sft_and_eval_on_count(tmp_path, capsys):
    """mirl sft / eval --task count end to end with the tiny VLM (8 frames: 64 video tokens)."""
    from mirl.cli import main

    s = str(tmp_path / "s")
    assert main(["sft", "--model", "vlm-nano", "--task", "count", "--steps", "1", "--batch-size", "4",
                 "--max-len", "96", "--max-new-tokens", "4", "--eval-n", "4", "--out-dir", s]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["eval", "--model", f"{s}/final", "--task", "count:3", "--n", "4", "--max-new-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == 4 and out["task"] == "count:3"
