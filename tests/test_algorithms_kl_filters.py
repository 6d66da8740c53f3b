"""KL estimators (verl kl_penalty) and DAPO sampling filters (docs/algorithms.md §7.1)."""

from __future__ import annotations

import math

import pytest
import torch

from rlkit.algorithms import dynamic_sampling_keep_B, kl_penalty, overlong_filter_mask

F64 = torch.float64
# x = logp - ref = [0.5, -1.0, 0.0]
LOGP = torch.tensor([[-1.0, -2.0, -0.5]], dtype=F64)
REF = torch.tensor([[-1.5, -1.0, -0.5]], dtype=F64)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("k1", [0.5, -1.0, 0.0]),  # x
        ("kl", [0.5, -1.0, 0.0]),
        ("k2", [0.125, 0.5, 0.0]),  # 0.5 x^2 = 0.5 * 0.25, 0.5 * 1, 0
        ("mse", [0.125, 0.5, 0.0]),
        # k3 = e^{ref-lp} - (ref-lp) - 1: e^-0.5 + 0.5 - 1 = 0.106531; e^1 - 1 - 1 = 0.718282; 0
        ("k3", [0.10653066, 0.71828183, 0.0]),
        ("low_var_kl", [0.10653066, 0.71828183, 0.0]),
        ("abs", [0.5, 1.0, 0.0]),
    ],
)
def test_kl_by_hand(kind: str, expected: list[float]) -> None:
    got = kl_penalty(LOGP, REF, kind)
    torch.testing.assert_close(got, torch.tensor([expected], dtype=F64), atol=1e-6, rtol=0)


def test_k3_clamps() -> None:
    # ref - lp = 30 -> clamp 20 -> e^20 - 21 = 4.85e8 -> clamp 10
    # ref - lp = -30 -> clamp -20 -> e^-20 + 20 - 1 = 19.000000002 -> clamp 10
    # ref - lp = -5 (no clamp): e^-5 + 5 - 1 = 4.006738
    lp = torch.tensor([[0.0, 30.0, 5.0]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[30.0, 0.0, 0.0]], dtype=F64)
    got = kl_penalty(lp, ref, "k3")
    torch.testing.assert_close(
        got, torch.tensor([[10.0, 10.0, math.exp(-5) + 4.0]], dtype=F64), atol=1e-6, rtol=0
    )
    got.sum().backward()
    assert torch.isfinite(lp.grad).all()
    # d/dlp (e^{ref-lp} + lp - ref - 1) = 1 - e^{ref-lp} = 1 - e^-5 = 0.993262 on the unclamped token
    assert lp.grad[0, 2].item() == pytest.approx(1 - math.exp(-5), abs=1e-9)


def test_kl_unknown_kind() -> None:
    with pytest.raises(KeyError, match="Did you mean 'low_var_kl'"):
        kl_penalty(LOGP, REF, "low_var")


def test_dynamic_sampling_keep() -> None:
    # group 4: [1, 1, 0] varies -> keep; group 9: single response -> keep; group 2: [1, 1] -> drop;
    # group -1: [0.5, 0.5, 0.5] -> drop
    scores = torch.tensor([1.0, 1.0, 0.0, 0.5, 1.0, 1.0, 0.5, 0.5, 0.5])
    ids = torch.tensor([4, 4, 4, 9, 2, 2, -1, -1, -1])
    keep = dynamic_sampling_keep_B(scores, ids)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [True, True, True, True, False, False, False, False, False]
    # interleaved ids and integer (accuracy) scores
    keep2 = dynamic_sampling_keep_B(torch.tensor([1, 0, 1, 1]), torch.tensor([5, 6, 6, 5]))
    assert keep2.tolist() == [False, True, True, False]


def test_overlong_filter_mask() -> None:
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    truncated = torch.tensor([False, True, False])
    out = overlong_filter_mask(mask, truncated)
    assert out.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    assert out.dtype == mask.dtype
    assert mask[1].sum() == 3  # input untouched
