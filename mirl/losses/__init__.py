"""Pure loss functions over log-probs, registered by name. See registry.py for the contract."""

from . import distill, mi, nca, policy, preference  # noqa: F401  (registers the losses)
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
    "preference_loss",
]


def preference_loss(
    terms, policy_logps, ref_logps, positive, *, beta, options=None, lengths=None, mask=None, rewards=None
):
    """sum_i w_i * loss_i over parsed terms [(name, weight)], one call shape for pair and group losses (a pair
    is a group of two, its positive first) -> (per_example_loss (N,), metrics).

    policy_logps, ref_logps, positive, mask, lengths: (N, K). Pair losses take column 0 as chosen and column
    1 as rejected (K must be 2); group losses take the whole group, and the reward-weighted ones (nca, infonca)
    its scalar rewards (N, K) too (NaN: unscored). options: every option the recipe has
    (neg_mix, label_smoothing, gamma, ...); each term receives the ones it takes. Metrics of every term are
    kept; when several terms are combined, a repeated name is prefixed with the loss's.
    """
    options = options or {}
    total, metrics = 0.0, {}
    for name, weight in terms:
        spec = get_loss(name)
        opts = {k: v for k, v in options.items() if k in spec.options}
        if spec.kind == "group":
            loss, m = spec(policy_logps, ref_logps, positive, beta=beta, mask=mask, rewards=rewards, **opts)
        else:
            if policy_logps.shape[-1] != 2:
                raise ValueError(
                    f"pair loss {name!r} needs groups of two (chosen, rejected), got {policy_logps.shape[-1]}"
                )
            lc, lr = (None, None) if lengths is None else (lengths[:, 0], lengths[:, 1])
            loss, m = spec(
                policy_logps[:, 0],
                policy_logps[:, 1],
                ref_logps[:, 0],
                ref_logps[:, 1],
                beta=beta,
                chosen_lengths=lc,
                rejected_lengths=lr,
                **opts,
            )
        total = total + weight * loss
        for k, v in m.items():
            metrics[k if len(terms) == 1 or k not in metrics else f"{name}/{k}"] = v
        metrics[f"loss/{name}"] = loss.detach()
    return total, metrics
