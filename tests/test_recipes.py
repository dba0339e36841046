"""Recipes run for real on the tiny GPT: pinned first losses, every parameter moves, exact resume,
gradient accumulation equals a large batch, and learning above a stated level."""

import math

import pytest
import torch
from safetensors.torch import load_file

from mirl.logging import read_metrics
from mirl.models import load_policy
from mirl.recipes import preference, sft

PAIRS = [
    {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1 + (a % 3))}
    for a in range(10)
    for b in range(10)
]


def pcfg(tmp_path, **kw):
    base = dict(
        task="",
        steps=6,
        batch_size=8,
        lr=1e-3,
        warmup_steps=0,
        eval_n=0,
        max_len=24,
        threads=1,
        out_dir=str(tmp_path / "pref"),
    )
    base.update(kw)
    return preference.Config(**base)


@pytest.mark.parametrize("loss,first", [("dpo", math.log(2)), ("mio", math.log(4)), ("ipo", 1.0)])
@pytest.mark.parametrize("ref_mode", ["precompute", "model"])
def test_first_preference_loss_is_the_value_at_reference(tmp_path, loss, first, ref_mode):
    # at step 0 the policy is the reference: DPO = ln 2, MIO = ln 4, IPO = (0 - 1/(2 beta))^2 = 1 at beta 0.5
    res = preference.train(pcfg(tmp_path, loss=loss, ref_mode=ref_mode, beta=0.5), data=PAIRS)
    assert res.history[0]["loss"] == pytest.approx(first, abs=1e-6)
    assert res.history[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_every_parameter_changes_and_preference_is_learned(tmp_path):
    model = load_policy("gpt-nano", seed=0)
    before = {k: v.clone() for k, v in model.named_parameters()}
    # from scratch, DPO separates these pairs within 80 steps (MIO, whose chosen term saturates at
    # T_w = ln 2, needs far longer here: every rejected answer is another prompt's chosen one)
    res = preference.train(
        pcfg(tmp_path, loss="dpo", beta=0.5, steps=80, lr=3e-3, batch_size=16), model=model, data=PAIRS
    )
    for k, v in res.model.named_parameters():
        assert not torch.equal(before[k], v), f"{k} did not change"
    last = res.history[-10:]
    assert sum(h["rewards/accuracies"] for h in last) / 10 > 0.85
    assert sum(h["loss"] for h in last) / 10 < 0.5  # from ln 2 = 0.693
    metrics = read_metrics(tmp_path / "pref")
    for key in (
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "logps/chosen",
        "logps/rejected",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "mi",
    ):
        assert key in metrics[0], key
    assert (tmp_path / "pref" / "final" / "model.safetensors").exists()
    assert list((tmp_path / "pref" / "tb").iterdir())


@pytest.mark.parametrize(
    "loss,first",
    [
        ("hinge", 1.0),  # relu(1 - 0)
        ("robust", math.log(2)),  # ((1 - e) ln 2 - e ln 2) / (1 - 2e) = ln 2
        ("nwj", math.exp(-1)),  # -(0 - (e^-1 + e^-1) / 2)
        ("infonce", 0.0),  # -0 + log(2) - log 2
        ("group_js", math.log(4)),  # a pair as a group of two is MIO
        ("group_dv", 0.0),  # DPO - ln 2
        ("simpo", None),
        ("dpo:1,sft:0.5", None),  # depend on the policy's own log-probs
    ],
)
def test_other_losses_train(tmp_path, loss, first):
    model = load_policy("gpt-nano", seed=0)
    before = [p.clone() for p in model.parameters()]
    res = preference.train(pcfg(tmp_path, loss=loss, steps=5, beta=0.5), model=model, data=PAIRS)
    if first is not None:
        assert res.history[0]["loss"] == pytest.approx(first, abs=1e-6)
    assert all(math.isfinite(h["loss"]) for h in res.history)
    assert all(not torch.equal(a, b) for a, b in zip(before, res.model.parameters()))


def test_preference_resume_equals_uninterrupted(tmp_path):
    full = preference.train(pcfg(tmp_path, out_dir=str(tmp_path / "a"), loss="mio", steps=6), data=PAIRS)
    preference.train(
        pcfg(tmp_path, out_dir=str(tmp_path / "b"), loss="mio", steps=6, save_every=3, stop_at_step=3), data=PAIRS
    )
    resumed = preference.train(
        pcfg(tmp_path, out_dir=str(tmp_path / "b"), loss="mio", steps=6, resume=True), data=PAIRS
    )
    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    for a, b in zip(full.history[3:], resumed.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7)
    logged = [m["loss"] for m in read_metrics(tmp_path / "b")]
    assert logged == pytest.approx([h["loss"] for h in full.history], rel=1e-6, abs=1e-7)


def test_sft_resume_equals_uninterrupted(tmp_path):
    kw = dict(task="arith:2", n_train=200, steps=6, batch_size=8, eval_n=0, threads=1, warmup_steps=2)
    full = sft.train(sft.Config(out_dir=str(tmp_path / "a"), **kw))
    sft.train(sft.Config(out_dir=str(tmp_path / "b"), save_every=2, stop_at_step=4, **kw))
    resumed = sft.train(sft.Config(out_dir=str(tmp_path / "b"), resume=True, **kw))
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history[4:]], rel=1e-6)


@pytest.mark.parametrize("recipe", ["sft", "preference"])
def test_grad_accumulation_4x2_equals_1x8(tmp_path, recipe):
    params = []
    for accum, bs in ((4, 2), (1, 8)):
        if recipe == "sft":
            res = sft.train(
                sft.Config(
                    task="arith:2",
                    n_train=64,
                    steps=3,
                    batch_size=bs,
                    grad_accum=accum,
                    eval_n=0,
                    threads=1,
                    out_dir=str(tmp_path / f"s{accum}"),
                )
            )
        else:
            res = preference.train(
                pcfg(tmp_path, batch_size=bs, grad_accum=accum, steps=3, out_dir=str(tmp_path / f"p{accum}")),
                data=PAIRS,
            )
        params.append(torch.cat([p.detach().flatten() for p in res.model.parameters()]))
        first = (res.history[0]["loss"], res.history[0]["grad_norm"])
        if accum == 4:
            first_accum = first
    # loss and gradient norm are scale-sensitive (Adam's update is not): they catch a wrong normaliser
    assert first == pytest.approx(first_accum, rel=1e-5)
    # parameters after 3 Adam steps: float noise on near-zero gradients can flip a few updates of size lr
    torch.testing.assert_close(params[0], params[1], atol=1e-4, rtol=1e-4)


def test_chosen_decline_warning(tmp_path, capsys):
    # a large lr with DPO pushes the chosen log-prob down while the margin grows: the recipe must say so
    res = preference.train(pcfg(tmp_path, loss="dpo", steps=30, lr=1e-2, beta=0.5, chosen_drop_warn=1.0), data=PAIRS)
    drop = res.history[0]["logps/chosen"] - min(h["logps/chosen"] for h in res.history)
    assert drop > 1.0 and res.history[-1]["rewards/margins"] > res.history[0]["rewards/margins"]
    assert res.summary["warned_chosen_decline"] is True
    assert "likelihood-decline" in capsys.readouterr().err


def test_recipes_on_a_transformers_model(tmp_path, hf_tiny_dir):
    # the same recipes drive a transformers model through the Policy interface; the result loads back
    from transformers import AutoModelForCausalLM

    model = load_policy(hf_tiny_dir)
    before = [p.clone() for p in model.parameters()]
    data = [{"prompt": "1+2=", "completion": "3"}, {"prompt": "2+2=", "completion": "4"}]
    res = sft.train(
        sft.Config(task="", steps=2, batch_size=2, eval_n=0, threads=1, out_dir=str(tmp_path / "s")),
        model=model,
        data=data,
    )
    assert all(not torch.equal(a, b) for a, b in zip(before, res.model.parameters()))
    pref = preference.train(pcfg(tmp_path, loss="mio", steps=2, batch_size=4), model=res.model, data=PAIRS[:8])
    assert pref.history[0]["loss"] == pytest.approx(math.log(4), abs=1e-6)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "pref" / "final")
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(back(ids).logits, pref.model(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["tiny", "hf"])
def test_activation_checkpointing_and_bf16(tmp_path, which, hf_tiny_dir):
    """Checkpointing recomputes the same numbers (same losses); bf16 autocast stays close to float32."""
    model = "gpt-nano" if which == "tiny" else str(hf_tiny_dir)
    runs = {}
    for name, opts in {"fp32": {}, "ckpt": {"activation_checkpointing": True}, "bf16": {"bf16": True}}.items():
        res = preference.train(
            pcfg(tmp_path, model=model, loss="dpo", steps=3, out_dir=str(tmp_path / name), **opts), data=PAIRS
        )
        runs[name] = [h["loss"] for h in res.history]
    assert runs["ckpt"] == pytest.approx(runs["fp32"], rel=1e-5)
    assert runs["bf16"] == pytest.approx(runs["fp32"], abs=0.05)
    assert runs["bf16"] != runs["fp32"]  # autocast really ran in bf16


def test_compile_blocks_gives_the_eager_losses(tmp_path):
    """--compile compiles each block in place: the same losses as eager, the same checkpoint keys."""
    runs = {}
    for flag in (False, True):
        res = sft.train(
            sft.Config(
                task="arith",
                steps=2,
                batch_size=8,
                eval_n=0,
                threads=1,
                report=False,
                compile=flag,
                out_dir=str(tmp_path / str(flag)),
            )
        )
        runs[flag] = [h["loss"] for h in res.history]
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)
    keys = {flag: set(load_file(str(tmp_path / str(flag) / "final" / "model.safetensors"))) for flag in runs}
    assert keys[True] == keys[False]


def test_the_options_recipes_share_are_declared_alike():
    """Flat Config dataclasses, no inheritance: the options that every training recipe has are written out in
    each, and must stay alike. IDENTICAL: same type, default and help; SAME_HELP: same type and help, a
    default of the recipe's own; OWN: same type, meaning worded for the recipe. A new shared option must be
    put in one of the three."""
    import dataclasses

    from mirl.cli import _field_help
    from mirl.recipes import distill, grpo, online, ppo, reward_model

    mods = [sft, preference, grpo, online, ppo, reward_model, distill]
    fields = [{f.name: f for f in dataclasses.fields(m.Config)} for m in mods]
    helps = [_field_help(m.Config) for m in mods]
    shared = set(fields[0]).intersection(*fields[1:])
    identical = {
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "lora_targets",
        "save_adapter_only",
        "bf16",
        "device",
        "activation_checkpointing",
        "freeze_vision",
        "video_fps",
        "video_max_frames",
        "video_max_pixels",
        "compile",
        "fsdp",
        "report",
        "allow_config_change",
        "seed",
        "threads",
        "resume",
        "save_every",
        "stop_at_step",
        "max_grad_norm",
        "weight_decay",
        "split",
        "data_config",
        "revision",
        "model_revision",
        "chat",
        "report_to",
        "log_every",
    }
    same_help = {"out_dir", "min_lr_ratio", "warmup_steps"}
    own = {"data", "model", "task", "steps", "lr", "max_len"}
    assert shared == identical | same_help | own, sorted(shared ^ (identical | same_help | own))
    for name in shared:
        assert len({fs[name].type for fs in fields}) == 1, name
        if name in identical | same_help:
            assert len({h[name] for h in helps}) == 1, (name, {h[name] for h in helps})
        if name in identical:
            assert len({repr(fs[name].default) for fs in fields}) == 1, name
    assert not any(len(m.Config.__mro__) > 2 for m in mods)  # no config inheritance
