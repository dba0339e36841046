"""Which prompts a generation round draws (`--prompt-sampler`), for grpo:

    uniform     a fresh permutation per epoch (data/collate.py: batch_indices), a pure function of the step
    curriculum  staged from easy to hard (Curr-ReFT): the prompts sorted by their 'difficulty' field (arith:
                the longer operand's digits; a --data file may carry the column); stage k of n draws from the
                easiest (k + 1) / n of them, the stages evenly over the run's progress (step / (steps - 1) or
                seconds / time budget, whichever ends the run: Cadence.progress)
    pass-rate   online filtering (ThinkLite-VL, MM-EUREKA): each prompt's pass rate is tracked from its
                rollouts; a round draws `oversample` x prompts_per_step candidates in the uniform order and keeps
                those whose latest pass rate is neither 0 nor 1 (or not measured yet), topped up in order from
                the rest when too few are left. Groups that are all right or all wrong carry no GRPO signal.

The tracker is the same on every rank (each round's pass rates are gathered from all ranks) and is saved
with checkpoints, so torchrun and resume draw the prompts one process would.
"""

from __future__ import annotations

import torch

from .. import distributed as dist
from ..data.collate import batch_indices
from ..options import ConfigError

SAMPLERS = ("uniform", "curriculum", "pass-rate")


def pass_rates(rewards: torch.Tensor, group_size: int, threshold: float = 0.5) -> list[float]:
    """Per prompt, the fraction of its group's samples whose reward is above threshold (NaN counts as a fail).
    rewards (P * G,) with each prompt's rows adjacent -> P floats."""
    passed = torch.nan_to_num(rewards.float(), nan=float("-inf")) > threshold
    return passed.view(-1, group_size).float().mean(1).tolist()


def select_by_pass_rate(candidates: list[int], rates: dict[int, float], k: int) -> list[int]:
    """The first k candidates whose pass rate is unknown or strictly between 0 and 1, topped up in order with
    the others when fewer than k qualify."""
    informative = [i for i in candidates if rates.get(i, 0.5) not in (0.0, 1.0)]
    rest = [i for i in candidates if rates.get(i, 0.5) in (0.0, 1.0)]
    return (informative + rest)[:k]


def curriculum_pool(order: list[int], progress: float, stages: int) -> list[int]:
    """The prompts the curriculum may draw at `progress` (the fraction of the run done, in [0, 1]): order sorts
    the prompts from easy to hard; stage s = floor(progress * stages) (0-based) allows the easiest
    (s + 1) / stages of them."""
    stage = min(stages - 1, int(progress * stages + 1e-9))  # 1e-9: 3 / 9 * 3 is stage 1, whatever the rounding
    return order[: max(1, round(len(order) * (stage + 1) / stages))]


class PromptSampler:
    """--prompt-sampler: the prompt indices of each generation round, and the pass-rate tracker."""

    def __init__(
        self, kind: str, data: list[dict], *, prompts_per_step: int, seed: int, stages: int = 3,
        oversample: int = 4, threshold: float = 0.5,
    ):  # fmt: skip
        if kind not in SAMPLERS:
            raise ConfigError(f"--prompt-sampler {kind!r}: must be one of {', '.join(SAMPLERS)}")
        self.kind, self.n, self.k, self.seed = kind, len(data), prompts_per_step, seed
        self.stages, self.oversample, self.threshold = stages, oversample, threshold
        self.rates: dict[int, float] = {}
        self.order: list[int] = []
        if kind == "curriculum":
            missing = [e.get("where", f"prompt {i}") for i, e in enumerate(data) if e.get("difficulty") is None]
            if missing:
                raise ConfigError(
                    f"--prompt-sampler curriculum needs a 'difficulty' per prompt; {len(missing)} have none "
                    f"(first: {missing[0]}). The arith tasks declare it; give a --data file a 'difficulty' column"
                )
            self.order = sorted(range(self.n), key=lambda i: (float(data[i]["difficulty"]), i))
            self.difficulty = [float(data[i]["difficulty"]) for i in range(self.n)]

    def indices(self, batch_id: int, progress: float = 0.0) -> list[int]:
        """The global batch of prompt indices for round `batch_id`, at `progress` (the fraction of the run done,
        the same on every rank: Run.progress)."""
        if self.kind == "uniform":
            return batch_indices(self.n, self.k, batch_id, self.seed)
        if self.kind == "curriculum":
            pool = curriculum_pool(self.order, progress, self.stages)
            return [pool[i] for i in batch_indices(len(pool), self.k, batch_id, self.seed)]
        candidates = batch_indices(self.n, self.k * self.oversample, batch_id, self.seed)
        return select_by_pass_rate(list(dict.fromkeys(candidates)), self.rates, self.k)

    def observe(self, indices: list[int], rewards: torch.Tensor, group_size: int) -> None:
        """Record this rank's prompts' pass rates (indices: their data indices, rewards (P * G,)); every rank
        gets every rank's (a collective under torchrun)."""
        pairs = list(zip(indices, pass_rates(rewards, group_size, self.threshold)))
        if dist.world_size() > 1:
            gathered: list = [None] * dist.world_size()
            torch.distributed.all_gather_object(gathered, pairs)
            pairs = [p for part in gathered for p in part]
        self.rates.update(pairs)

    def metrics(self, progress: float) -> dict:
        """The pass-rate histogram of the prompts measured so far (and the curriculum's stage)."""
        out = {}
        if self.rates:
            v = torch.tensor(list(self.rates.values()))
            out = {
                "prompts/measured": float(len(v)),
                "prompts/pass_rate_0": float((v == 0).float().mean()),
                "prompts/pass_rate_mid": float(((v > 0) & (v < 1)).float().mean()),
                "prompts/pass_rate_1": float((v == 1).float().mean()),
                "prompts/pass_rate_mean": float(v.mean()),
            }
        if self.kind == "curriculum":
            pool = curriculum_pool(self.order, progress, self.stages)
            out["prompts/curriculum_max_difficulty"] = self.difficulty[pool[-1]]
        return out

    def state(self) -> dict:
        """What a checkpoint keeps: {"pass_rates": the pass rates} (JSON keys are strings)."""
        return {"pass_rates": {str(i): r for i, r in self.rates.items()}}

    def load(self, state: dict) -> None:
        """The pass rates of a checkpoint's state()."""
        self.rates = {int(i): float(r) for i, r in state.get("pass_rates", {}).items()}
