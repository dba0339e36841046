"""Scalar heads on a policy's last hidden state: the value head of PPO and the reward model's head.

A RewardModel is a Policy backbone plus a linear head read at the last real token of each sequence
(Bradley-Terry training in recipes/reward_model.py). Saved as the backbone's folder plus
reward_head.safetensors, so the backbone stays loadable by transformers when it is one.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file


class ScalarHead(nn.Module):
    """A linear map from hidden states to one number per position (value and reward heads)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.proj.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, C) -> (B, T)."""
        return self.proj(hidden).squeeze(-1)  # (B, T)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding. (B,)"""
    t = attention_mask.shape[1]
    pos = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), pos, torch.full_like(pos, -1)).max(1).values


def step_token_mask(tokenizer, response_ids: list[int], separators: str) -> list[int]:
    """1 on the response tokens that end a step: the token before each separator character (the step's last
    character) and the last token (models/tokenizer.py: tokens_at_chars)."""
    from .tokenizer import tokens_at_chars

    text = tokenizer.decode(response_ids, skip_special_tokens=True)
    ends = [i for i, c in enumerate(text) if c in separators and i > 0]  # a step's text ends before position i
    mask = [0] * len(response_ids)
    if response_ids:
        for t in [*tokens_at_chars(tokenizer, response_ids, ends), len(response_ids) - 1]:
            mask[t] = 1
    return mask


class RewardModel(nn.Module):
    """aggregate="last": the head read at the last token (the usual sequence classifier);
    aggregate="mean": the mean of the head over response tokens, so that local checks (is this step of
    the worked solution right?) add up; it learns verifiable tasks much faster on small backbones;
    aggregate="step": a process reward model (recipes/prm.py): the head at each step's last token is the
    logit that the solution is still right there; the score is the smallest of those probabilities (PRM-min).
    Steps end before each of `separators` and at the last token."""

    def __init__(self, policy, aggregate: str = "mean", separators: str = ",|"):
        super().__init__()
        if aggregate not in ("last", "mean", "step"):
            raise ValueError(f"reward aggregate must be 'last', 'mean' or 'step', got {aggregate!r}")
        self.policy = policy
        self.aggregate = aggregate
        self.separators = separators
        self.head = ScalarHead(policy.hidden_size)

    @property
    def tokenizer(self):
        """The backbone's tokenizer."""
        return self.policy.tokenizer

    def token_scores(self, input_ids, attention_mask, images=None) -> torch.Tensor:
        """The head at every position (B, T)."""
        hidden = self.policy(input_ids, attention_mask, images=images, output="logits_and_hidden").hidden
        return self.head(hidden)

    def forward(self, input_ids, attention_mask, response_mask=None, images=None, step_mask=None) -> torch.Tensor:
        """Score of each sequence (B,). step_mask (B, T): the step ends, for aggregate="step"."""
        scores = self.token_scores(input_ids, attention_mask, images)  # (B, T)
        if self.aggregate == "step":
            if step_mask is None:
                raise ValueError("a process reward model needs the step mask (step_token_mask)")
            probs = torch.sigmoid(scores).masked_fill(~step_mask.bool(), 1.0)
            return probs.min(1).values
        if self.aggregate == "mean":
            if response_mask is None:
                raise ValueError("a mean-aggregated reward model needs the response mask")
            m = response_mask.to(scores.dtype)
            return (scores * m).sum(1) / m.sum(1).clamp(min=1)
        return scores.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)

    def save(self, path: str | Path) -> None:
        """The backbone (as a model folder) and the head (reward_head.safetensors, with its aggregation)."""
        self.policy.save(path)
        save_file(
            {k: v.contiguous() for k, v in self.head.state_dict().items()},
            str(Path(path) / "reward_head.safetensors"),
            metadata={"aggregate": self.aggregate, "separators": self.separators},
        )

    @classmethod
    def load(cls, path: str | Path) -> RewardModel:
        """A reward model folder written by save()."""
        from .policy import load_policy

        head_file = Path(path) / "reward_head.safetensors"
        if not head_file.exists():
            raise FileNotFoundError(f"{path} is not a reward model folder (no reward_head.safetensors)")
        from safetensors import safe_open

        with safe_open(str(head_file), "pt") as f:
            meta = f.metadata() or {}
        rm = cls(load_policy(path), meta.get("aggregate", "last"), meta.get("separators", ",|"))
        rm.head.load_state_dict(load_file(str(head_file)))
        return rm.eval()
