"""Log-probabilities of response tokens, computed over the vocabulary in chunks.

    token_logps(logits (B, T, V), labels (B, T)) -> (B, T): log softmax(logits)[labels], float32

Peak memory: a plain `log_softmax(logits.float())` materialises B*T*V floats in the forward pass and
keeps them for the backward pass. Here a custom autograd function walks over row chunks: the forward
keeps only the log-sum-exp per row (B*T floats), the backward recomputes softmax one chunk at a time
and writes the gradient into one buffer of the logits' own dtype. Extra memory is O(chunk * V).

Sequence log-probs (`sequence_logps`) line logits up with labels (position t predicts token t+1),
mask out the prompt and padding, and return the sum (DPO's convention) or the token mean, together
with the number of response tokens. Works for left or right padding: only the masks matter.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

Tensor = torch.Tensor
DEFAULT_CHUNK = 1024  # rows (tokens) per chunk


class _ChunkedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, chunk: int) -> Tensor:
        """log p(labels) per row, one chunk of rows at a time; keeps only the per-row log-sum-exp."""
        n, v = logits.shape
        out = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        for s in range(0, n, chunk):
            block = logits[s : s + chunk].float()  # (c, V)
            lse[s : s + chunk] = torch.logsumexp(block, dim=-1)
            out[s : s + chunk] = block.gather(-1, labels[s : s + chunk, None]).squeeze(-1) - lse[s : s + chunk]
        ctx.save_for_backward(logits, labels, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        """onehot(label) - softmax, recomputed chunk by chunk, times the incoming gradient."""
        logits, labels, lse = ctx.saved_tensors
        chunk = ctx.chunk
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], chunk):
            g = grad_out[s : s + chunk, None].float()  # (c, 1)
            probs = torch.exp(logits[s : s + chunk].float() - lse[s : s + chunk, None])
            block = -g * probs  # d/dz [z_y - lse(z)] = onehot(y) - softmax(z)
            block.scatter_add_(-1, labels[s : s + chunk, None], g)
            grad[s : s + chunk] = block.to(grad.dtype)
        return grad, None, None


def token_logps(logits: Tensor, labels: Tensor, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """log p(labels) under logits. logits (..., V), labels (...) -> (...) float32.

    Labels outside [0, V) (e.g. -100 or padding) must be masked by the caller; they are clamped here
    so that gather stays in range.
    """
    shape = labels.shape
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1).clamp(0, logits.shape[-1] - 1)
    if flat_logits.shape[0] == 0:
        return torch.zeros(shape, dtype=torch.float32, device=logits.device)
    return _ChunkedTokenLogps.apply(flat_logits, flat_labels, chunk).reshape(shape)


def shift_for_labels(input_ids: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Labels and mask aligned with logits[:, :-1]: position t is scored on token t+1. (B, T-1) each."""
    return input_ids[:, 1:], response_mask[:, 1:]


def sequence_logps(
    logits: Tensor, input_ids: Tensor, response_mask: Tensor, *, average: bool = False, chunk: int = DEFAULT_CHUNK
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token and per-sequence log-probs of the response tokens.

    logits (B, T, V) from a forward pass over input_ids (B, T); response_mask (B, T) is 1 on response
    tokens (prompt and padding 0). Returns (per_token (B, T-1) masked to 0 off-response,
    per_sequence (B,) sum or token mean, lengths (B,) number of response tokens).
    """
    labels, mask = shift_for_labels(input_ids, response_mask)
    per_token = token_logps(logits[:, :-1], labels, chunk) * mask
    lengths = mask.sum(-1).to(per_token.dtype)
    seq = per_token.sum(-1)
    if average:
        seq = seq / lengths.clamp(min=1)
    return per_token, seq, lengths


def entropy_from_logits(logits: Tensor, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """Entropy of softmax(logits) per position, (..., V) -> (...), chunked and without gradient."""
    with torch.no_grad():
        flat = logits.reshape(-1, logits.shape[-1])
        out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
        for s in range(0, flat.shape[0], chunk):
            lp = torch.log_softmax(flat[s : s + chunk].float(), dim=-1)
            out[s : s + chunk] = -(lp.exp() * lp).sum(-1)
    return out.reshape(logits.shape[:-1])


class _FusedHeadLogps(torch.autograd.Function):
    """log softmax(scale * h W^T)[y] for rows of h, chunk by chunk: the (N, V) logits never exist at once.
    Also returns the entropy of each row's distribution (no gradient), taken from the same chunk of logits.
    When all rows fit one chunk and a gradient is wanted, the forward keeps that chunk's probabilities for the
    backward instead of recomputing its logits (one head product fewer; the backward's first step would hold as
    much memory anyway)."""

    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int, scale: float, with_entropy: bool, grad: bool
    ):
        """(log p(labels), entropy or an empty tensor) from hidden states and the head weight, chunk by chunk.
        grad: a backward will follow (grad mode on and an input needing it; always off inside forward)."""
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        ent = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        keep = n <= chunk and grad
        probs = None
        w = weight.float()
        with torch.autocast(hidden.device.type, enabled=False):  # the head stays in float32 under bf16 autocast
            for s in range(0, n, chunk):
                logits = hidden[s : s + chunk].float() @ w.T  # (c, V), scaled, shifted and multiplied in place
                if scale != 1.0:
                    logits.mul_(scale)
                lse[s : s + chunk] = torch.logsumexp(logits, dim=-1)
                out[s : s + chunk] = logits.gather(-1, labels[s : s + chunk, None]).squeeze(-1) - lse[s : s + chunk]
                if with_entropy or keep:
                    lp = logits.sub_(lse[s : s + chunk, None])
                    p = lp.exp()
                    if with_entropy:
                        ent[s : s + chunk] = -lp.mul_(p).sum(-1)
                    probs = p if keep else None
        ctx.save_for_backward(hidden, weight, labels, lse, *(() if probs is None else (probs,)))
        ctx.chunk, ctx.scale = chunk, scale
        ctx.mark_non_differentiable(ent)
        return out, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor, _grad_ent=None):
        """Gradients of hidden states and head weight, from the kept probabilities or recomputing each chunk's."""
        hidden, weight, labels, lse, *kept = ctx.saved_tensors
        w = weight.float()
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        want_w, grad_w = ctx.needs_input_grad[1], None  # a frozen head (LoRA): no gradient
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s : s + ctx.chunk].float()
            g = grad_out[s : s + ctx.chunk, None].float()
            if kept:  # d/dz [z_y - lse] = onehot - p, in the kept block itself (once_differentiable: read once)
                dlogits = kept[0].mul_(-g)
            else:
                logits = h @ w.T
                if ctx.scale != 1.0:
                    logits.mul_(ctx.scale)
                dlogits = logits.sub_(lse[s : s + ctx.chunk, None]).exp_().mul_(-g)
            dlogits.scatter_add_(-1, labels[s : s + ctx.chunk, None], g)
            if ctx.scale != 1.0:
                dlogits.mul_(ctx.scale)
            if grad_h is not None:
                grad_h[s : s + ctx.chunk] = (dlogits @ w).to(grad_h.dtype)
            if want_w:  # the first chunk's product is the gradient (no zeroed (V, C) matrix to add it to)
                grad_w = dlogits.T @ h if grad_w is None else grad_w.add_(dlogits.T @ h)
        if want_w and grad_w is None:  # no rows: a zero gradient, not None (FSDP2 reduces every rank's alike)
            grad_w = torch.zeros_like(w)
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None, None


def fused_token_logps(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, scale: float = 1.0, with_entropy: bool = False, chunk=None
) -> tuple[Tensor, Tensor | None]:
    """log softmax(scale * hidden @ weight^T)[labels] for hidden (N, C) and labels (N,), without the (N, V)
    logits -> (log-probs (N,), entropies (N,) without gradient, or None)."""
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    lp, ent = _FusedHeadLogps.apply(hidden, weight, labels, chunk or DEFAULT_CHUNK, scale, with_entropy, grad)
    return lp, (ent if with_entropy else None)


def fused_sequence_logps(
    hidden: Tensor,
    weight: Tensor,
    input_ids: Tensor,
    response_mask: Tensor,
    *,
    average: bool = False,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[Tensor, Tensor]:
    """Sequence log-probs of the response tokens from the last hidden state (B, T, C) and the LM-head
    weight (V, C), without materialising (B, T, V) logits: only response positions go through the head.
    -> (per_sequence (B,) sum or token mean, lengths (B,))."""
    labels, mask = shift_for_labels(input_ids, response_mask)
    sel = mask.bool()  # (B, T-1)
    h = hidden[:, :-1][sel]  # (N, C): the positions that predict a response token
    lp, _ = fused_token_logps(h, weight, labels[sel], chunk=chunk)  # (N,)
    rows = torch.nonzero(sel)[:, 0]
    seq = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, rows, lp)
    lengths = mask.sum(-1).to(seq.dtype)
    if average:
        seq = seq / lengths.clamp(min=1)
    return seq, lengths


class SharedPrompt(NamedTuple):
    """Rows of a batch that begin with the same prompt (shared_prompts): the first `length` columns of row i equal
    those of row firsts[owner[i]]; firsts (N,) the first row of each distinct prompt, owner (B,) in 0..N-1."""

    length: int
    firsts: torch.Tensor
    owner: torch.Tensor


def shared_prompts(input_ids, attention_mask, n_resp: int) -> SharedPrompt | None:
    """Runs of consecutive rows whose prompt area (all but the last n_resp columns: ids and mask) is identical, as
    GRPO's groups are packed -> SharedPrompt, or None when no two neighbours share one. Two small host reads."""
    b, p = input_ids.shape[0], input_ids.shape[1] - n_resp
    if b < 2 or p < 1:
        return None
    ids, mask = input_ids[:, :p], attention_mask[:, :p]
    same = ((ids[1:] == ids[:-1]) & (mask[1:] == mask[:-1])).all(1)
    starts = torch.cat([torch.ones(1, dtype=torch.bool, device=same.device), ~same])
    n = int(starts.sum())
    if n == b:
        return None
    return SharedPrompt(p, starts.nonzero()[:, 0], starts.long().cumsum(0) - 1)


def device_of(model) -> torch.device:
    """The device a model computes on (a Policy, a LoRA reference, a DDP wrapper, any module)."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def autocast(model, bf16: bool):
    """bf16 autocast for the model's device when bf16 (a no-op context otherwise): keyed on where the model
    computes, never on where an input happens to be."""
    return torch.autocast(device_of(model).type, dtype=torch.bfloat16, enabled=bf16)


def head_logits(out, n_resp: int) -> Tensor:
    """The float32 logits (B, R, V) that predict the last n_resp tokens, from a forward's PolicyOutput (only
    those positions go through the head when it gives the hidden state and head weight)."""
    if out.head_weight is not None:
        return out.hidden[:, -n_resp - 1 : -1].float() @ out.head_weight.float().t()  # (a bf16 teacher's head too)
    return out.logits[:, -n_resp - 1 : -1].float()


def response_logps(
    policy,
    ids,
    attn,
    n_resp: int,
    temperature: float,
    with_entropy: bool = False,
    images=None,
    bf16: bool = False,
    entropy_grad: bool = False,
):
    """Per-token log-probs (B, R) of the last n_resp tokens under logits / temperature (and their entropies,
    without gradient). bf16: the forward under bf16 autocast, the log-softmax in float32. Where the policy
    gives its last hidden state and head weight (PolicyOutput), only the response positions go through the
    head, chunk by chunk (fused_token_logps): no (B, T, V) logits exist. entropy_grad: the entropies with
    their gradient (an entropy bonus), from the response positions' (B, R, V) logits. Rows that repeat a prompt
    (a group's, packed together) share one forward of it where the model can (shared_prompts, Policy.forward)."""
    shared = shared_prompts(ids, attn, n_resp) if images is None else None
    with autocast(policy, bf16):
        out = policy(ids, attn, images=images, output="hidden_and_head", shared=shared)
    scale = 1.0 / temperature if temperature > 0 else 1.0
    if entropy_grad:
        logp_all = torch.log_softmax(head_logits(out, n_resp) * scale, -1)
        lp = logp_all.gather(-1, ids[:, -n_resp:].unsqueeze(-1)).squeeze(-1)
        return lp, -(logp_all.exp() * logp_all).sum(-1)
    if out.head_weight is not None:
        h = out.hidden[:, -n_resp - 1 : -1]
        b, r = h.shape[:2]
        lp, ent = fused_token_logps(
            h.reshape(b * r, -1), out.head_weight, ids[:, -n_resp:].reshape(-1), scale=scale, with_entropy=with_entropy
        )
        return lp.view(b, r), (None if ent is None else ent.view(b, r))
    logits = out.logits[:, -n_resp - 1 : -1].float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    lp = token_logps(logits, ids[:, -n_resp:])
    ent = entropy_from_logits(logits) if with_entropy else None
    return lp, ent
