"""Generation: greedy equals step-by-step argmax of a full forward; recorded log-probs equal a forward."""

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
