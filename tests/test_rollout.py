"""Generation: greedy equals step-by-step argmax of a full forward; recorded log-probs equal a forward."""

import pytest
import torch

from mirl.logps import sequence_logps
from mirl.models import load_policy
from mirl.rollout import generate
from mirl.rollout.sample import _filter_logits, row_gumbel, row_seeds, sample_inverse_cdf


def _greedy_reference(policy, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            nxt = int(policy(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        if nxt == policy.tokenizer.eos_token_id:
            break
    return ids[len(prompt) :]


def test_greedy_matches_uncached_reference(hf_tiny_dir):
    for policy in (load_policy("gpt-nano", seed=2), load_policy(hf_tiny_dir)):
        prompts = [[5, 6, 7, 8], [9, 10]]
        batch = generate(policy, prompts, max_new_tokens=6, temperature=0.0)
        for i, p in enumerate(prompts):
            got = batch.response_ids[i][batch.response_mask[i].bool()].tolist()
            assert got == _greedy_reference(policy, p, 6)


def test_sampled_logps_equal_forward_and_shapes():
    policy = load_policy("gpt-nano", seed=0)
    tok = policy.tokenizer
    g = torch.Generator().manual_seed(0)
    batch = generate(
        policy,
        [tok.encode("12+3=", True), tok.encode("7=", True)],
        max_new_tokens=7,
        samples_per_prompt=3,
        temperature=1.0,
        generator=g,
    )
    b, r = batch.response_ids.shape
    assert b == 6 and r == 7 and batch.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    ids, attn, resp = batch.full()
    with torch.no_grad():
        per_tok, _, _ = sequence_logps(policy(ids, attn).logits, ids, resp)
    torch.testing.assert_close(per_tok[:, -r:], batch.logps, atol=1e-5, rtol=1e-5)
    # an untrained model rarely emits EOS in 7 tokens: rows that did not stop are flagged truncated
    stopped = (batch.response_ids == tok.eos_token_id).any(1)
    assert (batch.truncated == ~stopped).all()


def test_stop_strings_end_rows():
    policy = load_policy("gpt-nano", seed=0)
    tok = policy.tokenizer
    batch = generate(policy, [tok.encode("1", True)], max_new_tokens=20, temperature=0.0)
    text = batch.texts[0]
    assert len(text) >= 3
    stop = text[1:3]
    stopped = generate(policy, [tok.encode("1", True)], max_new_tokens=20, temperature=0.0, stop_strings=(stop,))
    assert stopped.texts[0] == text[: text.index(stop) + len(stop)] and not stopped.truncated[0]


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(_filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    # top_p 0.7: keep 0.5 and 0.3 (mass before 0.3 is 0.5 < 0.7; before 0.15 is 0.8 >= 0.7)
    assert torch.isinf(_filter_logits(logits, 0, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(_filter_logits(logits, 0, 0.1)).tolist() == [[False, True, True, True]]


def test_samplers_draw_from_the_distribution():
    """Inverse-CDF sampling (one uniform per row) and the row-seeded Gumbel-max sampler: frequencies within
    5 standard errors of the probabilities over 40000 draws; a zero-probability token is never drawn."""
    p = torch.tensor([0.5, 0.25, 0.0, 0.125, 0.125])
    n = 40000
    g = torch.Generator().manual_seed(0)
    inv = sample_inverse_cdf(p.repeat(n, 1), g)
    seeds = row_seeds(0, 7, list(range(n // 4)), 4)
    gum = (p.log()[None] + row_gumbel(seeds, 3, 5)).argmax(-1)
    for draws in (inv, gum):
        freq = torch.bincount(draws, minlength=5).double() / n
        se = (p.double() * (1 - p.double()) / n).sqrt()
        assert ((freq - p.double()).abs() <= 5 * se + 1e-12).all(), freq
        assert int((draws == 2).sum()) == 0
    # the row seeds do not depend on which other prompts share the batch
    assert torch.equal(row_seeds(1, 2, [5, 6, 7], 3)[3:], row_seeds(1, 2, [6, 7], 3))


def _ragged_prompts(policy, n=12):
    return [policy.tokenizer.encode(f"{i}+{(7 * i) % 10}=", add_special_tokens=True) for i in range(n)]


def _same_batch(a, b):
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    torch.testing.assert_close(a.logps, b.logps, atol=2e-5, rtol=0)
    assert a.texts == b.texts and torch.equal(a.truncated, b.truncated)


@pytest.mark.parametrize("kind", ["tiny", "hf", "vlm"])
@pytest.mark.parametrize("sampling", ["generator", "row_seeds"])
def test_dropping_finished_rows_keeps_every_sample(kind, sampling, hf_tiny_dir, hf_vlm_dir):
    """Cutting ended rows out of the batch and its KV cache changes no token and no log-prob: the random
    numbers are drawn for the whole batch either way (the tiny GPT's list cache, transformers' DynamicCache,
    a Qwen2-VL with images and M-RoPE deltas)."""
    images = None
    if kind == "tiny":
        torch.manual_seed(0)
        policy = load_policy("gpt-nano", seed=0)
    elif kind == "hf":
        policy = load_policy(hf_tiny_dir)
    else:
        from PIL import Image

        policy = load_policy(hf_vlm_dir)
    if kind == "vlm":
        enc = [policy.encode_prompt("<image>count:", [Image.new("RGB", (28, 28), (30 * i, 90, 200))]) for i in range(6)]
        prompts, images = [ids for ids, _ in enc], [im for _, im in enc]
    else:
        prompts = _ragged_prompts(policy)
    eos = policy.tokenizer.eos_token_id
    # make rows end at different steps: a strong bias towards EOS on a random model
    kw = dict(max_new_tokens=12, samples_per_prompt=2, images=images)
    if sampling == "row_seeds":
        kw["seeds"] = row_seeds(3, 0, list(range(len(prompts))), 2)
    runs = {}
    for drop in (False, True):
        g = torch.Generator().manual_seed(5) if sampling == "generator" else None
        with _eos_bias(policy, eos, 0.5):
            runs[drop] = generate(policy, prompts, generator=g, drop_finished=drop, **kw)
    lengths = runs[False].response_mask.sum(1)
    assert len(set(lengths.tolist())) > 1, lengths  # rows did end at different steps
    _same_batch(runs[False], runs[True])


class _eos_bias:
    """Add `bias` x the step's number to the EOS logit of every policy.step: a random model then ends its rows
    at various steps (the same for every row at a step, so it does not depend on the batch's make-up)."""

    def __init__(self, policy, eos, bias):
        self.policy, self.eos, self.bias = policy, eos, bias

    def __enter__(self):
        step, calls = self.policy.step, [0]

        def biased(*a, **k):
            logits, cache = step(*a, **k)
            calls[0] += 1
            logits = logits.clone()
            logits[..., self.eos] += self.bias * (calls[0] - 1)
            return logits, cache

        self.policy.step = biased

    def __exit__(self, *exc):
        del self.policy.step
