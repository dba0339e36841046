"""Offline preference losses over sequence log-probs (the DPO family and MIO).

Notation (docs/algorithms.md §1): delta = logp_policy - logp_ref, T = beta * delta, margin h = T_w - T_l.

    dpo     sp(-h)                                   = -log sigma(h)          (Rafailov et al. 2023)
    mio     sp(-T_w) + 1/2 sp(T_w) + 1/2 sp(T_l)     = -I_JS, Q = {w: 1/2, l: 1/2}  (Lv et al. 2025);
            term for term NCA's pairwise loss (Chen et al. 2024; TRL's nca_pair)
            neg_mix=lambda: sp(-T_w) + lambda sp(T_w) + (1 - lambda) sp(T_l)
    ipo     (delta_w - delta_l - 1/(2 beta))^2       (Azar et al. 2023; per-token deltas by default,
                                                       as TRL and the IPO authors do)
    hinge   relu(1 - h)                              (SLiC)
    robust  ((1-eps) sp(-h) - eps sp(h)) / (1 - 2 eps)   (Chowdhury et al. 2024, label noise eps)
    simpo   sp(-(beta (mean logp_w - mean logp_l) - gamma))   (Meng et al. 2024; no reference)
    sft     -mean_t logp(w_t)                        (NLL of the chosen response, per token)

Every loss returns (per_pair_loss (N,), metrics) with detached metric tensors. All forms go through
softplus / logsigmoid, so |T| of 100 or more stays finite.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .registry import register_loss

Tensor = torch.Tensor


def _pair_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, Tensor]:
    margins = chosen_rewards - rejected_rewards
    return {
        "rewards/chosen": chosen_rewards.detach(),
        "rewards/rejected": rejected_rewards.detach(),
        "rewards/margins": margins.detach(),
        "rewards/accuracies": (margins > 0).float().detach(),
    }


def _rewards(beta, pc, pr, rc, rr):
    return beta * (pc - rc), beta * (pr - rr)


@register_loss("dpo")
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta):
    """DPO (sigmoid): -log sigma(beta * (delta_w - delta_l)). Equals log 2 - I_DV for one pair."""
    tw, tl = _rewards(beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = F.softplus(-(tw - tl))
    metrics = _pair_metrics(tw, tl)
    metrics["mi"] = (math.log(2) - loss).detach()  # the DV bound this loss maximises
    return loss, metrics


@register_loss("mio")
def mio_loss(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, neg_mix: float = 0.5
):
    """MIO: sp(-T_w) + neg_mix * sp(T_w) + (1 - neg_mix) * sp(T_l), the negative Jensen-Shannon MI bound.

    At neg_mix = 1/2 this is, term for term, the pairwise loss of Noise Contrastive Alignment (Chen et al. 2024,
    "Noise Contrastive Alignment of Language Models with Explicit Rewards", arXiv 2402.05369; TRL's
    loss_type="nca_pair"): -log sigma(T_w) - 1/2 log sigma(-T_w) - 1/2 log sigma(-T_l). NCA made the same
    claim, that the chosen likelihood does not fall as under DPO, in 2024. Its group form with scalar rewards is
    the loss `nca` (losses/nca.py)."""
    if not 0.0 <= neg_mix <= 1.0:
        raise ValueError(f"neg_mix must lie in [0, 1], got {neg_mix}")
    tw, tl = _rewards(beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = F.softplus(-tw) + neg_mix * F.softplus(tw) + (1.0 - neg_mix) * F.softplus(tl)
    metrics = _pair_metrics(tw, tl)
    metrics["mi"] = (-loss).detach()
    return loss, metrics


@register_loss("ipo")
def ipo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    chosen_lengths=None,
    rejected_lengths=None,
    length_normalize: bool = True,
):
    """IPO: (delta_w - delta_l - 1/(2 beta))^2, deltas divided by response length when lengths are given."""
    dw = policy_chosen_logps - ref_chosen_logps
    dl = policy_rejected_logps - ref_rejected_logps
    if length_normalize and chosen_lengths is not None and rejected_lengths is not None:
        dw = dw / chosen_lengths.clamp(min=1)
        dl = dl / rejected_lengths.clamp(min=1)
    loss = (dw - dl - 1.0 / (2.0 * beta)) ** 2
    tw, tl = _rewards(beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return loss, _pair_metrics(tw, tl)


@register_loss("hinge")
def hinge_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta):
    """Hinge (SLiC): relu(1 - beta * (delta_w - delta_l))."""
    tw, tl = _rewards(beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return torch.relu(1.0 - (tw - tl)), _pair_metrics(tw, tl)


@register_loss("robust")
def robust_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    label_smoothing: float = 0.1,
):
    """Robust DPO: unbiased under preference flips with probability label_smoothing (in [0, 0.5))."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    tw, tl = _rewards(beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    h = tw - tl
    eps = label_smoothing
    loss = ((1 - eps) * F.softplus(-h) - eps * F.softplus(h)) / (1 - 2 * eps)
    return loss, _pair_metrics(tw, tl)


@register_loss("simpo", needs_reference=False)
def simpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps=None,
    ref_rejected_logps=None,
    *,
    beta,
    chosen_lengths=None,
    rejected_lengths=None,
    gamma: float = 0.5,
):
    """SimPO: sp(-(beta * (avg logp_w - avg logp_l) - gamma)); no reference model. beta ~2 in the paper."""
    cw, cl = policy_chosen_logps, policy_rejected_logps
    if chosen_lengths is not None and rejected_lengths is not None:
        cw = cw / chosen_lengths.clamp(min=1)
        cl = cl / rejected_lengths.clamp(min=1)
    tw, tl = beta * cw, beta * cl
    loss = F.softplus(-(tw - tl - gamma))
    return loss, _pair_metrics(tw, tl)


@register_loss("sft", needs_reference=False)
def sft_loss(
    policy_chosen_logps,
    policy_rejected_logps=None,
    ref_chosen_logps=None,
    ref_rejected_logps=None,
    *,
    beta=None,
    chosen_lengths=None,
):
    """SFT term: per-token negative log-likelihood of the chosen response (RPO's NLL term)."""
    nll = -policy_chosen_logps
    if chosen_lengths is not None:
        nll = nll / chosen_lengths.clamp(min=1)
    return nll, {"nll/chosen": nll.detach()}


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor, margin: float = 0.0):
    """Reward-model loss -log sigma(r_w - r_l - margin) per pair; accuracy = fraction with r_w > r_l."""
    diff = chosen_scores - rejected_scores
    return F.softplus(-(diff - margin)), {"accuracy": (diff > 0).float().detach(), "margin": diff.detach()}
