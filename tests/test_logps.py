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


@pytest.mark.parametrize("which", ["tiny", "hf"])
def test_fused_head_logps_equal_full_logits(which, hf_tiny_dir):
    """Log-probs and gradients from the hidden state in chunks equal those from the full logits."""
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
    fused, lengths = fused_sequence_logps(out.hidden, out.head_weight, ids, resp, chunk=3)
    (fused * w).sum().backward()
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    assert lengths.tolist() == ref_len.tolist()
    for a, p in zip(ref_grads, policy.parameters()):
        torch.testing.assert_close(p.grad, a, atol=1e-5, rtol=1e-4)
