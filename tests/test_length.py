"""DAPO soft overlong punishment, docs/algorithms.md §6e worked example (L_max 20480, L_cache 4096)."""

import pytest

from rewards.length import dapo_overlong_penalty


@pytest.mark.parametrize("length,expected", [(16000, 0.0), (16384, 0.0), (18432, -0.5), (20480, -1.0), (30000, -1.0)])
def test_dapo_overlong_worked_example(length, expected):
    assert dapo_overlong_penalty(length, max_len=20480, buffer_len=4096) == pytest.approx(expected, abs=1e-9)


def test_penalty_factor_scales():
    assert dapo_overlong_penalty(18432, max_len=20480, buffer_len=4096, penalty_factor=0.5) == pytest.approx(-0.25)
