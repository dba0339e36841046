"""Memory-lean layers for training transformers models of the Llama / Qwen families: RMSNorm and the SwiGLU
MLP written as autograd functions that keep only their inputs for the backward pass and recompute the cheap
element-wise rest there. No matrix multiplication is recomputed: this is not activation checkpointing.

What autograd keeps per token and layer (float32, C the width, I the MLP width), and what is kept here:
    RMSNorm (x2 per layer)   x and the normalised x (2C)              x and one float per row (C)
    SwiGLU MLP               gate, silu(gate), up, their product (4I)  gate and up (2I); down's input is
                                                                       recomputed when down is a plain Linear
(Rotary embeddings keep nothing per token already: autograd saves only cos and sin for q * cos.) On the
bench's DPO-large model (C 512, I 2048) that is 2C + 2I fewer floats per token and layer: 0.65 GB of the
1.83 GB a forward of its 16 x 256 tokens keeps (measured with saved-tensor hooks).
The outputs and gradients are those of the model's own modules (tests/test_lean.py, to float32 rounding).

    lean_layers(model) -> number of modules switched (0 for a family outside LEAN_MODEL_TYPES)
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# the families whose RMSNorm is weight * (x / rms(x)) with `variance_epsilon` and whose MLP is
# down(silu(gate(x)) * up(x)) (decode.py's NATIVE_MODEL_TYPES minus the VLMs' vision parts, which are left alone)
LEAN_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen2_vl", "qwen2_5_vl"})


class _RMSNorm(torch.autograd.Function):
    """weight * (x * rsqrt(mean(x^2) + eps)) with float32 statistics, keeping x and rsqrt for the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        """The transformers formula: statistics in float32, the weight applied in the input's dtype."""
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        """dx = rstd * (g - n * mean(g * n)), g = grad * weight, n the normalised input; dweight = sum(grad * n)."""
        x, weight, rstd = ctx.saved_tensors
        n = x.float() * rstd
        g = (grad * weight).float()
        dx = rstd * (g - n * (g * n).mean(-1, keepdim=True))
        dw = (grad.float() * n.to(x.dtype).float()).reshape(-1, n.shape[-1]).sum(0)
        return dx.to(x.dtype), dw.to(weight.dtype), None


def _swiglu_input_grads(grad: Tensor, gate: Tensor, up: Tensor, act: Tensor) -> tuple[Tensor, Tensor]:
    """(d gate, d up) of silu(gate) * up: torch's fused silu_backward of grad * up, and grad * act written into
    act = silu(gate) (a fresh tensor of the caller's, not read again)."""
    return torch.ops.aten.silu_backward(grad * up, gate), act.mul_(grad)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up for the backward."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        """silu(gate) * up."""
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    @torch.autograd.function.once_differentiable  # silu_backward has no derivative
    def backward(ctx, grad: Tensor):
        """d gate = grad * up * silu'(gate) (torch's fused silu_backward: one pass where the formula written out
        took five), d up = grad * silu(gate)."""
        gate, up = ctx.saved_tensors
        return _swiglu_input_grads(grad, gate, up, F.silu(gate))


class _SwiGLUDown(torch.autograd.Function):
    """(silu(gate) * up) @ W^T for a bias-free down projection, keeping gate and up (not their product)."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor, weight: Tensor) -> Tensor:
        """down(silu(gate) * up)."""
        ctx.save_for_backward(gate, up, weight)
        return F.linear(F.silu(gate) * up, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable  # silu_backward has no derivative
    def backward(ctx, grad: Tensor):
        """The product recomputed from gate and up for the weight's gradient, then _SwiGLU's backward."""
        gate, up, weight = ctx.saved_tensors
        act = F.silu(gate)
        dw = None
        if ctx.needs_input_grad[2]:
            dw = grad.reshape(-1, grad.shape[-1]).t() @ (act * up).reshape(-1, up.shape[-1])
        dp = grad @ weight.to(grad.dtype)
        return *_swiglu_input_grads(dp, gate, up, act), dw


def _norm_forward(self, hidden_states: Tensor) -> Tensor:
    if not torch.is_grad_enabled():
        return type(self).forward(self, hidden_states)
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: Tensor) -> Tensor:
    if not torch.is_grad_enabled():
        return type(self).forward(self, x)
    gate, up = self.gate_proj(x), self.up_proj(x)
    down = self.down_proj
    if type(down) is torch.nn.Linear and down.bias is None and gate.dtype == down.weight.dtype:
        return _SwiGLUDown.apply(gate, up, down.weight)
    return down(_SwiGLU.apply(gate, up))


def lean_layers(model) -> int:
    """Switch the RMSNorm and SwiGLU MLP modules of an allow-listed transformers model to the lean autograd
    functions above (per instance; the classes are untouched). Without gradients (generation, reference
    passes) the modules' own forward runs. -> the number of modules switched."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", "") not in LEAN_MODEL_TYPES:
        return 0
    act = getattr(getattr(cfg, "text_config", cfg), "hidden_act", "silu")
    n = 0
    for name, m in model.named_modules():
        if "visual" in name or "vision" in name:
            continue
        kind = type(m).__name__
        if kind.endswith("RMSNorm") and hasattr(m, "variance_epsilon") and hasattr(m, "weight"):
            m.forward = types.MethodType(_norm_forward, m)
            n += 1
        elif (
            kind.endswith("MLP") and act == "silu" and all(hasattr(m, p) for p in ("gate_proj", "up_proj", "down_proj"))
        ):
            m.forward = types.MethodType(_mlp_forward, m)
            n += 1
    return n
