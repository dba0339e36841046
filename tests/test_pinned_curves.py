"""Pinned loss curves: the first five losses (and gradient norms) of a seeded CPU float32 run of a tiny model,
for every recipe, stored here and compared at 1e-6. A change that alters what a recipe computes (a
normaliser, an order of operations, a seed) moves them; a pure refactoring must not. To re-pin after an
intended change, run `python tests/test_pinned_curves.py` and paste its output, saying why in the commit.

One thread: the same arithmetic order on every run. Machines whose float32 kernels differ (AVX-512 vs
AVX2) may differ in the last bits; the pins were taken on the CI machine class (Intel Xeon, AVX-512).
"""

import json
import sys

import pytest
import torch

from mirl.models import load_policy
from mirl.recipes import grpo, online, ppo, preference, reward_model, sft

PAIRS = [
    {"prompt": f"{a}+{b}=", "chosen": f"{a + b}|{a + b}", "rejected": f"{a + b + 1}|{a + b + 1}"}
    for a in range(5)
    for b in range(5)
]
COMMON = dict(threads=1, report=False, seed=0)
RL = dict(task="arith:1", steps=5, eval_n=0, max_new_tokens=12, lr=1e-3, **COMMON)


def weak_sft(out):
    torch.set_num_threads(1)
    sft.train(sft.Config(task="arith:1", steps=80, n_train=400, batch_size=32, eval_n=0, out_dir=str(out), **COMMON))
    return out / "final"


def run(recipe, out, sft_dir):
    """The history of a five-step run of `recipe` -> [(step, loss, grad_norm)] of the steps that updated."""
    torch.set_num_threads(1)
    if recipe == "sft":
        res = sft.train(
            sft.Config(
                task="arith:1",
                steps=5,
                n_train=200,
                batch_size=16,
                eval_n=0,
                lr=1e-3,
                warmup_steps=0,
                out_dir=str(out),
                **COMMON,
            )
        )
    elif recipe in ("dpo", "mio", "ipo_mean"):
        loss, agg = {"dpo": ("dpo", "sum"), "mio": ("mio", "sum"), "ipo_mean": ("ipo", "mean")}[recipe]
        res = preference.train(
            preference.Config(
                task="",
                loss=loss,
                logp_agg=agg,
                steps=5,
                batch_size=8,
                lr=1e-3,
                warmup_steps=0,
                probe_every=0,
                out_dir=str(out),
                **COMMON,
            ),
            model=load_policy("gpt-nano", seed=0),
            data=PAIRS,
        )
    elif recipe == "grpo":
        res = grpo.train(
            grpo.Config(
                model=str(sft_dir),
                group_size=4,
                prompts_per_step=8,
                beta=0.04,
                num_iterations=2,
                out_dir=str(out),
                **RL,
            )
        )
    elif recipe == "online":
        res = online.train(
            online.Config(model=str(sft_dir), loss="mio", k=4, prompts_per_step=8, out_dir=str(out), **RL)
        )
    elif recipe == "ppo":
        res = ppo.train(
            ppo.Config(model=str(sft_dir), samples_per_prompt=2, prompts_per_step=4, out_dir=str(out), **RL)
        )
    else:
        res = reward_model.train(
            reward_model.Config(task="", steps=5, batch_size=8, lr=1e-3, warmup_steps=0, out_dir=str(out), **COMMON),
            data=PAIRS,
            eval_data=PAIRS[:5],
        )
    return [(h["step"], h["loss"], h["grad_norm"]) for h in res.history if "loss" in h]


PINNED = {
    "sft": [
        [1, 4.625176906585693, 6.643507957458496],
        [2, 3.7762463092803955, 3.5418412685394287],
        [3, 3.5089786052703857, 3.5437684059143066],
        [4, 3.17490553855896, 3.4243264198303223],
        [5, 3.072374105453491, 3.2681210041046143],
    ],
    "dpo": [
        [1, 0.6931471824645996, 0.8363814949989319],
        [2, 0.744375467300415, 0.7958875894546509],
        [3, 0.6983869075775146, 0.4982668161392212],
        [4, 0.7033544778823853, 0.5353837609291077],
        [5, 0.6668084859848022, 0.6269291043281555],
    ],
    "mio": [
        [1, 1.3862943649291992, 0.41819074749946594],
        [2, 1.418206810951233, 0.3932463526725769],
        [3, 1.3932725191116333, 0.2812844216823578],
        [4, 1.3945667743682861, 0.2789055407047272],
        [5, 1.3745810985565186, 0.33653324842453003],
    ],
    "ipo_mean": [
        [1, 25.0, 41.81907272338867],
        [2, 27.565196990966797, 39.92483139038086],
        [3, 25.272323608398438, 24.91254997253418],
        [4, 25.5836124420166, 26.946455001831055],
        [5, 23.608585357666016, 31.131885528564453],
    ],
    "grpo": [
        [1, 0.1283121220767498, 4.877194195985794],
        [2, 0.031124673783779144, 2.4061057567596436],
        [3, 0.008988121524453163, 0.5830289721488953],
        [4, 0.008885348215699196, 0.49891698360443115],
        [5, 0.008563293609768152, 0.038756001740694046],
    ],
    "online": [
        [1, 1.3862943649291992, 0.9799302220344543],
        [2, 1.4837898015975952, 1.0630968809127808],
        [3, 1.420053243637085, 0.9174753427505493],
        [4, 1.536993384361267, 1.9318976402282715],
        [5, 1.6393847465515137, 1.801745057106018],
    ],
    "ppo": [
        [1, 0.3461000993847847, 2.4665165543556213],
        [2, 0.11610945127904415, 2.149408906698227],
        [3, 0.08791473135352135, 2.393408164381981],
        [4, 0.05383224040269852, 1.5568200945854187],
        [5, 0.03339829295873642, 4.5156698524951935],
    ],
    "rm": [
        [1, 0.7544385194778442, 5.485816478729248],
        [2, 1.3933875560760498, 16.134933471679688],
        [3, 0.7356479167938232, 2.6765706539154053],
        [4, 0.693590521812439, 1.53952157497406],
        [5, 0.6437852382659912, 1.2811923027038574],
    ],
}

RECIPES = ["sft", "dpo", "mio", "ipo_mean", "grpo", "online", "ppo", "rm"]


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    return weak_sft(tmp_path_factory.mktemp("sft"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_pinned_curve(tmp_path, sft_dir, recipe):
    threads = torch.get_num_threads()
    try:
        got = run(recipe, tmp_path / recipe, sft_dir)
    finally:
        torch.set_num_threads(threads)
    want = PINNED[recipe]
    assert [s for s, _, _ in got] == [s for s, _, _ in want]
    for (_, loss, gn), (_, want_loss, want_gn) in zip(got, want):
        assert loss == pytest.approx(want_loss, rel=1e-6, abs=1e-6)
        assert gn == pytest.approx(want_gn, rel=1e-6, abs=1e-6)


if __name__ == "__main__":  # print the pins of the current code
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        base = weak_sft(Path(d) / "weak_sft")
        pins = {r: run(r, Path(d) / r, base) for r in (sys.argv[1:] or RECIPES)}
    print("PINNED = " + json.dumps(pins, indent=None).replace("]], ", "]],\n          "))
