"""A learned reward model as a reward function: 'rm:<folder>' in a reward spec."""

from __future__ import annotations

import torch


class RewardModelReward:
    """f(prompts, completions, **_) -> scores of prompt + completion under a trained RewardModel."""

    def __init__(self, path: str, batch_size: int = 64):
        from ..models.heads import RewardModel

        self.rm = RewardModel.load(path)
        self.batch_size = batch_size
        self.__name__ = f"rm:{path}"

    @torch.no_grad()
    def __call__(self, prompts, completions, **_):
        from ..data.collate import pad_batch

        tok = self.rm.tokenizer
        out = []
        for s in range(0, len(prompts), self.batch_size):
            seqs = []
            for p, c in zip(prompts[s:s + self.batch_size], completions[s:s + self.batch_size]):
                pi = tok.encode(p, add_special_tokens=True)
                seqs.append((pi + tok.encode(c) + [tok.eos_token_id], len(pi)))
            ids, attn, resp = pad_batch(seqs, tok.pad_token_id)
            out += self.rm(ids, attn, resp).tolist()
        return out
