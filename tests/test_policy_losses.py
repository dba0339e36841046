"""Policy-gradient losses and advantages: hand values and loop references (they run without TRL; the equality
with TRL's GRPOTrainer is in tests/test_trl_policy_equality.py)."""

import math

import pytest
import torch

from mirl.advantages import gae, group_advantages, rloo, whiten
from mirl.losses.policy import clipped_policy_loss, clipped_value_loss, kl_estimate, top_entropy_mask


def test_ratio_one_gives_minus_advantage_and_policy_gradient():
    # at logps == old_logps the loss is -mean(A) and its gradient is -A per token / |o| (grpo aggregation)
    logps = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, m = clipped_policy_loss(logps, logps.detach(), adv, mask)
    assert loss.item() == pytest.approx(-(1.0 - 2.0) / 2)
    loss.backward()
    expect = torch.tensor([[-1 / 2 / 2, -1 / 2 / 2, 0], [2 / 3 / 2, 2 / 3 / 2, 2 / 3 / 2]], dtype=torch.float64)
    torch.testing.assert_close(logps.grad, expect)
    assert m["clip_fraction"] == 0


def test_kl_estimators_by_hand():
    lp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])  # q = ref - lp = -0.5
    assert kl_estimate(lp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_estimate(lp, ref, "k2").item() == pytest.approx(0.125)
    assert kl_estimate(lp, ref, "k3").item() == pytest.approx(torch.exp(torch.tensor(-0.5)).item() + 0.5 - 1)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(lp, ref, "k4")


def test_value_loss_clipping_by_hand():
    v, v_old, ret = torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]])
    # unclipped (1 - 2)^2 = 1; clipped V = 0.2: (0.2 - 2)^2 = 3.24; max -> 3.24; times 1/2
    assert clipped_value_loss(v, v_old, ret, torch.ones(1, 1)).item() == pytest.approx(1.62)


# ---- advantages against loops -------------------------------------------------------------------------


def _group_loop(r, g, scale):
    out = []
    allr = [x for x in r if x == x]
    bm = sum(allr) / len(allr)
    bstd = (sum((x - bm) ** 2 for x in allr) / (len(allr) - 1)) ** 0.5
    for s in range(0, len(r), g):
        grp = [x for x in r[s : s + g] if x == x]
        mean = sum(grp) / len(grp)
        std = (sum((x - mean) ** 2 for x in grp) / (len(grp) - 1)) ** 0.5 if len(grp) > 1 else 0.0
        for x in r[s : s + g]:
            if x != x:
                out.append(0.0)
            elif scale == "group":
                out.append((x - mean) / (std + 1e-4))
            elif scale == "batch":
                out.append((x - mean) / (bstd + 1e-4))
            else:
                out.append(x - mean)
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_loop_and_trl_formula(scale):
    r = [1.0, 0.0, 1.0, 1.0, 0.5, float("nan"), 0.0, 0.25, 0.0, 0.0, 0.0, 0.0]
    ours = group_advantages(torch.tensor(r, dtype=torch.float64), 4, scale)
    torch.testing.assert_close(ours, torch.tensor(_group_loop(r, 4, scale), dtype=torch.float64))
    assert ours[8:].abs().max() == 0  # all-equal group: zero advantage
    if scale != "batch":  # TRL: (r - mean_group) / (nanstd_group + 1e-4); nan rows -> 0
        rr = torch.tensor(r, dtype=torch.float64)
        from trl.trainer.utils import nanstd

        mean = torch.nanmean(rr.view(-1, 4), 1).repeat_interleave(4)
        trl = rr - mean
        if scale == "group":
            trl = trl / (nanstd(rr.view(-1, 4), dim=1).repeat_interleave(4) + 1e-4)
        torch.testing.assert_close(ours, torch.nan_to_num(trl, nan=0.0))


def test_rloo_and_whiten_by_hand():
    assert rloo(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2).tolist() == [1.0, -1.0, -1.0, 1.0]
    assert rloo(torch.tensor([3.0, 0.0, 0.0]), 3).tolist() == [3.0, -1.5, -1.5]
    w = whiten(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1, 1, 0]]))  # mean 2, var (1 + 1) / (2 - 1) = 2
    assert w.tolist()[0][:2] == pytest.approx([-(0.5**0.5), 0.5**0.5], abs=1e-6) and w[0, 2] == 0


def _gae_loop(rewards, values, mask, gamma, lam):
    adv = [[0.0] * len(row) for row in rewards]
    for b in range(len(rewards)):
        n = int(sum(mask[b]))
        last = 0.0
        for t in reversed(range(n)):
            nv = values[b][t + 1] if t + 1 < n else 0.0
            delta = rewards[b][t] + gamma * nv - values[b][t]
            last = delta + gamma * lam * last
            adv[b][t] = last
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_gae_matches_loop(gamma, lam):
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(3, 6, generator=g, dtype=torch.float64)
    values = torch.randn(3, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 1 + [0] * 5])
    rewards = rewards * mask
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref = torch.tensor(_gae_loop(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam), dtype=torch.float64)
    torch.testing.assert_close(adv, ref)
    torch.testing.assert_close(ret, (ref + values) * mask)


# ---- policy-loss variants: dual-clip, CISPO, SAPO -----------------------------------------------------------


def _loop_term(kind, lp, ratio, a, eps=0.2, high=0.28, c=3.0, tp=1.0, tn=1.05, cap=2.5):
    """One token's loss, written from the papers' formulas with Python floats."""
    import math

    if kind in ("clip", "dual_clip"):
        clipped = min(max(ratio, 1 - eps), 1 + high)
        term = -min(ratio * a, clipped * a)
        if kind == "dual_clip" and a < 0:
            term = min(term, -c * a)
        return term
    if kind == "cispo":
        return -min(ratio, cap) * a * lp
    tau = tp if a > 0 else tn
    return -(4 / tau) * a / (1 + math.exp(-tau * (ratio - 1)))


@pytest.mark.parametrize("kind", ["clip", "dual_clip", "cispo", "sapo"])
def test_policy_loss_variants_equal_a_loop_reference(kind):
    from mirl.losses.policy import policy_term

    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 3
    ratio = torch.exp(torch.randn(4, 6, generator=g, dtype=torch.float64) * 0.8)  # far outside the clip range
    adv = torch.randn(4, 1, generator=g, dtype=torch.float64) * 2
    got = policy_term(
        lp, ratio, adv, policy_loss=kind, clip_eps=0.2, clip_eps_high=0.28, dual_clip_c=3.0, cispo_cap=2.5
    )
    want = [
        [_loop_term(kind, lp[i, k].item(), ratio[i, k].item(), adv[i, 0].item()) for k in range(6)] for i in range(4)
    ]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    if kind == "dual_clip":  # the bound bites somewhere: a negative advantage with a ratio above c
        assert bool(((ratio > 3.0) & (adv < 0)).any())


def test_policy_loss_variants_match_trl_and_verl_formulas():
    """TRL's GRPOTrainer (loss_type cispo / sapo) and veRL's compute_policy_loss (dual-clip), as they write
    them, on identical tensors."""
    from mirl.losses.policy import policy_term

    g = torch.Generator().manual_seed(1)
    lp = -torch.rand(3, 5, generator=g)
    old = lp + torch.randn(3, 5, generator=g) * 0.5
    adv = torch.randn(3, 1, generator=g)
    coef_1 = torch.exp(lp - old)
    # TRL cispo: clamped_ratios = clamp(coef_1, max=epsilon_high).detach(); loss = -clamped * A * logps (for cispo
    # TRL's epsilon_high is the cap itself: our cispo_cap)
    eps_high = 1.28
    trl_cispo = -torch.clamp(coef_1, max=eps_high).detach() * adv * lp
    torch.testing.assert_close(policy_term(lp, coef_1, adv, policy_loss="cispo", cispo_cap=eps_high), trl_cispo)
    # TRL sapo: temperatures = where(A > 0, pos, neg); loss = -sigmoid(t (coef_1 - 1)) * 4 / t * A
    temps = torch.where(adv > 0, 1.0, 1.05)
    trl_sapo = -torch.sigmoid(temps * (coef_1 - 1)) * 4 / temps * adv
    torch.testing.assert_close(policy_term(lp, coef_1, adv, policy_loss="sapo"), trl_sapo)
    # veRL dual-clip: losses3 = -A * c; clip2 = min(losses3, max(-A r, -A clip(r))); where(A < 0, clip2, clip1)
    clip1 = torch.maximum(-adv * coef_1, -adv * torch.clamp(coef_1, 0.8, 1.2))
    verl = torch.where(adv < 0, torch.minimum(-adv * 3.0, clip1), clip1)
    torch.testing.assert_close(policy_term(lp, coef_1, adv, policy_loss="dual_clip", clip_eps_high=0.2), verl)


@pytest.mark.parametrize("kind", ["clip", "dual_clip", "cispo", "sapo", "gmpo"])
def test_every_policy_loss_is_the_plain_policy_gradient_on_policy(kind):
    """At rho = 1 (one pass over fresh samples) every variant's gradient is -A d logp."""
    from mirl.losses.policy import clipped_policy_loss

    g = torch.Generator().manual_seed(2)
    base = -torch.rand(3, 4, generator=g, dtype=torch.float64)
    adv = torch.randn(3, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 4, dtype=torch.float64)
    lp = base.clone().requires_grad_(True)
    loss, _ = clipped_policy_loss(lp, base.clone(), adv, mask, policy_loss=kind, loss_agg="bnpo")
    loss.backward()
    torch.testing.assert_close(lp.grad, -adv[:, None].expand(3, 4) / 12, rtol=1e-12, atol=1e-12)


def test_grpo_trains_with_each_policy_loss_and_refuses_an_unknown_one(tmp_path):
    import math

    from mirl.options import ConfigError
    from mirl.recipes import grpo

    common = dict(task="arith:1", steps=2, group_size=4, prompts_per_step=4, max_new_tokens=6, eval_n=0)
    common.update(num_iterations=2, threads=1, report=False)
    for kind in ("dual_clip", "cispo", "sapo", "gmpo"):
        res = grpo.train(grpo.Config(**common, policy_loss=kind, out_dir=str(tmp_path / kind)))
        assert len(res.history) == 2 and all(math.isfinite(h["loss"]) for h in res.history)
    with pytest.raises(ConfigError, match="--policy-loss"):
        grpo.train(grpo.Config(**common, policy_loss="gspo", out_dir=str(tmp_path / "bad")))
    from mirl.recipes import ppo

    for kind in ("dual_clip", "cispo", "sapo", "gmpo"):  # PPO takes the same choices
        res = ppo.train(
            ppo.Config(task="arith:1", steps=2, prompts_per_step=4, max_new_tokens=6, eval_n=0, threads=1,
                       report=False, policy_loss=kind, out_dir=str(tmp_path / f"ppo_{kind}"))
        )  # fmt: skip
        assert len(res.history) == 2 and all(math.isfinite(h["loss"]) for h in res.history)


def _loop_std(xs):
    m = sum(xs) / len(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def test_gdpo_matches_loop_and_trl_formula():
    """GDPO (--advantage gdpo): a loop over groups and functions, and TRL's
    normalize_then_sum lines (per-function group normalisation, weighted nansum, batch normalisation) on the
    same tensors; a function that does not apply to a row (NaN) is left out of that row's sum and group
    statistics; a row where none applies gets 0."""
    from mirl.advantages import gdpo_advantages

    g = torch.Generator().manual_seed(0)
    per_fn = torch.randint(0, 2, (12, 2), generator=g).double()
    per_fn[:, 1] = torch.rand(12, generator=g, dtype=torch.float64) * 0.1  # a small format-like reward
    per_fn[5, 1] = float("nan")
    per_fn[7] = float("nan")
    w = torch.tensor([1.0, 0.1], dtype=torch.float64)
    ours = gdpo_advantages(per_fn, w, 4)
    # loop reference
    totals = []
    for i in range(12):
        grp = range(4 * (i // 4), 4 * (i // 4) + 4)
        t, any_ok = 0.0, False
        for k in range(2):
            v = float(per_fn[i, k])
            if v != v:
                continue
            vals = [float(per_fn[j, k]) for j in grp if float(per_fn[j, k]) == float(per_fn[j, k])]
            t += float(w[k]) * (v - sum(vals) / len(vals)) / (_loop_std(vals) + 1e-4)
            any_ok = True
        totals.append(t if any_ok else None)
    ok = [t for t in totals if t is not None]
    mean, std = sum(ok) / len(ok), _loop_std(ok)
    ref = torch.tensor([0.0 if t is None else (t - mean) / (std + 1e-4) for t in totals], dtype=torch.float64)
    torch.testing.assert_close(ours, ref)
    # TRL's formula (GRPOTrainer._generate_and_score_completions, normalize_then_sum)
    from trl.trainer.utils import nanstd

    grouped = per_fn.view(-1, 4, 2)
    reward_k = (grouped - torch.nanmean(grouped, 1, keepdim=True)) / (nanstd(grouped, dim=1, keepdim=True) + 1e-4)
    rewards = (reward_k.view(-1, 2) * w.unsqueeze(0)).nansum(dim=1)
    rewards[torch.isnan(per_fn).all(1)] = float("nan")
    trl = (rewards - torch.nanmean(rewards)) / (nanstd(rewards) + 1e-4)
    torch.testing.assert_close(ours, torch.nan_to_num(trl, nan=0.0))
    # one reward function: GDPO is group normalisation followed by batch normalisation
    one = gdpo_advantages(per_fn[:, :1].nan_to_num(0.0), w[:1], 4)
    two_step = group_advantages(per_fn[:, 0].nan_to_num(0.0), 4)
    torch.testing.assert_close(one, (two_step - two_step.mean()) / (two_step.std() + 1e-4))


@pytest.mark.parametrize("baseline", [False, True])
def test_reinforce_pp_matches_loop_and_verl_formula(baseline):
    """REINFORCE++ (--advantage reinforce_pp[_baseline]): every response token carries its outcome reward
    (minus the group mean with the baseline), whitened over the batch's tokens with a Bessel-corrected
    variance, as veRL's compute_reinforce_plus_plus[_baseline]_outcome_advantage with masked_whiten; NaN rows
    get 0 and are left out of the statistics."""
    from mirl.advantages import reinforce_pp

    g = torch.Generator().manual_seed(1)
    rewards = torch.randint(0, 3, (8,), generator=g).double()
    rewards[3] = float("nan")
    lengths = torch.randint(1, 6, (8,), generator=g)
    ours = reinforce_pp(rewards, lengths, 4 if baseline else 0)
    # loop reference over tokens
    r = [float(x) for x in rewards]
    if baseline:
        for s in (0, 4):
            vals = [r[j] for j in range(s, s + 4) if r[j] == r[j]]
            m = sum(vals) / len(vals) if len(vals) > 1 else 0.0
            for j in range(s, s + 4):
                r[j] -= m
    tokens = [r[i] for i in range(8) if r[i] == r[i] for _ in range(int(lengths[i]))]
    mean = sum(tokens) / len(tokens)
    var = sum((t - mean) ** 2 for t in tokens) / (len(tokens) - 1)
    ref = torch.tensor([0.0 if x != x else (x - mean) / (var + 1e-8) ** 0.5 for x in r], dtype=torch.float64)
    torch.testing.assert_close(ours, ref)
    # veRL's formula on (B, T) token tensors (scorable rows only, as veRL has no NaN rewards)
    keep = ~torch.isnan(rewards)
    t = int(lengths.max())
    mask = (torch.arange(t)[None] < lengths[keep][:, None]).double()
    scores = rewards[keep].clone()
    if baseline:
        idx = torch.arange(8)[keep] // 4
        for k in idx.unique():
            sel = idx == k
            scores[sel] = scores[sel] - (scores[sel].mean() if sel.sum() > 1 else 0.0)
    vals = scores[:, None] * mask
    n = mask.sum()
    m = (vals * mask).sum() / n
    v = (((vals - m) ** 2) * mask).sum() / n * n / (n - 1)
    verl = ((vals - m) * torch.rsqrt(v + 1e-8)) * mask
    torch.testing.assert_close(ours[keep][:, None] * mask, verl)


def _correction_loop(p, q, mask, level, mode, cap):
    """rollout_correction written out one row and token at a time."""
    w = torch.zeros_like(p)
    for i in range(p.shape[0]):
        toks = [k for k in range(p.shape[1]) if mask[i, k]]
        seq = math.exp(sum(float(p[i, k] - q[i, k]) for k in toks))
        for k in toks:
            x = seq if level == "sequence" else math.exp(float(p[i, k] - q[i, k]))
            if mode == "truncate":
                x = min(x, cap)
            elif x > cap:
                x = 0.0
            w[i, k] = x
    return w


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_rollout_correction_equals_loop_and_trl_formula(level, mode):
    import math as m

    from mirl.losses.policy import rollout_correction

    g = torch.Generator().manual_seed(0)
    p = -torch.rand(6, 5, generator=g) * 3
    q = p + torch.randn(6, 5, generator=g) * 0.6  # a sampler that disagrees with the trainer
    mask = torch.ones(6, 5)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    w, stats = rollout_correction(p, q, mask, level=level, mode=mode, cap=2.0)
    torch.testing.assert_close(w, _correction_loop(p, q, mask, level, mode, 2.0))
    # TRL's GRPOTrainer (vllm_importance_sampling_mode = f"{level}_{mode}", clip_max 2, clip_min None), restated
    diff = (p - q) * mask
    ratio = torch.exp(diff.sum(-1, keepdim=True) if level == "sequence" else diff)
    hit = (ratio.expand_as(mask) > 2.0).float() * mask
    if mode == "truncate":
        ratio = torch.clamp(ratio, min=None, max=2.0)
    else:
        ratio = ratio.masked_fill((ratio < -m.inf) | (ratio > 2.0), 0.0)
    torch.testing.assert_close(w, ratio.expand_as(mask) * mask)
    assert stats["is/logp_gap_max"] == pytest.approx(float(((p - q) * mask).abs().max()))
    key = "is/masked_frac" if mode == "mask" else "is/capped_frac"
    assert stats[key] == pytest.approx(float(hit.sum() / mask.sum()))
    assert 0 < stats[key] < 1  # the example exercises the bound


def test_rollout_correction_is_the_identity_when_the_sampler_is_the_trainer():
    from mirl.losses.policy import rollout_correction

    lp = -torch.rand(4, 6)
    mask = (torch.rand(4, 6) > 0.3).float()
    for level in ("token", "sequence"):
        for mode in ("truncate", "mask"):
            w, stats = rollout_correction(lp, lp.clone(), mask, level=level, mode=mode, cap=3.0)
            torch.testing.assert_close(w, mask)
            assert stats["is/weight_mean"] == pytest.approx(1.0) and stats["is/logp_gap_max"] == 0.0
    adv = torch.randn(4)
    plain, _ = clipped_policy_loss(lp, lp.detach(), adv, mask)
    weighted, _ = clipped_policy_loss(lp, lp.detach(), adv, mask, is_weights=mask)
    torch.testing.assert_close(weighted, plain)
    # a weight of 2 on one row's tokens doubles that row's share of the seq-mean loss (grpo aggregation)
    w = mask.clone()
    w[0] *= 2
    weighted, _ = clipped_policy_loss(lp, lp.detach(), adv, mask, is_weights=w)
    torch.testing.assert_close(weighted, plain + (-adv[0]) / 4)


def test_grpo_and_ppo_log_the_rollout_correction_and_refuse_bad_engine_options(tmp_path):
    from mirl.options import ConfigError
    from mirl.recipes import grpo, ppo

    common = dict(task="arith:1", steps=2, max_new_tokens=6, eval_n=0, threads=1, report=False)
    res = grpo.train(
        grpo.Config(**common, group_size=4, prompts_per_step=4, is_correction="token", out_dir=str(tmp_path / "g"))
    )
    # mirl's sampler records the log-probs the trainer recomputes, up to the KV cache's float rounding
    for h in res.history:
        assert h["is/weight_mean"] == pytest.approx(1.0, abs=1e-3) and h["is/logp_gap_max"] < 1e-3
        assert h["is/masked_frac"] == 0.0
    res = ppo.train(
        ppo.Config(**common, prompts_per_step=4, is_correction="sequence", is_mode="truncate", out_dir=str(tmp_path))
    )
    assert all(h["is/capped_frac"] == 0.0 and h["is/weight_mean"] == pytest.approx(1.0, abs=1e-3) for h in res.history)
    with pytest.raises(ConfigError, match="--is-mode"):
        grpo.train(grpo.Config(**common, is_mode="clip", out_dir=str(tmp_path / "bad")))
    with pytest.raises(ConfigError, match="--engine"):
        grpo.train(grpo.Config(**common, engine="sglang", out_dir=str(tmp_path / "bad2")))
    # the built-in tiny GPT has no vLLM implementation (or vLLM is not installed here): a clear error either way
    with pytest.raises(ConfigError, match="--engine vllm"):
        grpo.train(grpo.Config(**common, engine="vllm", out_dir=str(tmp_path / "bad3")))


def test_adaptive_entropy_coef_by_hand():
    from mirl.losses.coefs import adaptive_entropy_coef

    assert adaptive_entropy_coef(0.01, 0.1, 0.2, 0.005, 0.05) == pytest.approx(0.015)  # below target: up
    assert adaptive_entropy_coef(0.01, 0.3, 0.2, 0.005, 0.05) == pytest.approx(0.005)  # above: down
    assert adaptive_entropy_coef(0.002, 0.3, 0.2, 0.005, 0.05) == 0.0  # never negative
    assert adaptive_entropy_coef(0.049, 0.1, 0.2, 0.005, 0.05) == 0.05  # capped


def _quantile_loop(values, q):
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def test_top_entropy_mask_equals_loop_and_keeps_the_fraction():
    from mirl.losses.policy import top_entropy_mask

    g = torch.Generator().manual_seed(0)
    ent = torch.rand(10, 12, generator=g) * 3
    mask = (torch.rand(10, 12, generator=g) > 0.2).float()
    for q in (0.2, 0.5, 0.9):
        kept = top_entropy_mask(ent, mask, q)
        vals = [float(ent[i, k]) for i in range(10) for k in range(12) if mask[i, k]]
        thr = _quantile_loop(vals, 1 - q)
        ref = torch.tensor([[float(mask[i, k] and ent[i, k] >= thr) for k in range(12)] for i in range(10)])
        torch.testing.assert_close(kept, ref)
    ent = torch.randperm(100).float().view(4, 25)  # distinct values: exactly the top 20 of 100 tokens
    kept = top_entropy_mask(ent, torch.ones(4, 25), 0.2)
    assert int(kept.sum()) == 20 and bool((ent[kept.bool()] >= 80).all())
    assert torch.equal(top_entropy_mask(ent, torch.ones(4, 25), 1.0), torch.ones(4, 25))


def test_entropy_with_gradient_equals_the_fused_heads_entropy():
    from mirl.logps import response_logps
    from mirl.models.policy import new_tiny_policy

    policy = new_tiny_policy("gpt-nano", seed=0)
    ids = torch.randint(3, 20, (3, 10))
    attn = torch.ones_like(ids)
    lp, ent = response_logps(policy, ids, attn, 4, 0.7, with_entropy=True)
    lp2, ent2 = response_logps(policy, ids, attn, 4, 0.7, entropy_grad=True)
    torch.testing.assert_close(lp2, lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent2, ent, atol=1e-5, rtol=1e-5)
    assert ent2.requires_grad and not ent.requires_grad
    ent2.sum().backward()
    assert float(policy.model.lm_head.weight.grad.abs().sum()) > 0


def test_grpo_entropy_control_switches(tmp_path):
    from mirl.recipes import grpo

    common = dict(task="arith:1", steps=3, group_size=4, prompts_per_step=4, max_new_tokens=6, eval_n=0)
    common.update(threads=1, report=False)
    res = grpo.train(grpo.Config(**common, entropy_coef=0.01, out_dir=str(tmp_path / "bonus")))
    assert all(h["entropy_coef"] == 0.01 for h in res.history)
    # a target above any entropy reached: the coefficient climbs by delta every step, from 0
    res = grpo.train(grpo.Config(**common, entropy_target=50.0, entropy_coef_delta=0.004, out_dir=str(tmp_path / "a")))
    assert [h["entropy_coef"] for h in res.history] == pytest.approx([0.0, 0.004, 0.008])
    res = grpo.train(grpo.Config(**common, top_entropy_quantile=0.2, out_dir=str(tmp_path / "q")))
    assert all(0.15 < h["tokens/trained_frac"] <= 0.3 for h in res.history)
    plain = grpo.train(grpo.Config(**common, out_dir=str(tmp_path / "plain")))
    assert all(h["tokens/trained_frac"] == 1.0 for h in plain.history)
    # a target below any entropy reached: the coefficient (0.05, then falling) never applies, so the run is the
    # plain one, loss for loss (before the fix the bonus applied whatever the entropy)
    res = grpo.train(grpo.Config(**common, entropy_coef=0.05, entropy_target=1e-6, out_dir=str(tmp_path / "low")))
    assert [h["entropy_coef"] for h in res.history] == pytest.approx([0.05, 0.045, 0.04])
    assert [h["loss"] for h in res.history] == [h["loss"] for h in plain.history]
    assert all(h["entropy_bonus_coef"] == 0.0 for h in res.history)


def test_arith_step_verifier_by_hand():
    from mirl.data.tasks.arith import ArithTask

    t, ex = ArithTask(3), {"prompt": "47+85=", "answer": "132"}
    assert t.step_scores("7+5=12,4+8+1=13|132", ex) == [(6, 1.0), (15, 1.0), (19, 1.0)]
    assert t.step_scores("7+5=12,4+8=12|122", ex) == [(6, 1.0), (13, 0.0), (17, 0.0)]  # the carry forgotten
    assert t.step_scores("7+5=1", ex) == [(5, 0.0), (5, 0.0), (5, 0.0)]  # a column and the answer left out
    assert t.step_scores("7+5=12", ex) == [(6, 1.0), (6, 0.0), (6, 0.0)]  # stopping early scores the rest 0
    assert t.step_scores("7+5=12,4+8+1=13,0+0=0|132", ex)[2] == (21, 0.0)  # an extra column scores 0


def test_process_advantages_by_hand_and_through_grpo(tmp_path):
    from mirl.advantages import process_advantages
    from mirl.options import ConfigError
    from mirl.recipes import grpo

    # baseline "group", one group of two: step rewards [1, 1] and [1, 0], steps ending at tokens 2 and 5; over
    # the group's four steps mean 0.75, std 0.5 (Bessel): a right step is worth 0.25 / 0.5 = 0.5, a wrong one -1.5;
    # both responses 6 tokens long (token 6 is padding)
    adv = process_advantages(
        [[1.0, 1.0], [1.0, 0.0]], [[2, 5], [2, 5]], group_size=2, width=7, eps=0.0, baseline="group", lengths=[6, 6]
    )
    torch.testing.assert_close(adv[0], torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.0]))
    torch.testing.assert_close(adv[1], torch.tensor([-1.0, -1.0, -1.0, -1.5, -1.5, -1.5, 0.0]))
    for baseline in ("group", "position"):  # no signal
        assert torch.equal(process_advantages([[1.0], [1.0]], [[1], [1]], 2, 3, baseline=baseline), torch.zeros(2, 3))
    # baseline "position": step k against the group's step k, the last step against the last steps. Same group:
    # the first steps agree (0); the last ones are 1 and 0, mean 0.5, std 0.7071 (Bessel): +-0.7071
    r = 0.5**0.5
    adv = process_advantages(
        [[1.0, 1.0], [1.0, 0.0]], [[2, 5], [2, 5]], 2, 7, eps=0.0, baseline="position", lengths=[6, 6]
    )
    torch.testing.assert_close(adv, torch.tensor([[r] * 6 + [0.0], [-r] * 6 + [0.0]]))
    # unequal step counts [0, 1, 0] and [1, 1]: step 0 -> -r, +r; step 1 only in the first response -> 0; the
    # last steps (0 and 1) -> -r, +r. Ends [1, 3, 5] and [1, 4], lengths 6 and 5
    adv = process_advantages(
        [[0.0, 1.0, 0.0], [1.0, 1.0]], [[1, 3, 5], [1, 4]], 2, 6, eps=0.0, baseline="position", lengths=[6, 5]
    )
    want = torch.tensor([[-2 * r] * 2 + [-r] * 4, [2 * r] * 2 + [r] * 3 + [0.0]])
    torch.testing.assert_close(adv, want)
    assert float(adv.sum(0)[:2].abs().max()) < 1e-6  # tokens before every step: the group's advantages sum to 0
    with pytest.raises(ValueError, match="baseline 'mean'"):
        process_advantages([[1.0]], [[0]], 1, 2, baseline="mean")
    common = dict(steps=2, group_size=4, prompts_per_step=4, max_new_tokens=12, eval_n=0, threads=1, report=False)
    for baseline in ("group", "position"):
        cfg = grpo.Config(task="arith:2", step_rewards=True, step_baseline=baseline, out_dir=str(tmp_path / baseline),
                          **common)  # fmt: skip
        res = grpo.train(cfg)
        assert len(res.history) == 2 and all(math.isfinite(h["loss"]) for h in res.history)
    with pytest.raises(ConfigError, match="--step-rewards needs a task with a step verifier"):
        grpo.train(
            grpo.Config(task="", reward="accuracy", step_rewards=True, out_dir=str(tmp_path / "c"), **common),
            data=[{"prompt": "1+1=", "answer": "2"}] * 8,
        )


def test_step_advantages_map_character_offsets_to_tokens():
    from types import SimpleNamespace

    from mirl.data.tasks.arith import ArithTask
    from mirl.models.policy import new_tiny_policy
    from mirl.rollout.groups import step_advantages
    from mirl.rollout.sample import left_pad

    tok = new_tiny_policy("gpt-nano", seed=0).tokenizer  # one token per character
    texts = ["7+5=12,4+8+1=13|132", "7+5=12,4+8=12|122"]
    ids, _ = left_pad([tok.encode(t, add_special_tokens=False)[::-1] for t in texts], tok.pad_token_id)
    ids = ids.flip(1)  # right-padded
    batch = SimpleNamespace(texts=texts, response_ids=ids, response_mask=(ids != tok.pad_token_id).long())
    sb = SimpleNamespace(batch=batch, examples=[{"prompt": "47+85=", "answer": "132"}] * 2)
    adv = step_advantages(ArithTask(3), sb, 2, tok, baseline="group")
    # steps end at characters 6, 15, 19 (right: [1, 1, 1]) and 6, 13, 17 (right, wrong, wrong): tokens 5, 14, 18
    # and 5, 12, 16; the second response's first step is as right as the first's, so its first tokens agree
    assert adv[0, 0] > adv[0, 6] > adv[0, 15] > 0 and adv[0, 18] > 0
    assert adv[1, 13] < 0 and adv[1, 17] == 0
    assert float(adv[1, 6] - adv[1, 12]) == pytest.approx(0.0, abs=1e-6)  # tokens 6..12: the same steps remain
    # the default baseline "position": first steps agree (0), the second and the last are [1, 0] -> +-0.7071 each
    # (up to the normaliser's eps, 1e-4)
    r = 0.5**0.5
    adv = step_advantages(ArithTask(3), sb, 2, tok)
    torch.testing.assert_close(adv[0, [0, 5, 6, 14, 15, 18]], torch.tensor([2 * r] * 4 + [r] * 2), atol=1e-3, rtol=0)
    torch.testing.assert_close(
        adv[1, [0, 5, 6, 12, 13, 16, 17]], torch.tensor([-2 * r] * 4 + [-r] * 2 + [0.0]), atol=1e-3, rtol=0
    )


# ---- fixes of the GRPO/PPO switches' numbers (each derived by hand) -------------------------------------------


def test_top_entropy_mask_restricts_the_policy_term_only():
    """--top-entropy-quantile: the entropy mask multiplies the policy-gradient term alone; the KL term, its `kl`
    metric and the normaliser keep the full loss mask (TRL masks only per_token_loss before adding the KL).

    Ratio 1 (logps = old), beta 0.1, k1 = logp - ref. Row 0: mask [1, 1, 1, 1], kept [1, 0, 0, 0], A = 1,
    k1 [0.5, 1, 1, 1]; row 1: mask [1, 1, 0, 0], kept [1, 1, 0, 0], A = -1, k1 [1, 1, ., .].
    Per token: kept x (-A) + 0.1 k1 -> row 0 [-0.95, 0.1, 0.1, 0.1] (sum -0.65, mean -0.1625), row 1
    [1.1, 1.1] (sum 2.2, mean 1.1).
        bnpo = (-0.65 + 2.2) / 6 = 0.258333;  grpo = (-0.1625 + 1.1) / 2 = 0.46875;  kl = (3.5 + 2) / 6 = 0.916667
    (the entropy mask as the loss mask gave bnpo (-1 + 0.05 + 2.2) / 3 = 0.416667 and kl 2.5 / 3 = 0.833333)."""
    logps = torch.zeros(2, 4, dtype=torch.float64)
    ref = -torch.tensor([[0.5, 1.0, 1.0, 1.0], [1.0, 1.0, 7.0, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    kept = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]])
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    common = dict(beta=0.1, ref_logps=ref, kl_estimator="k1", pg_mask=kept)
    bnpo, m = clipped_policy_loss(logps, logps, adv, mask, loss_agg="bnpo", **common)
    assert bnpo.item() == pytest.approx(1.55 / 6) and float(m["kl"]) == pytest.approx(5.5 / 6)
    grpo, _ = clipped_policy_loss(logps, logps, adv, mask, loss_agg="grpo", **common)
    assert grpo.item() == pytest.approx(0.46875)


def test_top_entropy_quantile_equals_trl():
    """TRL 1.16's GRPOTrainer._compute_loss with top_entropy_quantile 0.2 (get_high_entropy_mask, the KL added
    after the entropy mask) on identical tensors equals clipped_policy_loss with pg_mask = top_entropy_mask."""
    grpo_mod = pytest.importorskip("trl.trainer.grpo_trainer")
    from collections import defaultdict
    from functools import partial
    from types import SimpleNamespace

    from mirl.losses.policy import top_entropy_mask

    class Accel:
        num_processes = 1
        gather = gather_for_metrics = staticmethod(lambda x: x)
        reduce = staticmethod(lambda x, reduction="sum": x)
        pad_across_processes = staticmethod(lambda x, dim=0, pad_index=0: x)

    g = torch.Generator().manual_seed(3)
    b, t = 5, 7
    mask = (torch.arange(t)[None] < torch.tensor([7, 3, 5, 2, 6])[:, None]).long()
    logps = -torch.rand(b, t, generator=g, dtype=torch.float64) * 2
    old = logps + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    ref = logps + 0.2 * torch.randn(b, t, generator=g, dtype=torch.float64)
    ent = torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    for agg in ("grpo", "bnpo"):
        trainer = SimpleNamespace(
            _get_per_token_logps_and_entropies=lambda *a, **k: (logps, ent, None),
            top_entropy_quantile=0.2, off_policy_mask_threshold=None, importance_sampling_level="token", beta=0.04,
            args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1), loss_type=agg,
            epsilon_low=0.2, epsilon_high=0.28, use_vllm=False, model=SimpleNamespace(training=True),
            current_gradient_accumulation_steps=1, max_completion_length=t, accelerator=Accel(),
            _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        )  # fmt: skip
        trainer.get_high_entropy_mask = partial(grpo_mod.GRPOTrainer.get_high_entropy_mask, trainer)
        inputs = {
            "prompt_ids": torch.zeros(b, 2, dtype=torch.long),
            "prompt_mask": torch.ones(b, 2, dtype=torch.long),
            "completion_ids": torch.zeros(b, t, dtype=torch.long),
            "completion_mask": mask,
            "advantages": adv,
            "old_per_token_logps": old,
            "ref_per_token_logps": ref,
            "num_items_in_batch": mask.sum(),
        }
        expected = grpo_mod.GRPOTrainer._compute_loss(trainer, None, inputs)
        kept = top_entropy_mask(ent, mask, 0.2)
        ours, _ = clipped_policy_loss(
            logps, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28, beta=0.04, ref_logps=ref, loss_agg=agg,
            pg_mask=kept,
        )  # fmt: skip
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-9)


def test_entropy_bonus_applies_only_at_or_below_the_target():
    """Adaptive entropy control (Skywork-OR1, TRL's use_adaptive_entropy): the coefficient moves up while the
    measured entropy is at or below the target and down above it, and the bonus uses it only while the last
    measured entropy is at or below the target (0 above it, and 0 before any measurement, as TRL's inf start).
    Without a target (0) the constant --entropy-coef always applies."""
    from mirl.losses.coefs import adaptive_entropy_coef, entropy_bonus_coef

    assert entropy_bonus_coef(0.02, 0.5, 0.3) == 0.0  # above the target: no bonus
    assert entropy_bonus_coef(0.02, 0.3, 0.3) == 0.02  # at the target: the bonus
    assert entropy_bonus_coef(0.02, 0.1, 0.3) == 0.02
    assert entropy_bonus_coef(0.02, None, 0.3) == 0.0  # nothing measured yet
    assert entropy_bonus_coef(0.02, 0.5, 0.0) == 0.02  # no adaptive control: the constant coefficient
    assert adaptive_entropy_coef(0.01, 0.2, 0.2, 0.005, 0.05) == pytest.approx(0.015)  # at the target: up


def test_gmpo_is_the_clipped_geometric_mean_of_the_ratios_by_hand():
    """GMPO (Zhao et al. 2025) per response: -A exp(mean_k s'_k), s_k = log rho_k, with s'_k = min(s_k, 0.4) for
    A > 0 and max(s_k, -0.4) for A < 0 (eps 0.4: only the side A pushes is clipped). Two responses:
        A = 2,  s = [0.1, 0.6, -0.9]:  s' = [0.1, 0.4, -0.9], mean -0.4/3, loss -2 e^(-0.4/3)
        A = -1, s = [0.7, -0.5, (masked 5)]:  s' = [0.7, -0.4], mean 0.15,  loss e^0.15
    loss_agg grpo: their mean. d loss / d s_k = loss_i / |o_i| for an unclipped token, 0 for a clipped or masked
    one, halved by the mean: row 0 [-e^(-0.4/3) / 3, 0, -e^(-0.4/3) / 3], row 1 [e^0.15 / 4, 0, 0]."""
    from mirl.losses.policy import policy_term

    s = torch.tensor([[0.1, 0.6, -0.9], [0.7, -0.5, 5.0]], dtype=torch.float64)
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    old = -torch.ones(2, 3, dtype=torch.float64)
    lp = (old + s).requires_grad_(True)
    loss, m = clipped_policy_loss(lp, old, adv, mask, policy_loss="gmpo", loss_agg="grpo")
    loss.backward()
    per_seq = [-2 * math.exp(-0.4 / 3), math.exp(0.15)]
    assert loss.item() == pytest.approx(sum(per_seq) / 2, rel=1e-12)
    want = [[-math.exp(-0.4 / 3) / 3, 0.0, -math.exp(-0.4 / 3) / 3], [math.exp(0.15) / 4, 0.0, 0.0]]
    torch.testing.assert_close(lp.grad, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # the term alone: one loss per response (B, 1); eps 1 clips nothing here but row 1's masked token
    got = policy_term(lp.detach(), torch.exp(s), adv[:, None], policy_loss="gmpo", mask=mask, gmpo_eps=1.0)
    wide = [[-2 * math.exp(-0.2 / 3)], [math.exp(0.1)]]
    torch.testing.assert_close(got, torch.tensor(wide, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert float(m["clip_fraction/high"]) == pytest.approx(1 / 5)  # row 0's 0.6 > 0.4 (A > 0); 5 tokens
    assert float(m["clip_fraction/low"]) == pytest.approx(1 / 5)  # row 1's -0.5 < -0.4 (A < 0)
    # pg_mask (top-entropy tokens) selects the tokens of the mean: row 0 without its last token is
    # mean(0.1, 0.4) = 0.25, row 1 keeps its first alone: 0.7
    pg = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    sel, _ = clipped_policy_loss(lp.detach(), old, adv, mask, policy_loss="gmpo", pg_mask=pg)
    assert float(sel) == pytest.approx((-2 * math.exp(0.25) + math.exp(0.7)) / 2, rel=1e-12)


def test_cispo_caps_the_weight_at_cispo_cap():
    """CISPO's weight is sg(min(rho, cispo_cap)) (TRL's epsilon_high for cispo is the cap itself; ScaleRL and
    TRL recommend 5), not 1 + clip_eps_high. bnpo over 3 tokens, A = 1, ratios [0.5, 2, 8]: the loss is
    -sum_k min(rho_k, cap) logp_k / 3, so d loss / d logp = -min(rho, cap) / 3:
        cap 5 (the default): [-0.5, -2, -5] / 3;  cap 1.5: [-0.5, -1.5, -1.5] / 3
    (the old cap 1 + 0.2 gave [-0.5, -1.2, -1.2] / 3)."""
    old = torch.log(torch.tensor([[2.0, 0.5, 0.125]], dtype=torch.float64))  # logp = 0: rho = 1 / old prob
    for cap, want in ((None, [-0.5, -2.0, -5.0]), (1.5, [-0.5, -1.5, -1.5])):
        lp = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
        opts = {} if cap is None else {"cispo_cap": cap}
        loss, m = clipped_policy_loss(lp, old, torch.ones(1), torch.ones(1, 3), policy_loss="cispo",
                                      loss_agg="bnpo", **opts)  # fmt: skip
        loss.backward()
        torch.testing.assert_close(lp.grad, torch.tensor([want], dtype=torch.float64) / 3)
        assert float(m["clip_fraction/high"]) == pytest.approx(1 / 3 if cap is None else 2 / 3)


def test_cispo_cap_without_cispo_is_an_error(tmp_path):
    """--cispo-cap acts only with cispo, --clip-eps-high only with the clipped losses (an old command that set
    cispo's cap through --clip-eps-high must not run silently with cap 5); a cap below 1 or NaN is refused."""
    from mirl.options import ConfigError
    from mirl.recipes import grpo, ppo

    with pytest.raises(ConfigError, match="--cispo-cap 3.0 has no effect: it needs --policy-loss cispo"):
        grpo.train(grpo.Config(cispo_cap=3.0, out_dir=str(tmp_path / "g")))
    with pytest.raises(ConfigError, match="--cispo-cap 3.0 has no effect: it needs --policy-loss cispo"):
        ppo.train(ppo.Config(cispo_cap=3.0, policy_loss="sapo", out_dir=str(tmp_path / "p")))
    for kind in ("cispo", "sapo"):
        with pytest.raises(ConfigError, match="--clip-eps-high 4.0 has no effect: it needs --policy-loss clip or"):
            grpo.train(grpo.Config(clip_eps_high=4.0, policy_loss=kind, out_dir=str(tmp_path / "g3")))
    for bad in (0.5, float("nan")):
        with pytest.raises(ConfigError, match="--cispo-cap"):
            grpo.train(grpo.Config(cispo_cap=bad, policy_loss="cispo", out_dir=str(tmp_path / "g2")))
    with pytest.raises(ConfigError, match="--gmpo-eps 0.2 has no effect: it needs --policy-loss gmpo"):
        ppo.train(ppo.Config(gmpo_eps=0.2, out_dir=str(tmp_path / "p2")))
    with pytest.raises(ConfigError, match="--gmpo-eps 0.0: must be a finite number > 0"):
        grpo.train(grpo.Config(gmpo_eps=0.0, policy_loss="gmpo", out_dir=str(tmp_path / "g4")))


def test_whiten_uses_the_unbiased_variance_like_reinforce_pp():
    """PPO's whitening and REINFORCE++'s use the same statistics, those of veRL's and TRL's masked_whiten:
    Bessel-corrected variance, (x - mean) * rsqrt(var + 1e-8). x = [1, 3, 5] on the mask, 100 off it:
    mean 3, squared deviations 4 + 0 + 4 = 8, var 8 / 2 = 4 (the biased 8 / 3 gave +-1.2247), so
    [-2, 0, 2] / 2 = [-1, 0, 1]; REINFORCE++ on rewards [1, 3, 5] of one token each gives the same."""
    from mirl.advantages import reinforce_pp

    w = whiten(torch.tensor([[1.0, 3.0, 5.0, 100.0]]), torch.tensor([[1, 1, 1, 0]]))
    torch.testing.assert_close(w, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    r = reinforce_pp(torch.tensor([1.0, 3.0, 5.0]), torch.ones(3))
    torch.testing.assert_close(r, w[0, :3], atol=1e-6, rtol=0)


def test_tokens_after_the_last_step_carry_the_answer_steps_advantage():
    """--step-rewards: every response token after the last step's end (EOS included, and any text after the
    answer) gets the last (answer) step's advantage, so stopping is reinforced and trailing junk penalised;
    padding (beyond each response's length) stays 0. Baseline "position", a group of two: first steps agree
    (0), the last steps 1 and 0: +-r, r = 0.5 / std([1, 0]) = 0.7071 (eps 0). Steps end at tokens 2 and 4;
    lengths 7 and 6 (tokens 5, 6 and 5 come after the answer):
        row 0  [r, r, r, r, r | r, r | 0]      row 1  [-r, -r, -r, -r, -r | -r | 0, 0]
    (before the fix tokens 5.. were 0)."""
    from mirl.advantages import process_advantages

    r = 0.5**0.5
    adv = process_advantages(
        [[1.0, 1.0], [1.0, 0.0]], [[2, 4], [2, 4]], 2, 8, eps=0.0, baseline="position", lengths=[7, 6]
    )
    torch.testing.assert_close(adv, torch.tensor([[r] * 7 + [0.0], [-r] * 6 + [0.0] * 2]))
    # without lengths: up to the width
    adv = process_advantages([[1.0, 1.0], [1.0, 0.0]], [[2, 4], [2, 4]], 2, 8, eps=0.0, baseline="position")
    torch.testing.assert_close(adv, torch.tensor([[r] * 8, [-r] * 8]))


def test_step_advantages_give_the_eos_token_the_answers_advantage():
    """Through step_advantages: each response ends with EOS (in the response mask, not in the decoded text).
    The answers are right and wrong ([1, 1, 1] and [1, 0, 0], "position"): the last steps get +-r; the EOS
    tokens (19 and 17, after the answers' last characters 18 and 16) get the same, the padding after the
    shorter response 0 (before the fix the EOS tokens got 0)."""
    from types import SimpleNamespace

    from mirl.data.tasks.arith import ArithTask
    from mirl.models.policy import new_tiny_policy
    from mirl.rollout.groups import step_advantages

    tok = new_tiny_policy("gpt-nano", seed=0).tokenizer
    texts = ["7+5=12,4+8+1=13|132", "7+5=12,4+8=12|122"]
    rows = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in texts]
    ids = torch.full((2, 20), tok.pad_token_id)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    mask = (torch.arange(20)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
    batch = SimpleNamespace(texts=texts, response_ids=ids, response_mask=mask)
    sb = SimpleNamespace(batch=batch, examples=[{"prompt": "47+85=", "answer": "132"}] * 2)
    adv = step_advantages(ArithTask(3), sb, 2, tok)
    r = 0.5**0.5
    torch.testing.assert_close(adv[0, [18, 19]], torch.tensor([r, r]), atol=1e-3, rtol=0)  # "2", EOS
    torch.testing.assert_close(adv[1, [16, 17, 18]], torch.tensor([-r, -r, 0.0]), atol=1e-3, rtol=0)  # "2", EOS, pad


def test_top_entropy_threshold_is_torch_quantile_without_its_size_limit():
    """The threshold equals torch.quantile's (linear interpolation) on every size and quantile, and holds past
    2^24 tokens, where torch.quantile raises (a minibatch's tokens gathered from every rank can reach it)."""
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 7, 100):
        for q in (0.01, 0.2, 0.5, 0.99):
            e, m = torch.randn(1, n, generator=g), torch.ones(1, n)
            want = m * (e >= torch.quantile(e[m.bool()], 1 - q)).float()
            assert torch.equal(top_entropy_mask(e, m, q), want), (n, q)
    big = torch.rand(1, 2**24 + 1, generator=g)
    with pytest.raises(RuntimeError):
        torch.quantile(big.flatten(), 0.8)
    assert float(top_entropy_mask(big, torch.ones_like(big), 0.2).mean()) == pytest.approx(0.2, abs=1e-6)


def test_kl_and_entropy_coefficients_as_objects():
    """KLCoef: the constant and scheduled beta by hand, the adaptive controller's value moved, saved and loaded;
    EntropyCoef: no bonus under adaptive control until an entropy at or below the target was measured."""
    from mirl.losses.coefs import EntropyCoef, KLCoef

    assert KLCoef(0.1).at(0.7) == 0.1
    assert KLCoef(0.1, "linear", 0.0).at(0.25) == pytest.approx(0.075)
    assert KLCoef(0.1, "cosine", 0.0).at(0.5) == pytest.approx(0.05)
    kl = KLCoef(0.1, target=0.01, horizon=100)
    kl.update(kl.at(0.0), kl=0.02, n=50)  # KL above target: beta * (1 + 0.2 * 50 / 100)
    assert kl.at(0.9) == pytest.approx(0.11) and kl.state() == {"beta": pytest.approx(0.11)}
    again = KLCoef(0.1, target=0.01, horizon=100)
    again.load(kl.state())
    assert again.at(0.0) == pytest.approx(0.11)
    fixed = KLCoef(0.1)
    fixed.update(0.1, kl=5.0, n=50)  # not adaptive: no change
    assert fixed.at(0.0) == 0.1
    ent = EntropyCoef(0.01, target=1.0, delta=0.005, max_coef=0.05)
    assert ent.bonus() == 0.0  # nothing measured yet
    ent.update(0.5)  # at or below target: the coefficient rises and the bonus applies
    assert ent.coef == pytest.approx(0.015) and ent.bonus() == pytest.approx(0.015)
    ent.update(2.0)
    assert ent.coef == pytest.approx(0.01) and ent.bonus() == 0.0
    assert EntropyCoef(0.02).bonus() == 0.02  # not adaptive: the coefficient as given
