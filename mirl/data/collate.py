"""Tokenising prompt + response pairs and padding them into batches.

encode_example: prompt ids (with the tokenizer's BOS) + response ids + EOS, and a response mask.
A prompt that leaves no room for a response within max_len is skipped and counted, so is an empty
response; a response that does not fit is truncated (and counted).
"""

from __future__ import annotations

import torch

from .formats import SkipCounter


def encode_example(tokenizer, prompt: str, response: str, max_len: int, skips: SkipCounter, where: str,
                   field_name: str = "response") -> tuple[list[int], int] | None:
    """-> (ids, prompt_len) or None when skipped."""
    if not response.strip():
        skips.add(f"empty {field_name}", where)
        return None
    p = tokenizer.encode(prompt, add_special_tokens=True)
    r = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
    if len(p) >= max_len:
        skips.add("prompt longer than max_len", where)
        return None
    if len(p) + len(r) > max_len:
        skips.add(f"{field_name} truncated to max_len", where)
        r = r[: max_len - len(p)]
    return p + r, len(p)


def pad_batch(seqs: list[tuple[list[int], int]], pad_id: int, side: str = "right"):
    """[(ids, prompt_len)] -> input_ids, attention_mask, response_mask: (B, T) each."""
    width = max(len(ids) for ids, _ in seqs)
    b = len(seqs)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    resp = torch.zeros((b, width), dtype=torch.long)
    for i, (ids, plen) in enumerate(seqs):
        off = 0 if side == "right" else width - len(ids)
        input_ids[i, off:off + len(ids)] = torch.tensor(ids)
        attn[i, off:off + len(ids)] = 1
        resp[i, off + plen:off + len(ids)] = 1
    return input_ids, attn, resp


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the examples in batch `step`: a fresh permutation per epoch, a pure function of step.

    Being a function of (step, seed) alone is what makes resume exact: no sampler state to save.
    """
    if n == 0:
        raise ValueError("no training examples left (all rows were skipped?)")
    out = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, pos = divmod(start + len(out), n)
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        perm = torch.randperm(n, generator=g)
        take = min(batch_size - len(out), n - pos)
        out.extend(perm[pos:pos + take].tolist())
    return out
