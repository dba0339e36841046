"""Pure loss functions over log-probs, registered by name. See registry.py for the contract."""

from . import mi, policy, preference  # noqa: F401  (registers the losses)
from .reduce import masked_reduce, mean_over_examples
from .registry import LOSSES, LossSpec, get_loss, parse_loss_spec, register_loss

__all__ = [
    "LOSSES",
    "LossSpec",
    "get_loss",
    "parse_loss_spec",
    "register_loss",
    "masked_reduce",
    "mean_over_examples",
    "combined_pair_loss",
    "combined_group_loss",
]


def combined_pair_loss(
    terms,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    options=None,
    chosen_lengths=None,
    rejected_lengths=None,
):
    """sum_i w_i * loss_i over the parsed terms [(name, weight)] -> (per_pair_loss (N,), metrics).

    Metrics of every term are kept; when several terms are combined they are prefixed with the name.
    """
    options = options or {}
    total, metrics = 0.0, {}
    for name, weight in terms:
        spec = get_loss(name)
        loss, m = spec.fn(
            policy_chosen_logps,
            policy_rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            beta=beta,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            **options,
        )
        total = total + weight * loss
        for k, v in m.items():
            metrics[k if len(terms) == 1 or k not in metrics else f"{name}/{k}"] = v
        metrics[f"loss/{name}"] = loss.detach()
    return total, metrics


def combined_group_loss(terms, policy_logps, ref_logps, positive, *, beta, mask=None):
    """sum_i w_i * loss_i over parsed group-loss terms -> (per_group_loss (N,), metrics). policy_logps,
    ref_logps, positive, mask: (N, K). Every term is weighted (a spec 'group_js:0.5,group_dv' trains both)."""
    total, metrics = 0.0, {}
    for name, weight in terms:
        loss, m = get_loss(name).fn(policy_logps, ref_logps, positive, beta=beta, mask=mask)
        total = total + weight * loss
        for k, v in m.items():
            metrics[k if len(terms) == 1 or k not in metrics else f"{name}/{k}"] = v
        metrics[f"loss/{name}"] = loss.detach()
    return total, metrics
