"""Our pair losses equal TRL's DPOTrainer on identical log-prob tensors (TRL is a test-only dependency).

TRL computes its loss inline in DPOTrainer._compute_loss; we call that method on a stand-in trainer
whose model returns the per-token log-probs we chose, so the real TRL arithmetic runs unchanged.
TRL's "nca_pair" loss is algebraically MIO: -logsig(T_w) - 1/2 logsig(-T_w) - 1/2 logsig(-T_l).
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from mirl.losses import get_loss

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")


class _Accel:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def trl_loss(loss_type, per_token, completion_mask, ref_chosen, ref_rejected, beta, label_smoothing=0.0):
    b, t = completion_mask.shape

    def fake_model(**kw):
        return SimpleNamespace(
            log_probs=per_token,
            entropy=torch.zeros(b, t - 1),
            mean_logits=torch.zeros(b, t - 1),
            is_top1=torch.zeros(b, t - 1, dtype=torch.bool),
        )

    fake_model.training = True
    trainer = SimpleNamespace(
        model=fake_model,
        accelerator=_Accel(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(),
    )
    inputs = {
        "input_ids": torch.zeros(b, t, dtype=torch.long),
        "attention_mask": torch.ones(b, t, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return trl_dpo.DPOTrainer._compute_loss(trainer, fake_model, inputs, return_outputs=False)


@pytest.mark.parametrize(
    "ours,theirs,opts",
    [
        ("dpo", "sigmoid", {}),
        ("ipo", "ipo", {}),
        ("hinge", "hinge", {}),
        ("robust", "robust", {"label_smoothing": 0.2}),
        ("mio", "nca_pair", {}),
    ],
)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_pair_losses_equal_trl(ours, theirs, opts, beta):
    g = torch.Generator().manual_seed(0)
    n, t = 6, 12
    completion_mask = torch.zeros(2 * n, t, dtype=torch.long)
    for i in range(2 * n):  # ragged completions after a prompt of 3 tokens
        completion_mask[i, 3 : 3 + 2 + (i * 5) % 8] = 1
    shift = completion_mask[:, 1:].to(torch.float64)
    per_token = -torch.rand(2 * n, t - 1, generator=g, dtype=torch.float64) * 3 * shift
    ref = per_token.sum(1) + torch.randn(2 * n, generator=g, dtype=torch.float64)
    ref_c, ref_r = ref[:n], ref[n:]
    expected = trl_loss(theirs, per_token, completion_mask, ref_c, ref_r, beta, opts.get("label_smoothing", 0.0))
    seq, lengths = per_token.sum(1), shift.sum(1)
    loss, _ = get_loss(ours)(
        seq[:n], seq[n:], ref_c, ref_r, beta=beta, chosen_lengths=lengths[:n], rejected_lengths=lengths[n:], **opts
    )
    torch.testing.assert_close(loss.mean(), expected, rtol=1e-6, atol=0)
