"""Tests for the built-in prompt generators and their `load_rows` sources."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from rlkit.infra.data import DataError, load_rows
from rlkit.infra.generators import evaluate_terms, generate_arithmetic

HAS_REASONING_GYM = importlib.util.find_spec("reasoning_gym") is not None

_NUMBERS = re.compile(r"\d+")


def _eval_expression(prompt: str) -> int:
    """Evaluate 'What is 3 + (-2) * 4?' with Python itself (an independent reference)."""
    match = re.fullmatch(r"What is ([-+*() \d]+)\?", prompt)
    assert match, prompt
    return int(eval(match.group(1), {"__builtins__": {}}))  # digits/ops/parens only


def _word_answer(prompt: str) -> int:
    """Word problems hold two numbers; adding or removing is told by the story's verb."""
    a, b = (int(x) for x in _NUMBERS.findall(prompt))
    removes = any(w in prompt for w in ("gives", "takes", "used", "removes"))
    return a - b if removes else a + b


def test_arithmetic_deterministic_and_seed_dependent() -> None:
    assert generate_arithmetic(50, seed=7) == generate_arithmetic(50, seed=7)
    assert generate_arithmetic(50, seed=7) != generate_arithmetic(50, seed=8)
    assert generate_arithmetic(0) == []


def test_arithmetic_word_problem_answers_are_correct() -> None:
    rows = generate_arithmetic(300, seed=0)
    assert all(set(r) == {"prompt", "answer"} for r in rows)
    assert all(not r["prompt"].startswith("What is") for r in rows)
    assert all(int(r["answer"]) == _word_answer(r["prompt"]) for r in rows)
    assert all(int(r["answer"]) >= 0 for r in rows)
    assert len({r["prompt"] for r in rows}) == 300  # no duplicate prompts


@pytest.mark.parametrize("kwargs", [
    {"word_problems": False},
    {"n_terms": 4, "ops": ("+", "-", "*"), "word_problems": False},
    {"ops": ("*",), "max_value": 12},
    {"n_terms": 3, "min_value": -20, "max_value": 20, "allow_negative": True, "word_problems": False},
    {"n_terms": 4, "ops": ("-",), "min_value": 1, "max_value": 30, "word_problems": False},
])
def test_arithmetic_expression_answers_match_eval(kwargs: dict) -> None:
    rows = generate_arithmetic(200, seed=1, **kwargs)
    assert all(r["prompt"].startswith("What is") for r in rows)
    assert all(int(r["answer"]) == _eval_expression(r["prompt"]) for r in rows)
    if not kwargs.get("allow_negative"):
        assert all(int(r["answer"]) >= 0 for r in rows)
    values = [int(x) for r in rows for x in re.findall(r"-?\d+", r["prompt"])]
    assert min(values) >= kwargs.get("min_value", 1) and max(values) <= kwargs.get("max_value", 99)


def _story_answer(prompt: str) -> tuple[int, list[int]]:
    """A multi-step story read sentence by sentence: the opening's number, then each step's number
    added or removed by its verb. Returns the answer and the running totals."""
    sentences = [x for x in re.split(r"(?<=[.?])\s+", prompt) if x]
    assert sentences[-1].startswith("How many"), prompt
    total = int(_NUMBERS.findall(sentences[0])[0])
    totals = [total]
    for sentence in sentences[1:-1]:
        (n,) = (int(x) for x in _NUMBERS.findall(sentence))
        adds = any(w in sentence for w in ("buys", "finds", "gives her", "gives him", "wins"))
        removes = any(w in sentence for w in (" to a friend", "uses", "loses", "sells"))
        assert adds != removes, sentence
        total += n if adds else -n
        totals.append(total)
    return total, totals


@pytest.mark.parametrize("n_terms", [3, 4, 5])
def test_arithmetic_multi_step_stories(n_terms: int) -> None:
    rows = generate_arithmetic(300, seed=3, n_terms=n_terms, min_value=1, max_value=30)
    assert len({r["prompt"] for r in rows}) == 300
    for r in rows:
        answer, totals = _story_answer(r["prompt"])
        assert len(totals) == n_terms  # one sentence per step
        assert int(r["answer"]) == answer and min(totals) >= 0  # never gives away more than there is
    steps = [s for r in rows for s in re.split(r"(?<=[.])\s+", r["prompt"])[1:-1]]
    assert any("buys" in s for s in steps) and any("loses" in s for s in steps)
    # two-term rows are what they were before multi-step stories existed (the same draws and words)
    assert generate_arithmetic(2, seed=0, max_value=30) == [
        {"prompt": "A box holds 28 pencils. Mia removes 13 pencils. How many pencils are still in the box?",
         "answer": "15"},
        {"prompt": "There are 30 coins on the table. Ravi takes 13 of them. How many coins are left on the table?",
         "answer": "17"}]


def test_arithmetic_negative_answers_when_allowed() -> None:
    rows = generate_arithmetic(200, seed=2, ops=("-",), word_problems=False, allow_negative=True)
    assert any(int(r["answer"]) < 0 for r in rows)


def test_arithmetic_tiny_space_allows_duplicates() -> None:
    rows = generate_arithmetic(20, seed=0, min_value=1, max_value=1, ops=("*",))
    assert rows == [{"prompt": "What is 1 * 1?", "answer": "1"}] * 20


def test_arithmetic_validates_arguments() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        generate_arithmetic(3, n_terms=3, ops=("-",), min_value=5, max_value=9)
    with pytest.raises(ValueError, match="ops"):
        generate_arithmetic(3, ops=("/",))
    with pytest.raises(ValueError, match="min_value"):
        generate_arithmetic(3, min_value=5, max_value=1)
    with pytest.raises(ValueError, match="n_terms"):
        generate_arithmetic(3, n_terms=1)


def test_evaluate_terms_precedence() -> None:
    assert evaluate_terms([2, 3, 4, 5], ["*", "+", "*"]) == 26
    assert evaluate_terms([10, 2, 3], ["-", "*"]) == 4


def test_arithmetic_source_via_load_rows() -> None:
    rows, stats = load_rows("arithmetic", seed=5, generator_kwargs={"size": 40, "n_terms": 3})
    assert stats["rows"] == 40 and stats["skipped"] == 0
    assert rows == generate_arithmetic(40, seed=5, n_terms=3)
    assert len(load_rows("arithmetic", limit=7)[0]) == 7  # size defaults to limit
    with pytest.raises(DataError, match="bad generator_kwargs"):
        load_rows("arithmetic", generator_kwargs={"size": 3, "colour": "red"})
    with pytest.raises(DataError, match="may not set"):
        load_rows("arithmetic", generator_kwargs={"seed": 3})


@pytest.mark.skipif(not HAS_REASONING_GYM, reason="reasoning_gym is not installed")
def test_reasoning_gym_source() -> None:
    kwargs = {"task": "basic_arithmetic", "size": 8, "min_terms": 2, "max_terms": 3}
    rows, stats = load_rows("reasoning_gym", seed=3, generator_kwargs=kwargs)
    assert stats["rows"] == 8
    assert rows == load_rows("reasoning_gym", seed=3, generator_kwargs=kwargs)[0]
    for row in rows:
        assert set(row) == {"prompt", "answer", "metadata"}
        assert isinstance(row["prompt"], str) and row["prompt"]
        assert isinstance(row["answer"], str)
        meta = json.loads(row["metadata"])
        assert meta["source_dataset"] == "basic_arithmetic"
        assert 2 <= meta["num_terms"] <= 3


@pytest.mark.skipif(not HAS_REASONING_GYM, reason="reasoning_gym is not installed")
def test_reasoning_gym_errors() -> None:
    with pytest.raises(DataError, match="needs generator_kwargs"):
        load_rows("reasoning_gym", generator_kwargs={"size": 2})
    with pytest.raises(ValueError, match="no_such_task"):
        load_rows("reasoning_gym", generator_kwargs={"task": "no_such_task", "size": 2})


def test_arithmetic_mixed_step_counts() -> None:
    rows = generate_arithmetic(300, seed=4, n_terms=[2, 3], min_value=1, max_value=10)
    counts = [len(_NUMBERS.findall(r["prompt"])) for r in rows]
    assert set(counts) == {2, 3} and 0.3 < counts.count(3) / len(counts) < 0.7
    for r, c in zip(rows, counts):
        answer = _story_answer(r["prompt"])[0] if c == 3 else _word_answer(r["prompt"])
        assert int(r["answer"]) == answer
    # a one-element list is the plain int (the same draws)
    assert generate_arithmetic(20, seed=4, n_terms=[3]) == generate_arithmetic(20, seed=4, n_terms=3)
    for bad in ([], [2, 1], ["3"]):
        with pytest.raises(ValueError, match="n_terms must be >= 2"):
            generate_arithmetic(3, n_terms=bad)
