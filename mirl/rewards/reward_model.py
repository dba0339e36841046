"""A learned reward model as a reward function: 'rm:<folder>' in a reward spec."""

from __future__ import annotations

import torch


class RewardModelReward:
    """f(prompts, completions, images=None, **_) -> scores of prompt (+ its images) + completion under a
    trained RewardModel."""

    def __init__(self, path: str, batch_size: int = 64):
        from ..models.heads import RewardModel

        self.rm = RewardModel.load(path)
        self.batch_size = batch_size
        self.__name__ = f"rm:{path}"

    @torch.no_grad()
    def __call__(self, prompts, completions, images=None, **_):
        from ..data.collate import batch_images, pad_batch
        from ..models.heads import step_token_mask

        tok = self.rm.tokenizer
        images = images or [None] * len(prompts)
        out = []
        for s in range(0, len(prompts), self.batch_size):
            seqs = []
            for i in range(s, min(len(prompts), s + self.batch_size)):
                pi, img = self.rm.policy.encode_prompt(prompts[i], images[i], f"prompt {i}")
                # as training encoded responses (data/collate.py encode_example): no special tokens (a
                # Llama-style tokenizer would add BOS in front of the completion by default)
                ids = pi + tok.encode(completions[i], add_special_tokens=False) + [tok.eos_token_id]
                seqs.append((ids, len(pi)) if img is None else (ids, len(pi), img))
            ids, attn, resp = pad_batch(seqs, tok.pad_token_id)
            steps = None
            if self.rm.aggregate == "step":  # a process reward model: the step ends of each response
                steps = torch.zeros_like(resp)
                for r, (seq, plen, *_) in enumerate(seqs):
                    steps[r, plen : len(seq)] = torch.tensor(step_token_mask(tok, seq[plen:], self.rm.separators))
            out += self.rm(ids, attn, resp, images=batch_images(seqs), step_mask=steps).tolist()
        return out
