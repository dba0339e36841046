"""mirl on a device, proved on the CPU: one step of every recipe under a shadow device (tests/shadow_device.py)
makes no host tensor meet a device tensor; the local sampler reads the host once per decoding step; --device,
--bf16 and --dtype resolve as documented; a CUDA out-of-memory error is one line naming the phase."""

import pytest
import torch
from shadow_device import ShadowDevice

from mirl.recipes import distill, grpo, online, ppo, preference, prm, reward_model, sft

C = dict(threads=1, report=False, seed=0, device="cpu")
RL = dict(task="arith:1", steps=1, eval_n=2, max_new_tokens=6, **C)


def test_the_shadow_device_catches_a_host_tensor_and_counts_syncs():
    """The mode itself: a factory without a device is host, with one device; mixing a host tensor of more than 0
    dimensions with a device tensor is a violation, a 0-dim one is not; .item() of a device tensor is a sync."""
    with ShadowDevice() as sd:
        dev = torch.zeros(3, device="cpu")
        host = torch.ones(3)
        _ = dev + torch.tensor(1.0)  # a 0-dim host scalar: allowed (CUDA takes it)
        assert not sd.violations
        _ = dev + host
        assert sum(sd.violations.values()) == 1
        _ = dev.sum().item()
        _ = host.sum().item()  # a host tensor's: no sync
        assert sum(sd.syncs.values()) == 1
        lin = torch.nn.Linear(3, 1).to(torch.device("cpu"))
        _ = lin(dev)  # the parameters moved with .to(device) are device tensors
        assert sum(sd.violations.values()) == 1
        _ = torch.nn.Linear(3, 1)(dev)  # a module never moved: its host weight meets the device input
        assert sum(sd.violations.values()) == 2


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A tiny SFT'd model (a start for the online recipes, the distillation teacher) and a reward model on it."""
    root = tmp_path_factory.mktemp("device")
    sft.train(sft.Config(task="arith:1", steps=2, n_train=16, batch_size=8, eval_n=0, out_dir=str(root / "sft"), **C))
    reward_model.train(reward_model.Config(task="arith:1", steps=1, batch_size=4, out_dir=str(root / "rm"), **C))
    return root


def _cases(root, hf: str) -> dict:
    """case -> (train function, its Config, keyword arguments): small enough for one step in seconds."""
    from test_agents import ENV

    from mirl import eval as ev

    s = str(root / "sft" / "final")
    rl = dict(RL, model=s)
    (root / "two_turns.py").write_text(ENV)  # an environment that always replies once: its tokens in every row
    two_turns = f"{root / 'two_turns.py'}:TwoTurns"
    group = dict(prompts_per_step=2, group_size=2)
    return {
        "sft": (sft.train, sft.Config, dict(task="arith:1", steps=1, n_train=8, batch_size=4, eval_n=2, **C)),
        "dpo": (
            preference.train,
            preference.Config,
            dict(model=s, task="arith:1", steps=1, batch_size=4, n_prompts=16, ref_mode="model", eval_n=2, **C),
        ),
        "dpo_group_loss_bf16_reference": (
            preference.train,
            preference.Config,
            dict(model=s, task="arith:1", steps=1, batch_size=4, n_prompts=16, ref_mode="model", dtype="bfloat16")
            | dict(loss="group_js", eval_n=0, **C),
        ),
        "rm": (reward_model.train, reward_model.Config, dict(task="arith:1", steps=1, batch_size=4, **C)),
        "prm": (
            prm.train,
            prm.Config,
            dict(model=s, task="arith:2", steps=1, n_prompts=8, batch_size=4, eval_n=4, threads=1, device="cpu"),
        ),
        "grpo": (grpo.train, grpo.Config, dict(beta=0.1, reward=f"task,rm:{root / 'rm' / 'final'}", **group, **rl)),
        "grpo_step_rewards": (grpo.train, grpo.Config, dict(step_rewards=True, minibatches=2, **group, **rl)),
        "grpo_gdpo_dynamic": (
            grpo.train,
            grpo.Config,
            dict(reward="task:1,format:0.1", advantage="gdpo", dynamic_sampling=True)
            | dict(max_refills=1, prompt_sampler="pass-rate", **group, **rl),
        ),
        "online": (online.train, online.Config, dict(k=2, prompts_per_step=2, **rl)),
        "ppo_separate_critic": (
            ppo.train,
            ppo.Config,
            dict(samples_per_prompt=2, prompts_per_step=2, critic="separate", **rl),
        ),
        "ppo": (ppo.train, ppo.Config, dict(samples_per_prompt=2, prompts_per_step=2, beta=0.05, **rl)),
        "distill": (
            distill.train,
            distill.Config,
            dict(RL, model="gpt-nano", teacher=s, samples_per_prompt=2, prompts_per_step=2),
        ),
        "eval": (ev.run, ev.Config, dict(model=s, task="arith:1", n=4, k=2, max_new_tokens=6, threads=1, device="cpu")),
        "vlm_grpo": (grpo.train, grpo.Config, dict(RL, model="vlm-nano", task="shapes", max_new_tokens=4, **group)),
        "vlm_noisy_rollout": (
            grpo.train,
            grpo.Config,
            dict(RL, model="vlm-nano", task="shapes", max_new_tokens=4, noisy_rollout=0.5, **group),
        ),
        "hf_grpo": (grpo.train, grpo.Config, dict(RL, model=hf, beta=0.1, max_new_tokens=4, **group)),
        "hf_grpo_lora": (grpo.train, grpo.Config, dict(RL, model=hf, beta=0.1, lora_r=4, max_new_tokens=4, **group)),
        # multi-turn episodes (issue 27): the calculator's tool turns, PPO's GAE over the model's tokens, images in
        # a tool's reply (zoom's crop)
        "grpo_env": (grpo.train, grpo.Config, dict(rl, env=two_turns, task="", max_turns=3, **group)),
        "grpo_calc": (grpo.train, grpo.Config, dict(rl, env="calc", task="", max_turns=2, **group)),
        "ppo_env": (
            ppo.train,
            ppo.Config,
            dict(rl, env=two_turns, task="", max_turns=3, samples_per_prompt=2, prompts_per_step=2)
            | dict(max_new_tokens=12),
        ),
        "vlm_zoom": (grpo.train, grpo.Config, dict(RL, model="vlm-nano", env="zoom", task="", max_turns=2, **group)),
        "hf_sft_lora": (
            sft.train,
            sft.Config,
            dict(model=hf, task="arith:1", steps=1, n_train=8, batch_size=4, lora_r=4, eval_n=0, **C),
        ),
    }


RECIPES = ["sft", "dpo", "dpo_group_loss_bf16_reference", "rm", "prm", "grpo", "grpo_step_rewards"]
RECIPES += ["grpo_gdpo_dynamic", "online", "ppo", "ppo_separate_critic", "distill", "eval", "vlm_noisy_rollout"]
RECIPES += ["vlm_grpo", "hf_grpo", "hf_grpo_lora", "hf_sft_lora"]  # LoRA: the reference is the policy, adapters off
RECIPES += ["grpo_env", "grpo_calc", "ppo_env", "vlm_zoom"]


@pytest.mark.parametrize("case", RECIPES)
def test_one_step_of_every_recipe_keeps_its_tensors_on_the_device(case, start, hf_tiny_dir, tmp_path):
    """Policy, reference, value head, reward model (rm:), PRM, teacher and every batch on the device: no op
    mixes a host tensor of more than 0 dimensions with a device tensor. (On the code before this change it
    failed in pad_batch, pack_rows, the rewards and advantages, the minibatch indices, the value head.)"""
    torch.set_num_threads(1)
    train, config, kw = _cases(start, str(hf_tiny_dir))[case]
    cfg = config(**kw) if case == "eval" else config(out_dir=str(tmp_path / case), **kw)
    with ShadowDevice() as sd:
        train(cfg)
    assert not sd.violations, sd.report()


@pytest.mark.parametrize("stop_strings", [(), ("|",)])
def test_the_local_sampler_reads_the_host_once_per_decoding_step(stop_strings):
    """At most one host synchronisation per decoded token (the count of rows still going; with stop strings
    that read also brings the step's tokens), whatever the batch: before, done.all() and the decoding of every
    unfinished row on every token."""
    from mirl.models import load_policy
    from mirl.rollout.sample import generate

    torch.manual_seed(0)
    policy = load_policy("gpt-nano", seed=0).to(torch.device("cpu"))
    prompts = [policy.tokenizer.encode(f"{a}+{b}=") for a in range(4) for b in range(4)]
    gen = torch.Generator().manual_seed(0)
    with ShadowDevice() as sd:
        batch = generate(
            policy, prompts, max_new_tokens=12, samples_per_prompt=2, stop_strings=stop_strings, generator=gen
        )
    steps = batch.response_ids.shape[1]
    # every sync of the call: one per step, the prefill's (the tiny model checks its positions) and the token ids
    # and lengths read once at the end
    assert sum(sd.syncs.values()) <= steps + 4, sd.syncs


def test_device_options_resolve_and_bad_values_are_refused():
    from mirl.device import bf16_default, resolve_device, resolved
    from mirl.options import ConfigError, check_config

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    assert bf16_default(torch.device("cpu")) is False
    cfg = resolved(grpo.Config(device="cpu"))
    assert cfg.device == "cpu" and cfg.bf16 is False  # auto bf16: off on a CPU
    assert resolved(grpo.Config(device="cpu", bf16=True)).bf16 is True  # given: kept
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(ConfigError, match="--device"):
            check_config(grpo.Config(device=bad))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="--dtype 'bfloat16' has no effect"):
        check_config(grpo.Config(dtype="bfloat16"))  # beta 0: no reference copy to load
    check_config(grpo.Config(dtype="bfloat16", beta=0.1))
    with pytest.raises(ConfigError, match="--dtype"):
        check_config(grpo.Config(dtype="float16", beta=0.1))


def test_a_frozen_reference_in_bfloat16_halves_its_memory():
    from mirl.models import load_policy
    from mirl.recipes.common import frozen_reference

    policy = load_policy("gpt-nano", seed=0)
    ref = frozen_reference(policy, "bfloat16")
    assert {p.dtype for p in ref.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in policy.parameters()} == {torch.float32}  # the trained copy keeps fp32
    assert not any(p.requires_grad for p in ref.parameters())


def test_out_of_gpu_memory_is_one_line_naming_the_phase_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    """An injected torch.cuda.OutOfMemoryError in the update of step 2: the command stops with one line naming
    the phase, the step, the batch shape and the options that lower memory; step 1's checkpoint stays."""
    from mirl import cli

    calls = {"n": 0}
    real = grpo.grpo_update

    def update(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(grpo, "grpo_update", update)
    out = tmp_path / "run"
    argv = ["grpo", "--task", "arith:1", "--steps", "3", "--prompts-per-step", "2", "--group-size", "2"]
    argv += ["--max-new-tokens", "6", "--eval-n", "0", "--threads", "1", "--no-report", "--save-every", "1"]
    argv += ["--out-dir", str(out), "--device", "cpu"]
    assert cli.main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mirl grpo")]
    assert len(err) == 1, err  # (the progress line of step 1 is above it)
    assert "out of GPU memory in the update of step 2, batch 4 x" in err[0]
    assert "--prompts-per-step" in err[0] and "--activation-checkpointing" in err[0]
    assert "last checkpoint is in" in err[0]
    import json

    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 1


def test_a_resumed_dpo_run_keeps_its_cached_reference_on_the_device(start, tmp_path):
    """--resume with the default precomputed reference: the log-probs read back from the run folder are put on
    the policy's device (they were read to the host)."""
    kw = dict(model=str(start / "sft" / "final"), task="arith:1", batch_size=4, n_prompts=16, eval_n=0, **C)
    out = str(tmp_path / "dpo")
    preference.train(preference.Config(steps=1, out_dir=out, **kw))
    with ShadowDevice() as sd:
        preference.train(preference.Config(steps=2, resume=True, out_dir=out, allow_config_change=True, **kw))
    assert not sd.violations, sd.report()


def test_autocast_is_keyed_on_the_model_in_one_place():
    """torch.autocast is entered only through logps.autocast (keyed on the model's device, never on an input's):
    a recipe that wrote torch.autocast(ids.device.type, ...) would run without bf16 on a GPU when its ids were
    on the host."""
    from pathlib import Path

    import mirl

    root = Path(mirl.__file__).parent
    users = sorted(str(p.relative_to(root)) for p in root.rglob("*.py") if "torch.autocast(" in p.read_text())
    assert users == ["logps.py"], users  # autocast(), and the head kept in float32 (enabled=False)
    assert "torch.autocast(hidden.device.type, enabled=False)" in (root / "logps.py").read_text()


def test_a_multi_turn_episode_keeps_its_tensors_on_the_device():
    """Episodes with the environment's tokens in every row (a scripted two-turn calculator episode and a one-turn
    answer): the episode batch, its packing with the action mask, the policy loss and PPO's GAE over the model's
    tokens (masked_gae, last_index) stay on the device."""
    from test_episodes import EXAMPLE, Host, Renderer, ScriptedEngine

    from mirl.advantages import last_index, masked_gae
    from mirl.logps import response_logps
    from mirl.losses.policy import PolicyLoss
    from mirl.models import load_policy
    from mirl.rollout.episodes import run_episodes
    from mirl.rollout.score import pack_rows

    torch.set_num_threads(1)
    with ShadowDevice() as sd:
        policy = load_policy("gpt-nano", max_seq_len=128, seed=0).to(torch.device("cpu"))
        engine = ScriptedEngine([[("<calc>12*34</calc>", False), ("408", True)], [("408", True)]]).start()
        eps = run_episodes(policy, Host(), Renderer(), [EXAMPLE, EXAMPLE], group_size=1, max_turns=3, max_tokens=64,
                           turn_tokens=24, engine=engine)  # fmt: skip
        u = pack_rows([(eps.batch, 0), (eps.batch, 1)], policy.tokenizer.pad_token_id)
        lp, _ = response_logps(policy, u.ids, u.attn, u.n_resp, 1.0)
        loss, _ = PolicyLoss()(lp, lp.detach(), torch.ones(2, device=lp.device), u.resp_mask)
        loss.backward()
        rewards = torch.zeros(u.resp_mask.shape, device=lp.device)
        rewards[torch.arange(2, device=lp.device), last_index(u.resp_mask)] = 1.0
        adv, _ = masked_gae(rewards, lp.detach(), u.resp_mask, 1.0, 0.95)
    assert int((u.resp_mask == 0).sum()) >= 20  # the reply's tokens are in the batch, out of the mask
    assert not sd.violations, sd.report()
