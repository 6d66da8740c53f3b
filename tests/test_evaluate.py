"""Evaluation helpers: unbiased pass@k and the results table."""

import pytest

from rlkit.tools.evaluate import format_table, pass_at_k


def test_pass_at_k_hand_numbers():
    # n=4 samples, c=1 correct: pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0  # n - c < k: every pair holds a correct one


def test_format_table_percentages_and_counts():
    out = format_table({"before": {"accuracy": 0.25, "tokens_mean": 40.0}, "after": {"accuracy": 0.5, "tokens_mean": 20.0}})
    lines = out.splitlines()
    assert "before" in lines[0] and "after" in lines[0]
    assert "25.0%" in lines[1] and "50.0%" in lines[1]
    assert "40.0" in lines[2] and "20.0" in lines[2]
