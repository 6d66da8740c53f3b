"""Loss aggregation modes (docs/algorithms.md §0): hand-computed values and micro-batch invariance."""

from __future__ import annotations

import pytest
import torch

from rlkit.algorithms import AGGREGATIONS, aggregate, masked_mean

F64 = torch.float64
MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]

# loss [[1, 2, 9], [3, 9, 9], [9, 9, 9]] with lengths [2, 1, 0] (9 = padding, must be ignored)
LOSS = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0], [9.0, 9.0, 9.0]], dtype=F64)
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", 2.0),  # (1 + 2 + 3) / 3 tokens
        # (1.5 + 3) / 2 sequences = 2.25: the empty row (a filtered truncated sample) is no sequence
        ("seq-mean-token-mean", 2.25),
        ("seq-mean-token-sum", 3.0),  # (3 + 3) / 2 sequences
        ("seq-mean-token-sum-norm", 1.0),  # (1 + 2 + 3) / 2 sequences / T = 6 / 2 / 3
    ],
)
def test_modes_by_hand(mode: str, expected: float) -> None:
    assert aggregate(LOSS, MASK, mode).item() == pytest.approx(expected, abs=1e-12)


def test_explicit_divisors() -> None:
    assert aggregate(LOSS, MASK, "token-mean", num_tokens=12).item() == pytest.approx(0.5)  # 6 / 12
    assert aggregate(LOSS, MASK, "seq-mean-token-mean", num_seqs=2).item() == pytest.approx(2.25)  # 4.5/2
    assert aggregate(LOSS, MASK, "seq-mean-token-sum", num_seqs=torch.tensor(4.0)).item() == pytest.approx(
        1.5
    )
    assert aggregate(LOSS, MASK, "seq-mean-token-sum-norm", norm_length=4096).item() == pytest.approx(
        6 / 2 / 4096
    )


@pytest.mark.parametrize("mode", MODES)
def test_all_padding_gives_zero_not_nan(mode: str) -> None:
    loss = torch.randn(2, 4)
    out = aggregate(loss, torch.zeros(2, 4), mode)
    assert out.item() == 0.0


def test_unknown_mode_and_shape_mismatch() -> None:
    with pytest.raises(KeyError, match="Did you mean 'token-mean'"):
        aggregate(LOSS, MASK, "token_mean")
    with pytest.raises(ValueError):
        aggregate(LOSS, MASK[:, :2], "token-mean")
    assert AGGREGATIONS.names() == sorted(MODES)


def _random_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    B, T = 7, 6
    lengths = torch.tensor([6, 3, 0, 1, 5, 2, 4])  # row 2 fully masked
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(F64)
    loss = torch.randn(B, T, generator=g, dtype=F64)
    return loss, mask


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("splits", [[7], [2, 1, 4], [1] * 7, [3, 4]])
def test_micro_batch_invariance(mode: str, splits: list[int]) -> None:
    loss, mask = _random_batch(0)
    B, T = loss.shape
    full = aggregate(loss, mask, mode)
    globals_ = dict(num_tokens=mask.sum(), num_seqs=int((mask.sum(-1) > 0).sum()), norm_length=T)
    total = torch.zeros((), dtype=F64)
    start = 0
    for size in splits:
        mb_loss, mb_mask = loss[start : start + size], mask[start : start + size]
        # each micro-batch is re-padded to its own longest response, as a packer would do
        t = max(int(mb_mask.sum(-1).max().item()), 1)
        part = aggregate(mb_loss[:, :t], mb_mask[:, :t], mode, **globals_)
        assert torch.isfinite(part)
        total = total + part
        start += size
    torch.testing.assert_close(total, full, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_micro_batch_gradients_match(mode: str) -> None:
    loss, mask = _random_batch(1)
    B, T = loss.shape
    full_leaf = loss.clone().requires_grad_(True)
    aggregate(full_leaf, mask, mode).backward()
    mb_leaf = loss.clone().requires_grad_(True)
    for sl in (slice(0, 3), slice(3, 7)):
        aggregate(mb_leaf[sl], mask[sl], mode, num_tokens=mask.sum(), num_seqs=(mask.sum(-1) > 0).sum(),
                  norm_length=T).backward()
    torch.testing.assert_close(mb_leaf.grad, full_leaf.grad, atol=1e-12, rtol=0)


def test_masked_mean() -> None:
    # (1 + 2 + 3) / 3 = 2; empty mask -> 0
    assert masked_mean(LOSS, MASK).item() == pytest.approx(2.0)
    assert masked_mean(LOSS, torch.zeros_like(MASK)).item() == 0.0
    assert masked_mean(LOSS, MASK.bool()).item() == pytest.approx(2.0)
