"""Mutual-information lower bounds with the policy's log-ratio as critic (Lv et al. 2025, docs/algorithms.md §1).

A bound takes the critic on the positive sample, T_pos, and on the negative ("marginal") samples T_neg
(..., K) with weights w (..., K) summing to one:

    dv (= MINE):  I = T_pos - log sum_j w_j exp(T_j)
    js:           I = -sp(-T_pos) - sum_j w_j sp(T_j)
    nwj (f-GAN KL): I = T_pos - sum_j w_j exp(T_j - 1)

The loss is -I. For one pair the negatives are the half-mix {w, l} (neg_mix = weight of w): dv gives
DPO - log 2, js gives MIO. `infonce` is dv with uniform weights over the pair, i.e. the listwise
softmax. Over a group of K responses to one prompt (a verifier marks the positives), the negatives are
the whole group with weight 1/K and the loss averages over the group's positives:

    group_dv / group_infonce:  -T_pos + logsumexp_j T_j - log K
    group_js:                  sp(-T_pos) + mean_j sp(T_j)
    group_nwj:                 -T_pos + mean_j exp(T_j - 1)

A group with no positive has no defined loss: it gets loss 0 and is counted in `groups/no_positive`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .preference import _pair_metrics
from .registry import register_loss

Tensor = torch.Tensor
ESTIMATORS = ("dv", "js", "nwj")


def mi_bound(t_pos: Tensor, t_neg: Tensor, neg_weights: Tensor, estimator: str) -> Tensor:
    """I(t_pos; t_neg) per row. t_pos (...,), t_neg and neg_weights (..., K) -> (...,)."""
    if estimator == "dv":
        return t_pos - torch.logsumexp(t_neg + torch.log(neg_weights), dim=-1)
    if estimator == "js":
        return -F.softplus(-t_pos) - (neg_weights * F.softplus(t_neg)).sum(-1)
    if estimator == "nwj":
        return t_pos - (neg_weights * torch.exp(t_neg - 1.0)).sum(-1)
    raise ValueError(f"unknown MI estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")


def _pair_mi_loss(estimator, pc, pr, rc, rr, beta, neg_mix):
    if not 0.0 < neg_mix < 1.0 and estimator == "dv":
        raise ValueError(f"neg_mix must lie in (0, 1) for the DV bound, got {neg_mix}")
    tw, tl = beta * (pc - rc), beta * (pr - rr)
    t_neg = torch.stack([tw, tl], dim=-1)  # (N, 2)
    w = torch.tensor([neg_mix, 1.0 - neg_mix], dtype=tw.dtype, device=tw.device).expand_as(t_neg)
    mi = mi_bound(tw, t_neg, w, estimator)
    metrics = _pair_metrics(tw, tl)
    metrics["mi"] = mi.detach()
    return -mi, metrics


def _register_pair(estimator: str, name: str, uniform: bool = False):
    def fn(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        *,
        beta,
        neg_mix: float = 0.5,
    ):
        mix = 0.5 if uniform else neg_mix
        return _pair_mi_loss(
            estimator, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, mix
        )

    fn.__doc__ = f"Pair {name} bound: -I_{estimator} with Q = neg_mix*w + (1-neg_mix)*l."
    fn.__name__ = f"{name}_pair_loss"
    register_loss(name)(fn)
    return fn


dv_pair_loss = _register_pair("dv", "dv")
js_pair_loss = _register_pair("js", "js")
nwj_pair_loss = _register_pair("nwj", "nwj")
infonce_pair_loss = _register_pair("dv", "infonce", uniform=True)


def group_mi_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    positive: Tensor,
    *,
    beta: float,
    estimator: str,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """Group bound. policy_logps, ref_logps, positive, mask: (N, K); mask marks real responses (ragged groups).

    Returns the per-group loss (N,): mean over the group's positives of -I(T_pos; group).
    """
    t = beta * (policy_logps - ref_logps)  # (N, K)
    if mask is None:
        mask = torch.ones_like(t, dtype=torch.bool)
    mask = mask.bool()
    positive = positive.bool() & mask
    k = mask.sum(-1, keepdim=True).clamp(min=1).to(t.dtype)  # (N, 1)
    w = mask.to(t.dtype) / k  # uniform weight 1/K over the real responses
    # every positive j in the group is a sample from P; the marginal Q is the whole group (its real responses)
    if estimator == "dv":  # padding leaves the log-sum-exp exactly: -inf, not a tiny weight
        real = t.masked_fill(~mask, float("-inf")).masked_fill(~mask.any(-1, keepdim=True), 0.0)  # no all -inf row
        lse = torch.logsumexp(real, dim=-1, keepdim=True) - torch.log(k)
        mi = t - lse  # (N, K)
    else:
        t_neg_b = t.masked_fill(~mask, 0.0).unsqueeze(1).expand(-1, t.shape[1], -1)  # (N, K, K)
        mi = mi_bound(t, t_neg_b, w.unsqueeze(1).expand_as(t_neg_b), estimator)  # (N, K): I per candidate
    n_pos = positive.sum(-1)
    per_group = -torch.where(positive, mi, torch.zeros_like(mi)).sum(-1) / n_pos.clamp(min=1)
    metrics = {
        "mi": (-per_group).detach(),
        "rewards/positive": (t * positive).sum(-1).detach() / n_pos.clamp(min=1),
        "rewards/negative": (t * (mask & ~positive)).sum(-1).detach() / (mask & ~positive).sum(-1).clamp(min=1),
        "groups/no_positive": (n_pos == 0).float().detach(),
    }
    return per_group, metrics


def _register_group(estimator: str, name: str):
    def fn(policy_logps, ref_logps, positive, *, beta, mask=None):
        return group_mi_loss(policy_logps, ref_logps, positive, beta=beta, estimator=estimator, mask=mask)

    fn.__doc__ = f"Group {estimator} bound over K responses to one prompt; positives = verified correct."
    fn.__name__ = f"{name}_loss"
    register_loss(name, kind="group")(fn)
    return fn


group_dv_loss = _register_group("dv", "group_dv")
group_infonce_loss = _register_group("dv", "group_infonce")
group_js_loss = _register_group("js", "group_js")
group_nwj_loss = _register_group("nwj", "group_nwj")

LOG2 = math.log(2)
