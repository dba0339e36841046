"""Advantage estimators: vectorised pure functions (tests keep plain-loop references).

    group_advantages  A_i = (r_i - mean_group(r)) / (std + eps)   GRPO; scale = group | batch | none (Dr. GRPO)
    rloo              A_i = r_i - mean_{j != i} r_j               leave-one-out baseline (RLOO)
    nanstd_over_ranks the global batch's std, for scale="batch" under torchrun
    gae               A_t = sum_l (gamma lam)^l delta_{t+l},  delta_t = r_t + gamma V_{t+1} - V_t   (PPO)
    whiten            batch-level normalisation of advantages under a mask (PPO), with REINFORCE++'s statistics
    gdpo_advantages   GDPO: each reward function normalised within its group, the weighted sum normalised
                      over the batch (TRL's multi_objective_aggregation="normalize_then_sum")
    reinforce_pp      REINFORCE++: outcome rewards whitened over every token of the global batch, with or
                      without the group mean subtracted first (veRL's reinforce_plus_plus[_baseline])
    process_advantages  step rewards -> token advantages: normalised over every step of the group, each
                      token's advantage the sum of the normalised rewards of the steps ending at or after it
                      (DeepSeekMath's process supervision; StepGRPO's step-wise rewards)
    ESTIMATORS        --advantage's table: group, rloo, reinforce_pp[_baseline], gdpo, each f(RoundRewards)
    outcome_advantages  one estimator by name, over the rows of one update batch

Rewards may be NaN ("not applicable" from every reward function): such rows are left out of the
group statistics and get advantage 0, as in TRL. std is Bessel-corrected and eps = 1e-4, as TRL's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


def _nanstd(x: Tensor, dim=None, keepdim=False) -> Tensor:
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True) * count / (count - 1).clamp(min=1)
    var = torch.where(count > 1, var, torch.zeros_like(var))
    out = var.sqrt()
    return out if keepdim or dim is None else out.squeeze(dim)


def group_advantages(
    rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4, batch_std: Tensor | float | None = None
) -> Tensor:
    """rewards (N * G,), rows of one prompt adjacent -> advantages (N * G,). batch_std: the std of every
    rank's rewards for scale="batch" under torchrun (nanstd_over_ranks); this batch's own std otherwise."""
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)  # (N, G)
    adv = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (_nanstd(grouped, dim=1, keepdim=True) + eps)
    elif scale == "batch":
        adv = adv / ((_nanstd(rewards) if batch_std is None else batch_std) + eps)
    return torch.nan_to_num(adv.reshape(-1), nan=0.0)


def nanstd_over_ranks(rewards: Tensor) -> Tensor:
    """Bessel-corrected std of the non-NaN rewards of every rank (two passes; a no-op sum in one process):
    --scale-rewards batch under torchrun divides by the std of the global batch, not each rank's own."""
    from .losses.reduce import global_sum

    x = rewards.to(torch.float64)
    ok = ~torch.isnan(x)
    n = global_sum(ok.sum().to(torch.float64))
    mean = global_sum(torch.where(ok, x, 0.0).sum()) / n.clamp(min=1)
    ss = global_sum(torch.where(ok, (x - mean) ** 2, 0.0).sum())
    return torch.where(n > 1, (ss / (n - 1).clamp(min=1)).sqrt(), torch.zeros_like(ss))


def rloo(rewards: Tensor, group_size: int) -> Tensor:
    """Leave-one-out baseline: r_i - mean of the group's *other scorable* rewards. Unscorable (NaN) rewards
    get advantage 0 and are left out of their siblings' baselines (as TRL); a row with no scorable sibling
    gets 0."""
    if group_size < 2:
        raise ValueError("RLOO needs a group size of at least 2")
    grouped = rewards.view(-1, group_size)
    ok = ~torch.isnan(grouped)
    r = torch.where(ok, grouped, torch.zeros_like(grouped))
    others = ok.sum(1, keepdim=True) - ok.long()  # (N, G) scorable siblings of each row
    baseline = (r.sum(1, keepdim=True) - r) / others.clamp(min=1)
    return torch.where(ok & (others > 0), grouped - baseline, torch.zeros_like(grouped)).reshape(-1)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """rewards, values, mask: (B, T), response tokens left-aligned (mask 1...1 0...0).

    The value after the last response token is 0 (episode ends). Returns (advantages, returns), (B, T),
    zero off the mask.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    b, t = rewards.shape
    adv = torch.zeros_like(values)
    last = torch.zeros(b, dtype=values.dtype, device=values.device)
    for i in reversed(range(t)):
        next_v = values[:, i + 1] if i + 1 < t else torch.zeros_like(last)
        delta = rewards[:, i] + gamma * next_v - values[:, i]
        last = (delta + gamma * lam * last) * mask[:, i]
        adv[:, i] = last
    return adv, (adv + values) * mask


def masked_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95):
    """GAE over the masked tokens only, in their order: the tokens between them (an environment's reply inside
    a multi-turn episode) are no steps, so the state after the model's last token before a reply is its first
    token after it. -> (advantages, returns), (B, T), zero off the mask. With the mask a prefix (1...1 0...0)
    it is gae itself (the packing is the identity)."""
    order = torch.argsort((mask == 0).to(torch.int8), dim=1, stable=True)  # the masked positions first, in order
    adv, ret = gae(rewards.gather(1, order), values.gather(1, order), mask.gather(1, order), gamma, lam)
    return torch.zeros_like(adv).scatter(1, order, adv), torch.zeros_like(ret).scatter(1, order, ret)


def last_index(mask: Tensor) -> Tensor:
    """(B,) the position of each row's last masked token (0 for a row without one)."""
    t = mask.shape[1]
    flipped = mask.flip(1).to(torch.int8).argmax(1)
    return torch.where(mask.any(1), t - 1 - flipped, torch.zeros_like(flipped))


def whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) * rsqrt(var + eps) over the masked entries of all ranks (under torchrun); zero off the mask.
    var is Bessel-corrected (sum of squares / (n - 1)) and eps inside the root, as veRL's and TRL's
    masked_whiten (unbiased=True by default) and as reinforce_pp, so that PPO and REINFORCE++ whiten alike; the
    biased variance would scale every advantage by sqrt((n - 1) / n), which matters on small batches only."""
    from .losses.reduce import global_sum

    m = mask.to(x.dtype)
    n = global_sum(m.sum())
    mean = global_sum((x * m).sum()) / n.clamp(min=1)
    var = global_sum((((x - mean) * m) ** 2).sum()) / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * m


def nanmean_over_ranks(x: Tensor) -> Tensor:
    """Mean of the non-NaN values of every rank (a plain nanmean in one process)."""
    from .losses.reduce import global_sum

    x = x.to(torch.float64)
    ok = ~torch.isnan(x)
    return global_sum(torch.where(ok, x, 0.0).sum()) / global_sum(ok.sum().to(torch.float64)).clamp(min=1)


def gdpo_advantages(per_fn: Tensor, weights: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """GDPO (normalize_then_sum): per_fn (N * G, F) rewards of F functions (NaN where one did not apply), rows
    of one prompt adjacent; weights (F,). Each function's rewards are normalised within the group,
    (r_k - mean_g r_k) / (std_g r_k + eps), the weighted sum over functions is then normalised over the
    (global) batch. A row where no function applied gets advantage 0. -> (N * G,)"""
    if per_fn.shape[0] % group_size:
        raise ValueError(f"{per_fn.shape[0]} rows do not split into groups of {group_size}")
    grouped = per_fn.view(-1, group_size, per_fn.shape[1])
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    std = _nanstd(grouped, dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    normed = ((grouped - mean) / (std + eps)).view(-1, per_fn.shape[1])
    total = torch.nansum(normed * weights.to(normed.device, normed.dtype), dim=1)
    total[torch.isnan(per_fn).all(1)] = float("nan")
    adv = (total - nanmean_over_ranks(total)) / (nanstd_over_ranks(total) + eps)
    return torch.nan_to_num(adv, nan=0.0)


def reinforce_pp(rewards: Tensor, lengths: Tensor, group_size: int = 0, eps: float = 1e-8) -> Tensor:
    """REINFORCE++ for outcome rewards: rewards (B,) (NaN: not scorable, advantage 0), lengths (B,) response
    tokens. With group_size > 0 (REINFORCE++-baseline) the group's mean is subtracted first (a group of one
    keeps its reward). Every token of a response carries its reward; the tokens of the (global) batch are
    whitened: (r - mean) / sqrt(var + eps), var Bessel-corrected over tokens. -> per-row advantages (B,)."""
    from .losses.reduce import global_sum

    r = rewards.to(torch.float64)
    ok = ~torch.isnan(r)
    if group_size:
        if r.numel() % group_size:
            raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
        grouped = r.view(-1, group_size)
        base = torch.nanmean(grouped, dim=1, keepdim=True)
        many = (~torch.isnan(grouped)).sum(1, keepdim=True) > 1
        r = (grouped - torch.where(many, base, torch.zeros_like(base))).view(-1)
    w = torch.where(ok, lengths.to(torch.float64), 0.0)
    x = torch.where(ok, r, 0.0)
    n = global_sum(w.sum())
    mean = global_sum((w * x).sum()) / n.clamp(min=1)
    var = global_sum((w * (x - mean) ** 2).sum()) / (n - 1).clamp(min=1)
    return torch.where(ok & (w > 0), (x - mean) * torch.rsqrt(var + eps), 0.0).to(rewards.dtype)


def process_advantages(
    step_rewards: list[list[float]],
    step_ends: list[list[int]],
    group_size: int,
    width: int,
    eps: float = 1e-4,
    baseline: str = "position",
    lengths: list[int] | None = None,
    device=None,
) -> Tensor:
    """Per response i (rows of one prompt adjacent): its steps' rewards r_ik and the response-token index where
    each step ends. Each step reward is normalised within its group, r~ = (r - mean) / (std + eps), and token t
    of response i gets sum_k r~_ik over the steps with end >= t (its return-to-go); the tokens after the last
    step's end, up to the response's length (lengths[i] tokens, EOS included; None: up to width), get the last
    (answer) step's r~, so that stopping is reinforced with the answer and text after it penalised with it.
    -> advantages (B, width).
    baseline "group": mean and std over all the group's steps (DeepSeekMath's process supervision); on arith
    it collapsed (docs/rl.md: the advantages average below 0 per token, shorter answers win).
    baseline "position" (the default): step k against the group's k-th steps, and the last step (the outcome)
    against the group's last steps, so the normalised rewards of each step position sum to 0 over the group
    whatever the responses' step counts. Steps that all agree, or a position only one response reaches, get 0.
    The step rewards come from text on the host: the advantages are made there and moved to `device` once."""
    if baseline not in ("group", "position"):
        raise ValueError(f"baseline {baseline!r}: must be group or position")
    out = torch.zeros(len(step_rewards), width)

    def normalised(values: list[float]) -> Tensor:
        x = torch.tensor(values, dtype=torch.float32)
        if x.numel() < 2 or bool((x == x[0]).all()):
            return torch.zeros_like(x)  # one step or all equal: no signal
        return (x - x.mean()) / (x.std() + eps)

    for g in range(0, len(step_rewards), group_size):
        rows = range(g, g + group_size)
        if not any(step_rewards[i] for i in rows):
            continue
        if baseline == "group":
            flat = normalised([r for i in rows for r in step_rewards[i]]).tolist()
            norm = {}
            for i in rows:
                norm[i], flat = flat[: len(step_rewards[i])], flat[len(step_rewards[i]) :]
        else:
            # key of step k of response i: its index, or "last" for the final step
            key = lambda i, k: "last" if k == len(step_rewards[i]) - 1 else k
            members: dict = {}
            for i in rows:
                for k in range(len(step_rewards[i])):
                    members.setdefault(key(i, k), []).append((i, k))
            norm = {i: [0.0] * len(step_rewards[i]) for i in rows}
            for cells in members.values():
                for (i, k), v in zip(cells, normalised([step_rewards[i][k] for i, k in cells]).tolist()):
                    norm[i][k] = v
        for i in rows:
            for v, end in zip(norm[i], step_ends[i]):
                out[i, : min(end, width - 1) + 1] += v
            if norm[i]:  # after the answer: EOS and any trailing text carry the answer step's advantage
                stop = width if lengths is None else min(width, lengths[i])
                out[i, min(step_ends[i][-1], width - 1) + 1 : stop] = norm[i][-1]
    return out.to(device)


@dataclass
class RoundRewards:
    """What an outcome advantage estimator sees of the rows of one update batch (rows of one prompt adjacent):
    the weighted total reward (B,), each function's reward (B, F) and the functions' weights (F,), the responses'
    token counts (B,), the group size and --scale-rewards (group | batch | none, for the group estimator)."""

    total: Tensor
    per_fn: Tensor
    weights: Tensor
    lengths: Tensor
    group_size: int
    scale: str = "group"


def _group(r: RoundRewards) -> Tensor:
    batch_std = nanstd_over_ranks(r.total) if r.scale == "batch" else None
    return group_advantages(r.total, r.group_size, r.scale, batch_std=batch_std)


# --advantage: name -> f(RoundRewards) -> advantages (B,). A new estimator is one entry here (and its test); the
# recipes call whichever they are given the same way. The batch-level statistics (scale batch, REINFORCE++'s
# whitening, GDPO's second normalisation) are over the rows given, of every rank: pass only the rows trained on
# (dynamic sampling drops the groups without signal first, as veRL's DAPO does, so that they do not shrink the
# batch's std).
ESTIMATORS = {
    "group": _group,
    "rloo": lambda r: rloo(r.total, r.group_size),
    "reinforce_pp": lambda r: reinforce_pp(r.total, r.lengths, 0),
    "reinforce_pp_baseline": lambda r: reinforce_pp(r.total, r.lengths, r.group_size),
    "gdpo": lambda r: gdpo_advantages(r.per_fn, r.weights, r.group_size),
}


def outcome_advantages(estimator: str, rewards: RoundRewards) -> Tensor:
    """Per-row advantages (B,) of one update batch's rows by the estimator named (ESTIMATORS)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
    return ESTIMATORS[estimator](rewards)
