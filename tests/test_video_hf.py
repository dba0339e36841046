"""Video through transformers VLMs (models/vision.py: HFVision; models/backends.py: HFBackend): a tiny Qwen2-VL and a
tiny Qwen2.5-VL built here from configs. Their video processor needs torchvision, which does not load beside this
torch, so mirl makes pixel_values_videos and video_grid_thw itself from the image processor; the tests check those
against the video processor's layout by hand, the positions and logits against the model's own forward, cached
generation (rope deltas) against a full forward, batches mixing video and image rows, and a training step."""

import random

import numpy as np
import pytest
import torch
from conftest import _bpe_tokenizer, build_hf_vlm
from PIL import Image

from mirl.data.formats import DataError
from mirl.logps import token_logps
from mirl.models import load_policy
from mirl.models.vision import Video, cat_images
from mirl.rollout import generate
from mirl.rollout.sample import left_pad
from mirl.rollout.score import encode_prompts

TOKENS_PER_SECOND = 2  # Qwen2.5-VL's released configs


def build_qwen2_5_vl(path, seed=0):
    """A tiny Qwen2.5-VL (one vision block, hidden 32; the text model as build_hf_vlm's) with the same tokenizer and
    PIL image processor as the tiny Qwen2-VL."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
    fast = _bpe_tokenizer([*specials, "<|image_pad|>", "<|video_pad|>"])
    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(fast),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
        ),
        vision_config=dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=32,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[0],
            tokens_per_second=TOKENS_PER_SECOND,
        ),
        image_token_id=fast.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=fast.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=fast.convert_tokens_to_ids("<|vision_start|>"),
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(str(path))
    fast.save_pretrained(str(path))
    Qwen2VLImageProcessorPil(
        min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2
    ).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def qwen2_5_vl_dir(tmp_path_factory):
    return build_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl"))


@pytest.fixture(params=["qwen2_vl", "qwen2_5_vl"])
def qwen(request, hf_vlm_dir, qwen2_5_vl_dir):
    return load_policy(hf_vlm_dir if request.param == "qwen2_vl" else qwen2_5_vl_dir)


def _clip(n=5, size=56, seed=0, spacing=0.5):
    """n random RGB frames (size x size) at `spacing` seconds apart (None: no times)."""
    rng = np.random.default_rng(seed)
    frames = tuple(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n))
    return Video(frames, None if spacing is None else tuple(spacing * i for i in range(n)))


def _own_forward(p, ids, attn, inputs):
    """The model's own forward (it computes its M-RoPE positions itself from mm_token_type_ids) -> logits."""
    cfg = p.model.config
    mm = (ids == cfg.image_token_id).int() + 2 * (ids == cfg.video_token_id).int()
    return p.model(input_ids=ids, attention_mask=attn, mm_token_type_ids=mm, **inputs).logits


def test_video_placeholder_has_the_processors_token_count(qwen):
    """5 frames of 56x56: padded to 6 (temporal patch 2) -> t = 3 pairs, h = w = 56 / 14 = 4 patches ->
    3 * 4 * 4 / 2^2 = 12 video tokens between vision_start and vision_end, as the processor's
    video_grid_thw.prod() // merge_size^2. 40x60 frames: smart_resize (factor 28, 784..3136 pixels) -> 28x56 ->
    h = 2, w = 4 -> 3 * 2 * 4 / 4 = 6."""
    p = qwen
    tok = p.tokenizer
    ids, inputs = p.encode_prompt("<video>which way:", [_clip()], "row 1")
    vs, ve, vp = (tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|video_pad|>"))
    assert ids[:14] == [vs] + [vp] * 12 + [ve] and tok.decode(ids[14:]) == "which way:"
    assert inputs["video_grid_thw"].tolist() == [[3, 4, 4]] and "pixel_values" not in inputs
    assert inputs["pixel_values_videos"].shape == (3 * 4 * 4, 3 * 2 * 14 * 14)  # (t * h * w, C * tp * p * p)
    ids, inputs = p.encode_prompt("<video>x", [Video(tuple(f.resize((60, 40)) for f in _clip().frames))])
    assert inputs["video_grid_thw"].tolist() == [[3, 2, 4]] and ids.count(vp) == 6
    # Qwen2.5-VL: seconds per temporal patch = 2 frames / (2 frames per second); no times: Qwen's default 2 fps
    if p.model.config.model_type == "qwen2_5_vl":
        assert inputs["second_per_grid_ts"].tolist() == [1.0]
        assert p.encode_prompt("<video>x", [_clip(spacing=0.25)])[1]["second_per_grid_ts"].tolist() == [0.5]
    else:
        assert "second_per_grid_ts" not in inputs


def _video_patchify(videos, patch_size=14, merge_size=2, temporal_patch_size=2):
    """transformers' Qwen2VLVideoProcessor.patchify (models/qwen2_vl/video_processing_qwen2_vl.py, 5.x), as it is:
    videos (B, F, C, H, W) -> (B, t * h * w, C * tp * p * p); the module imports torchvision, so it is copied."""
    batch_size, num_frames, channel, resized_height, resized_width = videos.shape
    if pad := -num_frames % temporal_patch_size:
        videos = torch.cat((videos, videos[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
        num_frames += pad
    grid_t = num_frames // temporal_patch_size
    grid_h, grid_w = resized_height // patch_size, resized_width // patch_size
    patches = videos.view(batch_size, grid_t, temporal_patch_size, channel, grid_h // merge_size, merge_size,
                          patch_size, grid_w // merge_size, merge_size, patch_size)  # fmt: skip
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return patches.reshape(batch_size, grid_t * grid_h * grid_w, channel * temporal_patch_size * patch_size**2)


def test_video_pixels_are_the_video_processors_layout(hf_vlm_dir):
    """Frames of 56x56 (no resize): rescaled by 1/255, normalised with CLIP's mean and std, padded to 6 frames and
    patchified as the video processor does; a patch holds its two frames in order (swapping them changes it)."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    p = load_policy(hf_vlm_dir)
    clip = _clip(n=5)
    _, inputs = p.encode_prompt("<video>x", [clip])
    a = np.stack([np.asarray(f, dtype=np.float32) / 255.0 for f in clip.frames])  # (F, H, W, C)
    a = (a - np.array(OPENAI_CLIP_MEAN, dtype=np.float32)) / np.array(OPENAI_CLIP_STD, dtype=np.float32)
    by_hand = _video_patchify(torch.from_numpy(a).permute(0, 3, 1, 2)[None])[0]
    assert torch.allclose(inputs["pixel_values_videos"], by_hand, atol=1e-5)
    swapped = Video((clip.frames[1], clip.frames[0], *clip.frames[2:]), clip.times)
    assert not torch.allclose(p.encode_prompt("<video>x", [swapped])[1]["pixel_values_videos"][:16], by_hand[:16])


def test_video_positions_follow_qwens_rule_and_the_models_own_forward(qwen):
    """Prompt + response with a still image and a clip in one row. Up to the clip's end mirl's positions are the
    model's own rope index and its logits the model's own forward (which computes the positions itself). The clip:
    5 frames of 56x56 -> 3 pairs of 2x2 merged patches; Qwen2.5-VL's time axis is start + floor(k * tokens_per_second
    * seconds per pair), k = 0, 1, 2 (0.5 s between frames: 1 s per pair -> steps of 2), Qwen2-VL's k itself. The
    text after the clip starts one past its largest position on any axis, start + 2 steps + 1, as Qwen's original
    code and vLLM's MRotaryEmbedding put it; transformers 5.25 starts it at start + 2 (the clip's height), so from
    there its logits differ. Frame timing changes the logits of Qwen2.5-VL only."""
    p = qwen
    timed = p.model.config.model_type == "qwen2_5_vl"
    img = Image.new("RGB", (56, 56), (200, 30, 30))
    ids, inputs = p.encode_prompt("<image>then <video>which way: left", [img, _clip()], "row 1")
    x = torch.tensor([ids])
    attn = torch.ones_like(x)
    pos, delta = p.backend.positions(p.model, x, attn, inputs, None)
    vid = (x[0] == p.model.config.video_token_id).nonzero()[:, 0]
    start, end = int(pos[0, 0, vid[0]]), int(vid[-1]) + 1
    steps = TOKENS_PER_SECOND * 1 if timed else 1
    assert pos[0, 0, vid].unique().tolist() == [start, start + steps, start + 2 * steps]
    assert pos[1, 0, vid].unique().tolist() == pos[2, 0, vid].unique().tolist() == [start, start + 1]
    after = torch.arange(len(ids) - end) + start + 2 * steps + 1
    assert all(pos[a, 0, end:].tolist() == after.tolist() for a in range(3))
    assert int(delta) == int(after[-1]) + 1 - len(ids)
    ours, own = p(x, attn, images=inputs).logits, _own_forward(p, x, attn, inputs)
    assert torch.allclose(ours[:, :end], own[:, :end], atol=1e-5)
    assert not torch.allclose(ours[:, end:], own[:, end:], atol=1e-5)
    slower = p.encode_prompt("<image>then <video>which way: left", [img, _clip(spacing=2.0)])[1]
    other = p(x, attn, images=slower).logits
    assert torch.allclose(other, ours, atol=1e-6) != timed


def test_mrope_row_by_hand():
    """Qwen's rule, as vLLM computes it: text 1-D; a picture at start + (floor(k x seconds x tokens per second), h, w)
    with the product taken in float64 first (seconds 9.333333, 2 tokens a second: 18.666666 a pair, k = 3 gives
    55.999998 -> 55, where float32 k x seconds x 2 gives 56); text after it at its largest position + 1; an image
    takes time 0; two pictures back to back each start past the other."""
    from mirl.models.backends import mrope_row

    pos = mrope_row([0, 0, 2, 2, 2, 2, 0], {2: iter([(4, 2, 2, 9.333333, 2)])}, 2)
    assert pos[0].tolist() == [0, 1, 2, 20, 39, 57, 58] and pos[1].tolist() == [0, 1, 2, 2, 2, 2, 58]
    pos = mrope_row([1] * 4 + [2] * 2 + [0], {1: iter([(1, 4, 4, 1, 1)]), 2: iter([(2, 2, 2, 1, 1)])}, 2)
    assert pos.tolist() == [[0, 0, 0, 0, 2, 3, 4], [0, 0, 1, 1, 2, 2, 4], [0, 1, 0, 1, 2, 2, 4]]


def test_sampled_logps_equal_a_full_forward_with_video(qwen):
    """Cached generation (video at the prefill, the static cache and M-RoPE deltas after it) and the training forward
    over prompt + response agree. The 8-frame clip with 2 s between frames puts Qwen2.5-VL's time positions 24
    past the clip's start while the clip is only 2 merged patches high: the text after it, and each row's rope
    delta, continue from the largest position (mrope_row)."""
    p = qwen
    examples = [
        {"prompt": "<video>x", "images": [_clip(n=8, spacing=2.0, seed=1)]},
        {"prompt": "1+2=<image>", "images": [Image.new("RGB", (56, 56), (9, 99, 9))]},
        {"prompt": "<video>add:", "images": [_clip(n=3, spacing=None, seed=2)]},
    ]
    prompts, images = encode_prompts(p, examples)
    for static in (True, False):
        torch.manual_seed(0)
        b = generate(p, prompts, max_new_tokens=6, samples_per_prompt=2, temperature=1.0, images=images,
                     static_cache=static)  # fmt: skip
        ids, attn, _ = b.full()
        r = ids.shape[1] - b.prompt_ids.shape[1]
        logits = p(ids, attn, images=b.row_images(range(6))).logits[:, -r - 1 : -1]
        logits[..., p.never_sample] = float("-inf")  # generation never samples an image or video placeholder
        lp = token_logps(logits, ids[:, -r:])
        m = b.response_mask.bool()
        assert torch.allclose(lp[m], b.logps[m], atol=1e-4), static


def test_rows_keep_their_own_video_and_images_in_a_batch(qwen):
    """A row's logits in a batch of video, image, text and image + video rows equal its logits alone, and the model's
    own forward for the rows without video (after a clip the two rope rules differ: the test above)."""
    p = qwen
    img = lambda c: Image.new("RGB", (56, 56), c)  # noqa: E731
    ex = [
        {"prompt": "<video>add:", "images": [_clip(n=4, seed=3)]},
        {"prompt": "<image>add: 3", "images": [img((0, 0, 250))]},
        {"prompt": "add: 12", "images": None},
        {"prompt": "<video> and <image>", "images": [img((250, 0, 0)), _clip(n=6, seed=4, spacing=1.0)]},
    ]
    prompts, images = encode_prompts(p, ex)
    ids, attn = left_pad(prompts, p.tokenizer.pad_token_id)
    batched = cat_images(images)
    assert batched["video_grid_thw"].shape[0] == 2 and batched["image_grid_thw"].shape[0] == 2
    together = p(ids, attn, images=batched).logits
    assert torch.allclose(together[1:3], _own_forward(p, ids, attn, batched)[1:3], atol=1e-5)
    for i in range(4):
        alone = p(torch.tensor([prompts[i]]), torch.ones(1, len(prompts[i]), dtype=torch.long), images=images[i]).logits
        assert torch.allclose(together[i, -1], alone[0, -1], atol=1e-4), i


@pytest.mark.parametrize("recipe", ["sft", "grpo"])
def test_one_step_on_video_with_a_tiny_qwen2_vl(recipe, hf_vlm_dir, tmp_path):
    """sft on video rows and grpo on the motion task's clips take a step with the tiny Qwen2-VL: the vision tower
    (which only the video reaches) changes, and the saved model loads back as a VLM."""
    from mirl.data.tasks import make_task
    from mirl.recipes import grpo, sft
    from mirl.rewards.registry import REWARDS, register_reward

    if "test_alternate" not in REWARDS:

        @register_reward("test_alternate")
        def _alternate(prompts, completions, **_):
            return [float(i % 2 == 0) for i in range(len(completions))]

    policy = load_policy(hf_vlm_dir)
    before = {k: v.detach().clone() for k, v in policy.named_parameters()}
    common = {"out_dir": str(tmp_path / recipe), "threads": 1, "seed": 0, "report": False}
    if recipe == "sft":
        data = [
            {"prompt": "<video>which way:", "completion": random.Random(i).choice(["left", "right"]),
             "images": [_clip(n=4, seed=i)]}
            for i in range(4)
        ]  # fmt: skip
        sft.train(sft.Config(steps=1, batch_size=4, max_len=96, eval_n=0, task="", **common), model=policy, data=data)
    else:
        assert isinstance(make_task("motion").examples("train", 1)[0]["images"][0], Video)
        grpo.train(
            grpo.Config(task="motion", steps=1, group_size=2, prompts_per_step=2, max_new_tokens=4, eval_n=2,
                        max_len=96, reward="test_alternate", **common),
            model=policy,
        )  # fmt: skip
    changed = {k for k, v in policy.named_parameters() if not torch.equal(v, before[k])}
    assert any("visual" in k for k in changed), sorted(changed)[:5]
    assert any("visual" not in k for k in changed)
    back = load_policy(tmp_path / recipe / "final")
    assert back.is_vlm and back.mrope


@pytest.mark.parametrize("recipe", ["dpo", "ppo", "online", "distill"])
def test_the_other_recipes_take_a_step_on_video_with_a_tiny_qwen2_vl(recipe, hf_vlm_dir, tmp_path):
    """mio on preference pairs of the motion task's clips, ppo, online and distill (a second tiny Qwen2-VL as the
    teacher) on the motion task take a step with the tiny Qwen2-VL, and the vision tower changes with the rest."""
    from mirl.data.tasks import make_task
    from mirl.recipes import distill, online, ppo, preference
    from mirl.rewards.registry import REWARDS, register_reward

    if "test_alternate" not in REWARDS:

        @register_reward("test_alternate")
        def _alternate(prompts, completions, **_):
            return [float(i % 2 == 0) for i in range(len(completions))]

    policy = load_policy(hf_vlm_dir)
    before = {k: v.detach().clone() for k, v in policy.named_parameters()}
    common = {"out_dir": str(tmp_path / recipe), "threads": 1, "seed": 0, "report": False}
    rl = {"task": "motion", "steps": 1, "prompts_per_step": 2, "max_new_tokens": 4, "eval_n": 2, "max_len": 96}
    if recipe == "dpo":
        task = make_task("motion")
        pairs = [
            {"prompt": e["prompt"], "chosen": e["solution"], "rejected": task.wrong_solution(e, random.Random(i)),
             "images": e["images"]}
            for i, e in enumerate(task.examples("train", 4))
        ]  # fmt: skip
        preference.train(preference.Config(loss="mio", steps=1, batch_size=4, max_len=96, eval_n=0, task="", **common),
                         model=policy, data=pairs)  # fmt: skip
    elif recipe == "ppo":
        ppo.train(ppo.Config(samples_per_prompt=2, **rl, **common), model=policy)
    elif recipe == "online":
        res = online.train(online.Config(k=2, reward="test_alternate", loss="mio", **rl, **common), model=policy)
        assert res.summary["groups"]["used"] == 2
    else:
        teacher = build_hf_vlm(tmp_path / "teacher", seed=1)
        distill.train(distill.Config(teacher=str(teacher), **rl, **common), model=policy)
    changed = {k for k, v in policy.named_parameters() if not torch.equal(v, before[k])}
    assert any("visual" in k for k in changed), (recipe, sorted(changed)[:5])
    assert any("visual" not in k for k in changed)


def test_eval_on_motion_with_a_tiny_qwen2_vl(hf_vlm_dir, capsys):
    """mirl eval --task motion through the CLI: the clips reach the tiny Qwen2-VL and every row is scored."""
    import json

    from mirl.cli import main

    capsys.readouterr()
    argv = ["eval", "--model", str(hf_vlm_dir), "--task", "motion:2", "--n", "4", "--max-new-tokens", "4"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == 4 and out["task"] == "motion:2"


def test_vllm_request_for_a_video_row():
    """engine.vllm_multi_modal_data (no vLLM needed): a row's still images stay PIL images under "image" and its
    clips become (T, H, W, 3) uint8 frame arrays under "video", frames in order, with metadata naming every frame
    (nothing for vLLM to resample) and the frames' own rate; a clip without times: Qwen's 2 fps."""
    from mirl.rollout.engine import vllm_multi_modal_data

    img = Image.new("RGB", (56, 56), (200, 30, 30))
    clip = _clip(n=5, spacing=0.25)
    mm = vllm_multi_modal_data([img, clip, _clip(n=3, size=28, spacing=None)])
    assert mm["image"] == [img] and len(mm["video"]) == 2
    (frames, meta), (frames2, meta2) = mm["video"]
    assert frames.shape == (5, 56, 56, 3) and frames.dtype == np.uint8 and frames2.shape == (3, 28, 28, 3)
    assert np.array_equal(frames[3], np.asarray(clip.frames[3]))
    assert meta["fps"] == 4.0 and meta["frames_indices"] == [0, 1, 2, 3, 4] and meta["total_num_frames"] == 5
    assert not meta["do_sample_frames"] and meta2["fps"] == 2.0
    assert "image" not in vllm_multi_modal_data([clip]) and "video" not in vllm_multi_modal_data([img])


def test_bad_video_for_a_transformers_vlm_names_the_row(hf_vlm_dir, llava_dir, tmp_path):
    """Too long for the context, no frames, frames of two sizes, and a model that takes no video."""
    short = load_policy(build_hf_vlm(tmp_path / "short", max_position_embeddings=24))
    with pytest.raises(DataError, match=r"row 4: the prompt with its video tokens is \d+ tokens \(8 frames at 56x56\) "
                                        r"but the model's context is 24: lower --video-max-frames"):  # fmt: skip
        short.encode_prompt("<video>which way:", [_clip(n=8)], "row 4")
    p = load_policy(hf_vlm_dir)
    with pytest.raises(DataError, match="row 5 video 0: the video has no frames"):
        p.encode_prompt("<video>x", [Video(())], "row 5")
    mixed = Video((_clip().frames[0], _clip(size=28).frames[0]))
    with pytest.raises(DataError, match="row 6 video 0: the frames differ in size"):
        p.encode_prompt("<video>x", [mixed], "row 6")
    with pytest.raises(DataError, match=r"row 7: the row has a video, and this model \(llava\) takes images only"):
        load_policy(llava_dir).encode_prompt("<video>x", [_clip()], "row 7")
