"""Chunked log-probs: equal to log_softmax, same gradients, any chunk size, padding side irrelevant."""

import pytest
import torch

from mirl.logps import entropy_from_logits, sequence_logps, token_logps
from mirl.models import load_policy
from mirl.rollout import left_pad


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_token_logps_equal_log_softmax_and_grad(chunk):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 50, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9), generator=g)
    w = torch.randn(3, 9, generator=g, dtype=torch.float64)
    ours = token_logps(logits, labels, chunk)
    ref = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-6)
    (ga,) = torch.autograd.grad((ours * w).sum(), logits)
    (gb,) = torch.autograd.grad((ref * w).sum(), logits)
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-6)


def test_bf16_logits_give_float32_logps_and_bf16_grads():
    logits = torch.randn(2, 4, 30).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 30, (2, 4))
    out = token_logps(logits, labels, chunk=3)
    assert out.dtype == torch.float32
    ref = torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_sequence_logps_hand_example():
    # uniform logits over V=4: every token has logp = -ln 4; 2 response tokens -> sum -2 ln 4, mean -ln 4
    logits = torch.zeros(1, 5, 4)
    ids = torch.tensor([[1, 2, 3, 0, 1]])
    resp = torch.tensor([[0, 0, 1, 1, 0]])
    per_tok, seq, lengths = sequence_logps(logits, ids, resp)
    ln4 = torch.log(torch.tensor(4.0))
    assert lengths.item() == 2 and seq.item() == pytest.approx(-2 * ln4.item())
    assert per_tok[0].tolist() == pytest.approx([0.0, -ln4.item(), -ln4.item(), 0.0])
    _, mean, _ = sequence_logps(logits, ids, resp, average=True)
    assert mean.item() == pytest.approx(-ln4.item())


def test_left_and_right_padding_give_same_sequence_logps():
    policy = load_policy("gpt-nano", seed=1).eval()
    seqs = [([4, 5, 6, 7, 8, 9], 3), ([4, 10, 11], 2)]
    from mirl.data.collate import pad_batch

    with torch.no_grad():
        out = []
        for side in ("right", "left"):
            ids, attn, resp = pad_batch(seqs, 0, side)
            out.append(sequence_logps(policy(ids, attn).logits, ids, resp)[1])
    torch.testing.assert_close(out[0], out[1], atol=1e-5, rtol=1e-5)
    ids, mask = left_pad([[4, 5]], 0)
    assert ids.tolist() == [[4, 5]]


def test_entropy_uniform():
    assert entropy_from_logits(torch.zeros(2, 3, 8), chunk=2).flatten().tolist() == pytest.approx(
        [torch.log(torch.tensor(8.0)).item()] * 6
    )


def test_chunked_logps_keep_no_vocab_sized_float32_copy():
    """What autograd keeps for backward: the logits themselves plus O(B*T), never a B*T*V float32 copy."""
    logits = torch.randn(4, 32, 512).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 512, (4, 32))
    vocab_sized = 4 * 32 * 512

    def saved_bytes(fn):
        sizes = []

        def pack(t):
            if t.data_ptr() != logits.data_ptr():  # the logits exist anyway
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(sizes)

    ours = saved_bytes(lambda: token_logps(logits, labels, chunk=16))
    naive = saved_bytes(lambda: torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]))
    assert ours <= 4 * 4 * 32  # labels + lse (+ slack): O(B*T)
    assert naive >= vocab_sized  # the plain form keeps a float32 B*T*V tensor


@pytest.mark.parametrize("chunk", [3, 1024])
@pytest.mark.parametrize("which", ["tiny", "hf"])
def test_fused_head_logps_equal_full_logits(which, chunk, hf_tiny_dir):
    """Log-probs and gradients from the hidden state in chunks (logits recomputed in the backward), or in one
    chunk (its probabilities kept for the backward), equal those from the full logits."""
    from mirl.data.collate import pad_batch
    from mirl.logps import fused_sequence_logps

    policy = load_policy("gpt-nano", seed=0) if which == "tiny" else load_policy(hf_tiny_dir)
    ids, attn, resp = pad_batch([([4, 5, 6, 7, 8, 9], 3), ([4, 10, 11, 12], 2)], policy.tokenizer.pad_token_id)
    w = torch.tensor([1.0, -2.0])
    _, ref, ref_len = sequence_logps(policy(ids, attn).logits, ids, resp)
    (ref * w).sum().backward()
    ref_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    out = policy(ids, attn, output="hidden_and_head")
    fused, lengths = fused_sequence_logps(out.hidden, out.head_weight, ids, resp, chunk=chunk)
    (fused * w).sum().backward()
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    assert lengths.tolist() == ref_len.tolist()
    for a, p in zip(ref_grads, policy.parameters()):
        torch.testing.assert_close(p.grad, a, atol=1e-5, rtol=1e-4)


def test_shared_prompts_finds_runs_of_equal_prompts():
    """Neighbouring rows whose prompt columns (ids and mask) are equal form a run; anything else its own."""
    from mirl.logps import shared_prompts

    ids = torch.tensor([[1, 2, 7], [1, 2, 8], [1, 2, 9], [3, 2, 7], [3, 2, 7], [1, 2, 7]])
    attn = torch.ones_like(ids)
    sh = shared_prompts(ids, attn, n_resp=1)
    assert sh.length == 2 and sh.firsts.tolist() == [0, 3, 5] and sh.owner.tolist() == [0, 0, 0, 1, 1, 2]
    attn[1, 0] = 0  # the same ids with another mask (padding) is another prompt
    assert shared_prompts(ids, attn, n_resp=1).firsts.tolist() == [0, 1, 2, 3, 5]
    assert shared_prompts(ids[2:5], attn[2:5], n_resp=1).owner.tolist() == [0, 1, 1]
    assert shared_prompts(ids[:1], attn[:1], n_resp=1) is None  # one row
    assert shared_prompts(ids[2:4], attn[2:4], n_resp=1) is None  # no two neighbours alike
    assert shared_prompts(ids, attn, n_resp=3) is None  # no prompt columns


@pytest.mark.parametrize("which", ["tiny", "hf", "hf-checkpointing", "hf-dynamic-rope"])
def test_shared_prompt_forward_gives_the_same_logps_and_gradients(which, hf_tiny_dir, tmp_path, monkeypatch):
    """GRPO's rows repeat their group's prompt (left-padded here, responses of unequal length): one prefix forward
    per prompt whose keys and values the rows reuse gives the log-probs and gradients of one forward per row; under
    activation checkpointing (the transformers cache is off) and with dynamic-NTK rotary frequencies (chosen from
    the call's longest position) the plain forward runs instead."""
    import conftest

    import mirl.logps as logps_module
    from mirl.logps import response_logps

    if which == "tiny":
        policy = load_policy("gpt-nano", seed=0)
    elif which == "hf-dynamic-rope":
        rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
        policy = load_policy(conftest.build_hf_tiny(tmp_path / "dyn", rope_parameters=rope))
    else:
        policy = load_policy(hf_tiny_dir)
    if which == "hf-checkpointing":
        policy.enable_activation_checkpointing()
    policy.train()
    g = torch.Generator().manual_seed(0)
    p, r = 6, 5
    prompts = torch.randint(3, 40, (3, p), generator=g)
    ids = torch.cat([prompts.repeat_interleave(4, 0)[:11], torch.randint(3, 40, (11, r), generator=g)], 1)
    attn = torch.ones_like(ids)
    attn[:4, :2] = 0  # the first group's prompt is 2 shorter (left padding)
    attn[5, -2:] = 0  # a shorter response
    attn[10, -4:] = 0  # the last group has 3 rows
    ids = ids.masked_fill(attn == 0, policy.tokenizer.pad_token_id)
    w = torch.linspace(-1, 1, 11 * r).view(11, r) * attn[:, -r:]
    calls, find = [], logps_module.shared_prompts
    backend = policy.backend
    real = backend.shared_hidden_and_head
    monkeypatch.setattr(backend, "shared_hidden_and_head", lambda *a: calls.append(real(*a)) or calls[-1])

    def run(share: bool):
        monkeypatch.setattr(logps_module, "shared_prompts", find if share else lambda *a: None)
        policy.zero_grad()
        lp, ent = response_logps(policy, ids, attn, r, 0.7, with_entropy=True)
        (lp * w).sum().backward()
        return lp.detach(), ent, [q.grad.clone() for q in policy.parameters() if q.grad is not None]

    (lp0, ent0, g0), (lp1, ent1, g1) = run(False), run(True)
    assert len(calls) == 1 and (calls[0] is None) == (which in ("hf-checkpointing", "hf-dynamic-rope"))
    keep = attn[:, -r:].bool()
    torch.testing.assert_close(lp1[keep], lp0[keep], atol=2e-5, rtol=0)
    torch.testing.assert_close(ent1[keep], ent0[keep], atol=2e-5, rtol=0)
    assert len(g1) == len(g0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=0)


def test_rows_do_not_share_a_prompt_forward_while_dropout_draws(hf_tiny_dir):
    """With LoRA dropout in training each row draws its own dropout on the prompt too: no shared forward; in eval
    mode (no draws) the rows share it."""
    from mirl.logps import shared_prompts

    policy = load_policy(hf_tiny_dir)
    policy.add_lora(r=4, alpha=8, dropout=0.1)
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 10]])
    attn = torch.ones_like(ids)
    calls = []
    real = policy.backend.shared_hidden_and_head
    policy.backend.shared_hidden_and_head = lambda *a: calls.append(1) or real(*a)
    policy.train()
    policy(ids, attn, output="hidden_and_head", shared=shared_prompts(ids, attn, 2))
    assert calls == []
    policy.eval()
    policy(ids, attn, output="hidden_and_head", shared=shared_prompts(ids, attn, 2))
    assert calls == [1]


@pytest.mark.parametrize("chunk", [2, 1024])
def test_fused_head_at_a_temperature_equals_the_plain_log_softmax(chunk):
    """log softmax(h W^T / T)[y] and its gradients (hidden and head) at T = 0.7, recomputed per chunk of 2 rows or
    kept from the forward (one chunk), equal autograd's through the full logits."""
    from mirl.logps import fused_token_logps

    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 8, generator=g, requires_grad=True)
    w = torch.randn(11, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 11, (5,), generator=g)
    coef = torch.linspace(-1, 2, 5)
    ref = torch.log_softmax(h @ w.T / 0.7, -1).gather(-1, y[:, None])[:, 0]
    gh, gw = torch.autograd.grad((ref * coef).sum(), (h, w))
    lp, _ = fused_token_logps(h, w, y, scale=1 / 0.7, chunk=chunk)
    fh, fw = torch.autograd.grad((lp * coef).sum(), (h, w))
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(fh, gh, atol=1e-5, rtol=0)
    torch.testing.assert_close(fw, gw, atol=1e-5, rtol=0)


def test_fused_head_with_no_rows_gives_a_zero_head_gradient():
    """No response rows (an empty per-rank micro-batch): log-probs of shape (0,), a zero head gradient rather than
    None (FSDP2 reduces the gradients of every rank alike), with and without the entropy."""
    from mirl.logps import fused_token_logps

    for with_entropy in (False, True):
        h = torch.zeros(0, 8, requires_grad=True)
        w = torch.randn(11, 8, requires_grad=True)
        lp, _ = fused_token_logps(h, w, torch.zeros(0, dtype=torch.long), with_entropy=with_entropy)
        assert lp.shape == (0,)
        lp.sum().backward()
        assert w.grad is not None and w.grad.shape == w.shape and not w.grad.any()
