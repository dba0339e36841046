"""The fast decode path: a preallocated KV cache written in place, and one incremental step per backend that
calls the model's own modules (so LoRA adapters, disabled adapters and any dtype behave as in its forward).

    cache = to_static(kv, attention_mask, max_new_tokens, tiny_decoder(gpt, rows) or hf_decoder(model, length, rows))
    logits = decode_step(cache.decoder, ids, attention_mask, cache)

The prefill (prompt, images) always goes through the model's own forward; only the per-token steps that
follow are ours. At the prefill the weights are snapshotted as decoding uses them (q, k and v in one
matrix, gate and up in another, every matrix stored (in, out), or on x86 prepacked by oneDNN (mirl/cpu.py:
decode_products); active LoRA adapters merged in, once per
generation instead of two extra matmuls per layer and token). The snapshot is a copy of the linear weights
for the duration of one generate() call. The token embedding is not copied: the step calls the model's own
embedding module (a LoRA adapter on it included; merging it would copy the whole vocabulary's matrix for a
few rows per step). A step writes one slot of the preallocated keys and values (no
concatenation per token) and attends to the slots filled so far; a conversation's next turn (rollout/turns.py)
writes its several new tokens at once, causal among themselves. The positions are those of the plain
path (the mask count; plus each row's rope delta for Qwen2-VL's and Qwen2.5-VL's M-RoPE, whose three position
axes are equal for generated text: the delta, set at the prefill from the model's rope index over the prompt's
images and videos (models/backends.py), puts the first generated token where the training forward puts it).
Models whose attention or positions the step does not reproduce keep their own forward: a sliding window
that bites within the generation's length, a rope whose frequencies change with the length (hf_decoder).
tests/test_decode.py checks tokens and log-probs against the plain path for the tiny GPT, the tiny VLM with
images, a transformers Llama, Qwen2, Qwen3 and Qwen2-VL with images, with and without LoRA (on the embedding
too), and against transformers' forward for a windowed Mistral and the rope types; tests/test_video_hf.py for
Qwen2-VL and Qwen2.5-VL with video.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import cpu

Tensor = torch.Tensor

# transformers families whose decoder layers are exactly: x + o(attn(rope(q), rope(k), v)) on the input norm,
# then x + mlp(post-attention norm); q_norm / k_norm on the head dimension when the layer has them (Qwen3).
# A sliding window that would mask keys within the generation's length is excluded at run time (hf_decoder).
NATIVE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen2_vl", "qwen2_5_vl"})

# rope types whose cos / sin are a fixed function of the position (transformers' ROPE_INIT_FUNCTIONS ignore
# seq_len for these): the step looks them up in one table built for the whole generation. "dynamic" (NTK) and
# "longrope" change their frequencies with the sequence length at run time (dynamic_rope_update): those models,
# and any rope type not listed, decode through their own forward.
POSITIONAL_ROPE_TYPES = frozenset({"default", "linear", "yarn", "llama3", "proportional", "mrope"})


@dataclass
class StaticCache:
    """Keys and values of every layer, preallocated for the prompt and all new tokens.

    keys[i], values[i]: (B, H_kv, S, D) with S = prompt length + max_new_tokens; slots [0, length) are filled.
    mask: (B, S) bool, the filled slots that hold real tokens (left padding and finished rows' steps are False).
    deltas: (B, 1) M-RoPE rope deltas (Qwen2-VL, Qwen2.5-VL: a row's text position less its mask count), else None.
    decoder: the weights the steps use (snapshotted at the prefill).
    """

    keys: list[Tensor]
    values: list[Tensor]
    mask: Tensor
    length: int
    deltas: Tensor | None = None
    decoder: Decoder | None = None
    rope: tuple | None = None  # (cos, sin) per position (S, D), built at the first step (1-D rotary models)

    def select_rows(self, rows: Tensor) -> StaticCache:
        """The cache of these batch rows only (finished rows cut out of decoding)."""
        return StaticCache(
            [k.index_select(0, rows) for k in self.keys],
            [v.index_select(0, rows) for v in self.values],
            self.mask.index_select(0, rows),
            self.length,
            None if self.deltas is None else self.deltas.index_select(0, rows),
            self.decoder,
            self.rope,
        )

    def grown(self, slots: int) -> StaticCache:
        """A copy with room for `slots` more tokens (a conversation whose next turn does not fit)."""
        pad = lambda z: torch.cat([z, z.new_zeros(*z.shape[:2], slots, z.shape[3])], 2)
        mask = torch.cat([self.mask, self.mask.new_zeros(self.mask.shape[0], slots)], 1)
        # the rope table covers the old length only: rebuilt at the next step
        return StaticCache([pad(k) for k in self.keys], [pad(v) for v in self.values], mask, self.length, self.deltas,
                           self.decoder)  # fmt: skip


def to_static(kv, attention_mask: Tensor, new_tokens: int, decoder: Decoder, deltas=None) -> StaticCache:
    """A prefill's per-layer (keys, values) (B, H, P, D) and its mask (B, P) -> a StaticCache with room for
    `new_tokens` more slots."""
    b, p = attention_mask.shape
    s = p + new_tokens
    keys, values = [], []
    for k, v in kv:
        kk = k.new_zeros(b, k.shape[1], s, k.shape[3])
        vv = v.new_zeros(b, v.shape[1], s, v.shape[3])
        kk[:, :, :p] = k
        vv[:, :, :p] = v
        keys.append(kk)
        values.append(vv)
    mask = torch.zeros(b, s, dtype=torch.bool, device=attention_mask.device)
    mask[:, :p] = attention_mask.bool()
    return StaticCache(keys, values, mask, p, deltas, decoder)


def _advance(cache: StaticCache, attention_mask: Tensor, t: int) -> tuple[int, Tensor, Tensor]:
    """Take the t new tokens' mask bits from the sampler's mask (B, length + t) -> (first slot, attention mask
    over the filled slots (B, 1, t, slot + t), position ids (B, t))."""
    slot = cache.length
    if slot + t > cache.mask.shape[1]:
        raise ValueError(f"the static cache holds {cache.mask.shape[1]} tokens; {slot + t} do not fit")
    new = attention_mask[:, -t:]
    cache.mask[:, slot : slot + t] = new
    cache.length = slot + t
    filled = cache.mask[:, None, None, : slot + t]
    if t == 1:  # the plain path's positions: the mask count (<= slot)
        return slot, filled, (attention_mask.sum(-1, keepdim=True) - 1).clamp_(min=0)
    # several tokens (a conversation's next turn, rollout/turns.py): causal among them; a hole (mask 0) sees
    # itself too, so that its (unused) output stays finite as the backends' forwards keep padding finite
    pos = (attention_mask[:, :-t].sum(-1, keepdim=True) + new.long().cumsum(-1) - 1).clamp_(min=0)
    keys = torch.arange(slot + t, device=new.device)[None, :]
    queries = torch.arange(slot, slot + t, device=new.device)[:, None]
    return slot, (filled & (keys <= queries)) | (keys == queries), pos


def _attend(q: Tensor, layer: int, k: Tensor, v: Tensor, cache: StaticCache, slot: int, mask: Tensor):
    """Write k, v (B, H_kv, T, D) into the slots from `slot`, attend q (B, H, T, D) to the filled slots ->
    (B, H, T, D)."""
    kk, vv = cache.keys[layer], cache.values[layer]
    end = slot + k.shape[2]
    kk[:, :, slot:end] = k
    vv[:, :, slot:end] = v
    gqa = q.shape[1] != kk.shape[1]
    return F.scaled_dot_product_attention(q, kk[:, :, :end], vv[:, :, :end], attn_mask=mask, enable_gqa=gqa)


def is_lora_layer(m) -> bool:
    """Whether m is a PEFT LoRA layer (Linear, Embedding, ...) wrapping a base layer."""
    return hasattr(m, "get_delta_weight") and hasattr(m, "get_base_layer")


def lora_merged_weight(m) -> Tensor:
    """The weight a PEFT LoRA layer computes with: its base layer's, plus PEFT's delta (scaled B A, in the base
    weight's layout) of each active adapter; the base weight alone while the adapters are disabled (the reference
    context) or already merged. For DoRA the delta is not the whole change: callers check use_dora."""
    w = m.get_base_layer().weight
    if not m.disable_adapters and not m.merged:
        for name in m.active_adapters:
            if name in m.lora_A or name in getattr(m, "lora_embedding_A", {}):
                w = w + m.get_delta_weight(name).to(w.dtype)
    return w


def linear_weights(m) -> tuple[Tensor, Tensor | None] | None:
    """(weight, bias) that m computes: an nn.Linear, or a PEFT LoRA Linear with its active adapters merged in
    (none when the adapters are disabled: the reference context); None for anything else (DoRA, quantised)."""
    if isinstance(m, torch.nn.Linear):
        return m.weight, m.bias
    if not is_lora_layer(m):
        return None
    base = m.get_base_layer()
    if not isinstance(base, torch.nn.Linear) or any(getattr(m, "use_dora", {}).values()):
        return None
    return lora_merged_weight(m), base.bias


class Weight(NamedTuple):
    """A decode product's weight: w (in, out), its bias, and oneDNN's copy prepacked for the step's rows where
    the CPU's choice (mirl/cpu.py: decode_products) sends the product there (w is then dropped)."""

    w: Tensor | None
    b: Tensor | None
    packed: Tensor | None = None


def _base_weight(m) -> Tensor:
    """The (out, in) weight of a linear layer or of the layer a LoRA adapter wraps (for its shape: no merge)."""
    return m.get_base_layer().weight if is_lora_layer(m) else m.weight


def _cat_linears(*mods, pack_rows: int = 0) -> Weight | None:
    """One (in, out) matrix for one linear layer or several that read the same input (q, k, v; gate, up): x @ W
    is one matmul instead of several, and for a few rows the (in, out) layout is the faster one (SmolLM2's
    shapes, 16 rows, 2 threads: 0.13 against 0.22 ms for q/k/v, 0.17 against 0.37 ms for the down projection).
    With pack_rows, a float32 CPU weight of at least the CPU choice's min_elements is instead prepacked by oneDNN
    for that many rows (any count works) straight from the layers' (out, in) weights: one copy, no transpose."""
    parts = [linear_weights(m) for m in mods]
    if any(p is None for p in parts):
        return None
    bias = None
    if any(b is not None for _, b in parts):
        bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in parts])
    w0 = parts[0][0]
    size = sum(w.numel() for w, _ in parts)
    if pack_rows and w0.device.type == "cpu" and w0.dtype == torch.float32:
        if size >= cpu.this_cpu_decode_products().min_elements:
            w = parts[0][0] if len(parts) == 1 else torch.cat([w for w, _ in parts], dim=0)
            return Weight(None, bias, torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), pack_rows))
    return Weight(torch.cat([w.t() for w, _ in parts], dim=1), bias)


def _norm(m) -> tuple[Tensor, float] | None:
    """(weight, eps) of a transformers RMSNorm (variance_epsilon) or torch's nn.RMSNorm."""
    if isinstance(m, torch.nn.RMSNorm):
        return m.weight, m.eps
    eps = getattr(m, "variance_epsilon", None)
    return None if eps is None or getattr(m, "weight", None) is None else (m.weight, eps)


def rms_norm(x: Tensor, norm: tuple[Tensor, float | None]) -> Tensor:
    """The transformers RMSNorm formula (float32 statistics, then the weight in the input's dtype)."""
    w, eps = norm
    if x.dtype == torch.float32 and w.dtype == torch.float32:  # torch's fused kernel: one call instead of six
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    eps = torch.finfo(torch.float32).eps if eps is None else eps
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _matmul(x: Tensor, wb: Weight) -> Tensor:
    """x @ W (+ b) for an (in, out) matrix from _cat_linears, or through oneDNN with its prepacked copy."""
    w, b, packed = wb
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
    return torch.matmul(x, w) if b is None else torch.addmm(b, x.view(-1, x.shape[-1]), w).view(*x.shape[:-1], -1)


@dataclass
class Layer:
    """One decoder layer's weights as decoding uses them: q, k and v in one matrix, gate and up in another."""

    norm1: tuple
    qkv: Weight
    o: Weight
    norm2: tuple
    mlp_in: Weight  # gate and up stacked (SwiGLU), or the single input projection (the tiny GPT's GELU MLP)
    mlp_out: Weight
    heads: tuple[int, int, int]  # query heads, key/value heads, head dimension
    q_norm: tuple | None = None  # Qwen3
    k_norm: tuple | None = None


@dataclass
class Decoder:
    """The weights of a model's decode step, snapshotted at the prefill (LoRA adapters merged in)."""

    kind: str  # "tiny" (learned positions, GELU) or "hf" (rotary, SwiGLU)
    embed: torch.nn.Module  # the model's own token embedding, called: a LoRA adapter on it stays in play
    layers: list[Layer]
    norm: tuple
    head: Weight
    pos_embed: Tensor | None = None  # the tiny GPT's learned positions
    rotary: object = None  # the transformers rotary module (its inv_freq and scaling)


def _pack_rows(rows: int) -> tuple[int, int]:
    """(pack_rows of the layers' products, of the head) under this CPU's choice (mirl/cpu.py: decode_products)."""
    choice = cpu.this_cpu_decode_products()
    return rows if choice.layers else 0, rows if choice.head else 0


def tiny_decoder(gpt, rows: int = 0) -> Decoder | None:
    """The built-in GPT's decode weights (models/tiny_lm.py; the tiny VLM's text model too), for `rows` rows
    (0: no product prepacked)."""
    layer_rows, head_rows = _pack_rows(rows)
    layers = []
    for blk in gpt.blocks:
        parts = [_cat_linears(m, pack_rows=layer_rows) for m in (blk.qkv, blk.proj, blk.fc, blk.fc_out)]
        if any(p is None for p in parts):
            return None
        c = _base_weight(blk.qkv).shape[1]
        heads = (blk.n_head, blk.n_head, c // blk.n_head)
        layers.append(Layer(_norm(blk.ln1), parts[0], parts[1], _norm(blk.ln2), parts[2], parts[3], heads))
    head = _cat_linears(gpt.lm_head, pack_rows=head_rows)
    return Decoder("tiny", gpt.wte, layers, _norm(gpt.ln_f), head, gpt.wpe.weight)


def window_masks_within(cfg, length: int) -> bool:
    """Whether a sliding-window layer of this (text) config would hide a key from a query within `length`
    positions. transformers masks key k for query q when k <= q - window (masking_utils), which needs
    length > window. Mistral declares sliding_window for every layer (no layer_types); Qwen2/Qwen3 only with
    use_sliding_window, on the layers layer_types names."""
    window = getattr(cfg, "sliding_window", None)
    if window is None or getattr(cfg, "use_sliding_window", True) is False:
        return False
    types = getattr(cfg, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return False
    return length > window


def hf_decoder(base, length: int, rows: int = 0) -> Decoder | None:
    """The decode weights of a transformers model whose layers the native step reproduces exactly for a
    generation of `length` positions (prompt + new tokens) of `rows` rows (0: no product prepacked), else None
    (its own forward and cache are then used)."""
    cfg = base.config
    if getattr(cfg, "model_type", "") not in NATIVE_MODEL_TYPES:
        return None
    text_cfg = getattr(cfg, "text_config", cfg)
    layer_types = getattr(text_cfg, "layer_types", None) or ()
    if any(t not in ("full_attention", "sliding_attention") for t in layer_types):
        return None
    if window_masks_within(text_cfg, length):  # the step attends to every filled slot
        return None
    if getattr(text_cfg, "hidden_act", "silu") != "silu":
        return None
    inner = getattr(base, "model", None)
    inner = getattr(inner, "language_model", inner)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return None
    if getattr(inner.rotary_emb, "rope_type", "default") not in POSITIONAL_ROPE_TYPES:
        return None
    layer_rows, head_rows = _pack_rows(rows)
    layers = []
    for layer in inner.layers:
        a, mlp = layer.self_attn, layer.mlp
        if not all(hasattr(a, x) for x in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
            return None
        if abs(a.scaling - a.head_dim**-0.5) > 1e-12 or not hasattr(mlp, "gate_proj"):
            return None
        qkv = _cat_linears(a.q_proj, a.k_proj, a.v_proj, pack_rows=layer_rows)
        o = _cat_linears(a.o_proj, pack_rows=layer_rows)
        gate_up = _cat_linears(mlp.gate_proj, mlp.up_proj, pack_rows=layer_rows)
        down = _cat_linears(mlp.down_proj, pack_rows=layer_rows)
        norms = [_norm(layer.input_layernorm), _norm(layer.post_attention_layernorm)]
        qk_norms = [_norm(a.q_norm), _norm(a.k_norm)] if hasattr(a, "q_norm") else [None, None]
        if None in (qkv, o, gate_up, down, *norms) or (hasattr(a, "q_norm") and None in qk_norms):
            return None
        q_out, kv_out = _base_weight(a.q_proj).shape[0], _base_weight(a.k_proj).shape[0]
        heads = (q_out // a.head_dim, kv_out // a.head_dim, a.head_dim)
        layers.append(Layer(norms[0], qkv, o, norms[1], gate_up, down, heads, *qk_norms))
    head = _cat_linears(base.get_output_embeddings(), pack_rows=head_rows)
    norm = _norm(inner.norm)
    if head is None or norm is None:
        return None
    return Decoder("hf", inner.embed_tokens, layers, norm, head, rotary=inner.rotary_emb)


def _signed_rope(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """rotate_half(x) = roll(x, D/2) with its first half negated: fold that sign into sin, so that rotary is
    x * cos + roll(x, D/2) * sin."""
    half = sin.shape[-1] // 2
    return cos, torch.cat([-sin[..., :half], sin[..., half:]], -1)


def _rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x cos + rotate_half(x) sin, rotate_half's sign folded into sin (_signed_rope): each half times sin is
    written into the other half of one buffer, where roll() would concatenate a copy (a cat per layer); the
    products and the sum are rounded as transformers' apply_rotary_pos_emb rounds them."""
    h = x.shape[-1] // 2
    r = torch.empty_like(x)
    torch.mul(x[..., h:], sin[..., :h], out=r[..., :h])
    torch.mul(x[..., :h], sin[..., h:], out=r[..., h:])
    return (x * cos).add_(r)


@torch.no_grad()
def decode_step(dec: Decoder, input_ids: Tensor, attention_mask: Tensor, cache: StaticCache) -> Tensor:
    """Tokens (B, T) through the snapshotted weights, written into the cache in place -> logits (B, T, V): one per
    row while decoding, a conversation's next turn (rollout/turns.py) at once. The same arithmetic as the model's
    forward (tests/test_decode.py, tests/test_episodes.py)."""
    b, t = input_ids.shape
    slot, mask, pos = _advance(cache, attention_mask, t)  # (generate() checked prompt + new tokens <= max positions)
    x = dec.embed(input_ids)
    # the mask in SDPA's additive form once per step (SDPA would convert a boolean one in every layer, the same way)
    mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
    if dec.kind == "tiny":
        x = x + F.embedding(pos, dec.pos_embed)
    else:
        if cache.deltas is not None:  # M-RoPE: generated text has equal t/h/w positions, offset by the delta
            cos, sin = _signed_rope(*dec.rotary(x, (pos + cache.deltas)[None].expand(3, -1, -1)))
        else:  # positions never exceed the slot: one table for the whole generation, looked up per step
            if cache.rope is None:
                table = torch.arange(cache.mask.shape[1], device=x.device)[None]
                cache.rope = tuple(z[0] for z in _signed_rope(*dec.rotary(x, table)))
            cos, sin = F.embedding(pos, cache.rope[0]), F.embedding(pos, cache.rope[1])  # (B, T, D)
        cos, sin = cos[:, :, None], sin[:, :, None]  # (B, T, 1, D): broadcast over heads
    for i, lay in enumerate(dec.layers):
        hq, hk, d = lay.heads
        qkv = _matmul(rms_norm(x, lay.norm1), lay.qkv).view(b, t, hq + 2 * hk, d)
        qk, v = qkv[:, :, : hq + hk], qkv[:, :, hq + hk :]
        if lay.q_norm is not None:  # Qwen3: RMSNorm of each head's query and key
            qk = torch.cat([rms_norm(qk[:, :, :hq], lay.q_norm), rms_norm(qk[:, :, hq:], lay.k_norm)], 2)
        if dec.kind == "hf":  # rotary on the queries and keys at once
            qk = _rotary(qk, cos, sin)
        q, k = qk[:, :, :hq].transpose(1, 2), qk[:, :, hq:].transpose(1, 2)
        y = _attend(q, i, k, v.transpose(1, 2), cache, slot, mask)
        x = x + _matmul(y.transpose(1, 2).reshape(b, t, hq * d), lay.o)
        h = _matmul(rms_norm(x, lay.norm2), lay.mlp_in)
        if dec.kind == "tiny":
            h = F.gelu(h)
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        x = x + _matmul(h, lay.mlp_out)
    return _matmul(rms_norm(x, dec.norm), dec.head)


def hf_cache_layers(past) -> list[tuple[Tensor, Tensor]]:
    """(keys, values) per layer of a transformers cache after the prefill."""
    return [(layer.keys, layer.values) for layer in past.layers]
