"""Our GRPO-family policy losses equal TRL's GRPOTrainer._compute_loss on identical tensors for the grpo,
dr_grpo, dapo and bnpo aggregations (TRL is a test-only dependency; skipped without it)."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from mirl.losses.policy import clipped_policy_loss

grpo_mod = pytest.importorskip("trl.trainer.grpo_trainer")


class _Accel:
    num_processes = 1

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def reduce(x, reduction="sum"):
        return x


def trl_grpo_loss(loss_type, logps, old, ref, adv, mask, *, beta, eps_low, eps_high, importance, max_len):
    b, t = mask.shape
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=importance,
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=max_len,
        accelerator=_Accel(),
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
    )
    inputs = {
        "prompt_ids": torch.zeros(b, 2, dtype=torch.long),
        "prompt_mask": torch.ones(b, 2, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    return grpo_mod.GRPOTrainer._compute_loss(trainer, None, inputs)


def _tensors(seed=0, b=6, t=9):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, t, dtype=torch.long)
    for i in range(b):
        mask[i, : 2 + (i * 3) % (t - 1)] = 1
    logps = -torch.rand(b, t, generator=g, dtype=torch.float64) * 2
    old = logps + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)  # ratios well outside the clip range
    ref = logps + 0.2 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    return logps, old, ref, adv, mask


# TRL refuses sequence-level importance (GSPO) with the token-summing aggregations, so it pairs with grpo only
CASES = [(a, "token") for a in ("grpo", "dr_grpo", "dapo", "bnpo")] + [("grpo", "sequence")]


@pytest.mark.parametrize("agg,importance", CASES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_policy_loss_equals_trl(agg, beta, importance):
    logps, old, ref, adv, mask = _tensors()
    eps_low, eps_high = 0.2, 0.28
    expected = trl_grpo_loss(
        agg, logps, old, ref, adv, mask, beta=beta, eps_low=eps_low, eps_high=eps_high, importance=importance, max_len=9
    )
    ours, m = clipped_policy_loss(
        logps,
        old,
        adv,
        mask,
        clip_eps=eps_low,
        clip_eps_high=eps_high,
        beta=beta,
        ref_logps=ref,
        importance=importance,
        loss_agg=agg,
        max_completion_length=9,
    )
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-9)
    assert 0 < m["clip_fraction"] < 1
