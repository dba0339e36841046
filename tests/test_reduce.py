"""The named reduction: hand values per mode; split batch with a global count equals the whole batch."""

import pytest
import torch

from mirl.losses import masked_reduce, mean_over_examples

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


def test_modes_by_hand():
    assert masked_reduce(LOSS, MASK, "token_mean").item() == pytest.approx((1 + 2 + 4 + 5 + 6) / 5)
    assert masked_reduce(LOSS, MASK, "seq_mean").item() == pytest.approx((1.5 + 5.0) / 2)
    assert masked_reduce(LOSS, MASK, "seq_sum").item() == pytest.approx((3 + 15) / 2)
    assert masked_reduce(LOSS, MASK, "constant", constant=4).item() == pytest.approx((3 / 4 + 15 / 4) / 2)
    with pytest.raises(ValueError, match="valid: token_mean"):
        masked_reduce(LOSS, MASK, "mean")
    with pytest.raises(ValueError, match="positive constant"):
        masked_reduce(LOSS, MASK, "constant")


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean", "seq_sum"])
def test_split_batch_with_global_count_equals_whole(mode):
    whole = masked_reduce(LOSS, MASK, mode)
    count = MASK.sum() if mode == "token_mean" else 2
    parts = sum(masked_reduce(LOSS[i : i + 1], MASK[i : i + 1], mode, global_count=count) for i in range(2))
    assert parts.item() == pytest.approx(whole.item())


def test_mean_over_examples():
    x = torch.tensor([1.0, 2.0, 6.0])
    assert mean_over_examples(x).item() == pytest.approx(3.0)
    assert (mean_over_examples(x[:1], global_count=3) + mean_over_examples(x[1:], global_count=3)).item() == 3.0
