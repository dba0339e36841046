"""Image + text: the tiny VLM, transformers VLMs (Qwen2-VL, LLaVA) behind the Policy, image data, visual
tasks, the IoU reward, NoisyRollout, bad input, and one training step of every recipe on a tiny HF VLM."""

import json

import pytest
import torch
from PIL import Image

from mirl.data.formats import DataError, completion_records, load_rows, prompt_records
from mirl.data.tasks import make_task
from mirl.logps import token_logps
from mirl.models import load_policy
from mirl.models.vision import cat_images, perturb
from mirl.rewards.registry import REWARDS, register_reward
from mirl.rollout import generate
from mirl.rollout.score import encode_prompts

if "test_alternate" not in REWARDS:

    @register_reward("test_alternate")
    def _alternate(prompts, completions, **_):
        """1, 0, 1, 0, ...: every group of an even size has a positive and a negative."""
        return [float(i % 2 == 0) for i in range(len(completions))]


def _img(colour=(200, 30, 30), size=32):
    return Image.new("RGB", (size, size), colour)


@pytest.fixture(params=["tiny", "qwen2_vl", "llava"])
def any_vlm(request, hf_vlm_dir, llava_dir):
    if request.param == "tiny":
        return load_policy("vlm-nano", seed=0)
    return load_policy(hf_vlm_dir if request.param == "qwen2_vl" else llava_dir)


def test_tiny_vlm_placeholders_become_image_tokens_and_save_load_roundtrip(tmp_path):
    p = load_policy("vlm-nano", seed=0)
    ids, img = p.encode_prompt("<image>add:", [_img()])
    n = p.model.config.n_image_tokens
    assert n == 16 and ids[0] == p.tokenizer.bos_token_id
    assert ids[1 : 1 + n] == [p.tokenizer.image_token_id] * n and p.tokenizer.decode(ids) == "add:"
    assert img["pixel_values"].shape == (1, 3, 32, 32)
    # no placeholder: the image goes first (TRL's convention)
    assert p.encode_prompt("add:", [_img()])[0] == ids
    x = torch.tensor([ids])
    before = p(x, torch.ones_like(x), images=img).logits
    p.save(tmp_path / "m")
    q = load_policy(tmp_path / "m")
    assert q.is_vlm and torch.allclose(q(x, torch.ones_like(x), images=img).logits, before)
    # the image changes the prediction (it is really read)
    other = p(x, torch.ones_like(x), images=p.encode_prompt("add:", [_img((0, 0, 255))])[1]).logits
    assert not torch.allclose(other[:, -1], before[:, -1])


def test_std_presets_standardise_each_image(tmp_path):
    """pixel_norm 'image' (the -std presets): the features are those of the image at mean 0 and std 1, so a
    change of brightness and contrast (a * x + b, a > 0) changes nothing; without it, it does. A saved folder
    keeps the setting, and a config.json from before the field loads as 'none'."""
    x = torch.rand(2, 3, 32, 32) * 0.2
    std, plain = load_policy("vlm-nano-std", seed=0).model, load_policy("vlm-nano", seed=0).model
    assert std.config.pixel_norm == "image" and plain.config.pixel_norm == "none"
    by_hand = (x - x.mean((1, 2, 3), keepdim=True)) / (x.std((1, 2, 3), keepdim=True, unbiased=False) + 1e-5)
    with torch.no_grad():
        assert torch.allclose(std.image_features(x), plain.image_features(by_hand), atol=1e-5)
        assert torch.allclose(std.image_features(x), std.image_features(3 * x + 0.1), atol=1e-4)
        assert not torch.allclose(plain.image_features(x), plain.image_features(3 * x + 0.1), atol=1e-3)
    p = load_policy("vlm-nano-std", seed=0)
    p.save(tmp_path / "m")
    assert load_policy(tmp_path / "m").model.config.pixel_norm == "image"
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["pixel_norm"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert load_policy(tmp_path / "m").model.config.pixel_norm == "none"


def test_sampled_logps_equal_a_full_forward_with_images(any_vlm):
    """Cached generation (images at the prefill, M-RoPE deltas after it for Qwen2-VL) and the training
    forward over prompt + response agree; two prompts with different images, repeated G = 3 times."""
    p = any_vlm
    examples = [{"prompt": "<image>add:", "images": [_img()]}, {"prompt": "1+2=<image>", "images": [_img((9, 99, 9))]}]
    prompts, images = encode_prompts(p, examples)
    torch.manual_seed(0)
    b = generate(p, prompts, max_new_tokens=6, samples_per_prompt=3, temperature=1.0, images=images)
    assert len(b.images) == 6 and b.images[0] is b.images[2] and b.images[3] is b.images[5]
    ids, attn, _ = b.full()
    r = ids.shape[1] - b.prompt_ids.shape[1]
    logits = p(ids, attn, images=b.row_images(range(6))).logits[:, -r - 1 : -1]
    logits[..., p.never_sample] = float("-inf")  # generation never samples an image placeholder
    lp = token_logps(logits, ids[:, -r:])
    m = b.response_mask.bool()
    assert torch.allclose(lp[m], b.logps[m], atol=1e-4)


def test_rows_keep_their_own_images_in_a_batch(any_vlm):
    """A row's logits in a batch equal its logits alone: pixels stay aligned with their prompt."""
    p = any_vlm
    ex = [
        {"prompt": "<image>add:", "images": [_img((250, 0, 0))]},
        {"prompt": "add: 12", "images": None},
        {"prompt": "<image>add: 3", "images": [_img((0, 0, 250))]},
    ]
    prompts, images = encode_prompts(p, ex)
    from mirl.rollout.sample import left_pad

    ids, attn = left_pad(prompts, p.tokenizer.pad_token_id)
    together = p(ids, attn, images=cat_images(images)).logits
    for i in range(3):
        alone = p(torch.tensor([prompts[i]]), torch.ones(1, len(prompts[i]), dtype=torch.long), images=images[i]).logits
        assert torch.allclose(together[i, -1], alone[0, -1], atol=1e-4)


def test_bad_images_are_clear_errors_naming_the_row(tmp_path):
    p = load_policy("vlm-nano", seed=0)
    good = tmp_path / "ok.png"
    _img().save(good)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    rows = [
        {"prompt": "a", "completion": "b", "images": ["ok.png"]},
        {"prompt": "a", "completion": "b", "images": ["missing.png"]},
    ]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"d\.jsonl:2.*missing\.png does not exist"):
        completion_records(load_rows(f), p.tokenizer)
    f.write_text(json.dumps({"prompt": "a", "completion": "b", "image": "broken.png"}))
    with pytest.raises(DataError, match=r"d\.jsonl:1.*unreadable image"):
        completion_records(load_rows(f), p.tokenizer)
    with pytest.raises(DataError, match="row 7 image 0: image is 20x20 pixels but this model takes 32x32"):
        p.encode_prompt("<image>x", [_img(size=20)], "row 7")
    with pytest.raises(DataError, match="row 8 image 0: image mode 'CMYK' is not supported"):
        p.encode_prompt("<image>x", [Image.new("CMYK", (32, 32))], "row 8")
    with pytest.raises(DataError, match="row 9: the prompt has 2 image placeholder.*1 image"):
        p.encode_prompt("<image><image>x", [_img()], "row 9")
    with pytest.raises(DataError, match="row 10: the prompt has 1 image placeholder.*no images"):
        p.encode_prompt("<image>x", None, "row 10")
    with pytest.raises(DataError, match="row 11: the row has 1 image.*text-only"):
        load_policy("gpt-nano").encode_prompt("x", [_img()], "row 11")
    from mirl.data.collate import encode_example
    from mirl.data.formats import SkipCounter

    with pytest.raises(DataError, match="row 12: the prompt with its image tokens is 19 tokens.*max_len 16"):
        encode_example(p, "<image>ab", "c", 16, SkipCounter(), "row 12", images=[_img()])


def test_image_columns_from_jsonl_parquet_datasets_and_messages(tmp_path):
    import datasets

    p = load_policy("vlm-nano", seed=0)
    _img().save(tmp_path / "a.png")
    rows = [{"prompt": "<image>count:", "answer": "1", "images": ["a.png"]}]
    (tmp_path / "p.jsonl").write_text(json.dumps(rows[0]))
    recs = prompt_records(load_rows(tmp_path / "p.jsonl"), p.tokenizer)
    assert recs[0]["images"][0].size == (32, 32) and recs[0]["answer"] == "1"
    ds = datasets.Dataset.from_dict(
        {"prompt": ["count:"], "answer": ["1"], "image": [_img()]},
        features=datasets.Features(
            {"prompt": datasets.Value("string"), "answer": datasets.Value("string"), "image": datasets.Image()}
        ),
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    ds.to_parquet(str(tmp_path / "p.parquet"))
    for src in (tmp_path / "ds", tmp_path / "p.parquet"):
        recs = prompt_records(load_rows(src), p.tokenizer)
        assert len(recs[0]["images"]) == 1 and "image" not in recs[0]
        assert p.encode_prompt(recs[0]["prompt"], recs[0]["images"])[1]["pixel_values"].shape == (1, 3, 32, 32)
    msgs = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "count:"}]},
            {"role": "assistant", "content": "1"},
        ],
        "images": ["a.png"],
    }
    (tmp_path / "m.jsonl").write_text(json.dumps(msgs))
    rec = completion_records(load_rows(tmp_path / "m.jsonl"), p.tokenizer)[0]
    assert rec["prompt"] == "user: <image>count:\nassistant: " and rec["completion"] == "1"
    # a video part: the '<video>' placeholder, for the row's video column (2 frames as an array)
    msgs["messages"][0]["content"][0] = {"type": "video"}
    video = {"messages": msgs["messages"], "video": [[[[0, 0, 0]] * 32] * 32] * 2}  # (2, 32, 32, 3) black frames
    (tmp_path / "v.jsonl").write_text(json.dumps(video))
    rec = completion_records(load_rows(tmp_path / "v.jsonl"), p.tokenizer)[0]
    assert rec["prompt"] == "user: <video>count:\nassistant: " and len(rec["images"][-1]) == 2
    assert p.encode_prompt(rec["prompt"], rec["images"])[1]["frame_index"].tolist() == [0, 1]


def test_visual_tasks_are_deterministic_verified_and_split():
    for name in ("digits", "shapes", "grounding", "grounding:pair"):
        t = make_task(name)
        a, b = t.examples("train", 20, 3), t.examples("train", 20, 3)
        assert [x["solution"] for x in a] == [x["solution"] for x in b]
        assert list(a[0]["images"][0].getdata()) == list(b[0]["images"][0].getdata())
        assert all(t.score(x["solution"], x) == 1.0 for x in a)
        assert all(x["images"][0].size == (32, 32) for x in a)
    d = make_task("digits")
    train_scans = {s for x in d.examples("train", 300) for s in x["scans"]}
    test_scans = {s for x in d.examples("test", 300) for s in x["scans"]}
    assert train_scans and test_scans and not train_scans & test_scans
    ex = d.examples("train", 1)[0]
    assert d.score(f"{ex['digits'][0]}+{ex['digits'][1]}=99|99", ex) == float(ex["answer"] == "99")
    g = make_task("grounding")
    ex = g.examples("test", 1)[0]
    x1, y1, x2, y2 = ex["box"]
    assert g.score(f"[{x1},{y1},{x2},{(y1 + y2) / 2}]", ex) == pytest.approx(0.5)
    assert g.score("no box", ex) == 0.0
    # `grounding`: the colour alone names the target; `grounding:pair` has scenes that need both words
    for ex in g.examples("train", 200):
        assert len({s["colour"] for s in ex["shapes"]}) == len(ex["shapes"])
    pair = make_task("grounding:pair").examples("train", 200)
    assert all(len({(s["colour"], s["kind"]) for s in ex["shapes"]}) == len(ex["shapes"]) for ex in pair)
    assert any(len({s["colour"] for s in ex["shapes"]}) < len(ex["shapes"]) for ex in pair)
    with pytest.raises(ValueError, match="colour' or 'pair"):
        make_task("grounding:kind")


def test_grounding_breakdown_by_hand():
    shapes = [
        {"kind": "circle", "colour": "red", "box": [0, 0, 4, 4]},
        {"kind": "square", "colour": "blue", "box": [10, 10, 14, 14]},
    ]
    ex = {"box": [0, 0, 4, 4], "shapes": shapes}
    # on the target with IoU 1/2 ([0,0,4,2]: 8 of 16), on the target exactly, on the other shape,
    # on no shape, no box at all
    outs = ["[0,0,4,2]", "[0,0,4,4]", "[10,10,13,13]", "[20,20,25,25]", "none"]
    d = make_task("grounding").breakdown(outs, [ex] * 5)
    assert d == {
        "boxes/on_target": pytest.approx(0.4),
        "boxes/on_other": pytest.approx(0.2),
        "boxes/off_shapes": pytest.approx(0.2),
        "boxes/no_box": pytest.approx(0.2),
        "boxes/iou_on_target": pytest.approx(0.75),
    }


def test_iou_reward_by_hand():
    import mirl.rewards  # noqa: F401

    iou = REWARDS["iou"]  # registered by mirl.rewards
    # [0,0,2,2] vs [1,0,3,2]: intersection 2, union 6; swapped corners are put in order; missing box = 0
    out = iou(
        ["q"] * 4,
        ["[0,0,2,2]", "box (2, 2, 0, 0)", "none", "[0,0,1,1]"],
        box=[[1, 0, 3, 2], [1, 0, 3, 2], [0, 0, 1, 1], None],
    )
    assert out == [pytest.approx(1 / 3), pytest.approx(1 / 3), 0.0, None]


def test_noisy_rollout_perturbs_part_of_each_group_and_anneals():
    import random

    from mirl.rollout.groups import NoisyRollout
    from mirl.rollout.score import noisy_sample_images

    img = _img((120, 60, 30))
    assert perturb(img, 0.0, random.Random(0)) is img
    noisy = perturb(img, 1.0, random.Random(0))
    assert noisy.size == img.size and list(noisy.getdata()) != list(img.getdata())
    p = load_policy("vlm-nano", seed=0)
    clean_inputs = p.encode_prompt("<image>x", [img])[1]
    rows = noisy_sample_images(
        p, [{"prompt": "<image>x", "images": [img]}], [clean_inputs], 4, 2, 0.8, random.Random(0)
    )
    clean = clean_inputs["pixel_values"]
    same = [torch.equal(r["pixel_values"], clean) for r in rows]
    assert same == [True, True, False, False]
    noise = NoisyRollout(rows=2, strength=0.6, anneal_steps=100)
    assert [noise.strength_at(s) for s in (0, 50, 100)] == pytest.approx([0.6, 0.3, 0.0])


def test_noise_only_perturbation_keeps_positions_and_crop_moves_them():
    """Grounding needs noise without crop: a bright square must stay where it was."""
    import random

    import numpy as np
    from PIL import Image

    a = np.zeros((32, 32, 3), dtype=np.uint8)
    a[2:8, 2:8] = 255  # a square in the top-left corner
    img = Image.fromarray(a)
    moved = 0
    for seed in range(5):
        noise = np.asarray(perturb(img, 0.5, random.Random(seed), ("noise",)), dtype=np.float32)
        assert noise[2:8, 2:8].mean() > 200 and noise[12:, 12:].mean() < 40  # same place, pixels changed
        assert not np.array_equal(noise.astype(np.uint8), a)
        crop = np.asarray(perturb(img, 1.0, random.Random(seed), ("crop",)), dtype=np.float32)
        moved += int(np.abs(crop - a).mean() > 1.0)  # no noise, but the square moved or grew
    assert moved >= 4
    with pytest.raises(ValueError, match="unknown perturbation 'blur'"):
        perturb(img, 0.5, random.Random(0), ("blur",))


def test_freeze_vision_keeps_the_tower_and_trains_the_rest(tmp_path):
    from mirl.recipes import sft

    p = load_policy("vlm-nano", seed=0)
    tower = p.model.vision[0].weight.detach().clone()
    proj = p.model.projector[0].weight.detach().clone()
    sft.train(
        sft.Config(
            task="digits",
            n_train=32,
            steps=2,
            batch_size=8,
            max_len=48,
            eval_n=0,
            freeze_vision=True,
            out_dir=str(tmp_path / "s"),
            threads=1,
        ),
        model=p,
    )
    assert torch.equal(p.model.vision[0].weight, tower) and not torch.equal(p.model.projector[0].weight, proj)


def test_sft_teaches_the_tiny_vlm_to_read_digits(tmp_path):
    """Learning: 150 SFT steps take held-out digit-sum accuracy (200 distinct image pairs) from 0 (an untrained
    model writes no sum) to, over seeds 0-3 (AMD EPYC, AVX2, 2026-12-03): 0.485, 0.260, 0.595, 0.470. Asserted:
    half the smallest, 0.13 (the standard error of a 200-prompt accuracy is about 0.035)."""
    from mirl.recipes import sft

    res = sft.train(
        sft.Config(
            model="vlm-nano",
            task="digits",
            n_train=5000,
            steps=150,
            warmup_steps=10,
            max_len=48,
            eval_n=200,
            max_new_tokens=12,
            out_dir=str(tmp_path / "s"),
        )
    )
    assert res.summary["eval"]["accuracy"] >= 0.13, res.summary["eval"]


@pytest.mark.parametrize("recipe", ["sft", "dpo", "online", "grpo", "grpo_noisy", "ppo", "rm"])
def test_one_step_of_every_recipe_on_a_tiny_transformers_vlm(recipe, hf_vlm_dir, tmp_path):
    """Each recipe runs a training step on image + text data with the tiny Qwen2-VL, changes the weights,
    and saves a model that loads back as a VLM."""
    from mirl.recipes import grpo, online, ppo, preference, reward_model, sft

    policy = load_policy(hf_vlm_dir)
    before = {k: v.detach().clone() for k, v in policy.named_parameters()}
    out = str(tmp_path / recipe)
    common = {"out_dir": out, "threads": 1, "seed": 0}
    task = make_task("digits")
    if recipe == "sft":
        data = [
            {"prompt": e["prompt"], "completion": e["solution"], "images": e["images"]}
            for e in task.examples("train", 4)
        ]
        sft.train(sft.Config(steps=1, batch_size=4, max_len=96, eval_n=0, task="", **common), model=policy, data=data)
    elif recipe == "dpo":
        data = [
            {"prompt": e["prompt"], "chosen": e["solution"], "rejected": "1+1=2|2", "images": e["images"]}
            for e in task.examples("train", 4)
        ]
        preference.train(
            preference.Config(loss="mio", steps=1, batch_size=4, max_len=96, eval_n=0, task="", **common),
            model=policy,
            data=data,
        )
    elif recipe in ("grpo", "grpo_noisy"):
        extra = {"noisy_rollout": 0.5, "num_iterations": 2} if recipe == "grpo_noisy" else {}
        grpo.train(
            grpo.Config(
                task="digits",
                steps=1,
                group_size=2,
                prompts_per_step=2,
                max_new_tokens=4,
                eval_n=2,
                max_len=96,
                reward="test_alternate",
                **extra,
                **common,
            ),
            model=policy,
        )
    elif recipe == "online":
        res = online.train(
            online.Config(
                task="digits",
                steps=1,
                k=2,
                prompts_per_step=2,
                max_new_tokens=4,
                eval_n=0,
                reward="test_alternate",
                loss="mio",
                max_len=96,
                **common,
            ),
            model=policy,
        )
        assert res.summary["groups"]["used"] == 2
    elif recipe == "ppo":
        ppo.train(
            ppo.Config(
                task="digits",
                steps=1,
                samples_per_prompt=2,
                prompts_per_step=2,
                max_new_tokens=4,
                eval_n=0,
                max_len=96,
                **common,
            ),
            model=policy,
        )
    else:
        data = [
            {"prompt": e["prompt"], "chosen": e["solution"], "rejected": "1+1=2|2", "images": e["images"]}
            for e in task.examples("train", 8)
        ]
        reward_model.train(
            reward_model.Config(steps=1, batch_size=4, max_len=96, task="", **common),
            model=policy,
            data=data,
            eval_data=data[:4],
        )
    changed = [k for k, v in policy.named_parameters() if not torch.equal(v, before[k])]
    assert changed, f"{recipe}: no parameter changed"
    if recipe not in ("rm",):
        back = load_policy(f"{out}/final")
        assert back.is_vlm and back.mrope


def test_cli_grpo_and_eval_on_images(tmp_path, capsys):
    from mirl.cli import main

    assert (
        main(
            [
                "sft",
                "--model",
                "vlm-nano",
                "--task",
                "digits",
                "--steps",
                "2",
                "--batch-size",
                "4",
                "--max-len",
                "48",
                "--eval-n",
                "4",
                "--max-new-tokens",
                "6",
                "--out-dir",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "grpo",
                "--model",
                str(tmp_path / "s/final"),
                "--task",
                "grounding",
                "--reward",
                "iou",
                "--steps",
                "1",
                "--group-size",
                "2",
                "--prompts-per-step",
                "2",
                "--max-new-tokens",
                "6",
                "--noisy-rollout",
                "0.5",
                "--eval-n",
                "4",
                "--out-dir",
                str(tmp_path / "g"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(["eval", "--model", str(tmp_path / "g/final"), "--task", "grounding", "--n", "4", "--max-new-tokens", "6"])
        == 0
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == 4 and 0.0 <= out["mean_score"] <= 1.0
    where = ("on_target", "on_other", "off_shapes", "no_box")
    assert sum(out[f"boxes/{k}"] for k in where) == pytest.approx(1.0)
