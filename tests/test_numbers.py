"""Regression tests for numbers that were wrong in common settings; each failed on the code before its fix.

The values are derived by hand in the docstrings, or are invariances (a ratio of exactly 1 at an
unchanged policy, a log-ratio of 0 at the reference).
"""

import json
import math

import pytest
import torch

from mirl.advantages import group_advantages, rloo
from mirl.cli import main
from mirl.data.collate import encode_example, encode_pairs, pad_batch
from mirl.data.formats import SkipCounter
from mirl.logging import read_metrics
from mirl.losses import parse_loss_spec, preference_loss
from mirl.losses.mi import group_mi_loss
from mirl.models import load_policy
from mirl.recipes import online, ppo, preference, sft
from mirl.rewards import register_reward
from mirl.rollout.groups import groups_with_signal
from mirl.rollout.sample import bits_to_uniform, inverse_cdf_index, row_gumbel

PAIRS = [
    {"prompt": f"{a}+{b}=", "chosen": f"{a + b}|{a + b}", "rejected": f"{a + b + 1}|{a + b + 1}"}
    for a in range(4)
    for b in range(4)
]


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """A weak SFT model on 1-digit addition: some samples right, some wrong (groups with signal)."""
    out = tmp_path_factory.mktemp("sft")
    sft.train(
        sft.Config(
            task="arith:1", steps=60, n_train=400, batch_size=32, eval_n=0, threads=2, report=False, out_dir=str(out)
        )
    )
    return out / "final"


# 1 ---------------------------------------------------------------------------------------------------------
def test_counter_uniforms_lie_strictly_inside_the_unit_interval():
    """The largest 32-bit value gave u = (2^24 - 1 + 0.5) / 2^24 = 1 - 2^-25, which float32 rounds to 1.0, and
    a Gumbel draw of -log(-log 1) = +inf: about one token in 2^24 was drawn whatever its probability (even a
    banned one). With 23 bits the extremes are 2^-24 and 1 - 2^-24, both exact in float32."""
    u = bits_to_uniform(torch.tensor([0, 1, 0x7FFFFFFF, 0xFFFFFF00, 0xFFFFFFFF], dtype=torch.long))
    assert u.dtype == torch.float32 and bool((u > 0).all()) and bool((u < 1).all())
    assert float(u.max()) == 1 - 2.0**-24 and float(u.min()) == 2.0**-24
    assert bool(torch.isfinite(-torch.log(-torch.log(u))).all())
    g = row_gumbel(torch.arange(64, dtype=torch.long), 3, 50_000)  # 3.2M draws: all finite
    assert bool(torch.isfinite(g).all())


# 2 ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra", [["--top-p", "0.7"], ["--row-seeded-sampling", "--top-k", "5"]], ids=["top_p", "row_seeded_top_k"]
)
def test_grpo_ratio_is_one_at_lr_zero_with_filtered_sampling(tmp_path, sft_dir, extra):
    """At lr 0 the policy never changes, so every importance ratio is 1 and nothing is clipped. The old
    log-probs used to be the sampler's top-p/top-k-renormalised ones: ratio = kept mass (about 0.7)."""
    rc = main(
        [
            "grpo",
            "--model",
            str(sft_dir),
            "--task",
            "arith:1",
            "--lr",
            "0",
            "--num-iterations",
            "2",
            "--minibatches",
            "2",
            "--group-size",
            "4",
            "--prompts-per-step",
            "4",
            "--steps",
            "3",
            "--eval-n",
            "0",
            "--max-new-tokens",
            "8",
            "--threads",
            "2",
            "--no-report",
            "--temperature",
            "1.0",
            "--out-dir",
            str(tmp_path / "g"),
            *extra,
        ]
    )
    assert rc == 0
    rows = read_metrics(tmp_path / "g")
    assert len(rows) == 3
    for r in rows:
        assert r["clip_fraction"] == 0.0
        assert r["ratio/mean"] == pytest.approx(1.0, abs=1e-5)


# 3 ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["simpo", "sft"])
def test_logp_agg_mean_divides_by_the_length_once(tmp_path, loss):
    """logp_agg=mean gives token-mean log-probs m_w, m_l. SimPO's loss is then sp(-(beta (m_w - m_l) - gamma))
    and the SFT term -m_w; the recipe used to divide m by the length a second time. One step over all 16
    pairs (batch 16) at lr 0: the logged loss is the mean of the formula over the pairs."""
    cfg = preference.Config(
        task="",
        loss=loss,
        logp_agg="mean",
        beta=2.0,
        simpo_gamma=0.5,
        steps=1,
        batch_size=16,
        lr=0.0,
        warmup_steps=0,
        threads=2,
        probe_every=0,
        report=False,
        out_dir=str(tmp_path / loss),
    )
    policy = load_policy("gpt-nano", max_seq_len=256, seed=0)
    res = preference.train(cfg, model=policy, data=PAIRS)
    skips = SkipCounter()
    pairs = encode_pairs(policy, PAIRS, cfg.max_len, skips)
    m_w, m_l = preference.all_pair_logps(policy, pairs, policy.tokenizer.pad_token_id, average=True)
    want = (torch.nn.functional.softplus(-(2.0 * (m_w - m_l) - 0.5)) if loss == "simpo" else -m_w).mean()
    assert res.history[0]["loss"] == pytest.approx(float(want), rel=1e-5)


# 4 ---------------------------------------------------------------------------------------------------------
def _tiny_hf(tmp_path, name, hf_tiny_dir):
    from conftest import tiny_text_config
    from transformers import AutoTokenizer, GraniteConfig, GraniteForCausalLM, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(hf_tiny_dir))
    common = tiny_text_config(tok, max_position_embeddings=128)
    torch.manual_seed(0)
    if name == "granite":  # logits = lm_head(h) / logits_scaling
        model = GraniteForCausalLM(GraniteConfig(logits_scaling=4.0, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    path = tmp_path / name
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.mark.parametrize("name,fused", [("granite", False), ("llama", True)])
def test_fused_head_only_where_it_equals_the_models_logits(tmp_path, hf_tiny_dir, name, fused):
    """The fused LM head computes log-probs from the last hidden state and the head weight. Granite divides
    its logits by logits_scaling (4 here) after the head: the fused path gave log-probs of unscaled logits.
    Now only allow-listed model types take it, and the preference forward equals the model's own logits."""
    policy = load_policy(_tiny_hf(tmp_path, name, hf_tiny_dir))
    pairs = encode_pairs(policy, PAIRS[:4], 64, SkipCounter())
    seqs = [c for c, _ in pairs] + [r for _, r in pairs]
    ids, attn, resp = pad_batch(seqs, policy.tokenizer.pad_token_id)
    assert (policy(ids, attn, output="hidden_and_head").head_weight is not None) == fused
    out = preference.pair_forward(policy, pairs, policy.tokenizer.pad_token_id, average=False)
    with torch.no_grad():
        logits = policy.model(input_ids=ids, attention_mask=attn).logits  # the model's own forward
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    want = (lp * resp[:, 1:]).sum(-1)
    torch.testing.assert_close(torch.cat([out[0], out[1]]).detach(), want, atol=1e-4, rtol=1e-4)


# 5 ---------------------------------------------------------------------------------------------------------
def test_reward_model_reward_scores_the_tokens_it_was_trained_on(tmp_path, hf_tiny_dir):
    """A tokenizer that adds BOS by default (Llama-style): the reward used to encode completions with it, so
    RL scored [BOS] + completion while training saw the completion alone. Now the reward's score of a
    (prompt, completion) equals the reward model's score of the training encoding."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from mirl.models.heads import RewardModel
    from mirl.rewards.reward_model import RewardModelReward

    tok = AutoTokenizer.from_pretrained(str(hf_tiny_dir))
    bos = "<|im_start|>"
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.convert_tokens_to_ids(bos))]
    )
    tok.bos_token = bos
    path = tmp_path / "bos_model"
    load_policy(hf_tiny_dir).model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    policy = load_policy(path)
    assert policy.tokenizer.encode("3")[0] == policy.tokenizer.bos_token_id  # the default adds BOS
    torch.manual_seed(1)
    rm = RewardModel(policy)
    rm.save(tmp_path / "rm")
    rm = RewardModel.load(tmp_path / "rm")
    prompts, completions = ["1+2=", "2+2="], ["3|3", "4|4 ok"]
    got = RewardModelReward(str(tmp_path / "rm"))(prompts, completions)
    seqs = [encode_example(rm.policy, p, c, 64, SkipCounter(), "x") for p, c in zip(prompts, completions)]
    ids, attn, resp = pad_batch(seqs, rm.tokenizer.pad_token_id)
    with torch.no_grad():
        want = rm(ids, attn, resp).tolist()
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


# 6 ---------------------------------------------------------------------------------------------------------
def test_rloo_leaves_unscorable_rewards_out():
    """Group [nan, 1, 0, 1]: the NaN row gets 0 and is no sibling's baseline.
    row 1: 1 - (0 + 1) / 2 = 0.5; row 2: 0 - (1 + 1) / 2 = -1; row 3: 0.5 (the old code made NaN a 0:
    row 1 = 1 - 1/3). Group [nan, nan, 1, nan]: the lone scorable row has no baseline: 0."""
    adv = rloo(torch.tensor([float("nan"), 1.0, 0.0, 1.0, float("nan"), float("nan"), 1.0, float("nan")]), 4)
    assert adv.tolist() == pytest.approx([0.0, 0.5, -1.0, 0.5, 0.0, 0.0, 0.0, 0.0])
    # no NaN: the textbook leave-one-out values
    assert rloo(torch.tensor([1.0, 0.0, 0.0]), 3).tolist() == pytest.approx([1.0, -0.5, -0.5])


# 7: scale_rewards batch under torchrun is in tests/test_distributed.py (grpo_batch_small) ---------------------
def test_batch_scaling_uses_the_given_global_std():
    """scale=batch divides by the std passed in (the global batch's under torchrun), not the local one."""
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    adv = group_advantages(r, 2, "batch", batch_std=2.0)
    assert adv.tolist() == pytest.approx([0.5 / (2.0 + 1e-4), -0.5 / (2.0 + 1e-4), 0.0, 0.0])


# 8 ---------------------------------------------------------------------------------------------------------
def test_group_dv_masks_padding_exactly():
    """Ragged group: two real critics T = [-100, -100] and one padding slot, positive the first.
    -I_DV = -T_pos + logsumexp_real(T) - log 2 = 100 + (-100 + log 2) - log 2 = 0. The old weight 1e-30 on the
    padding (critic 0) added exp(-69) to the sum, which dominates exp(-100): a loss of about 31."""
    t = torch.tensor([[-100.0, -100.0, 0.0]])
    loss, _ = group_mi_loss(
        t,
        torch.zeros_like(t),
        torch.tensor([[True, False, False]]),
        beta=1.0,
        estimator="dv",
        mask=torch.tensor([[True, True, False]]),
    )
    assert float(loss) == pytest.approx(0.0, abs=1e-5)
    # a group whose every slot is padding gives 0 and a finite gradient
    t = torch.zeros(1, 2, requires_grad=True)
    loss, _ = group_mi_loss(
        t,
        torch.zeros(1, 2),
        torch.zeros(1, 2, dtype=torch.bool),
        beta=1.0,
        estimator="dv",
        mask=torch.zeros(1, 2, dtype=torch.bool),
    )
    loss.sum().backward()
    assert float(loss) == 0.0 and bool(torch.isfinite(t.grad).all())


# 9: an empty per-rank minibatch is in tests/test_distributed.py (grpo_batch_small, ppo_small) -----------------


# 10 --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ref_mode", ["precompute", "model"])
def test_bf16_reference_runs_under_the_policys_arithmetic(tmp_path, ref_mode):
    """--bf16: the policy's forward runs under bf16 autocast; the reference used to run in float32, so at step
    0 (policy = reference) the implicit rewards beta * (logp - ref_logp) were not zero (5.6e-5 here on the
    random tiny GPT). Both sides now use the same arithmetic in the same batch shapes (all 16 pairs in one
    batch): exactly zero."""
    cfg = preference.Config(
        task="",
        loss="dpo",
        bf16=True,
        ref_mode=ref_mode,
        steps=1,
        batch_size=16,
        lr=0.0,
        warmup_steps=0,
        threads=2,
        probe_every=0,
        report=False,
        out_dir=str(tmp_path / "b"),
    )
    res = preference.train(cfg, model=load_policy("gpt-nano", seed=0), data=PAIRS)
    h = res.history[0]
    assert h["rewards/chosen"] == 0.0 and h["rewards/rejected"] == 0.0


@pytest.mark.parametrize("loss", ["dpo", "simpo"])
def test_probes_run_under_the_training_arithmetic_from_start_to_end(tmp_path, monkeypatch, loss):
    """The probe pairs' log-probs (probe/*, the summary's start and change) are taken under the training forward's
    arithmetic (bf16 autocast here): the start is the precomputed reference's rows for DPO (the policy at step 0)
    and its own pass for SimPO (no reference), equal to a bf16 pass of the start model and not to a float32 one;
    the end is the last step's probe when that step took one (steps 1 and 3 of 3 with probe_every 3), not a
    second pass: 3 passes over the probes in all (the start, steps 1 and 3), where there were 5."""
    policy = load_policy("gpt-nano", seed=0)
    pairs = encode_pairs(policy, PAIRS, 512, SkipCounter())
    pad = policy.tokenizer.pad_token_id
    torch.set_num_threads(2)  # as the run's threads=2: the same kernels' reduction order
    want = {bf: preference.all_pair_logps(policy, pairs, pad, False, bf16=bf) for bf in (True, False)}
    passes, logps = [], preference.all_pair_logps
    monkeypatch.setattr(preference, "all_pair_logps", lambda *a, **k: passes.append(k.get("bf16")) or logps(*a, **k))
    cfg = preference.Config(task="", loss=loss, bf16=True, steps=3, batch_size=8, lr=1e-2, warmup_steps=0, threads=2,
                            probe_every=3, report=False, out_dir=str(tmp_path / loss))  # fmt: skip
    res = preference.train(cfg, model=policy, data=PAIRS)
    s, probed = res.summary, [r for r in res.history if "probe/mass" in r]
    start = s["probe_start"]["chosen_logps"], s["probe_start"]["rejected_logps"]
    assert start == (float(want[True][0].mean()), float(want[True][1].mean()))  # the same pass: exactly
    assert start[0] != float(want[False][0].mean())  # bf16 and float32 differ (2e-5 here): the test can tell
    assert [r["step"] for r in probed] == [1, 3]
    end = start[0] + s["chosen_logp_change"], start[1] + s["rejected_logp_change"]
    assert end == pytest.approx((probed[-1]["probe/chosen_logps"], probed[-1]["probe/rejected_logps"]), abs=1e-5)
    assert abs(s["chosen_logp_change"]) > 1e-3  # lr 1e-2 moved it
    assert passes == [True] * 3


# 11 --------------------------------------------------------------------------------------------------------
def test_inverse_cdf_reaches_the_tail_of_a_large_vocabulary():
    """p = 0.999 on token 0 and 1e-3 spread over 149 999 tokens (w = 6.7e-9 each, under float32's spacing of
    6e-8 near 1). The u at the centre of token k's interval, 0.999 + (k - 1/2) w, must draw token k, for every
    k. A float32 cumulative sum moves in steps of 6e-8: 133 222 of these intervals have width 0 (those tokens
    could never be drawn) and the rest about 9 times their probability."""
    v = 150_000
    w = 1e-3 / (v - 1)
    probs = torch.full((1, v), w)
    probs[0, 0] = 0.999
    assert int((torch.diff(probs.cumsum(-1)[0]) == 0).sum()) > 100_000  # the float32 accumulation it replaces
    c = probs[0].double().cumsum(0)  # exact interval ends of the float32 probabilities
    centres = (c[:-1] + probs[0, 1:].double() / 2) / c[-1]  # (v - 1,): one u per tail token
    idx = inverse_cdf_index(probs, centres[None])
    assert torch.equal(idx[0], torch.arange(1, v))
    assert int(inverse_cdf_index(probs, torch.tensor([[0.5]], dtype=torch.float64))) == 0


# 12 --------------------------------------------------------------------------------------------------------
def test_nan_rewards_are_no_outcome_for_dynamic_sampling():
    """[nan, 1, 1, 1] has one outcome only (no signal); [nan, 1, 0, 1] has two; [nan, nan, nan, 1] has one."""
    r = torch.tensor([float("nan"), 1, 1, 1, float("nan"), 1, 0, 1, float("nan"), float("nan"), float("nan"), 1])
    assert groups_with_signal(r, 4).tolist() == [False, True, False]


@register_reward("test_half_unscorable")
def _half_unscorable(prompts, completions, **_):
    """1.0 on completions of even length, None (not applicable) on the others."""
    return [1.0 if len(c) % 2 == 0 else None for c in completions]


@register_reward("test_unscorable")
def _unscorable(prompts, completions, **_):
    """Never applicable."""
    return [None] * len(completions)


def test_online_never_makes_an_unscorable_response_a_negative(tmp_path, sft_dir):
    """Rewards 1.0 or None only: no group has a negative, so no pair can be formed (the old code made the
    None responses negatives and trained on them)."""
    res = online.train(
        online.Config(
            model=str(sft_dir),
            task="arith:1",
            reward="test_half_unscorable",
            loss="mio",
            k=4,
            prompts_per_step=8,
            steps=2,
            eval_n=0,
            threads=2,
            max_new_tokens=8,
            report=False,
            out_dir=str(tmp_path / "o"),
        )
    )
    g = res.summary["groups"]
    assert g["used"] == 0 and g["unscorable"] > 0 and not any("loss" in h for h in res.history)


def test_ppo_leaves_unscorable_responses_out_of_the_update(tmp_path, sft_dir):
    """Every reward None: no response enters the policy or value loss, so the weights stay put (the old code
    scored them 0 and fitted the critic to it)."""
    model = load_policy(sft_dir)
    before = [p.clone() for p in model.parameters()]
    res = ppo.train(
        ppo.Config(
            model=str(sft_dir),
            task="arith:1",
            reward="test_unscorable",
            samples_per_prompt=2,
            prompts_per_step=4,
            steps=1,
            beta=0.0,
            eval_n=0,
            threads=2,
            max_new_tokens=8,
            report=False,
            out_dir=str(tmp_path / "p"),
        ),
        model=model,
    )
    assert res.history[0]["loss"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, res.model.parameters()))


# 13 --------------------------------------------------------------------------------------------------------
def test_every_term_of_a_group_loss_spec_is_trained(tmp_path):
    """'group_dv,group_js:0.5' at the reference (T = 0, a pair as a group of two): group_dv = -0 + log(2) - log 2
    = 0 and group_js = sp(0) + (sp(0) + sp(0)) / 2 = 2 ln 2, so the loss is 0 + 0.5 * 2 ln 2 = ln 2. Only the
    first term used to count (at weight 1): 0."""
    terms = parse_loss_spec("group_dv,group_js:0.5")
    z = torch.zeros(3, 2)
    loss, m = preference_loss(terms, z, z, torch.tensor([[True, False]]).expand(3, 2), beta=0.1)
    assert loss.tolist() == pytest.approx([math.log(2)] * 3)
    assert "loss/group_js" in m and "loss/group_dv" in m
    cfg = preference.Config(
        task="",
        loss="group_dv,group_js:0.5",
        steps=1,
        batch_size=16,
        threads=2,
        probe_every=0,
        report=False,
        out_dir=str(tmp_path / "d"),
    )
    res = preference.train(cfg, model=load_policy("gpt-nano", seed=0), data=PAIRS)
    assert res.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


# 14 --------------------------------------------------------------------------------------------------------
def test_a_diverging_run_stops_and_writes_no_final_model(tmp_path, capsys):
    """lr 1e30: the first Adam step moves every weight by ~1e30, the logits overflow, the next loss and gradient
    are NaN. The run stops at that optimizer step with exit status 1, keeps the checkpoint of step 1 and
    writes no final/ (it used to save an all-NaN model and exit 0)."""
    out = tmp_path / "s"
    rc = main(
        [
            "sft",
            "--task",
            "arith:1",
            "--steps",
            "5",
            "--lr",
            "1e30",
            "--warmup-steps",
            "0",
            "--eval-n",
            "0",
            "--save-every",
            "1",
            "--threads",
            "2",
            "--no-report",
            "--out-dir",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert "optimizer step 2: the gradient norm is nan" in err and "Traceback" not in err
    assert not (out / "final").exists()
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 1


def test_adamw_is_foreach_on_a_cpu_and_its_first_step_is_lr_times_the_sign():
    """make_optimizer on CPU tensors takes the foreach form (the fused CPU kernel rounds differently under each of
    ATen's instruction sets: see its docstring), weight decay on matrices only; Adam's first update, hand-derived:
    decoupled decay, then lr x m / sqrt(v) = lr x sign(g) (eps aside)."""
    from mirl.optim import make_optimizer

    torch.manual_seed(0)
    a = torch.nn.Linear(30, 20)
    opt = make_optimizer(a, lr=1e-2, weight_decay=0.1)
    assert opt.defaults["foreach"] is True and not opt.defaults.get("fused")
    w0, b0 = a.weight.detach().clone(), a.bias.detach().clone()
    g = torch.randn(20, 30), torch.randn(20)
    a.weight.grad, a.bias.grad = g[0].clone(), g[1].clone()
    opt.step()
    torch.testing.assert_close(a.weight, w0 * (1 - 1e-3) - 1e-2 * g[0].sign(), atol=1e-6, rtol=0)
    torch.testing.assert_close(a.bias, b0 - 1e-2 * g[1].sign(), atol=1e-6, rtol=0)
