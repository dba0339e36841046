"""The loss registry: one name -> one pure function, plus what the recipe must feed it.

kind "pair": fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
              beta, chosen_lengths=None, rejected_lengths=None, **options) -> (per_pair_loss (N,), metrics)
kind "group": fn(policy_logps (N,K), ref_logps (N,K), positive (N,K) bool, *, beta, mask=None, rewards=None,
              **options) -> (per_group_loss (N,), metrics); rewards (N,K) float are the responses' scalar rewards,
              read by the reward-weighted losses (nca, infonca) and dropped for the others
kind "policy": fn(logps, old_logps, advantages, mask, **options) -> (scalar loss, metrics)   (losses/policy.py)
kind "distill": fn(student_logits (..., V), teacher_logits (..., V), beta, temperature) -> per position (...)
                (losses/distill.py)
`needs_reference=False` lets a recipe skip the reference model (SimPO, the SFT term).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

# data a caller may always pass; a loss that does not read them gets them dropped (they are not options)
DATA_KWARGS = ("chosen_lengths", "rejected_lengths", "mask", "rewards")


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: call it as spec(*tensors, beta=..., **options); an option the loss does not take
    is an error that lists the ones it does."""

    name: str
    fn: Callable
    kind: str  # "pair" | "group" | "policy" | "distill"
    needs_reference: bool = True
    doc: str = ""

    @property
    def options(self) -> tuple[str, ...]:
        """The loss's keyword options (beta and the data arguments aside)."""
        params = inspect.signature(self.fn).parameters.values()
        return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in ("beta", *DATA_KWARGS))

    @property
    def reads_rewards(self) -> bool:
        """Whether the loss weighs a group by its responses' scalar rewards (`rewards=`: nca, infonca) rather than
        by the binary positives."""
        return "rewards" in inspect.signature(self.fn).parameters

    def __call__(self, *tensors, **kwargs):
        accepted = inspect.signature(self.fn).parameters
        unknown = [k for k in kwargs if k not in accepted and k not in DATA_KWARGS]
        if unknown:
            raise ValueError(
                f"loss {self.name!r} has no option {', '.join(map(repr, unknown))}; its options: "
                f"{', '.join(self.options) or 'none'}"
            )
        return self.fn(*tensors, **{k: v for k, v in kwargs.items() if k in accepted})


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, kind: str = "pair", needs_reference: bool = True):
    """Register a loss function under `name` (kind pair, group, policy or distill)."""
    if kind not in ("pair", "group", "policy", "distill"):
        raise ValueError(f"loss kind must be 'pair', 'group', 'policy' or 'distill', got {kind!r}")

    def wrap(fn):
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        LOSSES[name] = LossSpec(name, fn, kind, needs_reference, doc)
        return fn

    return wrap


def get_loss(name: str) -> LossSpec:
    """The registered loss `name`; an unknown name is an error listing the valid ones."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def parse_loss_spec(spec: str) -> list[tuple[str, float]]:
    """'mio' -> [('mio', 1.0)]; 'dpo:1,sft:0.1' -> [('dpo', 1.0), ('sft', 0.1)].

    Every name is checked against the registry, so a typo fails before any model is loaded.
    """
    terms = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, weight = part.partition(":")
        name = name.strip()
        get_loss(name)
        try:
            w = float(weight) if weight else 1.0
        except ValueError as e:
            raise ValueError(f"loss weight for {name!r} must be a number, got {weight!r}") from e
        if not math.isfinite(w):
            raise ValueError(f"loss weight for {name!r} must be finite, got {weight!r}")
        terms.append((name, w))
    if not terms:
        raise ValueError(f"empty loss spec {spec!r}; valid losses: {', '.join(sorted(LOSSES))}")
    kinds = {get_loss(n).kind for n, _ in terms}
    if "policy" in kinds:
        raise ValueError(f"{spec!r}: policy-gradient losses are used by the grpo/ppo recipes, not as preference losses")
    if "distill" in kinds:
        raise ValueError(f"{spec!r}: distillation losses are used by `mirl distill`, not as preference losses")
    if len(kinds) > 1:
        raise ValueError(f"cannot combine pair and group losses in one spec: {spec!r}")
    return terms
