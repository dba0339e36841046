"""Noise Contrastive Alignment over a group of K responses with scalar rewards (Chen et al. 2024, "Noise
Contrastive Alignment of Language Models with Explicit Rewards", arXiv 2402.05369; docs/algorithms.md §1).

K responses y_1..y_K to one prompt carry scalar rewards r_i (a verifier's, a reward model's, a weighted sum of
them). With the critic T_i = beta * (logp(y_i) - logp_ref(y_i)) and the targets p = softmax(r / alpha) over the
group:

    infonca:  -sum_i p_i log softmax_j(T_j)_i                       (InfoNCE with the targets as soft labels)
    nca:      -sum_i [p_i log sigma(T_i) + 1/K log sigma(-T_i)]     = sum_i p_i sp(-T_i) + mean_i sp(T_i)

alpha -> 0 puts equal weight on the group's best responses (alpha = 0 is that limit, exactly); alpha -> inf makes
the targets uniform. Facts the tests check (tests/test_nca.py):
- K = 2, r_1 > r_2, alpha -> 0: nca = sp(-T_1) + (sp(T_1) + sp(T_2)) / 2, the MIO pair loss (TRL's nca_pair),
  and infonca = sp(-(T_1 - T_2)), the DPO loss.
- 0/1 rewards, alpha -> 0 (targets uniform over the positives): nca = group_js, infonca = group_dv + log K.
- at the reference (every T = 0): nca = ln 4 and infonca = ln K whatever the rewards; the gradients there are
  dL/dT_i = (1/K - p_i) / 2 (nca) and 1/K - p_i (infonca): nca's is half infonca's, as MIO's is half DPO's.
- infonca does not change when a constant is added to every T of a group (it sets relative likelihoods); nca
  does (it sets each response's own likelihood: the paper's remedy for the falling chosen likelihood).

Where this departs from the authors' code (thu-ml/Noise-Contrastive-Alignment, reward_trainer.py): there K = 4
and the first response's reward gets +0.01 so that it wins ties; here K is any size, a tie keeps equal targets,
and a ragged group (mask, or a NaN reward: unscored) counts only its real responses, K being their number. The
targets are data: no gradient flows into the rewards. A group whose rewards are all equal gets uniform targets,
which carry no reward information; `mirl online` skips and counts such groups (groups/all_equal).

    mirl online --model runs/sft/final --task arith --loss nca --alpha 0.1
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .registry import register_loss

Tensor = torch.Tensor


def check_alpha(alpha) -> None:
    """alpha must be a finite number >= 0 (0: the hard limit)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(
            f"alpha must be a finite number >= 0 (the temperature of the reward targets softmax(r / alpha); "
            f"0 = equal weight on the best responses), got {alpha!r}"
        )


def reward_targets(rewards: Tensor, alpha: float, mask: Tensor | None = None) -> Tensor:
    """p = softmax(rewards / alpha) over each group's real responses, 0 on the others. rewards, mask: (N, K)
    -> (N, K), each row summing to 1 (0 for a group without a real response). A NaN reward is no response.
    alpha = 0: the limit alpha -> 0, equal weight on the group's best responses."""
    check_alpha(alpha)
    real = ~torch.isnan(rewards) if mask is None else mask.bool() & ~torch.isnan(rewards)
    r = rewards.detach().masked_fill(~real, float("-inf"))  # (N, K)
    best = r.max(-1, keepdim=True).values.masked_fill(~real.any(-1, keepdim=True), 0.0)  # (N, 1), finite
    if alpha == 0:
        weight = ((r == best) & real).to(r.dtype)
    else:
        weight = torch.exp((r - best) / alpha)  # the best response weighs 1, padding 0: the row sum is >= 1
    return weight / weight.sum(-1, keepdim=True).clamp(min=1.0)


def _group(policy_logps, ref_logps, rewards, beta, mask, alpha, name):
    """The critic T (N, K) with 0 at padding, the real responses (N, K) bool, their number K (N,) and the targets."""
    if rewards is None:
        raise ValueError(
            f"loss {name!r} weighs each group by its responses' scalar rewards: pass rewards=(N, K) (`mirl online` "
            "does; preference pairs have none: their NCA loss is the pair form, mio)"
        )
    if rewards.shape != policy_logps.shape:
        shapes = f"rewards {tuple(rewards.shape)}, log-probs {tuple(policy_logps.shape)}"
        raise ValueError(f"loss {name!r}: the rewards must have the log-probs' shape (N, K), got {shapes}")
    real = ~torch.isnan(rewards)
    if mask is not None:
        real = real & mask.bool()
    t = (beta * (policy_logps - ref_logps)).masked_fill(~real, 0.0)  # (N, K)
    p = reward_targets(rewards, alpha, real).to(t.dtype)  # (N, K)
    return t, real, real.sum(-1).clamp(min=1).to(t.dtype), p


def _metrics(t, real, k, p):
    weighted = (p * t).sum(-1)  # the targets' mean of T
    mean = t.sum(-1) / k  # the group's plain mean of T
    return {
        "rewards/target_weighted": weighted.detach(),
        "rewards/group_mean": mean.detach(),
        "rewards/margins": (weighted - mean).detach(),  # > 0: the policy favours the high-reward responses
        "targets/max": p.max(-1).values.detach(),  # 1: hard targets; 1/K: uniform
    }


@register_loss("infonca", kind="group")
def infonca_loss(policy_logps, ref_logps, positive=None, *, beta, rewards=None, mask=None, alpha: float = 0.1):
    """InfoNCA: -sum_i p_i log softmax_j(T_j)_i, p = softmax(rewards / alpha) over the group (Chen et al. 2024).

    policy_logps, ref_logps, rewards, mask: (N, K); positive is not read (the rewards say more). -> (N,)."""
    t, real, k, p = _group(policy_logps, ref_logps, rewards, beta, mask, alpha, "infonca")
    logits = t.masked_fill(~real, float("-inf")).masked_fill(~real.any(-1, keepdim=True), 0.0)  # no all -inf row
    log_q = torch.log_softmax(logits, dim=-1).masked_fill(~real, 0.0)  # (N, K)
    loss = -(p * log_q).sum(-1)
    return loss, _metrics(t, real, k, p)


@register_loss("nca", kind="group")
def nca_loss(policy_logps, ref_logps, positive=None, *, beta, rewards=None, mask=None, alpha: float = 0.1):
    """NCA: sum_i p_i sp(-T_i) + mean_i sp(T_i), p = softmax(rewards / alpha) over the group (Chen et al. 2024).

    policy_logps, ref_logps, rewards, mask: (N, K); positive is not read (the rewards say more). -> (N,)."""
    t, real, k, p = _group(policy_logps, ref_logps, rewards, beta, mask, alpha, "nca")
    loss = (p * F.softplus(-t)).sum(-1) + (real * F.softplus(t)).sum(-1) / k
    return loss, _metrics(t, real, k, p)
