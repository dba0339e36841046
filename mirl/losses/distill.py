"""On-policy distillation losses: the student samples, and on each of its response positions the loss is a
divergence between the student's and the teacher's next-token distributions (Agarwal et al. 2024, GKD; the
on-policy distillation of Qwen3 and of Thinking Machines' note), per token:

    generalized JSD_beta = beta KL(p_t || m) + (1 - beta) KL(p_s || m),   m = beta p_t + (1 - beta) p_s
    beta = 1: reverse KL(p_s || p_t) (mode seeking; the default)          beta = 0: forward KL(p_t || p_s)

both distributions at temperature T. The same definition as TRL's GKDTrainer.generalized_jsd_loss
(tests/test_distill.py compares them on identical tensors).
"""

from __future__ import annotations

import math

import torch

from .registry import register_loss

Tensor = torch.Tensor


@register_loss("generalized_jsd", kind="distill")
def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float = 1.0, temperature: float = 1.0):
    """Per-position divergence (..., V) x 2 -> (...): the module docstring's generalized JSD (beta 1: reverse
    KL, beta 0: forward KL). The gradient flows into the student's logits only."""
    s = torch.log_softmax(student_logits.float() / temperature, -1)
    t = torch.log_softmax(teacher_logits.detach().float() / temperature, -1)
    if beta == 1.0:
        return (s.exp() * (s - t)).sum(-1)
    if beta == 0.0:
        return (t.exp() * (t - s)).sum(-1)
    m = torch.logsumexp(torch.stack([s + math.log1p(-beta), t + math.log(beta)]), 0)
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
