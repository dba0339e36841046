"""A step's groups for GRPO: sample G responses per prompt, score them, and, with dynamic sampling (DAPO),
keep drawing new prompts until enough groups carry a learning signal. NoisyRollout's perturbed images.

    groups = sample_groups(policy, data, rewards, step=s, prompts_per_step=P, group_size=G, seed=seed, ...)
    groups.rounds: [(ScoredBatch, signal (P_round,) bool)], one per generation round; groups never mix
    across rounds (their advantages are computed per round)
    rows, adv = group_advantages(groups, weights, estimator="group", group_size=G, scale="group")
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from .. import distributed as dist
from ..advantages import RoundRewards, outcome_advantages, process_advantages
from ..data.collate import batch_indices
from ..models.tokenizer import tokens_at_chars
from .sample import row_seeds
from .score import ScoredBatch, noisy_sample_images, rollout_and_score


def groups_with_signal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(P,) bool: groups whose scorable (non-NaN) rewards are not all equal; NaN is no outcome, so a group
    [nan, 1, 1, 1] has no signal, nor has a group with fewer than two scorable rewards."""
    r = rewards.view(-1, group_size)
    ok = ~torch.isnan(r)
    hi = torch.where(ok, r, float("-inf")).max(1).values
    lo = torch.where(ok, r, float("inf")).min(1).values
    return (ok.sum(1) >= 2) & ((hi - lo) > 1e-9)


@dataclass
class NoisyRollout:
    """NoisyRollout (Liu et al. 2025): the last `rows` samples of each group are drawn on perturbed copies of
    the prompt's images (models/vision.py perturb: crop and/or pixel noise), the update conditions on the clean
    ones. The strength falls linearly from `strength` to 0 over `anneal_steps` steps."""

    rows: int  # samples per group drawn on perturbed images
    strength: float
    anneal_steps: int
    kinds: tuple[str, ...] = ("crop", "noise")
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def strength_at(self, step: int) -> float:
        """The perturbation strength at `step` (linear annealing to 0)."""
        return self.strength * max(0.0, 1.0 - step / max(1, self.anneal_steps))

    def sample_images(self, policy, examples: list[dict], clean: list, group_size: int, step: int) -> list | None:
        """Per row, the image inputs to sample from (None: sample from the clean ones)."""
        strength = self.strength_at(step)
        if self.rows <= 0 or strength <= 0:
            return None
        return noisy_sample_images(policy, examples, clean, group_size, self.rows, strength, self.rng, self.kinds)


@dataclass
class Groups:
    """What sample_groups drew for one step."""

    rounds: list[tuple[ScoredBatch, torch.Tensor]]  # (scored batch, signal per group) per generation round
    refills: int  # rounds beyond the first
    zero_signal: int  # groups whose rewards were all equal (or unscorable), over all rounds
    gen_s: float
    score_s: float

    @property
    def metrics(self) -> dict:
        """The first round's reward statistics."""
        return self.rounds[0][0].metrics


def sample_groups(
    policy,
    data: list[dict],
    reward_set,
    *,
    step: int,
    progress: float = 0.0,
    prompts_per_step: int,
    group_size: int,
    seed: int,
    row_seeded: bool,
    dynamic: bool = False,
    max_refills: int = 0,
    noisy: NoisyRollout | None = None,
    generator=None,
    engine=None,
    sampler=None,
    rollout=None,
    **sampling,
) -> Groups:
    """One step's generation rounds. Round r of step s draws the global batch number s * (max_refills + 1) + r
    of the prompt order (so a refill never repeats a batch); this rank samples its share. Without dynamic
    sampling there is one round; with it, rounds continue until the kept groups (those with signal, over all
    ranks) reach prompts_per_step or max_refills refills were drawn. sampling: generate's options
    (max_new_tokens, temperature, top_p, top_k, ignore_eos); engine: what samples (rollout/engine.py); sampler:
    which prompts each round draws and the pass-rate tracker it feeds (rollout/prompts.py; default uniform), at
    `progress` (the fraction of the run done, Run.progress: the curriculum's stage). rollout: what samples and
    scores a round (default rollout_and_score; multi-turn episodes: envs/task.EnvTask.rollout)."""
    rounds, gen_s, score_s, zero = [], 0.0, 0.0, 0
    while True:
        batch_id = step * (max_refills + 1) + len(rounds)
        if sampler is not None:
            idx = sampler.indices(batch_id, progress)
        else:
            idx = batch_indices(len(data), prompts_per_step, batch_id, seed)
        mine = dist.shard(list(range(len(idx))))  # this rank's positions in the global batch
        sb = (rollout or rollout_and_score)(
            policy,
            [data[idx[i]] for i in mine],
            reward_set,
            group_size=group_size,
            generator=generator,
            seeds=row_seeds(seed, batch_id, mine, group_size) if row_seeded else None,
            noisy=noisy,
            step=step,
            engine=engine,
            **sampling,
        )
        if sampler is not None:
            sampler.observe([idx[i] for i in mine], sb.rewards, group_size)
        gen_s, score_s = gen_s + sb.gen_s, score_s + sb.score_s
        signal = groups_with_signal(sb.rewards, group_size)  # (P_round,)
        zero += int((~signal).sum())
        rounds.append((sb, signal))
        kept = sum(int(s.sum()) for _, s in rounds) * dist.world_size()
        if not dynamic or kept >= prompts_per_step or len(rounds) > max_refills:
            return Groups(rounds, len(rounds) - 1, zero, gen_s, score_s)


def step_rewards(task, name: str, tokenizer, group_size: int, baseline: str):
    """--step-rewards: the function of a scored rollout -> its token advantages (B, R) from the task's step
    verifier (step_advantages); a task without one (`name`: its --task) is a ConfigError."""
    from ..options import ConfigError

    if task is None or not hasattr(task, "step_scores"):
        raise ConfigError(
            f"--step-rewards needs a task with a step verifier (the compact arith tasks); {name!r} "
            "has none (a chat-template task is scored on its prose answer)"
        )
    return lambda sb: step_advantages(task, sb, group_size, tokenizer, baseline)


def step_advantages(task, sb, group_size: int, tokenizer, baseline: str = "position") -> torch.Tensor:
    """Token advantages (B, R) of a scored rollout from the task's step verifier (step_scores: each step's end
    in characters and its reward), the character offsets mapped to response tokens; the tokens after the last step
    (EOS, text after the answer) take the answer step's advantage."""
    rewards, ends = [], []
    lengths = sb.batch.response_mask.sum(1).tolist()  # (responses are right-padded: the first n tokens)
    for text, example, ids, n in zip(sb.batch.texts, sb.examples, sb.batch.response_ids.tolist(), lengths):
        steps = task.step_scores(text, example)
        ends.append(tokens_at_chars(tokenizer, ids[:n], [e for e, _ in steps]))
        rewards.append([r for _, r in steps])
    width = sb.batch.response_ids.shape[1]
    device = sb.batch.response_ids.device
    return process_advantages(rewards, ends, group_size, width, baseline=baseline, lengths=lengths, device=device)


def group_advantages(
    groups: Groups,
    weights: torch.Tensor,
    *,
    estimator: str,
    group_size: int,
    scale: str,
    dynamic: bool = False,
    steps=None,
) -> tuple[list, torch.Tensor]:
    """The rows trained on (with dynamic sampling: the groups with signal of every round, dropped *before* any
    batch statistics, as veRL's DAPO) and their advantages from `estimator` (advantages.ESTIMATORS: group, rloo,
    reinforce_pp[_baseline], gdpo; weights: the reward functions', for GDPO; scale: the group estimator's), over
    those rows together; or token advantages from step rewards (steps: a function of a scored rollout -> (B, R),
    per round). -> (rows [(rollout batch, index)], advantages (B,) or (B, R))."""
    rows, rewards, per_fn, lengths, token_adv = [], [], [], [], []
    for sb, signal in groups.rounds:
        n = len(sb.rewards)
        every = torch.ones(n, dtype=torch.bool, device=sb.rewards.device)
        keep = signal.repeat_interleave(group_size) if dynamic else every
        rows += [(sb.batch, i) for i in torch.nonzero(keep).flatten().tolist()]
        if steps is not None:
            token_adv += list(steps(sb).float()[keep])
        else:
            rewards.append(sb.rewards[keep])
            per_fn.append(sb.per_fn[keep])
            lengths.append(sb.batch.response_mask.sum(1)[keep])
    if steps is not None:  # rounds of different response widths padded to the longest
        width = max((len(x) for x in token_adv), default=0)
        token_adv = [torch.nn.functional.pad(x, (0, width - len(x))) for x in token_adv]
        return rows, (torch.stack(token_adv) if token_adv else torch.zeros(0, device=sb.rewards.device))
    kept = RoundRewards(torch.cat(rewards), torch.cat(per_fn), weights, torch.cat(lengths), group_size, scale)
    return rows, outcome_advantages(estimator, kept).float()
