"""Policy-gradient losses for online RL: the PPO clip objective, the GRPO family, KL estimators, value loss.

Per token k of response o (docs/algorithms.md §2):
    rho_k = exp(logp_k - old_logp_k)      (importance="sequence": one rho per response, GSPO:
                                           exp(mean_k (logp_k - old_logp_k)))
    l_k   = -min(rho_k A, clip(rho_k, 1 - eps_low, 1 + eps_high) A) + beta * KL_k
    KL_k  = k1: logp - ref | k2: (logp - ref)^2 / 2 | k3: exp(ref - logp) - (ref - logp) - 1  (Schulman)
The per-token term by policy_loss (the others replace the min/clip above; all equal -A at rho = 1):
    clip       the PPO clipped surrogate above
    dual_clip  for A < 0 also bounded: min(l_k, -c A), c = dual_clip_c (Ye et al. 2020; veRL's clip_ratio_c)
    cispo      -sg(min(rho_k, cap)) A logp_k: the weight capped and detached, every token keeps its gradient
               (MiniMax-M1's CISPO); cap = cispo_cap, 5 by default (TRL's epsilon_high for cispo is the cap
               itself, and ScaleRL recommends 5), not 1 + eps_high
    sapo       -(4 / tau) sigmoid(tau (rho_k - 1)) A, tau = tau_pos for A > 0, tau_neg for A < 0: a soft gate
               instead of the hard clip (SAPO; TRL's loss_type="sapo")
    gmpo       one loss per response, the geometric mean of its ratios (GMPO, Zhao et al. 2025, arXiv 2507.20673):
               -A exp((1/|o|) sum_k sgn(A) min(sgn(A) s_k, sgn(A) clip(s_k, -eps, eps))), s_k = log rho_k,
               eps = gmpo_eps (0.4: the paper's (e^-0.4, e^0.4)); the min on the side A pushes, as the released
               code. With token advantages (PPO, step rewards): sgn(A_k) per token, A their mean (veRL's gmpo).
               Spread over the response's tokens, loss_agg grpo averages it over responses, as the paper (bnpo,
               dapo, dr_grpo weight each response by its length; PPO's bnpo does). With importance sequence
               the clip is on the sequence's mean log-ratio, not on its sum as the paper's seqclip ablation clips
               it (a looser clip by |o|); pg_mask selects the tokens of the mean.
Aggregation (loss_agg), the place where the GRPO variants differ:
    grpo     mean over responses of (token mean within the response)
    bnpo     token mean over the micro-batch
    dapo     token mean over the whole generation batch (pass global_count = its token count)
    dr_grpo  sum over tokens / (number of responses * max_completion_length)     (Dr. GRPO)
These match TRL's GRPOTrainer for the same names (tests/test_policy_losses.py). pg_mask (the 80/20 rule's
top-entropy tokens, top_entropy_mask) multiplies the policy term alone: the KL term and the normaliser keep the
whole loss mask, as in TRL.

Rollout/train mismatch (rollout_correction): when the sampler's log-probs q are not the trainer's p (vLLM's
kernels, bf16), the samples come from q, not p; each token's loss is weighted by w = p / q (detached):
    level token     w_k = exp(p_k - q_k)                 level sequence  w = exp(sum_k (p_k - q_k)), every token
    mode truncate   w <- min(w, cap)  (TIS)              mode mask       w <- 0 where w > cap (MIS; TRL's
                                                                         default: sequence, mask, 3; no floor)
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch

from .reduce import gather_all, masked_reduce
from .registry import register_loss

Tensor = torch.Tensor
AGGREGATIONS = ("grpo", "bnpo", "dapo", "dr_grpo")
KL_ESTIMATORS = ("k1", "k2", "k3")
IS_LEVELS = ("none", "token", "sequence")
IS_MODES = ("truncate", "mask")


def rollout_correction(
    trainer_logps: Tensor,
    sampler_logps: Tensor,
    mask: Tensor,
    *,
    level: str = "sequence",
    mode: str = "mask",
    cap: float = 3.0,
    floor: float = 0.0,
) -> tuple[Tensor, dict]:
    """Importance weights p / q for samples drawn from the sampler q and trained on as if from the trainer p
    (the module docstring). trainer_logps, sampler_logps, mask: (B, T). -> (weights (B, T), zero off the mask,
    and their statistics: the mean weight, the fraction of tokens masked (mode mask) or capped (truncate),
    the mean and largest |p - q| per token). floor: the lower bound of mode mask (0 = none)."""
    if level not in IS_LEVELS[1:]:
        raise ValueError(f"unknown correction level {level!r}; valid: token, sequence")
    if mode not in IS_MODES:
        raise ValueError(f"unknown correction mode {mode!r}; valid: {', '.join(IS_MODES)}")
    mask = mask.to(trainer_logps.dtype)
    diff = ((trainer_logps - sampler_logps) * mask).detach()
    log_w = diff.sum(-1, keepdim=True) if level == "sequence" else diff
    w = torch.exp(log_w).expand_as(mask)
    if mode == "truncate":
        hit = w > cap
        w = torch.clamp(w, max=cap)
    else:
        hit = (w > cap) | (w < floor)
        w = w.masked_fill(hit, 0.0)
    n = mask.sum().clamp(min=1)
    gap = diff.abs()
    stats = {
        "is/weight_mean": float((w * mask).sum() / n),
        "is/masked_frac" if mode == "mask" else "is/capped_frac": float((hit.to(mask.dtype) * mask).sum() / n),
        "is/logp_gap_mean": float(gap.sum() / n),
        "is/logp_gap_max": float(gap.max()) if gap.numel() else 0.0,
    }
    return w * mask, stats


@register_loss("clip", kind="policy")
def clip_term(logps: Tensor, ratio: Tensor, adv: Tensor, clip: tuple[float, float]) -> Tensor:
    """PPO's clipped surrogate: -min(rho A, clip(rho, 1 - low, 1 + high) A)."""
    low, high = clip
    return -torch.min(ratio * adv, torch.clamp(ratio, 1 - low, 1 + high) * adv)


@register_loss("dual_clip", kind="policy")
def dual_clip_term(logps: Tensor, ratio: Tensor, adv: Tensor, clip: tuple[float, float], *, dual_clip_c: float = 3.0):
    """The clipped surrogate, for A < 0 also bounded by -c A (Ye et al. 2020; veRL's clip_ratio_c)."""
    term = clip_term(logps, ratio, adv, clip)
    return torch.where(adv < 0, torch.minimum(term, -dual_clip_c * adv), term)


@register_loss("cispo", kind="policy")
def cispo_term(logps: Tensor, ratio: Tensor, adv: Tensor, clip: tuple[float, float], *, cispo_cap: float = 5.0):
    """-sg(min(rho, cap)) A logp: the weight capped and detached, every token keeps its gradient (CISPO)."""
    return -torch.clamp(ratio, max=cispo_cap).detach() * adv * logps


@register_loss("sapo", kind="policy")
def sapo_term(
    logps: Tensor,
    ratio: Tensor,
    adv: Tensor,
    clip: tuple[float, float],
    *,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
) -> Tensor:
    """-(4 / tau) sigmoid(tau (rho - 1)) A, tau_pos for A > 0 and tau_neg for A < 0: a soft gate (SAPO)."""
    tau = torch.full_like(adv, sapo_tau_neg).masked_fill(adv > 0, sapo_tau_pos)
    return -torch.sigmoid(tau * (ratio - 1)) * (4.0 / tau) * adv


@register_loss("gmpo", kind="policy")
def gmpo_term(
    logps: Tensor, ratio: Tensor, adv: Tensor, clip: tuple[float, float], *, mask: Tensor, gmpo_eps: float = 0.4
) -> Tensor:
    """-A exp(mean_k sgn(A) min(sgn(A) s_k, sgn(A) clip(s_k, -eps, eps))), s_k = log rho_k over the response's
    tokens (mask (B, T)): one loss per response (B, 1), GMPO's clipped geometric mean of the ratios."""
    mask = mask.to(ratio.dtype)
    n = mask.sum(-1, keepdim=True).clamp(min=1)
    s = torch.log(ratio)  # (exact while |log rho| < 87 in float32: exp neither overflows nor underflows)
    sgn = torch.sign(adv)
    kept = sgn * torch.minimum(sgn * s, sgn * s.clamp(-gmpo_eps, gmpo_eps))
    a = adv if adv.shape[-1] == 1 else (adv * mask).sum(-1, keepdim=True) / n  # token advantages: their mean
    return -a * torch.exp((kept * mask).sum(-1, keepdim=True) / n)


def policy_term(
    logps: Tensor,
    ratio: Tensor,
    adv: Tensor,
    *,
    policy_loss: str = "clip",
    clip_eps: float = 0.2,
    clip_eps_high: float = 0.2,
    mask: Tensor | None = None,
    **options,
) -> Tensor:
    """The per-token policy-gradient loss before the KL term and the aggregation (the module docstring's table):
    the registered term `policy_loss` with the options it takes (the others are not its own and are dropped).
    ratio: the importance weight (B, T) or (B, 1); adv (B, 1) or (B, T); mask (B, T), for a term that takes it
    (gmpo; default: every token)."""
    spec = policy_spec(policy_loss)
    own = {k: v for k, v in options.items() if k in spec.options}
    mask = torch.ones_like(logps) if mask is None else mask
    return spec(logps, ratio, adv, (clip_eps, clip_eps_high), mask=mask, **own)


def policy_spec(name: str):
    """The registered policy-loss term `name`; another name is an error listing the terms."""
    from .registry import LOSSES

    spec = LOSSES.get(name)
    if spec is None or spec.kind != "policy" or name == "clipped_pg":
        raise ValueError(f"unknown policy loss {name!r}; valid: {', '.join(policy_terms())}")
    return spec


def policy_terms() -> tuple[str, ...]:
    """The registered policy-loss terms (kind policy, clipped_pg aside: the whole loss as one call), in the order
    of registration: --policy-loss's choices."""
    from .registry import LOSSES

    return tuple(n for n, spec in LOSSES.items() if spec.kind == "policy" and n != "clipped_pg")


def kl_estimate(logps: Tensor, ref_logps: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi."""
    q = ref_logps - logps
    if kind == "k1":
        return -q
    if kind == "k2":
        return 0.5 * q**2
    if kind == "k3":
        return torch.exp(q) - q - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}; valid: {', '.join(KL_ESTIMATORS)}")


def top_entropy_mask(entropy: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """The loss mask restricted to the highest-entropy `quantile` of its tokens (Wang et al. 2025, "Beyond the
    80/20 rule": the forking tokens carry the learning signal; 0.2 there). entropy, mask: (B, T). A token is kept
    when its entropy is at least the (1 - quantile) quantile of the masked tokens' entropies (ties kept), those of
    every rank under torch.distributed (a collective: every rank calls it, also with no rows), so N ranks keep
    the tokens one process would (TRL gathers them too). For clipped_policy_loss's pg_mask."""
    if quantile >= 1.0:
        return mask
    values = gather_all(entropy.detach()[mask.bool()].float())
    if not values.numel():
        return mask
    # torch.quantile's linear interpolation, by a sort: torch.quantile refuses inputs above 2^24 elements, which
    # the tokens of a minibatch gathered from every rank can reach
    ordered = torch.sort(values).values
    pos = (1.0 - quantile) * (values.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, values.numel() - 1)
    threshold = torch.lerp(ordered[lo], ordered[hi], pos - lo)
    return mask * (entropy >= threshold).to(mask.dtype)


@dataclass(frozen=True)
class PolicyLoss:
    """The policy loss of an online recipe, built once from its options and called the same way by grpo and ppo:
    the registered term (clip, dual_clip, cispo, sapo, gmpo) with its own options, the clipping range, the importance
    level (token, or sequence: GSPO), the aggregation (loss_agg) and the KL estimator. An option the term does
    not take is an error listing those it does (LossSpec)."""

    term: str = "clip"
    options: tuple = ()  # the term's own options, as (name, value) pairs: (("cispo_cap", 5.0),)
    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # None: clip_eps
    importance: str = "token"
    loss_agg: str = "grpo"
    kl_estimator: str = "k3"
    max_completion_length: int | None = None  # dr_grpo's constant

    def __post_init__(self):
        spec = policy_spec(self.term)
        unknown = [k for k, _ in self.options if k not in spec.options]
        if unknown:
            raise ValueError(
                f"policy loss {self.term!r} has no option {', '.join(map(repr, unknown))}; its options: "
                f"{', '.join(spec.options) or 'none'}"
            )
        if self.loss_agg not in AGGREGATIONS:
            raise ValueError(f"unknown loss aggregation {self.loss_agg!r}; valid: {', '.join(AGGREGATIONS)}")
        if self.importance not in ("token", "sequence"):
            raise ValueError(f"importance must be 'token' or 'sequence', got {self.importance!r}")
        if self.loss_agg == "dr_grpo" and not self.max_completion_length:
            raise ValueError("dr_grpo aggregation needs max_completion_length")

    @property
    def high(self) -> float:
        """The upper clipping offset: clip_eps_high, or clip_eps when not given."""
        return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high

    def bounds(self) -> tuple[float, float]:
        """The ratios below and above which the term clips (the clip-fraction metrics): 1 - clip_eps and
        1 + high; cispo's cap above; gmpo's e^-eps and e^eps."""
        if self.term == "gmpo":
            eps = dict(self.options).get("gmpo_eps", 0.4)
            return math.exp(-eps), math.exp(eps)
        cap = dict(self.options).get("cispo_cap", 5.0) if self.term == "cispo" else 1 + self.high
        return 1 - self.clip_eps, cap

    def __call__(
        self,
        logps: Tensor,
        old_logps: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        beta: float = 0.0,
        ref_logps: Tensor | None = None,
        global_count: Tensor | float | None = None,
        is_weights: Tensor | None = None,
        pg_mask: Tensor | None = None,
    ) -> tuple[Tensor, dict]:
        """logps, old_logps, ref_logps, mask: (B, T); advantages (B,) or (B, T). is_weights (B, T): the rollout
        correction's weights on the policy term (rollout_correction; the KL term is not reweighted, as in TRL).
        pg_mask (B, T): the tokens whose policy term counts (top_entropy_mask); the KL term, its metric and the
        aggregation's normaliser keep `mask`. -> (the loss, metrics)."""
        mask = mask.to(logps.dtype)
        adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        log_ratio = logps - old_logps
        if self.importance == "token":
            log_w = log_ratio
        else:
            log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)
        ratio = torch.exp(log_w)
        spec = policy_spec(self.term)
        pg = mask if pg_mask is None else mask * pg_mask.to(mask.dtype)  # the tokens the policy term trains on
        per_token = spec(logps, ratio, adv, (self.clip_eps, self.high), mask=pg, **dict(self.options))
        if is_weights is not None:
            per_token = per_token * is_weights
        if pg_mask is not None and "mask" not in inspect.signature(spec.fn).parameters:  # (gmpo: applied inside)
            per_token = per_token * pg_mask.to(per_token.dtype)
        metrics = {}
        if beta != 0.0:
            if ref_logps is None:
                raise ValueError("beta > 0 needs ref_logps")
            kl = kl_estimate(logps, ref_logps, self.kl_estimator)
            per_token = per_token + beta * kl
            metrics["kl"] = ((kl * mask).sum() / mask.sum().clamp(min=1)).detach()
        per_token = per_token.expand_as(mask) if per_token.shape != mask.shape else per_token
        loss = aggregate(per_token, mask, self.loss_agg, self.max_completion_length, global_count)
        floor, cap = self.bounds()
        low_clip = ((ratio < floor) & (adv < 0)).to(mask.dtype).expand_as(mask)
        high_clip = ((ratio > cap) & (adv > 0)).to(mask.dtype).expand_as(mask)
        n = mask.sum().clamp(min=1)
        metrics["clip_fraction/low"] = ((low_clip * mask).sum() / n).detach()
        metrics["clip_fraction/high"] = ((high_clip * mask).sum() / n).detach()
        metrics["clip_fraction"] = metrics["clip_fraction/low"] + metrics["clip_fraction/high"]
        metrics["ratio/mean"] = ((ratio.expand_as(mask) * mask).sum() / n).detach()
        return loss, metrics


def aggregate(per_token: Tensor, mask: Tensor, loss_agg: str, max_completion_length, global_count) -> Tensor:
    """The per-token loss (B, T) to a scalar by loss_agg (the module docstring's aggregation table)."""
    if loss_agg == "grpo":
        return masked_reduce(per_token, mask, "seq_mean", global_count=global_count)
    if loss_agg in ("bnpo", "dapo"):
        return masked_reduce(per_token, mask, "token_mean", global_count=global_count)
    return masked_reduce(per_token, mask, "constant", constant=max_completion_length, global_count=global_count)


# every registered term's own options: each is a field of grpo's and ppo's Config (options.term_option)
TERM_OPTIONS = tuple(dict.fromkeys(o for name in policy_terms() for o in policy_spec(name).options))


def term_options(term: str, **values) -> tuple:
    """The options of `term` among the given values (a recipe's TERM_OPTIONS: dual_clip_c, cispo_cap, ...), as
    PolicyLoss.options."""
    spec = policy_spec(term)
    return tuple((k, v) for k, v in values.items() if k in spec.options)


@register_loss("clipped_pg", kind="policy")
def clipped_policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    importance: str = "token",
    beta: float = 0.0,
    ref_logps: Tensor | None = None,
    kl_estimator: str = "k3",
    loss_agg: str = "grpo",
    max_completion_length: int | None = None,
    global_count: Tensor | float | None = None,
    policy_loss: str = "clip",
    dual_clip_c: float = 3.0,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    cispo_cap: float = 5.0,
    gmpo_eps: float = 0.4,
    is_weights: Tensor | None = None,
    pg_mask: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """PolicyLoss as one function call (tests, the starvation experiment): built from these options and called."""
    own = term_options(
        policy_loss,
        dual_clip_c=dual_clip_c,
        sapo_tau_pos=sapo_tau_pos,
        sapo_tau_neg=sapo_tau_neg,
        cispo_cap=cispo_cap,
        gmpo_eps=gmpo_eps,
    )
    fn = PolicyLoss(
        policy_loss, own, clip_eps, clip_eps_high, importance, loss_agg, kl_estimator, max_completion_length
    )
    return fn(
        logps,
        old_logps,
        advantages,
        mask,
        beta=beta,
        ref_logps=ref_logps,
        global_count=global_count,
        is_weights=is_weights,
        pg_mask=pg_mask,
    )


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip_range: float = 0.2
) -> Tensor:
    """PPO value loss: 1/2 max((V - R)^2, (clip(V, V_old +- c) - R)^2), token mean."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    per_token = 0.5 * torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    return masked_reduce(per_token, mask, "token_mean")
