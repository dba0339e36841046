"""Episodes in the recipes: grpo, ppo and online (MIO) train on a user's two-turn environment loaded by
--env file.py:Class, evaluation runs greedy episodes, a resumed episode run equals an uninterrupted one, and
`mirl eval --env` reports success, turns and faults."""

import json
import math

import pytest

from mirl.recipes import grpo, online, ppo, sft

ENV = '''
from mirl.envs.base import Step


class TwoTurns:
    """Asks for an answer twice: the first is answered "again:", the second scored by its length's parity."""

    tools = []

    def __init__(self):
        self.turn = 0

    @staticmethod
    def examples(split, n, seed):
        start = 0 if split == "train" else 1000
        return [{"prompt": f"{(start + i) % 10}+{(start + 3 * i + seed) % 10}="} for i in range(n)]

    def reset(self, example):
        self.turn = 0
        return [{"role": "user", "content": example["prompt"]}]

    def step(self, message):
        self.turn += 1
        if self.turn == 1:
            return Step([{"role": "user", "content": "again:"}], None, False)
        return Step([], float(len(message) % 2 == 0), True)

    def finish(self):
        return 0.0
'''


FAULTY = (
    ENV.replace("class TwoTurns", "class _Base")
    + '''

class Faulty(_Base):
    """Every third episode's second turn raises, every fifth one's hangs: counted faults, the run goes on."""

    count = 0

    def reset(self, example):
        Faulty.count += 1
        self.n = Faulty.count
        return super().reset(example)

    def step(self, message):
        if self.turn == 1 and self.n % 5 == 0:
            import time

            time.sleep(60)
        if self.turn == 1 and self.n % 3 == 0:
            raise RuntimeError("the environment broke")
        return super().step(message)
'''
)


@pytest.fixture(scope="module")
def weak(tmp_path_factory):
    """A weak SFT model on 1-digit addition: short answers that end with EOS, of varied lengths."""
    out = tmp_path_factory.mktemp("sft")
    sft.train(sft.Config(task="arith:1", steps=40, n_train=200, batch_size=32, eval_n=0, threads=1, report=False,
                         report_to="none", out_dir=str(out)))  # fmt: skip
    env = tmp_path_factory.mktemp("env") / "two_turns.py"
    env.write_text(ENV)
    return str(out / "final"), f"{env}:TwoTurns"


COMMON = dict(steps=2, prompts_per_step=4, max_new_tokens=12, max_turns=3, eval_n=8, threads=1, report=False,
              report_to="none", lr=1e-3, task="")  # fmt: skip


@pytest.mark.parametrize("recipe", ["grpo", "ppo", "online"])
def test_recipes_train_on_two_turn_episodes(tmp_path, weak, recipe):
    """Two steps of each recipe on the environment: the episodes take two turns (the first answered "again:";
    a turn the 12-token limit cuts ends its episode: the weak model's first turns end within it), the logged
    completions are whole episodes with the environment's part marked, the losses are finite, and the held-out
    evaluation is of greedy episodes."""
    model, env = weak
    size = {"grpo": dict(group_size=4), "ppo": dict(samples_per_prompt=4), "online": dict(k=4)}[recipe]
    module = {"grpo": grpo, "ppo": ppo, "online": online}[recipe]
    opts = {**COMMON, "report": recipe == "grpo"}  # the report's held-out samples: greedy episodes
    res = module.train(module.Config(model=model, env=env, out_dir=str(tmp_path), log_completions=2, **size, **opts))
    assert res.history[0]["episodes/turns"] > 1.5  # (the first rollout, before any update)
    assert all(math.isfinite(h["loss"]) for h in res.history if "loss" in h)
    assert any("loss" in h for h in res.history)
    logged = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert logged and all("«env: again:»" in r["completion"] for r in logged[:2])  # the environment's part marked
    held_out = [r for r in logged if r["kind"] == "held-out"]
    assert len(held_out) == (8 if recipe == "grpo" else 0) and all("«env: again:»" in r["completion"] for r in held_out)
    evals = res.summary["evals"]
    assert len(evals) == 2 and evals[0]["episode_turns"] > 1.5 and 0.0 <= evals[-1]["accuracy"] <= 1.0


def test_episode_run_resumes_as_if_uninterrupted(tmp_path, weak):
    """GRPO on episodes for 3 steps, against 1 step, a stop, and a resume for the other 2: the same rewards and
    losses (the sampler's generator state and the run's state come back from the checkpoint)."""
    model, env = weak
    opts = dict(model=model, env=env, group_size=4, **{**COMMON, "steps": 3, "eval_n": 0})
    full = grpo.train(grpo.Config(out_dir=str(tmp_path / "a"), **opts))
    grpo.train(grpo.Config(out_dir=str(tmp_path / "b"), stop_at_step=1, save_every=1, **opts))
    resumed = grpo.train(grpo.Config(out_dir=str(tmp_path / "b"), resume=True, **opts))
    for a, b in zip(full.history[1:], resumed.history, strict=True):
        assert b["reward/mean"] == pytest.approx(a["reward/mean"])
        assert b.get("loss", 0.0) == pytest.approx(a.get("loss", 0.0), abs=1e-6)


def test_eval_env_reports_episodes(weak, capsys):
    """`mirl eval --env`: one JSON line with the success rate, the mean turns and the faults."""
    from mirl.cli import main

    model, env = weak
    assert main(["eval", "--model", model, "--env", env, "--n", "6", "--max-new-tokens", "12", "--threads", "1"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["n"] == 6 and row["episode_turns"] > 1.5 and row["episode_faults"] == 0.0
    p = row["accuracy"]  # the success rate's standard error: sample std (n - 1) over sqrt(n) of 0/1 successes
    assert row["accuracy_se"] == pytest.approx((p * (1 - p) * 6 / 5) ** 0.5 / 6**0.5)


def test_environment_faults_are_counted_and_the_run_goes_on(tmp_path, weak):
    """An environment whose step raises (every third episode) or hangs past --tool-timeout-s (every fifth): those
    episodes end with no reward, the faults are counted by kind in the summary and the metrics, the run ends."""
    model, _ = weak
    env = tmp_path / "faulty.py"
    env.write_text(FAULTY)
    opts = dict(model=model, env=f"{env}:Faulty", group_size=4, tool_timeout_s=1.0, **{**COMMON, "eval_n": 0})
    res = grpo.train(grpo.Config(out_dir=str(tmp_path / "run"), **opts))
    faults = res.summary["env_faults"]
    assert faults.get("step raised", 0) >= 1 and faults.get("step timeout", 0) >= 1, faults
    assert sum(h["episodes/faults"] for h in res.history) == sum(faults.values())
    assert len(res.history) == 2


@pytest.mark.parametrize("model", ["vlm-nano", "qwen2_vl"])
def test_zoom_tool_answers_with_an_image_in_the_context(model, request):
    """The zoom environment on the tiny VLM and a tiny transformers Qwen2-VL, with a scripted model: turn 1
    '<zoom>Q</zoom>' (Q the digit's quadrant), whose reply carries the quadrant as an image; turn 2 the digit:
    reward 1. The row's context holds the scene's image tokens and as many again for the crop (the tiny VLM: 16
    each), both images in its image inputs, in order; the update's forward runs on it; with the wrong quadrant's
    crop and a wrong answer the reward is 0."""
    from test_episodes import ScriptedEngine

    from mirl.envs.host import EnvHost
    from mirl.envs.protocol import Renderer
    from mirl.envs.zoom import ZoomEnv
    from mirl.logps import response_logps
    from mirl.models import load_policy
    from mirl.rollout.episodes import run_episodes
    from mirl.rollout.score import pack_rows

    policy = load_policy(model if model == "vlm-nano" else str(request.getfixturevalue("hf_vlm_dir")), seed=0)
    ex = ZoomEnv.examples("test", 1, 0)[0]
    wrong = next(q for q in ("tl", "tr", "bl", "br") if q != ex["quadrant"])
    script = [
        [(f"<zoom>{ex['quadrant']}</zoom>", False), (ex["answer"], True)],
        [(f"<zoom>{wrong}</zoom>", False), ("x", True)],
    ]
    host = EnvHost(ZoomEnv, 2, 10.0)
    renderer = Renderer(policy.tokenizer, ZoomEnv().tools, chat=False)
    try:
        eps = run_episodes(policy, host, renderer, [ex], group_size=2, max_turns=3, max_tokens=120, turn_tokens=24,
                           engine=ScriptedEngine(script, policy.tokenizer).start())  # fmt: skip
    finally:
        host.close()
    assert [e.reward for e in eps.episodes] == [1.0, 0.0] and [e.turns for e in eps.episodes] == [2, 2]
    image_id = policy.vision.cfg.image_token_id if model == "vlm-nano" else policy.vision.image_token_id
    n_image = sum(t == image_id for t in eps.episodes[0].opening)
    assert n_image == (16 if model == "vlm-nano" else n_image) and n_image > 0
    assert sum(t == image_id for t in eps.episodes[0].tokens) == n_image  # the crop, in the environment's reply
    assert all(a == 0 for t, a in zip(eps.episodes[0].tokens, eps.episodes[0].action) if t == image_id)
    pixels = eps.batch.images[0]["pixel_values"]
    assert pixels.shape[0] == (2 if model == "vlm-nano" else pixels.shape[0])
    if model != "vlm-nano":  # two images' grids
        assert eps.batch.images[0]["image_grid_thw"].shape[0] == 2
    u = pack_rows([(eps.batch, 0), (eps.batch, 1)], policy.tokenizer.pad_token_id)
    lp, _ = response_logps(policy, u.ids, u.attn, u.n_resp, 1.0, images=u.row_images())
    assert lp.shape == u.resp_mask.shape and bool(lp.isfinite().all())


def test_episode_run_killed_with_sigkill_resumes_identically(tmp_path, weak):
    """GRPO on episodes from the command line, killed with SIGKILL (no handler runs) once a checkpoint of step 2 or
    later exists, then resumed: the steps after the checkpoint equal an uninterrupted run's (rewards, losses)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    model, env = weak
    args = ["grpo", "--model", model, "--env", env, "--task", "", "--group-size", "4", "--prompts-per-step", "4"]
    args += ["--max-new-tokens", "12", "--max-turns", "3", "--eval-n", "0", "--threads", "1", "--lr", "1e-3"]
    args += ["--no-report", "--report-to", "none", "--steps", "8", "--save-every", "1"]
    opts = dict(model=model, env=env, group_size=4, **{**COMMON, "steps": 8, "eval_n": 0})
    full = grpo.train(grpo.Config(out_dir=str(tmp_path / "a"), **opts))
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "mirl", *args, "--out-dir", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    state = out / "checkpoint" / "state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text()).get("step", 0) >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    step = json.loads(state.read_text())["step"]
    assert 2 <= step < 8
    resumed = grpo.train(grpo.Config(out_dir=str(out), resume=True, **opts))
    assert [h["step"] for h in resumed.history] == list(range(step + 1, 9))
    for a, b in zip(full.history[step:], resumed.history, strict=True):
        assert b["reward/mean"] == pytest.approx(a["reward/mean"])
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)


def test_zoom_scene_shows_where_and_the_crop_shows_which():
    """The scene has the detail of 4x4 (every 8x8 block one value: the mean of the source's 16x16 block), and the
    16x16 digit fills one such block with the same ink whichever digit it is: its block reads 40 (INK) + 6 (the
    noise's mean) for every digit, to within the noise. The crop is the source's quadrant pixel for pixel."""
    import numpy as np

    from mirl.envs.zoom import QUADRANTS, ZoomEnv, source_image

    env, block = ZoomEnv(), {}
    for e in env.examples("test", 60, 0):
        src = source_image(e).astype(np.float64)
        scene = np.asarray(e["images"][0])[:, :, 0].astype(np.float64)
        assert scene.shape == (32, 32) and set(e["at"]) <= {0, 16} and src.max() < 255  # nothing clipped
        assert np.array_equal(scene, np.round(src.reshape(4, 16, 4, 16).mean((1, 3))).repeat(8, 0).repeat(8, 1))
        oy, ox = QUADRANTS[e["quadrant"]]
        block.setdefault(e["answer"], []).append(scene[(oy + e["at"][0]) // 2, (ox + e["at"][1]) // 2])
        env.reset(e)
        crop = np.asarray(env.zoom(e["quadrant"])["images"][0])[:, :, 0]
        assert np.array_equal(crop, src[oy : oy + 32, ox : ox + 32])
    assert len(block) >= 8 and all(abs(v - 46) <= 1 for vs in block.values() for v in vs)


def test_zoom_demonstrations_are_what_an_episode_holds():
    """ZoomEnv.demonstrations: per training scene a call record (the opening with the scene -> '<zoom>Q</zoom>')
    and an answer record (that + '<result><image></result>', the scene and the crop -> the digit). On the tiny VLM
    the answer record encodes to the token ids and the pixels of a scripted episode that makes the same call and
    answer (the SFT data is what a rollout holds)."""
    import torch
    from test_episodes import ScriptedEngine

    from mirl.data.collate import encode_example
    from mirl.data.formats import SkipCounter
    from mirl.envs.host import EnvHost
    from mirl.envs.protocol import Renderer
    from mirl.envs.zoom import ZoomEnv
    from mirl.models import load_policy
    from mirl.rollout.episodes import run_episodes

    examples, recs = ZoomEnv.examples("train", 3, 0), ZoomEnv().demonstrations(3, 0)
    assert len(recs) == 6 and all(r["prompt"] == "<image>digit?\n" for r in recs[::2])
    assert [len(r["images"]) for r in recs] == [1, 2] * 3
    policy = load_policy("vlm-nano", seed=0)
    script = [[(c["completion"], False), (a["completion"], True)] for c, a in zip(recs[::2], recs[1::2])]
    host = EnvHost(ZoomEnv, 3, 10.0)
    try:
        eps = run_episodes(policy, host, Renderer(policy.tokenizer, ZoomEnv().tools, chat=False), examples,
                           group_size=1, max_turns=3, max_tokens=120, turn_tokens=24,
                           engine=ScriptedEngine(script, policy.tokenizer).start())  # fmt: skip
    finally:
        host.close()
    for ex, call, answer, ep in zip(examples, recs[::2], recs[1::2], eps.episodes, strict=True):
        assert call["completion"] == f"<zoom>{ex['quadrant']}</zoom>" and answer["completion"] == ex["answer"]
        assert answer["prompt"] == call["prompt"] + call["completion"] + "<result><image></result>"
        assert ep.reward == 1.0
        ids, _, images = encode_example(policy, answer["prompt"], answer["completion"], 128, SkipCounter(), "x",
                                        "completion", answer["images"])  # fmt: skip
        assert ep.opening + ep.tokens == ids
        pixels = [i["pixel_values"] for i in ep.images]
        assert torch.equal(torch.cat(pixels), images["pixel_values"])
