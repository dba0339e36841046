"""examples/minimal_grpo.py: the ~150-line GRPO loop on mirl's core raises held-out accuracy from a weak SFT."""

import importlib.util
from pathlib import Path

from mirl.recipes import sft


def _load_example():
    path = Path(__file__).resolve().parents[1] / "examples" / "minimal_grpo.py"
    spec = importlib.util.spec_from_file_location("minimal_grpo", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, path


def test_minimal_grpo_raises_held_out_accuracy(tmp_path):
    """From a 100-step SFT of 1-digit addition (held-out greedy accuracy 0.125 here), 300 GRPO steps reach
    0.325 (measured; 14 s on 2 cores). Asserted: at least 0.1 above the start. The file stays under 170 lines."""
    mod, path = _load_example()
    assert len(path.read_text().splitlines()) < 170
    sft.train(
        sft.Config(
            task="arith:1",
            steps=100,
            n_train=400,
            batch_size=32,
            eval_n=0,
            threads=2,
            report=False,
            out_dir=str(tmp_path / "sft"),
        )
    )
    before, after = mod.main(
        [
            "--model",
            str(tmp_path / "sft" / "final"),
            "--task",
            "arith:1",
            "--threads",
            "2",
            "--out",
            str(tmp_path / "grpo"),
        ]
    )
    assert after >= before + 0.1, (before, after)
    assert (tmp_path / "grpo" / "model.safetensors").exists()
