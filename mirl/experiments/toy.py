"""The toy of `mirl experiment mio-vs-dpo`: a linear-softmax policy over a fixed set of responses.

    pi_W(y | x) = softmax_y( x^T W phi_y )       x in R^dx (prompt), phi_y in R^d (unit response features)

Responses come in clusters of near-duplicates (cosine ~0.9 inside a cluster). A hidden W* decides the
correct response of each prompt; the reference W_ref = W* + noise gets some of them wrong. Each training
prompt gives one preference pair: chosen = its correct response, rejected = the member of the same
cluster the reference likes most (a hard negative). Training is full-batch gradient descent on W from
W_ref with a loss from the registry (pair losses on (w, l); group losses on the whole cluster with the
chosen one as the positive), so the curves are those of the library's own loss functions.

Why DPO can lower the chosen likelihood here: grad_W log pi(y|x) = x (phi_y - E_pi[phi])^T, and the DPO
gradient is proportional to x (phi_w - phi_l)^T (the expectation cancels). For hard negatives phi_w -
phi_l is short and not aligned with phi_w, so a step moves other responses' logits as much as the
chosen one's; the margin grows while mass leaves both w and l. MIO's chosen term sp(-T_w) + sp(T_w)/2
pulls T_w towards ln 2 directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..losses import get_loss


@dataclass
class Toy:
    """The toy problem: features, clusters of near-duplicate responses, prompts, pairs and the reference weights."""

    x_train: torch.Tensor  # (P, dx)
    x_test: torch.Tensor  # (Q, dx)
    phi: torch.Tensor  # (N, d) unit rows
    y_train: torch.Tensor  # (P,) correct response
    y_test: torch.Tensor  # (Q,)
    rejected: torch.Tensor  # (P,) hard negative of each training prompt
    group: torch.Tensor  # (P, K) the correct response's cluster, correct one first
    w_ref: torch.Tensor  # (dx, d)


def make_toy(
    seed: int,
    n_train: int = 32,
    n_test: int = 256,
    n_clusters: int = 8,
    per_cluster: int = 4,
    dim: int = 8,
    prompt_dim: int = 8,
    spread: float = 0.17,
    scale: float = 3.0,
    ref_noise: float = 0.6,
) -> Toy:
    """Deterministic by seed. spread: per-coordinate noise of a cluster member around its centre
    (cosine to the centre ~ 1/sqrt(1 + spread^2 dim), ~0.9 by default)."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_clusters, dim, generator=g), dim=-1)
    phi = centres.repeat_interleave(per_cluster, 0) + spread * torch.randn(n_clusters * per_cluster, dim, generator=g)
    phi = F.normalize(phi, dim=-1)
    w_star = scale * torch.randn(prompt_dim, dim, generator=g) / prompt_dim**0.5
    w_ref = w_star + ref_noise * scale * torch.randn(prompt_dim, dim, generator=g) / prompt_dim**0.5
    x = torch.randn(n_train + n_test, prompt_dim, generator=g)
    y = (x @ w_star @ phi.T).argmax(-1)
    x_train, x_test, y_train, y_test = x[:n_train], x[n_train:], y[:n_train], y[n_train:]
    cluster = torch.arange(n_clusters * per_cluster) // per_cluster
    ref_logits = x_train @ w_ref @ phi.T
    same = cluster[None, :] == cluster[y_train][:, None]  # (P, N) members of the chosen one's cluster
    others = same.clone()
    others[torch.arange(n_train), y_train] = False
    rejected = ref_logits.masked_fill(~others, float("-inf")).argmax(-1)
    members = torch.nonzero(same)[:, 1].view(n_train, per_cluster)
    group = torch.cat([y_train[:, None], members[members != y_train[:, None]].view(n_train, per_cluster - 1)], 1)
    return Toy(x_train, x_test, phi, y_train, y_test, rejected, group, w_ref)


def log_probs(w: torch.Tensor, x: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """log pi(y | x) of every response for every prompt under weights W: (prompts, responses)."""
    return torch.log_softmax(x @ w @ phi.T, dim=-1)


def toy_loss(name: str, logp: torch.Tensor, ref_logp: torch.Tensor, toy: Toy, beta: float) -> torch.Tensor:
    """Mean registry loss over the training prompts."""
    spec = get_loss(name)
    if spec.kind == "group":
        pos = torch.zeros_like(toy.group, dtype=torch.bool)
        pos[:, 0] = True
        loss, _ = spec(logp.gather(1, toy.group), ref_logp.gather(1, toy.group), pos, beta=beta)
    else:
        chosen, rejected = toy.y_train[:, None], toy.rejected[:, None]
        loss, _ = spec(
            logp.gather(1, chosen)[:, 0],
            logp.gather(1, rejected)[:, 0],
            ref_logp.gather(1, chosen)[:, 0],
            ref_logp.gather(1, rejected)[:, 0],
            beta=beta,
        )
    return loss.mean()


DIVERGED = 1e3  # a log-ratio beyond this (or a NaN) ends a run as diverged; its later points are NaN


def train_toy(toy: Toy, loss: str, beta: float, lr: float, steps: int, log_every: int = 5) -> dict:
    """Full-batch gradient descent from W_ref. -> curves {'step', 'chosen_logratio', 'rejected_logratio',
    'margin', 'chosen_logp', 'mass', 'test_accuracy'} (log-ratios are delta = logp - logp_ref, not beta-scaled)
    and 'diverged_at' (the step, or None)."""
    w = toy.w_ref.clone().requires_grad_(True)
    with torch.no_grad():
        ref = log_probs(toy.w_ref, toy.x_train, toy.phi)
    idx = torch.arange(len(toy.y_train))
    curves = {
        k: []
        for k in ("step", "chosen_logratio", "rejected_logratio", "margin", "chosen_logp", "mass", "test_accuracy")
    }
    curves["diverged_at"] = None
    for step in range(steps + 1):
        logp = log_probs(w, toy.x_train, toy.phi)
        if curves["diverged_at"] is None and not bool(((logp - ref).abs() < DIVERGED).all()):
            curves["diverged_at"] = step
        if curves["diverged_at"] is not None:
            if step % log_every == 0 or step == steps:
                curves["step"].append(step)
                for k in list(curves)[1:-1]:
                    curves[k].append(float("nan"))
            continue
        if step % log_every == 0 or step == steps:
            with torch.no_grad():
                dw = (logp - ref)[idx, toy.y_train]
                dl = (logp - ref)[idx, toy.rejected]
                p = logp.exp()
                test_pred = log_probs(w, toy.x_test, toy.phi).argmax(-1)
                for k, v in (
                    ("step", step),
                    ("chosen_logratio", dw.mean()),
                    ("rejected_logratio", dl.mean()),
                    ("margin", (dw - dl).mean()),
                    ("chosen_logp", logp[idx, toy.y_train].mean()),
                    ("mass", (p[idx, toy.y_train] + p[idx, toy.rejected]).mean()),
                    ("test_accuracy", (test_pred == toy.y_test).float().mean()),
                ):
                    curves[k].append(float(v))
        if step == steps:
            break
        value = toy_loss(loss, logp, ref, toy, beta)
        (grad,) = torch.autograd.grad(value, w)
        with torch.no_grad():
            w -= lr * grad
    return curves
