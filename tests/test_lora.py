"""LoRA through PEFT in the recipes: only adapters train, the reference is the base with adapters off,
merged and adapter-only saves load back with the same outputs."""

import math

import pytest
import torch

from mirl.models import load_policy
from mirl.recipes import grpo, preference, sft
from mirl.recipes.common import AdapterOffReference, frozen_reference

PAIRS = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)} for a in range(6) for b in range(6)]


@pytest.fixture
def tiny_dir(tmp_path):
    load_policy("gpt-nano", seed=0).save(tmp_path / "base")
    return tmp_path / "base"


def test_sft_lora_trains_adapters_only_and_saves(tmp_path, tiny_dir):
    base = {k: v.clone() for k, v in load_policy(tiny_dir).model.named_parameters()}
    for merged in (True, False):
        out = tmp_path / f"run_{merged}"
        res = sft.train(
            sft.Config(
                model=str(tiny_dir),
                task="arith:1",
                n_train=64,
                steps=3,
                batch_size=8,
                lr=1e-2,
                eval_n=0,
                threads=1,
                lora_r=4,
                save_adapter_only=not merged,
                out_dir=str(out),
            )
        )
        pol = res.model
        assert pol.has_lora
        for name, p in pol.model.named_parameters():
            if "lora_" in name:
                assert p.requires_grad
            else:
                assert not p.requires_grad
                key = name.replace("base_model.model.", "").replace(".base_layer", "")
                assert torch.equal(p, base[key]), name
        back = load_policy(out / "final")
        assert back.has_lora == (not merged)
        ids = torch.tensor([[4, 5, 6, 7]])
        with torch.no_grad():
            torch.testing.assert_close(back(ids).logits, pol(ids).logits, atol=1e-5, rtol=1e-5)


def test_lora_reference_is_the_base_with_adapters_off(tmp_path, tiny_dir):
    policy = load_policy(tiny_dir)
    policy.add_lora(4)
    ref = frozen_reference(policy)
    assert isinstance(ref, AdapterOffReference)  # no second copy of the weights
    res = preference.train(
        preference.Config(
            model=str(tiny_dir),
            task="",
            loss="mio",
            ref_mode="model",
            steps=3,
            batch_size=6,
            lr=1e-2,
            threads=1,
            lora_r=4,
            out_dir=str(tmp_path / "p"),
        ),
        data=PAIRS,
    )
    assert res.history[0]["loss"] == pytest.approx(math.log(4), abs=1e-6)
    assert res.history[-1]["rewards/margins"] != 0.0  # the adapters moved away from the reference
    ids = torch.tensor([[4, 5, 6]])
    with torch.no_grad():
        with res.model.reference_context():
            off = res.model(ids).logits
        torch.testing.assert_close(off, load_policy(tiny_dir)(ids).logits)


def test_grpo_lora_on_a_transformers_model(tmp_path, hf_tiny_dir):
    from transformers import AutoModelForCausalLM

    res = grpo.train(
        grpo.Config(
            model=str(hf_tiny_dir),
            task="arith:1",
            group_size=2,
            prompts_per_step=2,
            steps=2,
            max_new_tokens=6,
            eval_n=0,
            threads=1,
            lora_r=4,
            beta=0.05,
            out_dir=str(tmp_path / "g"),
        )
    )
    assert all(math.isfinite(h["loss"]) for h in res.history)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "g" / "final")  # merged: a plain transformers folder
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, res.model(ids).logits, atol=1e-5, rtol=1e-5)


def test_vllm_weights_merge_every_adapter_the_embeddings_too(tmp_path):
    """What a vLLM sync sends (rollout/engine.py: vllm_state_dict) is the policy's function: loaded strictly into a
    fresh copy of the base model, it gives the adapted policy's logits, with adapters on the token embedding (PEFT
    keeps those in lora_embedding_A/B, not lora_A/B), the attention and the MLP."""
    from test_decode import _hf_text
    from transformers import AutoModelForCausalLM

    from mirl.rollout.engine import vllm_state_dict

    folder = _hf_text(tmp_path, "llama")
    policy = load_policy(folder)
    policy.add_lora(r=4, alpha=8, targets="embed_tokens,q_proj,down_proj")
    torch.manual_seed(3)
    for name, p in policy.model.named_parameters():
        if "lora_" in name:  # PEFT starts B (embedding: A) at zero: give every adapter an effect
            p.data.normal_(0, 0.3)
    fresh = AutoModelForCausalLM.from_pretrained(folder)
    fresh.load_state_dict(vllm_state_dict(policy), strict=True)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        want = policy(ids).logits
        with policy.reference_context():
            assert (policy(ids).logits - want).abs().max() > 1e-2  # the adapters matter
        torch.testing.assert_close(fresh(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_vllm_weights_refuse_an_embedding_adapter_on_tied_embeddings(hf_tiny_dir):
    """With tied embeddings the trained policy's head is the base embedding while vLLM would tie its head to the
    merged one: a clear error instead of samples from another model."""
    from mirl.options import ConfigError
    from mirl.rollout.engine import vllm_state_dict

    policy = load_policy(hf_tiny_dir)
    assert policy.model.get_output_embeddings().weight is policy.model.get_input_embeddings().weight
    policy.add_lora(r=4, targets="embed_tokens,q_proj")
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        vllm_state_dict(policy)
    untouched = load_policy(hf_tiny_dir)
    untouched.add_lora(r=4, targets="q_proj")
    assert "model.embed_tokens.weight" in vllm_state_dict(untouched)
