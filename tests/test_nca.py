"""NCA and InfoNCA over groups with scalar rewards (Chen et al. 2024, arXiv 2402.05369; mirl/losses/nca.py).

Notation: T_i = beta * (logp_i - logp_ref_i), p = softmax(r / alpha) over the group's real responses, K their
number, sp = softplus, sigma = logistic sigmoid.

    infonca = -sum_i p_i log softmax_j(T_j)_i
    nca     = -sum_i [p_i log sigma(T_i) + (1/K) log sigma(-T_i)] = sum_i p_i sp(-T_i) + (1/K) sum_i sp(T_i)

(-log sigma(x) = sp(-x), so the two forms of nca are the same sum.)
"""

import math

import pytest
import torch

from mirl.losses import get_loss, parse_loss_spec, preference_loss
from mirl.losses.nca import reward_targets
from mirl.models import load_policy
from mirl.recipes import online
from mirl.rewards import register_reward

LN4 = math.log(4)
F64 = torch.float64


def loss_of(name, t, rewards, alpha, mask=None, beta=1.0):
    """The registered loss with T given directly (reference log-probs 0, logp = T / beta)."""
    t = torch.as_tensor(t, dtype=F64)
    return get_loss(name)(t / beta, torch.zeros_like(t), None, beta=beta, rewards=torch.as_tensor(rewards, dtype=F64),
                          mask=mask, alpha=alpha)  # fmt: skip


def _sp(x):
    return math.log1p(math.exp(x)) if x < 30 else x + math.log1p(math.exp(-x))


def _paper(t, r, alpha):
    """The paper's two losses for one group, written with Python floats: (infonca, nca)."""
    top = max(r)
    e = [math.exp((ri - top) / alpha) for ri in r]
    p = [x / sum(e) for x in e]
    lse = math.log(sum(math.exp(tj) for tj in t))
    k = len(t)
    infonca = -sum(pi * (ti - lse) for pi, ti in zip(p, t))
    log_sig = [-_sp(-ti) for ti in t]  # log sigma(T)
    log_sig_neg = [-_sp(ti) for ti in t]  # log sigma(-T)
    nca = -sum(pi * a + b / k for pi, a, b in zip(p, log_sig, log_sig_neg))
    return infonca, nca


GROUPS = [  # (T, rewards, alpha)
    ([0.3, -0.2, 0.5], [1.0, 0.0, 0.5], 0.5),
    ([1.0, 2.0, -1.5, 0.0], [0.2, 0.9, 0.9, -1.0], 0.1),
    ([-3.0, 4.0], [7.0, 2.0], 3.0),
    ([0.0, 0.0, 0.0], [1.0, 0.0, 0.0], 1.0),
]


@pytest.mark.parametrize("t,r,alpha", GROUPS)
def test_losses_equal_the_papers_formulas_by_hand(t, r, alpha):
    infonca, nca = _paper(t, r, alpha)
    assert loss_of("infonca", [t], [r], alpha)[0].item() == pytest.approx(infonca, rel=1e-12)
    assert loss_of("nca", [t], [r], alpha)[0].item() == pytest.approx(nca, rel=1e-12)


def test_a_worked_group():
    """T = (0, ln 3), r = (1, 0), alpha = 1/ln 2: r / alpha = (ln 2, 0), p = (2/3, 1/3).
    softmax(T) = (1/4, 3/4): infonca = -(2/3) ln(1/4) - (1/3) ln(3/4) = 2 ln 2 - (1/3) ln 3.
    sp(0) = ln 2, sp(-ln 3) = ln(4/3), sp(ln 3) = ln 4: nca = (2/3) ln 2 + (1/3) ln(4/3) + (ln 2 + ln 4) / 2
    = (2/3 + 2/3 + 3/2) ln 2 - (1/3) ln 3."""
    t, r, alpha = [[0.0, math.log(3)]], [[1.0, 0.0]], 1 / math.log(2)
    want_infonca = 2 * math.log(2) - math.log(3) / 3
    want_nca = (2 / 3 + 2 / 3 + 3 / 2) * math.log(2) - math.log(3) / 3
    assert loss_of("infonca", t, r, alpha)[0].item() == pytest.approx(want_infonca, rel=1e-12)
    assert loss_of("nca", t, r, alpha)[0].item() == pytest.approx(want_nca, rel=1e-12)


def test_vectorised_over_groups_equals_one_group_at_a_time():
    t = torch.tensor([g[0][:2] for g in GROUPS], dtype=F64)
    r = torch.tensor([g[1][:2] for g in GROUPS], dtype=F64)
    for name in ("infonca", "nca"):
        whole = loss_of(name, t, r, 0.3)[0]
        alone = torch.cat([loss_of(name, t[i : i + 1], r[i : i + 1], 0.3)[0] for i in range(len(t))])
        torch.testing.assert_close(whole, alone)


def test_padding_and_unscored_responses_leave_the_group():
    """A group of 3 padded to 5 (mask) or with NaN rewards gives the loss of the group of 3: K = 3 in nca's
    1/K and in the softmaxes, whatever T and r the padding holds."""
    t, r = [[0.2, -0.3, 1.0]], [[0.5, 1.0, 0.0]]
    padded_t = [[0.2, -0.3, 1.0, 9.0, -9.0]]
    mask = torch.tensor([[True, True, True, False, False]])
    for name in ("infonca", "nca"):
        small = loss_of(name, t, r, 0.2)[0]
        torch.testing.assert_close(loss_of(name, padded_t, [[0.5, 1.0, 0.0, 5.0, 5.0]], 0.2, mask=mask)[0], small)
        torch.testing.assert_close(loss_of(name, padded_t, [[0.5, 1.0, 0.0, math.nan, math.nan]], 0.2)[0], small)
        empty = loss_of(name, [[1.0, 2.0]], [[math.nan, math.nan]], 0.2)[0]
        assert empty.item() == 0.0  # no real response: no loss, and no NaN


def test_infonca_is_invariant_to_a_constant_added_to_a_groups_critic_and_nca_is_not():
    """softmax(T + c) = softmax(T): InfoNCA sets relative likelihoods. NCA's sp(T_i) terms move with c: it sets
    each response's own likelihood."""
    t = torch.tensor([[0.3, -0.2, 0.5], [1.0, 2.0, -1.5]], dtype=F64)
    r = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.9, 0.1]], dtype=F64)
    c = torch.tensor([[2.5], [-7.0]], dtype=F64)
    torch.testing.assert_close(loss_of("infonca", t + c, r, 0.3)[0], loss_of("infonca", t, r, 0.3)[0])
    assert (loss_of("nca", t + c, r, 0.3)[0] - loss_of("nca", t, r, 0.3)[0]).abs().min() > 0.1


def test_targets_one_hot_as_alpha_goes_to_zero_and_uniform_as_it_grows():
    r = torch.tensor([[0.2, 0.9, 0.5, -1.0], [1.0, 1.0, 0.0, 0.5]], dtype=F64)
    hard = reward_targets(r, 0.0)  # the limit: equal weight on the best responses (a tie shares it)
    assert hard.tolist() == [[0.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]]
    torch.testing.assert_close(reward_targets(r, 1e-3), hard)  # the smallest gap is 0.4: e^-400 ~ 0
    torch.testing.assert_close(reward_targets(r, 1e7), torch.full_like(r, 0.25))
    soft = reward_targets(r, 0.5)
    torch.testing.assert_close(soft.sum(-1), torch.ones(2, dtype=F64))
    torch.testing.assert_close(soft[0], torch.softmax(r[0] / 0.5, 0))
    assert reward_targets(r * 1000, 1000.0).allclose(reward_targets(r, 1.0))  # only r / alpha matters


def test_pair_with_alpha_to_zero_is_the_mio_pair_loss_and_dpo():
    """K = 2, r_1 > r_2, alpha -> 0: p = (1, 0). nca = sp(-T_1) + (sp(T_1) + sp(T_2)) / 2 = MIO at neg_mix 1/2
    (= TRL's nca_pair), and infonca = -log(e^T_1 / (e^T_1 + e^T_2)) = sp(-(T_1 - T_2)) = DPO. The identity holds
    for every T (not only at the reference) and for any beta, since both sides read T = beta * delta; it needs
    r_1 > r_2 strictly (a tie gives p = (1/2, 1/2), no longer a pair loss)."""
    beta = 0.1
    tw = torch.tensor([0.3, -2.0, 5.0, 40.0], dtype=F64)
    tl = torch.tensor([1.1, -0.5, -5.0, -40.0], dtype=F64)
    r = torch.tensor([[1.0, 0.0], [0.3, 0.2], [1.0, -1.0], [2.0, 1.0]], dtype=F64)
    t = torch.stack([tw, tl], 1)
    z = torch.zeros(4, dtype=F64)
    mio = get_loss("mio")(tw / beta, tl / beta, z, z, beta=beta)[0]
    dpo = get_loss("dpo")(tw / beta, tl / beta, z, z, beta=beta)[0]
    torch.testing.assert_close(loss_of("nca", t, r, 0.0, beta=beta)[0], mio)
    torch.testing.assert_close(loss_of("infonca", t, r, 0.0, beta=beta)[0], dpo)
    torch.testing.assert_close(loss_of("nca", t, r, 1e-4, beta=beta)[0], mio)  # the limit, approached
    assert not torch.allclose(loss_of("nca", t, r, 1.0, beta=beta)[0], mio)  # at alpha = 1 it is another loss


def test_binary_rewards_with_alpha_to_zero_are_the_group_losses():
    """0/1 rewards, alpha -> 0: p = 1/P on the P positives. nca = (1/P) sum_pos sp(-T_pos) + mean_j sp(T_j) =
    group_js; infonca = (1/P) sum_pos (-T_pos + logsumexp_j T_j) = group_dv + log K (DV subtracts log K)."""
    t = torch.tensor([[0.3, -0.2, 0.5, 1.0], [1.0, 2.0, -1.5, 0.0]], dtype=F64)
    pos = torch.tensor([[True, False, True, False], [False, True, False, False]])
    z = torch.zeros_like(t)
    js = get_loss("group_js")(t, z, pos, beta=1.0)[0]
    dv = get_loss("group_dv")(t, z, pos, beta=1.0)[0]
    torch.testing.assert_close(loss_of("nca", t, pos.double(), 0.0)[0], js)
    torch.testing.assert_close(loss_of("infonca", t, pos.double(), 0.0)[0], dv + math.log(4))


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_values_and_gradients_at_the_reference(beta):
    """Every T = 0: log softmax = -ln K and sum_i p_i = 1, so infonca = ln K; sp(0) = ln 2, so nca = ln 2 + ln 2
    = ln 4, whatever the rewards. dinfonca/dT_i = softmax(T)_i - p_i = 1/K - p_i; dnca/dT_i = -p_i sigma(-T_i)
    + sigma(T_i) / K = (1/K - p_i) / 2: half InfoNCA's, as MIO's is half DPO's. Times beta per log-prob."""
    r = torch.tensor([[1.0, 0.0, 0.5]], dtype=F64)
    p = torch.softmax(r / 0.5, -1)
    for name, value, scale in (("infonca", math.log(3), 1.0), ("nca", LN4, 0.5)):
        lp = torch.zeros(1, 3, dtype=F64, requires_grad=True)
        loss, _ = get_loss(name)(lp, torch.zeros(1, 3, dtype=F64), None, beta=beta, rewards=r, alpha=0.5)
        assert loss.item() == pytest.approx(value, rel=1e-12)
        loss.sum().backward()
        torch.testing.assert_close(lp.grad, beta * scale * (1 / 3 - p))


def test_no_gradient_flows_into_the_rewards_and_large_critics_stay_finite():
    r = torch.tensor([[1.0, 0.0, 0.5]], dtype=F64, requires_grad=True)
    for name in ("infonca", "nca"):
        for big in (150.0, -150.0, 1e4):
            lp = torch.tensor([[big, -big, 0.0]], dtype=F64, requires_grad=True)
            loss, _ = get_loss(name)(lp, torch.zeros_like(lp), None, beta=1.0, rewards=r, alpha=0.1)
            loss.sum().backward()
            assert torch.isfinite(loss).all() and torch.isfinite(lp.grad).all()
        assert r.grad is None


def test_metrics():
    """T = (1, -1), p = (1, 0) at alpha 0: the targets' mean of T is 1, the plain mean 0, the margin 1."""
    _, m = loss_of("nca", [[1.0, -1.0]], [[1.0, 0.0]], 0.0)
    assert m["rewards/target_weighted"].item() == 1.0 and m["rewards/group_mean"].item() == 0.0
    assert m["rewards/margins"].item() == 1.0 and m["targets/max"].item() == 1.0


def test_bad_values_are_clear_errors():
    t, r = torch.zeros(1, 2, dtype=F64), torch.tensor([[1.0, 0.0]], dtype=F64)
    for name in ("infonca", "nca"):
        for alpha in (-0.1, math.nan, math.inf, True, "0.1"):
            with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
                get_loss(name)(t, t, None, beta=1.0, rewards=r, alpha=alpha)
        with pytest.raises(ValueError, match=f"loss '{name}' weighs each group by its responses' scalar rewards"):
            get_loss(name)(t, t, torch.tensor([[True, False]]), beta=1.0)
        with pytest.raises(ValueError, match="the rewards must have the log-probs' shape"):
            get_loss(name)(t, t, None, beta=1.0, rewards=torch.zeros(1, 3))
        with pytest.raises(ValueError, match=f"loss '{name}' has no option 'neg_mix'; its options: alpha"):
            get_loss(name)(t, t, None, beta=1.0, rewards=r, neg_mix=0.5)


def test_preference_loss_hands_the_rewards_to_the_weighted_terms_only():
    """'group_js:1,nca:0.5': group_js reads the positives, nca the rewards; with 0/1 rewards at alpha 0 the two are
    equal (above), so the mix is 1.5 group_js. The recipes' call shape, options filtered per term."""
    t = torch.tensor([[0.3, -0.2, 0.5, 1.0]], dtype=F64)
    pos = torch.tensor([[True, False, True, False]])
    z = torch.zeros_like(t)
    terms = parse_loss_spec("group_js:1,nca:0.5")
    options = {"alpha": 0.0, "neg_mix": 0.5, "label_smoothing": 0.1}
    mixed, m = preference_loss(terms, t, z, pos, beta=1.0, options=options, rewards=pos.double())
    js = get_loss("group_js")(t, z, pos, beta=1.0)[0]
    torch.testing.assert_close(mixed, 1.5 * js)
    assert "loss/nca" in m and "loss/group_js" in m
    assert get_loss("nca").reads_rewards and not get_loss("group_js").reads_rewards


def test_usable_groups_for_reward_weighted_losses():
    """Unequal scored rewards make a group usable; equal ones (also a lone scored response) are counted."""
    nan = math.nan
    r = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 1.2], [0.0, nan, 0.0], [1.0, nan, nan], [0.0, 1.0, 0.0]])
    outcomes = online.group_outcomes(r.flatten(), 3, 1.0)
    usable, counts = online.usable_groups(outcomes, r)
    assert usable == [1, 4] and counts == {"all_equal": 3, "used": 2, "unscorable": 3}
    usable, counts = online.usable_groups(outcomes)  # binary: group 1 is all correct, 0 and 2 all wrong
    assert usable == [4] and counts == {"all_correct": 2, "all_wrong": 2, "used": 1, "unscorable": 3}


@register_reward("test_nca_graded")
def _graded(prompts, completions, **_):
    """0, 0.25, ..., 1 from the completion's characters: a scalar reward that a random model's samples spread over."""
    return [(sum(map(ord, c)) % 5) / 4 for c in completions]


@pytest.mark.parametrize("loss,k", [("nca", 3), ("infonca", 3)])
def test_one_online_step_on_the_tiny_model(tmp_path, monkeypatch, loss, k):
    """`mirl online --loss nca|infonca` on an untrained gpt-nano with a graded reward: the first step's loss is the
    value at the reference (nca ln 4, infonca ln K = ln 3: the policy is the reference), the loss gets the scalar
    rewards (values between 0 and 1 among them) of the groups whose rewards differ, and every parameter moves."""
    seen = []
    real = online.preference_loss

    def spy(*args, **kwargs):
        seen.append(kwargs["rewards"].clone())
        return real(*args, **kwargs)

    monkeypatch.setattr(online, "preference_loss", spy)
    model = load_policy("gpt-nano", max_seq_len=256, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    cfg = online.Config(task="arith:1", reward="test_nca_graded", loss=loss, alpha=0.5, k=k, prompts_per_step=8,
                        steps=2, lr=1e-2, eval_n=0, threads=1, max_new_tokens=6, report=False,
                        out_dir=str(tmp_path / "o"))  # fmt: skip
    res = online.train(cfg, model=model)
    rows = [h for h in res.history if "loss" in h]
    assert rows and rows[0]["step"] == 1, "the first step had no usable group"
    assert rows[0]["loss"] == pytest.approx({"nca": LN4, "infonca": math.log(k)}[loss], abs=1e-5)
    assert rows[0]["targets/max"] < 1.0 and "groups/all_equal" in rows[0]
    g = res.summary["groups"]
    assert set(g) == {"all_equal", "used", "unscorable"} and g["used"] > 0
    assert sum(len(x) for x in seen) == g["used"]
    got = torch.cat(seen)
    assert got.shape[1] == k and ((got > 0) & (got < 1)).any()  # not 0/1 labels: the scalar rewards
    assert (got.max(1).values > got.min(1).values).all()  # every group the loss saw has unequal rewards
    changed = [not torch.equal(a, b) for a, b in zip(before, res.model.parameters())]
    assert all(changed), f"{changed.count(False)} of {len(changed)} parameters did not move"
