"""Batched generation for any Policy, with a KV cache, temperature / top-k / top-p, EOS and stop strings.

Shapes of the returned RolloutBatch (B = number of prompts x samples_per_prompt, P prompt length after
left padding, R = longest response):
    prompt_ids (B, P) left-padded, prompt_mask (B, P)
    response_ids (B, R) right-padded with pad_id, response_mask (B, R): 1 on generated tokens (EOS incl.)
    logps (B, R): log-prob of each sampled token under the sampling distribution (logits / temperature,
                  after top-k / top-p), recorded while sampling; GRPO's later passes recompute their "old"
                  log-probs unfiltered (recipes/grpo.py), so that the ratio at an unchanged policy is 1
    truncated (B,): hit max_new_tokens without EOS or a stop string
    prompt_index (B,): which input prompt each row belongs to (rows of one prompt are adjacent)
    images: B per-row image inputs (models/vision.py; None for a text row), each prompt's repeated G times
    action_mask (B, R): multi-turn episodes (rollout/episodes.py) only: 1 on the tokens the model wrote, 0 on
                  those the environment wrote (in the context, out of every loss and log-prob statistic)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass
class RolloutBatch:
    """What generation returns; shapes in the module docstring."""

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    logps: Tensor
    truncated: Tensor
    prompt_index: Tensor
    texts: list[str]
    images: list | None = None  # per row: the image inputs the update conditions on (clean, for NoisyRollout)
    action_mask: Tensor | None = None  # (B, R) episodes: 1 on the model's tokens, 0 on the environment's (None: all)

    def row_images(self, rows) -> dict | None:
        """Image inputs of these rows, batched in row order (None for text)."""
        from ..models.vision import cat_images

        return None if self.images is None else cat_images([self.images[i] for i in rows])

    def full(self) -> tuple[Tensor, Tensor, Tensor]:
        """(input_ids, attention_mask, response_mask) of prompt + response, each (B, P + R)."""
        ids = torch.cat([self.prompt_ids, self.response_ids], 1)
        attn = torch.cat([self.prompt_mask, self.response_mask], 1)
        resp = torch.cat([torch.zeros_like(self.prompt_mask), self.response_mask], 1)
        return ids, attn, resp


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token lists -> (ids (B, P), mask (B, P))."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def _filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, -1)
        # drop a token once the mass before it already reaches top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


def sample_inverse_cdf(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw per row from probs (B, V) by inverting the cumulative sum: one uniform number per row
    instead of torch.multinomial's V (10x faster per decoding step on a CPU). right=True: a token of
    probability 0 (filtered by top-k/top-p, banned) has an empty interval and is never drawn."""
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device)
    return inverse_cdf_index(probs, u)


def inverse_cdf_index(probs: Tensor, u: Tensor) -> Tensor:
    """The token whose cumulative-probability interval holds u * total mass: probs (B, V), u (B, 1) in [0, 1).
    The sum runs in float64: in float32 the tokens of a 150k vocabulary after the first ~0.999 of the mass
    add less than one unit in the last place each and their intervals vanish (they could never be drawn)."""
    c = probs.to(torch.float64).cumsum(-1)
    return (
        torch.searchsorted(c, u.to(torch.float64) * c[:, -1:], right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)
    )


_M32 = 0xFFFFFFFF


def _fmix32(x: Tensor) -> Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding 32-bit values (products wrap modulo 2^64; the
    mask keeps the low 32 bits, which wrapping leaves exact)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def row_seeds(seed: int, step: int, prompt_ids: list[int], samples_per_prompt: int) -> Tensor:
    """One 32-bit seed per row from (run seed, step, global prompt position, sample number): rows keep their
    random stream whichever rank or batch they are generated in."""
    p = torch.tensor(prompt_ids, dtype=torch.long).repeat_interleave(samples_per_prompt)
    j = torch.arange(samples_per_prompt, dtype=torch.long).repeat(len(prompt_ids))
    x = _fmix32(torch.tensor(seed & _M32) ^ 0x9E3779B9)
    x = _fmix32(x ^ (step & _M32))
    x = _fmix32(x ^ p)
    return _fmix32(x ^ ((j * 0x27D4EB2D) & _M32))


def row_gumbel(seeds: Tensor, t: int, vocab: int) -> Tensor:
    """Gumbel(0, 1) noise (B, V) from the rows' seeds and the position t: a counter-based generator."""
    key = _fmix32(seeds ^ ((t * 0x632BE5AB) & _M32))  # (B,)
    v = torch.arange(vocab, dtype=torch.long, device=seeds.device)
    u = _fmix32((key[:, None] + v * 0x9E3779B1) & _M32)
    u = _fmix32(u ^ _fmix32(key ^ 0x5BD1E995)[:, None])  # (B, V) uniform 32-bit integers (two rounds)
    return -torch.log(-torch.log(bits_to_uniform(u)))


def bits_to_uniform(u: Tensor) -> Tensor:
    """32-bit integers -> float32 uniforms strictly inside (0, 1): the top 23 bits at the centres of 2^23
    cells, (k + 0.5) / 2^23 for k in [0, 2^23). Their largest value, 1 - 2^-24, is a float32 number; with 24
    bits the top cell's centre 1 - 2^-25 rounds to 1.0 (a Gumbel draw of +inf that beats every mask)."""
    return ((u >> 9).float() + 0.5) * 2.0**-23


def stop_string_rows(text_ids: list[list[int]], tokens: Tensor, ended: Tensor, newly: Tensor, tok, stops) -> int:
    """One decoding step's stop strings: the step's tokens and which rows had ended, read to the host at once;
    each row still going gets its token appended to text_ids and ends (newly, in place) when its text holds a
    stop string. -> the number of rows that go on."""
    host = torch.stack([tokens, ended.long()]).tolist()
    hits = []
    for i, (token, was_done) in enumerate(zip(*host)):
        if was_done:
            continue
        text_ids[i].append(token)
        text = tok.decode(text_ids[i], skip_special_tokens=True)
        if any(s in text for s in stops):
            hits.append(i)
    if hits:
        newly[torch.tensor(hits, device=newly.device)] = True
    return sum(1 for d in host[1] if not d) - len(hits)


@dataclass
class Decoded:
    """What decode_tokens returns: B rows, N steps."""

    ids: Tensor  # (B, N) the sampled tokens, pad_id after a row's end
    logps: Tensor  # (B, N) their log-probs (0 after a row's end)
    lengths: Tensor  # (B,) tokens per row, the EOS or the token that completed a stop string included
    stopped: Tensor  # (B,) ended by EOS or a stop string
    cache: object  # the rows still decoded (all with drop_finished=False): every token but each row's last
    attn: Tensor  # (rows, slots) the mask over the cache's slots (0 at the steps after a row's end)


@torch.no_grad()
def decode_tokens(
    policy,
    logits: Tensor,
    cache,
    attn: Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_strings: tuple[str, ...] = (),
    generator: torch.Generator | None = None,
    ignore_eos: bool = False,
    seeds: Tensor | None = None,
    drop_finished: bool = True,
) -> Decoded:
    """generate()'s decoding loop (its docstring has the arguments) from a prefill's logits (B, T, V), its cache
    and mask (B, S). A row's last token (its EOS, the end of its stop string, the last step's) is not fed to the
    model: the cache holds everything before it (rollout/turns.py feeds it with the next turn)."""
    from ..models.tokenizer import eos_token_ids

    tok = policy.tokenizer
    pad_id = tok.pad_token_id
    device = logits.device
    # every EOS id of the model (Policy.eos_ids: config, generation config, tokenizer), as vLLM stops on them
    eos_ids = getattr(policy, "eos_ids", None) or eos_token_ids(tok.eos_token_id)
    eos_ids = torch.tensor(eos_ids, dtype=torch.long, device=device)
    b = logits.shape[0]
    out_ids = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_logps = torch.zeros((b, max_new_tokens), dtype=torch.float32, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    stopped = torch.zeros(b, dtype=torch.bool, device=device)  # ended by EOS or a stop string
    lengths = torch.zeros(b, dtype=torch.long, device=device)
    live = torch.arange(b, device=device)  # the rows of the whole batch that the model still decodes
    whole = True  # live is every row (nothing cut yet): slices instead of indexing by live
    row_seeds_ = None if seeds is None else seeds.to(device)
    banned = list(getattr(policy, "never_sample", []))  # image placeholders: never a sampled token
    banned = torch.tensor(banned, dtype=torch.long, device=device) if banned else None  # (indexed once per step)
    n_steps = 0
    text_ids: list[list[int]] = [[] for _ in range(b)]  # with stop strings: each row's tokens so far, on the host
    for t in range(max_new_tokens):
        step_logits = logits[:, -1].float()  # (len(live), V)
        if banned is not None:
            step_logits[:, banned] = float("-inf")
        if temperature > 0:
            if temperature != 1.0:
                step_logits = step_logits / temperature
            step_logits = _filter_logits(step_logits, top_k, top_p)
            logprobs = torch.log_softmax(step_logits, -1)
            if row_seeds_ is not None:  # argmax(logp + Gumbel) is a sample from softmax(logp)
                rows_seeds = row_seeds_ if whole else row_seeds_[live]
                nxt = (logprobs + row_gumbel(rows_seeds, t, logprobs.shape[-1])).argmax(-1)
            else:  # one uniform for every row of the batch, decoded or not: the same stream either way
                u = torch.rand(b, 1, generator=generator, dtype=torch.float64, device=device)
                nxt = inverse_cdf_index(logprobs.exp(), u if whole else u[live])
        else:
            logprobs = torch.log_softmax(step_logits, -1)
            nxt = logprobs.argmax(-1)
        live_done = done if whole else done[live]
        nxt = nxt.masked_fill(live_done, pad_id)
        token_logps = logprobs.gather(-1, nxt[:, None]).squeeze(-1).masked_fill_(live_done, 0.0)
        newly = torch.zeros(b, dtype=torch.bool, device=device)
        if whole:
            out_ids[:, t], out_logps[:, t] = nxt, token_logps
            if not ignore_eos:
                newly = (~live_done) & torch.isin(nxt, eos_ids)
        else:
            out_ids[live, t], out_logps[live, t] = nxt, token_logps
            if not ignore_eos:
                newly[live] = (~live_done) & torch.isin(nxt, eos_ids)
        lengths += ~done
        # the step's one read on the host: how many rows go on (with stop strings, also the new tokens)
        if stop_strings:
            n_left = stop_string_rows(text_ids, out_ids[:, t], done | newly, newly, tok, stop_strings)
        else:
            n_left = int(b - (done | newly).sum())
        stopped |= newly
        done |= newly
        n_steps = t + 1
        finished = n_left == 0
        if getattr(policy, "lockstep", False):  # FSDP2: stop only when every rank's rows are done
            from ..distributed import all_sum

            finished = all_sum(0.0 if finished else 1.0) == 0
        if finished or t == max_new_tokens - 1:  # the last token feeds no further step
            break
        attn = torch.cat([attn, (~(done if whole else done[live]))[:, None].long()], 1)  # a row's last token: mask 0
        # the live rows not done are all the rows not done (the others were dropped finished): n_left of them
        if drop_finished and 0 < n_left <= 0.75 * len(live):  # (none left: lockstep waits on other ranks)
            keep = torch.argsort(done[live].to(torch.int8), stable=True)[:n_left]  # the unfinished, in order
            cut = policy.select_rows(cache, keep)
            if cut is not None:
                cache, live, attn, nxt, whole = cut, live[keep], attn[keep], nxt[keep], False
        logits, cache = policy.step(nxt[:, None], attn, cache)
    return Decoded(out_ids[:, :n_steps], out_logps[:, :n_steps], lengths, stopped, cache, attn)


@torch.no_grad()
def generate(
    policy,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    samples_per_prompt: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_strings: tuple[str, ...] = (),
    generator: torch.Generator | None = None,
    ignore_eos: bool = False,
    images: list | None = None,
    sample_images: list | None = None,
    seeds: Tensor | None = None,
    drop_finished: bool = True,
    static_cache: bool = True,
) -> RolloutBatch:
    """Sample `samples_per_prompt` responses for each prompt (token lists). temperature 0 = greedy.
    ignore_eos: always generate max_new_tokens (benchmarks). seeds: one per row (row_seeds) to sample by
    Gumbel-max with counter-based noise instead of the shared generator: a row's sample then does not
    depend on the other rows in the batch (torchrun ranks = one process).
    images: one image-input dict (or None) per prompt; sample_images: one per row, to sample from other
    pixels than the batch records (NoisyRollout's perturbed copies).
    drop_finished: once a quarter of the rows being decoded have ended, cut them out of the batch and its
    KV cache, so finished rows cost no compute. The random numbers drawn per step stay those of the whole
    batch, so the samples are the same as without it (tests/test_rollout.py).
    static_cache: decode on a preallocated KV cache written in place, through the backend's native step
    (models/decode.py; the same tokens and log-probs as the model's own forward, tests/test_decode.py)."""
    from ..logps import SharedPrompt
    from ..models.vision import cat_images

    tok = policy.tokenizer
    device = policy.device
    rows = [p for p in prompts for _ in range(samples_per_prompt)]
    row_images = None if images is None else [im for im in images for _ in range(samples_per_prompt)]
    if sample_images is not None and len(sample_images) != len(rows):
        raise ValueError(f"sample_images has {len(sample_images)} entries for {len(rows)} rows")
    prefill_images = cat_images(sample_images if sample_images is not None else (row_images or []))
    if prefill_images is not None:
        prefill_images = {k: v.to(device) for k, v in prefill_images.items()}
    prompt_index = torch.arange(len(prompts)).repeat_interleave(samples_per_prompt)
    prompt_ids, prompt_mask = left_pad(rows, tok.pad_token_id)
    if prompt_ids.shape[1] + max_new_tokens > policy.max_seq_len:
        raise ValueError(
            f"prompt of {prompt_ids.shape[1]} tokens + {max_new_tokens} new tokens exceeds the "
            f"model's maximum length {policy.max_seq_len}"
        )
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    was_training = policy.training
    policy.eval()
    # a group's rows prefill their prompt once (the same logits and cache, copied per row)
    shared = None
    if samples_per_prompt > 1 and prefill_images is None:
        starts = torch.arange(0, len(rows), samples_per_prompt, device=device)
        shared = SharedPrompt(prompt_ids.shape[1], starts, prompt_index.to(device))
    logits, cache = policy.start_decode(
        prompt_ids, prompt_mask, max_new_tokens, images=prefill_images, static=static_cache, shared=shared
    )
    out = decode_tokens(
        policy,
        logits,
        cache,
        prompt_mask,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_strings=stop_strings,
        generator=generator,
        ignore_eos=ignore_eos,
        seeds=seeds,
        drop_finished=drop_finished,
    )
    policy.train(was_training)
    n = out.ids.shape[1]
    response_mask = (torch.arange(n, device=device)[None, :] < out.lengths[:, None]).long()
    texts = [tok.decode(r[:k], skip_special_tokens=True) for r, k in zip(out.ids.tolist(), out.lengths.tolist())]
    return RolloutBatch(
        prompt_ids,
        prompt_mask,
        out.ids,
        response_mask,
        out.logps * response_mask,
        ~out.stopped,
        prompt_index.to(device),
        texts,
        row_images,
    )
