"""Hand-derived facts of docs/algorithms.md §1, as tests.

Notation: T = beta * (logp - logp_ref), h = T_w - T_l, sp = softplus.
"""

import math

import pytest
import torch

from mirl.losses import LOSSES, get_loss, parse_loss_spec, preference_loss
from mirl.losses.mi import group_mi_loss, mi_bound

LN2, LN4 = math.log(2), math.log(4)


def pair(tw, tl, beta=1.0, dtype=torch.float64, grad=False):
    """Policy/reference logps with given critic values T (reference at 0): delta = T / beta."""
    pc = torch.tensor([tw / beta], dtype=dtype, requires_grad=grad)
    pr = torch.tensor([tl / beta], dtype=dtype, requires_grad=grad)
    z = torch.zeros(1, dtype=dtype)
    return pc, pr, z, z


def loss_of(name, *args, **kw):
    return get_loss(name)(*args, **kw)[0]


def test_at_reference_dpo_is_ln2_and_mio_is_ln4():
    # T_w = T_l = 0: sp(0) = ln 2, so DPO = ln 2 and MIO = ln 2 + ln 2 / 2 + ln 2 / 2 = ln 4
    z = torch.zeros(5)
    assert torch.allclose(loss_of("dpo", z, z, z, z, beta=0.1), torch.full((5,), LN2))
    assert torch.allclose(loss_of("mio", z, z, z, z, beta=0.1), torch.full((5,), LN4))


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_gradients_at_reference(beta):
    # d sp(-T)/dT = -sigma(-T) = -1/2 at 0, d sp(T)/dT = 1/2. MIO: dL/dT_w = -1/2 + 1/2 * 1/2 = -1/4,
    # dL/dT_l = 1/2 * 1/2 = 1/4; times dT/d delta = beta. DPO: -beta/2 and +beta/2.
    for name, gw, gl in (("mio", -beta / 4, beta / 4), ("dpo", -beta / 2, beta / 2)):
        pc, pr, rc, rr = pair(0.0, 0.0, beta, grad=True)
        loss_of(name, pc, pr, rc, rr, beta=beta).sum().backward()
        assert pc.grad.item() == pytest.approx(gw, abs=1e-12)
        assert pr.grad.item() == pytest.approx(gl, abs=1e-12)


def test_mio_chosen_part_is_minimised_at_ln2():
    # f(T) = sp(-T) + sp(T)/2; f'(T) = -sigma(-T) + sigma(T)/2 = 0 <=> e^T = 2 <=> T = ln 2.
    # Scan T_w with T_l fixed: the rejected term is constant, so MIO's argmin over T_w is ln 2.
    tws = torch.linspace(-3, 3, 60001, dtype=torch.float64)
    z = torch.zeros_like(tws)
    loss = loss_of("mio", tws, z - 5.0, z, z, beta=1.0)
    assert tws[loss.argmin()].item() == pytest.approx(LN2, abs=1e-3)
    # and the gradient there is zero
    t = torch.tensor([LN2], dtype=torch.float64, requires_grad=True)
    loss_of("mio", t, torch.tensor([-5.0], dtype=torch.float64), torch.zeros(1), torch.zeros(1), beta=1.0).backward()
    assert abs(t.grad.item()) < 1e-12


def test_mio_rejected_gradient_vanishes_far_below():
    # 1/2 sp(T_l) has derivative sigma(T_l)/2 > 0 that -> 0 as T_l -> -inf
    grads = []
    for tl in (0.0, -5.0, -20.0):
        pc, pr, rc, rr = pair(0.0, tl, grad=True)
        loss_of("mio", pc, pr, rc, rr, beta=1.0).backward()
        grads.append(pr.grad.item())
    assert grads[0] == pytest.approx(0.25) and 0 < grads[2] < grads[1] < grads[0] and grads[2] < 1e-8


@pytest.mark.parametrize("tw,tl", [(0.0, 0.0), (1.3, -0.4), (-2.0, 3.0), (50.0, -50.0)])
def test_dv_pair_identity(tw, tl):
    # I_DV with Q = {w: 1/2, l: 1/2} = T_w - log((e^T_w + e^T_l)/2) = ln 2 - sp(-(T_w - T_l)) = ln 2 - L_DPO
    args = pair(tw, tl)
    dpo, m = get_loss("dpo")(*args, beta=1.0)
    dv_loss, dv_m = get_loss("dv")(*args, beta=1.0)
    assert dv_m["mi"].item() == pytest.approx(LN2 - dpo.item(), abs=1e-12)
    assert m["mi"].item() == pytest.approx(dv_m["mi"].item(), abs=1e-12)
    assert dv_loss.item() == pytest.approx(dpo.item() - LN2, abs=1e-12)


@pytest.mark.parametrize("mix", [0.5, 0.2, 0.9])
def test_js_bound_is_mio(mix):
    args = pair(0.7, -1.1)
    js = loss_of("js", *args, beta=1.0, neg_mix=mix)
    mio = loss_of("mio", *args, beta=1.0, neg_mix=mix)
    # direct: sp(-T_w) + mix sp(T_w) + (1 - mix) sp(T_l)
    sp = lambda x: math.log1p(math.exp(x))
    direct = sp(-0.7) + mix * sp(0.7) + (1 - mix) * sp(-1.1)
    assert js.item() == pytest.approx(direct, abs=1e-12) and mio.item() == pytest.approx(direct, abs=1e-12)


def test_nwj_and_infonce_pair_values():
    tw, tl = 0.5, -1.0
    args = pair(tw, tl)
    nwj = loss_of("nwj", *args, beta=1.0)  # -(T_w - (e^(T_w-1) + e^(T_l-1))/2)
    assert nwj.item() == pytest.approx(-(tw - 0.5 * (math.exp(tw - 1) + math.exp(tl - 1))), abs=1e-12)
    infonce = loss_of("infonce", *args, beta=1.0)  # -T_w + log(e^T_w + e^T_l) - log 2
    assert infonce.item() == pytest.approx(-tw + math.log(math.exp(tw) + math.exp(tl)) - LN2, abs=1e-12)


def test_other_pair_losses_by_hand():
    beta = 0.5
    pc, pr = torch.tensor([-3.0], dtype=torch.float64), torch.tensor([-5.0], dtype=torch.float64)
    rc, rr = torch.tensor([-4.0], dtype=torch.float64), torch.tensor([-4.5], dtype=torch.float64)
    # delta_w = 1, delta_l = -0.5, h = beta * 1.5 = 0.75
    h = 0.75
    assert loss_of("hinge", pc, pr, rc, rr, beta=beta).item() == pytest.approx(0.25)
    ipo = loss_of("ipo", pc, pr, rc, rr, beta=beta, length_normalize=False).item()
    assert ipo == pytest.approx((1.5 - 1.0) ** 2)  # (1.5 - 1/(2*0.5))^2
    lens = torch.tensor([2.0], dtype=torch.float64)
    ipo_norm = loss_of("ipo", pc, pr, rc, rr, beta=beta, chosen_lengths=lens, rejected_lengths=lens).item()
    assert ipo_norm == pytest.approx((0.75 - 1.0) ** 2)
    eps = 0.2
    sp = lambda x: math.log1p(math.exp(x))
    robust = loss_of("robust", pc, pr, rc, rr, beta=beta, label_smoothing=eps).item()
    assert robust == pytest.approx(((1 - eps) * sp(-h) - eps * sp(h)) / (1 - 2 * eps))
    assert loss_of("robust", pc, pr, rc, rr, beta=beta, label_smoothing=0.0).item() == pytest.approx(sp(-h))
    # SimPO: averages -3/2 and -5/4, beta 2, gamma 0.5: sp(-(2 * (-1.5 + 1.25) - 0.5)) = sp(1.0)
    simpo = loss_of(
        "simpo",
        pc,
        pr,
        None,
        None,
        beta=2.0,
        gamma=0.5,
        chosen_lengths=lens,
        rejected_lengths=torch.tensor([4.0], dtype=torch.float64),
    ).item()
    assert simpo == pytest.approx(sp(1.0))
    assert loss_of("sft", pc, pr, None, None, chosen_lengths=lens).item() == pytest.approx(1.5)


@pytest.mark.parametrize("name", [n for n, s in LOSSES.items() if s.kind == "pair"])
def test_stable_for_large_critic_values(name):
    # |T| of 100 and more: softplus/logsigmoid forms stay finite, and so do gradients
    for tw, tl in ((150.0, -150.0), (-150.0, 150.0), (120.0, 110.0)):
        pc, pr, rc, rr = pair(tw, tl, dtype=torch.float32, grad=True)
        lens = torch.ones(1)
        loss = loss_of(name, pc, pr, rc, rr, beta=1.0, chosen_lengths=lens, rejected_lengths=lens)
        if name == "nwj" and max(tw, tl) > 80:  # e^(T-1) overflows float32: the bound itself is exponential
            continue
        assert torch.isfinite(loss).all(), (name, tw, tl, loss)
        loss.sum().backward()
        assert torch.isfinite(pc.grad).all()
        assert pr.grad is None or torch.isfinite(pr.grad).all()  # the SFT term ignores the rejected side
    # DPO at h = 300 is ~0 and at h = -300 is ~300 (not inf): sp(-h)
    assert loss_of("dpo", *pair(150.0, -150.0, dtype=torch.float32), beta=1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert loss_of("dpo", *pair(-150.0, 150.0, dtype=torch.float32), beta=1.0).item() == pytest.approx(300.0)


def _group_loop(t, positive, estimator):
    """Plain-Python reference for the group bound, one group and one positive at a time."""
    out = []
    for row, pos in zip(t.tolist(), positive.tolist()):
        k = len(row)
        vals = []
        for j, is_pos in enumerate(pos):
            if not is_pos:
                continue
            tp = row[j]
            if estimator == "dv":
                vals.append(-tp + math.log(sum(math.exp(x) for x in row)) - math.log(k))
            elif estimator == "js":
                vals.append(math.log1p(math.exp(-tp)) + sum(math.log1p(math.exp(x)) for x in row) / k)
            else:
                vals.append(-tp + sum(math.exp(x - 1) for x in row) / k)
        out.append(sum(vals) / len(vals) if vals else 0.0)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("estimator", ["dv", "js", "nwj"])
def test_group_bound_matches_loop(estimator):
    g = torch.Generator().manual_seed(1)
    logps = torch.randn(5, 6, generator=g, dtype=torch.float64)
    positive = torch.rand(5, 6, generator=g) < 0.4
    positive[0] = False  # a group with no positive: loss 0, counted
    loss, m = group_mi_loss(logps, torch.zeros_like(logps), positive, beta=1.0, estimator=estimator)
    torch.testing.assert_close(loss, _group_loop(logps, positive, estimator))
    assert m["groups/no_positive"][0].item() == 1.0


def test_group_of_two_reduces_to_pair_losses():
    # positive w in the group {w, l}: group_js = MIO, group_dv = DPO - ln 2
    tw, tl = torch.tensor([0.3, -2.0], dtype=torch.float64), torch.tensor([1.1, -0.5], dtype=torch.float64)
    z = torch.zeros(2, dtype=torch.float64)
    pos = torch.tensor([[True, False]] * 2)
    logps = torch.stack([tw, tl], 1)
    js, _ = get_loss("group_js")(logps, torch.zeros_like(logps), pos, beta=1.0)
    dv, _ = get_loss("group_dv")(logps, torch.zeros_like(logps), pos, beta=1.0)
    torch.testing.assert_close(js, loss_of("mio", tw, tl, z, z, beta=1.0))
    torch.testing.assert_close(dv, loss_of("dpo", tw, tl, z, z, beta=1.0) - LN2)


def test_group_mask_equals_smaller_group():
    # a ragged group padded to K=5 with mask gives the same loss as the unpadded group of 3
    logps = torch.tensor([[0.2, -0.3, 1.0]], dtype=torch.float64)
    pos = torch.tensor([[True, False, False]])
    small, _ = group_mi_loss(logps, torch.zeros_like(logps), pos, beta=1.0, estimator="dv")
    padded = torch.cat([logps, torch.tensor([[9.0, 9.0]], dtype=torch.float64)], 1)
    mask = torch.tensor([[True, True, True, False, False]])
    pos_p = torch.cat([pos, torch.tensor([[True, False]])], 1)
    big, _ = group_mi_loss(padded, torch.zeros_like(padded), pos_p, beta=1.0, estimator="dv", mask=mask)
    torch.testing.assert_close(big, small)


def test_mi_bound_rejects_unknown():
    with pytest.raises(ValueError, match="valid: dv, js, nwj"):
        mi_bound(torch.zeros(1), torch.zeros(1, 2), torch.ones(1, 2) / 2, "mine")


def test_loss_spec_parsing_and_combination():
    assert parse_loss_spec("mio") == [("mio", 1.0)]
    assert parse_loss_spec("dpo:1, sft:0.25") == [("dpo", 1.0), ("sft", 0.25)]
    with pytest.raises(ValueError, match="valid losses: .*mio"):
        parse_loss_spec("dpoo")
    with pytest.raises(ValueError, match="cannot combine"):
        parse_loss_spec("dpo,group_js")
    pc, pr, rc, rr = pair(0.4, -0.2)
    lens = torch.tensor([4.0], dtype=torch.float64)
    total, m = preference_loss(
        [("dpo", 1.0), ("sft", 0.25)],
        torch.stack([pc, pr], 1),
        torch.stack([rc, rr], 1),
        torch.tensor([[True, False]]),
        beta=1.0,
        lengths=torch.stack([lens, lens], 1),
    )
    expect = loss_of("dpo", pc, pr, rc, rr, beta=1.0) + 0.25 * (-pc / 4)
    torch.testing.assert_close(total, expect)
    assert "loss/dpo" in m and "loss/sft" in m


def test_an_unknown_loss_option_is_an_error_listing_the_valid_ones():
    pc, pr, rc, rr = pair(0.4, -0.2)
    with pytest.raises(ValueError, match="loss 'mio' has no option 'neg_mixx'; its options: neg_mix"):
        get_loss("mio")(pc, pr, rc, rr, beta=0.1, neg_mixx=0.3)
    with pytest.raises(ValueError, match="loss 'dpo' has no option 'gamma'; its options: none"):
        get_loss("dpo")(pc, pr, rc, rr, beta=0.1, gamma=0.3)
    assert get_loss("simpo").options == ("gamma",) and get_loss("robust").options == ("label_smoothing",)
    # data arguments are not options: dropped where a loss does not read them
    assert get_loss("dpo")(pc, pr, rc, rr, beta=0.1, chosen_lengths=torch.ones(1))[0].shape == (1,)


def test_star_import_gives_every_name_in_all():
    """`from mirl.losses import *` works: every name in __all__ exists (two removed functions were listed)."""
    import mirl.losses

    namespace: dict = {}
    exec("from mirl.losses import *", namespace)
    assert all(hasattr(mirl.losses, name) for name in mirl.losses.__all__)
    assert namespace["preference_loss"] is preference_loss and namespace["masked_reduce"] is not None
