"""The KL and entropy-bonus coefficients over a run: constant, scheduled or under adaptive control, each an object
whose state is kept with checkpoints (KLCoef, EntropyCoef), over the plain functions that move them.

    KL       scheduled_beta: beta, or linear / cosine from beta to beta_final; adaptive_kl_coef: Ziegler et al.
             (2019), beta * (1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon)
    entropy  adaptive_entropy_coef: Skywork-OR1's, coef +- delta by the mean token entropy against a target,
             in [0, max_coef]; entropy_bonus_coef: no bonus above the target
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def adaptive_kl_coef(beta: float, kl: float, target: float, horizon: float, n: int) -> float:
    """The adaptive KL controller of Ziegler et al. (2019), as veRL's kl_ctrl and OpenRLHF's kl target:
    beta * (1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon), with kl the batch's mean per-token KL to the
    reference and n the samples in the batch. beta grows while the KL is above target and shrinks below."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n / horizon)


def adaptive_entropy_coef(coef: float, entropy: float, target: float, delta: float, max_coef: float) -> float:
    """Skywork-OR1's adaptive entropy control: the bonus coefficient rises by delta while the batch's mean
    token entropy is at or below target and falls by delta above it, within [0, max_coef] (as TRL's
    use_adaptive_entropy). The bonus applies it only at or below the target: entropy_bonus_coef."""
    coef = coef + delta if entropy <= target else coef - delta
    return min(max(coef, 0.0), max_coef)


def entropy_bonus_coef(coef: float, entropy: float | None, target: float) -> float:
    """The entropy bonus's coefficient in the loss: coef, except under adaptive control (target > 0) while the
    last measured mean token entropy is above the target, or none was measured yet: 0 (Skywork-OR1; TRL starts
    its measurement at inf, so its first step has no bonus either)."""
    if target <= 0:
        return coef
    return coef if entropy is not None and entropy <= target else 0.0


def scheduled_beta(schedule: str, beta: float, beta_final: float, progress: float) -> float:
    """The KL coefficient at `progress` (the fraction of the run done, in [0, 1]): beta, or a linear / cosine
    schedule from beta to beta_final."""
    if schedule == "constant":
        return beta
    frac = min(1.0, max(0.0, progress))
    if schedule == "linear":
        return beta + (beta_final - beta) * frac
    if schedule == "cosine":
        return beta_final + (beta - beta_final) * 0.5 * (1 + math.cos(math.pi * frac))
    raise ValueError(f"kl_schedule must be constant, linear or cosine, got {schedule!r}")


@dataclass
class KLCoef:
    """The KL coefficient over a run, one object for every way it is set: a constant beta, a linear / cosine
    schedule to beta_final (scheduled_beta), or the adaptive controller towards a target per-token KL
    (adaptive_kl_coef), whose value is kept with checkpoints as {"beta": ...}."""

    beta: float
    schedule: str = "constant"
    beta_final: float = 0.0
    target: float = 0.0  # > 0: adaptive
    horizon: float = 10000.0
    value: float | None = None  # the adaptive controller's current beta (None: not moved yet)

    @property
    def adaptive(self) -> bool:
        """Whether the controller moves beta (a target KL is set)."""
        return self.target > 0

    def at(self, progress: float) -> float:
        """beta for the step that starts at `progress` (the fraction of the run done)."""
        if self.adaptive:
            return self.beta if self.value is None else self.value
        return scheduled_beta(self.schedule, self.beta, self.beta_final, progress)

    def update(self, beta: float, kl: float, n: int) -> None:
        """After a step that used `beta` and measured the mean per-token KL `kl` over n samples (adaptive only)."""
        if self.adaptive:
            self.value = adaptive_kl_coef(beta, kl, self.target, self.horizon, n)

    def state(self) -> dict:
        """What a checkpoint keeps: {"beta": the controller's current value (or the configured beta)}."""
        return {"beta": self.at(0.0) if self.adaptive else self.beta}

    def load(self, state: dict) -> None:
        """The controller's value from a checkpoint's state (adaptive only)."""
        if self.adaptive and "beta" in state:
            self.value = state["beta"]


@dataclass
class EntropyCoef:
    """The entropy bonus's coefficient over a run: constant, or under adaptive control (target > 0: Skywork-OR1's,
    adaptive_entropy_coef) with the last measured mean token entropy; kept with checkpoints as {"entropy_coef",
    "entropy"}."""

    coef: float
    target: float = 0.0
    delta: float = 0.005
    max_coef: float = 0.05
    entropy: float | None = None  # the last measured mean token entropy (adaptive)

    @property
    def adaptive(self) -> bool:
        """Whether the coefficient follows the entropy (a target entropy is set)."""
        return self.target > 0

    def bonus(self) -> float:
        """The coefficient the loss uses this step (entropy_bonus_coef)."""
        return entropy_bonus_coef(self.coef, self.entropy, self.target)

    def update(self, entropy: float) -> None:
        """After a step that measured the mean token entropy (adaptive only)."""
        if self.adaptive:
            self.entropy = entropy
            self.coef = adaptive_entropy_coef(self.coef, entropy, self.target, self.delta, self.max_coef)

    def state(self) -> dict:
        """What a checkpoint keeps: the coefficient and the last measured entropy."""
        return {"entropy_coef": self.coef, "entropy": self.entropy}

    def load(self, state: dict) -> None:
        """The coefficient and the last measured entropy from a checkpoint's state."""
        self.coef = state.get("entropy_coef", self.coef)
        self.entropy = state.get("entropy", self.entropy)
