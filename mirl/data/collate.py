"""Tokenising prompt + response pairs and padding them into batches.

encode_example: prompt ids (with the tokenizer's BOS) + response ids + EOS, and a response mask.
A prompt that leaves no room for a response within max_len is skipped and counted, so is an empty
response; a response that does not fit is truncated (and counted). Only responses are ever cut: a prompt
with images that does not fit is an error (an image is never truncated).
Encoded examples are (ids, prompt_len) or, with images, (ids, prompt_len, image inputs).
"""

from __future__ import annotations

import torch

from .formats import DataError, SkipCounter


def encode_example(
    encoder,
    prompt: str,
    response: str,
    max_len: int,
    skips: SkipCounter,
    where: str,
    field_name: str = "response",
    images=None,
    image_base: str = "",
):
    """encoder: a Policy (images allowed) or a tokenizer. -> (ids, prompt_len[, image inputs]) or None
    when skipped."""
    if not response.strip():
        skips.add(f"empty {field_name}", where)
        return None
    if hasattr(encoder, "encode_prompt"):
        tokenizer = encoder.tokenizer
        p, image_inputs = encoder.encode_prompt(prompt, images, where, image_base)
    else:
        tokenizer, image_inputs = encoder, None
        p = tokenizer.encode(prompt, add_special_tokens=True)
    r = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
    unk = getattr(tokenizer, "unk_token_id", None)  # transformers tokenizers may have none (byte-level BPE)
    if unk is not None and (unk in p or unk in r):
        skips.note("characters the tokenizer cannot encode (kept as its unknown token)", where)
    if len(p) >= max_len:
        if image_inputs is not None:
            raise DataError(
                f"{where}: the prompt with its image tokens is {len(p)} tokens, which leaves no room "
                f"for a response within max_len {max_len}; raise --max-len (images are never cut)"
            )
        skips.add("prompt longer than max_len", where)
        return None
    if len(p) + len(r) > max_len:
        skips.add(f"{field_name} truncated to max_len", where)
        r = r[: max_len - len(p)]
    return (p + r, len(p)) if image_inputs is None else (p + r, len(p), image_inputs)


def batch_images(seqs) -> dict | None:
    """The image inputs of encoded examples, batched in row order (None when none has images)."""
    from ..models.vision import cat_images

    return cat_images([s[2] if len(s) > 2 else None for s in seqs])


def pad_batch(seqs: list[tuple[list[int], int]], pad_id: int, side: str = "right", device=None):
    """[(ids, prompt_len)] -> input_ids, attention_mask, response_mask: (B, T) each, made on `device` (the
    host lists padded first, then one copy per tensor)."""
    width = max(len(s[0]) for s in seqs)
    ids_rows, attn_rows, resp_rows = [], [], []
    for ids, plen, *_ in seqs:
        pad = [0] * (width - len(ids))
        ones, resp = [1] * len(ids), [0] * plen + [1] * (len(ids) - plen)
        if side == "right":
            ids_rows.append(ids + [pad_id] * len(pad))
            attn_rows.append(ones + pad)
            resp_rows.append(resp + pad)
        else:
            ids_rows.append([pad_id] * len(pad) + ids)
            attn_rows.append(pad + ones)
            resp_rows.append(pad + resp)
    return tuple(torch.tensor(rows, dtype=torch.long, device=device) for rows in (ids_rows, attn_rows, resp_rows))


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
        out.extend(perm[pos : pos + take].tolist())
    return out


def encode_pairs(policy, pairs: list[dict], max_len: int, skips: SkipCounter) -> list[tuple]:
    """Preference records -> [(chosen encoded, rejected encoded)] (encode_example's forms); a pair whose two
    sides encode to the same tokens, or either side skipped, is counted in `skips` and left out."""
    out = []
    for i, p in enumerate(pairs):
        where = p.get("where", f"pair {i}")
        img = {"images": p.get("images"), "image_base": p.get("image_base", "")}
        c = encode_example(policy, p["prompt"], p["chosen"], max_len, skips, where, "chosen", **img)
        r = encode_example(policy, p["prompt"], p["rejected"], max_len, skips, where, "rejected", **img) if c else None
        if c and r and c[0] == r[0]:  # e.g. characters the tokenizer cannot encode, replaced by one token
            skips.add("chosen and rejected encode to the same tokens", where)
        elif c and r:
            out.append((c, r))
    return out


def prompts_that_fit(policy, records: list[dict], max_new_tokens: int) -> tuple[list[dict], list[str]]:
    """The prompt records whose prompt + max_new_tokens fit the model's context (policy.max_seq_len), and the
    places ('file.jsonl:3 (300 tokens)') of those that do not. Prompts whose UTF-8 bytes alone fit (a token is
    at least one byte) are not encoded."""
    room = policy.max_seq_len - max_new_tokens
    keep, too_long = [], []
    for i, r in enumerate(records):
        text = r["prompt"]
        if not r.get("images") and len(text.encode("utf-8")) + 8 <= room:  # 8: the tokenizer's special tokens, at most
            keep.append(r)
            continue
        ids, _ = policy.encode_prompt(text, r.get("images"), r.get("where", f"prompt {i}"), r.get("image_base", ""))
        if len(ids) > room:
            too_long.append(f"{r.get('where', f'prompt {i}')} ({len(ids)} tokens)")
        else:
            keep.append(r)
    return keep, too_long


def too_long_message(too_long: list[str], n: int, policy, max_new_tokens: int, hint: str) -> str:
    """One line on the prompts that leave no room for --max-new-tokens within the model's context."""
    return (
        f"{len(too_long)} of {n} prompts are too long for the model's context of {policy.max_seq_len} tokens with "
        f"--max-new-tokens {max_new_tokens} (first: {too_long[0]}); {hint}"
    )
