"""Policy-gradient losses and advantages: hand values and loop references (they run without TRL; the equality
with TRL's GRPOTrainer is in tests/test_trl_policy_equality.py)."""

import pytest
import torch

from mirl.advantages import gae, group_advantages, rloo, whiten
from mirl.losses.policy import clipped_policy_loss, clipped_value_loss, kl_estimate


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
    w = whiten(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1, 1, 0]]))
    assert w.tolist()[0][:2] == pytest.approx([-1.0, 1.0], abs=1e-6) and w[0, 2] == 0


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
