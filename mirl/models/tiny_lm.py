"""A small GPT for CPU experiments: pre-norm decoder, learned positions, tied embeddings, KV cache.

One size dial, `depth` (as in nanochat): n_layer = depth, n_embd = 64 * depth, n_head = depth (head
dimension 64). Named presets pick a depth. Positions come from the attention mask (cumsum - 1), so
left-padded batches and cached generation see the same positions as an unpadded sequence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

PRESETS = {"gpt-nano": 2, "gpt-micro": 3, "gpt-mini": 4, "gpt-small": 6, "gpt-base": 8}


@dataclass
class TinyGPTConfig:
    """Sizes of the built-in GPT (vocabulary, context, depth, width, heads)."""

    vocab_size: int = 100
    depth: int = 2
    max_seq_len: int = 256
    n_layer: int = 0  # derived from depth when 0
    n_embd: int = 0
    n_head: int = 0
    model_type: str = "mirl-tiny-gpt"

    def __post_init__(self):
        self.n_layer = self.n_layer or self.depth
        self.n_embd = self.n_embd or 64 * self.depth
        self.n_head = self.n_head or max(1, self.n_embd // 64)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")

    def to_dict(self) -> dict:
        """The config as saved in config.json (with model_type)."""
        return asdict(self)


def preset_config(name: str, vocab_size: int, max_seq_len: int = 256) -> TinyGPTConfig:
    """'gpt-nano' or 'gpt-d3' (any depth) -> config."""
    if name in PRESETS:
        depth = PRESETS[name]
    elif name.startswith("gpt-d") and name[5:].isdigit():
        depth = int(name[5:])
    else:
        raise ValueError(f"unknown tiny GPT preset {name!r}; valid: {', '.join(PRESETS)} or gpt-d<depth>")
    return TinyGPTConfig(vocab_size=vocab_size, depth=depth, max_seq_len=max_seq_len)


class Block(nn.Module):
    """A pre-norm transformer block (RMSNorm): causal self-attention and a GELU MLP, each with a residual."""

    def __init__(self, cfg: TinyGPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.fc_out = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)
        self.ln1 = nn.RMSNorm(cfg.n_embd)
        self.ln2 = nn.RMSNorm(cfg.n_embd)

    def forward(self, x, attn_mask, past):
        """x (B, T, C) through the block, attending to the cached keys and values `past` -> (x, (keys, values))."""
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))  # (B,H,T,D)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        x = x + self.fc_out(F.gelu(self.fc(self.ln2(x))))
        return x, (k, v)


class TinyGPT(nn.Module):
    """The built-in decoder-only language model with a KV cache."""

    def __init__(self, cfg: TinyGPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.checkpointing = False  # recompute block activations in the backward (policy option)
        self.apply(self._init)
        for blk in self.blocks:  # scaled residual init (GPT-2)
            nn.init.normal_(blk.proj.weight, std=0.02 / (2 * cfg.n_layer) ** 0.5)
            nn.init.normal_(blk.fc_out.weight, std=0.02 / (2 * cfg.n_layer) ** 0.5)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        return_hidden: bool = False,
        skip_lm_head: bool = False,
    ):
        """input_ids (B, T); attention_mask (B, S+T) over past and new tokens; returns (logits, cache).

        inputs_embeds (B, T, C) replaces the token embedding (the VLM puts image tokens there).
        """
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + t, device=x.device).expand(b, t)
        if int(position_ids.max()) >= self.config.max_seq_len:
            raise ValueError(
                f"sequence of {int(position_ids.max()) + 1} positions exceeds the model's "
                f"max_seq_len {self.config.max_seq_len}"
            )
        x = x + self.wpe(position_ids)
        mask = _attention_mask(attention_mask, b, t, past_len, x.device)
        cache = []
        for i, blk in enumerate(self.blocks):
            past = None if past_key_values is None else past_key_values[i]
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x, kv = torch.utils.checkpoint.checkpoint(blk, x, mask, past, use_reentrant=False)
            else:
                x, kv = blk(x, mask, past)
            cache.append(kv)
        h = self.ln_f(x)
        if return_hidden:
            return (None if skip_lm_head else self.lm_head(h)), cache, h
        return self.lm_head(h), cache


def _attention_mask(attention_mask, b, t, past_len, device):
    """Boolean (B, 1, T, S+T): causal and not padding; None when plain causal attention does."""
    if attention_mask is None or (past_len == 0 and bool(attention_mask.all())):
        return None if past_len == 0 else torch.ones(b, 1, t, past_len + t, dtype=torch.bool, device=device)
    s = past_len + t
    q_pos = torch.arange(past_len, s, device=device)[:, None]
    causal = torch.arange(s, device=device)[None, :] <= q_pos  # (T, S)
    keep = causal[None, None] & attention_mask[:, None, None, :].bool()
    # a query at a padding position would see no key at all (softmax of nothing = NaN): let it see itself
    diag = torch.arange(s, device=device)[None, :] == q_pos
    return keep | diag[None, None]
