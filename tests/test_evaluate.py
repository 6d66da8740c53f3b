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


def test_format_rate_does_not_count_the_templates_example_box():
    """Answers are scored by a fixed generator: the math verifier and format rate see exactly these texts."""
    from rlkit.config import load_config
    from rlkit.tools.evaluate import evaluate_rows
    from rollout.engine import Completion

    cfg = load_config("recipes/multistep.yaml")
    assert "\\boxed{{answer}}" in cfg.data.prompt_template
    texts = ["so \\boxed{answer}.", "4 + 3 = 7, \\boxed{7}", "it is 7", "\\boxed{9}"]
    rows = [{"prompt": f"q{i}", "answer": "7"} for i in range(len(texts))]

    def generate(requests):
        return [Completion(prompt_ids=r.prompt_ids, token_ids=[1] * (i + 1), logprobs=[0.0] * (i + 1),
                           finish_reason="stop", text=texts[r.group_id]) for i, r in enumerate(requests)]

    res = evaluate_rows(cfg, rows, lambda r: [0], generate)
    assert res["format_rate"] == pytest.approx(0.5)  # \boxed{7} and \boxed{9}; not \boxed{answer}
    assert res["accuracy"] == pytest.approx(0.5)  # "7" boxed and unboxed
