"""Two gloo ranks under torchrun take the same steps as one process with the same global batch."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

PAIRS = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)} for a in range(8) for b in range(8)]


def _run(args, nproc):
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    r = subprocess.run(
        launcher + ["-m", "mirl"] + args,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.parametrize(
    "recipe,fsdp",
    [("sft", False), ("dpo", False), ("sft", True), ("dpo", True)],
    ids=["sft", "dpo", "sft-fsdp2", "dpo-fsdp2"],
)
def test_two_ranks_equal_one_process(tmp_path, recipe, fsdp):
    if recipe == "sft":
        common = [
            "sft",
            "--task",
            "arith:2",
            "--n-train",
            "64",
            "--steps",
            "3",
            "--eval-n",
            "0",
            "--threads",
            "1",
            "--lr",
            "1e-3",
            "--warmup-steps",
            "0",
        ]
    else:
        data = tmp_path / "pairs.jsonl"
        data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
        common = [
            "dpo",
            "--data",
            str(data),
            "--task",
            "",
            "--loss",
            "mio",
            "--steps",
            "3",
            "--threads",
            "1",
            "--lr",
            "1e-3",
            "--warmup-steps",
            "0",
        ]
    _run(common + ["--batch-size", "8", "--out-dir", str(tmp_path / "one")], 1)
    out = _run(common + ["--batch-size", "4", "--out-dir", str(tmp_path / "two")] + (["--fsdp"] if fsdp else []), 2)
    assert ("FSDP2: 2 blocks and the root sharded over 2 ranks" in out) == fsdp
    # tolerance: float32 sums in another order; 1e-5 relative on the losses, 1e-4 absolute on weights
    # (three Adam steps of lr 1e-3; a wrong normaliser changes the losses and the gradient norms at once)
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-4, rtol=1e-4)
    m1 = json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[0])
    m2 = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[0])
    assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)


@pytest.fixture(scope="module")
def weak_sft(tmp_path_factory):
    """A weak SFT model on 1-digit addition: its samples are partly right (groups with a learning signal)."""
    out = tmp_path_factory.mktemp("sft")
    _run(
        [
            "sft",
            "--task",
            "arith:1",
            "--steps",
            "60",
            "--n-train",
            "400",
            "--batch-size",
            "32",
            "--eval-n",
            "0",
            "--threads",
            "1",
            "--no-report",
            "--out-dir",
            str(out),
        ],
        1,
    )
    return out / "final"


@pytest.mark.parametrize(
    "recipe,fsdp",
    [
        ("grpo", False),
        ("online_mio", False),
        ("online_group_js", False),
        ("ppo", False),
        ("rm", False),
        ("grpo", True),
        ("online_mio", True),
        ("ppo", True),
        ("rm", True),
        ("grpo_batch_small", False),
        ("grpo_batch_small", True),
        ("ppo_small", False),
        ("grpo_gdpo", False),
        ("grpo_rpp", False),
        ("grpo_pass_rate", False),
        ("distill", False),
        ("grpo_entropy", False),
        ("grpo_env", False),
        ("grpo_calc", False),
    ],
    ids=[
        "grpo",
        "online_mio",
        "online_group_js",
        "ppo",
        "rm",
        "grpo-fsdp2",
        "online_mio-fsdp2",
        "ppo-fsdp2",
        "rm-fsdp2",
        "grpo_batch_small",
        "grpo_batch_small-fsdp2",
        "ppo_small",
        "grpo_gdpo",
        "grpo_reinforce_pp",
        "grpo_pass_rate",
        "distill",
        "grpo_entropy",
        "grpo_env",
        "grpo_calc",
    ],
)
def test_online_recipes_two_ranks_equal_one_process(tmp_path, weak_sft, recipe, fsdp):
    """Two gloo ranks (8 prompts each) against one process (16 prompts) for 3 steps, with DDP-style gradient
    averaging or FSDP2. Rows are sampled with per-row noise (--row-seeded-sampling, always on under
    torchrun), so both sample the same responses; losses divide by global counts. Tolerances as for
    sft/dpo."""
    common = [
        "--model",
        str(weak_sft),
        "--task",
        "arith:1",
        "--steps",
        "3",
        "--eval-n",
        "0",
        "--threads",
        "1",
        "--max-new-tokens",
        "8",
        "--lr",
        "1e-3",
        "--no-report",
    ]
    if recipe == "grpo":
        args = ["grpo", "--group-size", "4", "--prompts-per-step", "16", "--num-iterations", "2"]
    elif recipe == "grpo_batch_small":
        # --scale-rewards batch divides by the global batch's std (not each rank's); 2 rows per rank in 4
        # minibatches of one row: in every minibatch one rank's part is empty (it still joins the collectives)
        args = [
            "grpo",
            "--group-size",
            "2",
            "--prompts-per-step",
            "2",
            "--minibatches",
            "4",
            "--scale-rewards",
            "batch",
        ]
    elif recipe == "grpo_gdpo":  # GDPO's batch normalisation runs over the global batch
        args = ["grpo", "--group-size", "4", "--prompts-per-step", "16", "--reward", "task:1,format:0.1"]
        args += ["--advantage", "gdpo"]
    elif recipe == "grpo_rpp":  # REINFORCE++'s token whitening runs over the global batch
        args = ["grpo", "--group-size", "4", "--prompts-per-step", "16", "--advantage", "reinforce_pp_baseline"]
    elif recipe == "grpo_pass_rate":  # the tracker gathers every rank's pass rates: the same prompts are drawn
        args = ["grpo", "--group-size", "4", "--prompts-per-step", "8", "--prompt-sampler", "pass-rate"]
    elif recipe == "grpo_entropy":
        # the 80/20 rule's threshold over every rank's token entropies of a minibatch, the entropy bonus a global
        # token mean, the adaptive coefficient on the global entropy; 2 minibatches, one pass
        args = ["grpo", "--group-size", "4", "--prompts-per-step", "16", "--minibatches", "2"]
        args += ["--top-entropy-quantile", "0.2", "--entropy-coef", "0.05", "--entropy-target", "5"]
    elif recipe == "grpo_env":  # two-turn episodes in an environment loaded from a file (tests/test_agents.py)
        from test_agents import ENV

        (tmp_path / "two_turns.py").write_text(ENV)
        env = f"{tmp_path / 'two_turns.py'}:TwoTurns"
        args = ["grpo", "--group-size", "4", "--prompts-per-step", "8", "--env", env]
        common[common.index("arith:1")] = ""
        common[common.index("8")] = "12"  # --max-new-tokens: each turn's
    elif recipe == "grpo_calc":  # the calculator environment: its host and tool calls per rank
        args = ["grpo", "--group-size", "4", "--prompts-per-step", "8", "--env", "calc", "--max-turns", "2"]
        common[common.index("arith:1")] = ""
    elif recipe == "distill":  # the token mean of the divergence divides by the global token count
        args = ["distill", "--teacher", "gpt-micro", "--prompts-per-step", "16", "--samples-per-prompt", "2"]
    elif recipe == "ppo_small":  # 2 rows per rank, 4 minibatches: empty parts as above
        args = [
            "ppo",
            "--samples-per-prompt",
            "2",
            "--prompts-per-step",
            "2",
            "--minibatches",
            "4",
            "--ppo-epochs",
            "1",
        ]
    elif recipe.startswith("online"):
        args = ["online", "--loss", recipe.split("_", 1)[1], "--k", "4", "--prompts-per-step", "16"]
    elif recipe == "ppo":
        args = ["ppo", "--samples-per-prompt", "4", "--prompts-per-step", "16", "--beta", "0.05"]
    else:
        data = tmp_path / "pairs.jsonl"
        data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
        args = [
            "rm",
            "--data",
            str(data),
            "--eval-data",
            str(data),
            "--task",
            "",
            "--batch-size",
            "8",
            "--warmup-steps",
            "0",
        ]
        common = [c for c in common if c not in ("--max-new-tokens", "8", "--eval-n", "0")]
    _run(
        args + common + ["--row-seeded-sampling", "--out-dir", str(tmp_path / "one")]
        if recipe != "rm"
        else args + common + ["--out-dir", str(tmp_path / "one")],
        1,
    )
    if recipe == "rm":
        args[args.index("--batch-size") + 1] = "4"
    out = _run(args + common + ["--out-dir", str(tmp_path / "two")] + (["--fsdp"] if fsdp else []), 2)
    assert ("FSDP2:" in out) == fsdp
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5, abs=1e-7)
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-4, rtol=1e-4)
