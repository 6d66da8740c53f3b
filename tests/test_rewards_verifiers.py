"""Built-in verifiers: math (math-verify), format, think_format."""

from __future__ import annotations

import threading

import pytest

from rewards.format import boxed_format_reward, find_boxed, has_boxed, think_format_reward
from rewards.math import extract_answer, math_reward


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("The answer is \\boxed{42}", "42", 1.0),
        ("so 41", "42", 0.0),
        ("3 + 14 = 17", "17", 1.0),
        ("We get $\\frac{1}{2}$", "0.5", 1.0),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
        ("\\boxed{0.5}", "$\\frac{1}{2}$", 1.0),
        ("boxed wins: \\boxed{3}, not 4", "3", 1.0),
        ("", "42", 0.0),
        (None, "42", 0.0),
        ("no numbers here", "42", 0.0),
    ],
)
def test_math_reward(completion, answer, expected):
    assert math_reward([completion], answer=[answer]) == [expected]


def test_math_reward_require_boxed():
    texts = ["3 + 14 = 17", "\\boxed{17}", "so 17 \\boxed{16}", "\\boxed{16} no, \\boxed{17}", "\\boxed{17"]
    assert math_reward(texts, answer=["17"] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]  # lenient: first box, else last number
    assert math_reward(texts, answer=["17"] * 5, require_boxed=True) == [0.0, 1.0, 0.0, 1.0, 0.0]


def test_require_boxed_reaches_the_verifier_through_the_reward_manager():
    from rewards import RewardManager, VerifierSpec

    # process mode: the params travel to the verifier's worker process
    with RewardManager([VerifierSpec("math", params={"require_boxed": True})], mode="process") as rm:
        _, _, per = rm.score(["17", "\\boxed{17}"], {"answer": ["17", "17"]})
    assert per["math"] == [0.0, 1.0]


def test_math_reward_missing_gold_is_none_and_lengths_checked():
    assert math_reward(["\\boxed{1}"], answer=[None]) == [None]
    with pytest.raises(ValueError):
        math_reward(["1", "2"], answer=["1"])


def test_math_reward_off_main_thread():
    # math-verify's signal.alarm timeouts raise off the main thread; we must disable them there.
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", math_reward(["\\boxed{5}", "6"], answer=[5, 5])))
    t.start()
    t.join()
    assert box["r"] == [1.0, 0.0]


def test_extract_answer():
    assert extract_answer("so \\boxed{12}") == "12"
    assert extract_answer("first 3, then 17") == "17"
    assert extract_answer("nothing") is None


def test_format_reward_and_helpers():
    completions = ["\\boxed{7}", "\\boxed{7} \\boxed{8}", "\\boxed{}", "\\boxed{7", "7", "\\boxed{x^{2}}"]
    assert boxed_format_reward(completions) == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert find_boxed("\\boxed{a{b}c}") == ["a{b}c"]
    assert has_boxed("x \\boxed{1}") and not has_boxed("\\boxed{ }")


def test_format_refuses_a_copied_placeholder_box():
    """The prompt asks for \\boxed{answer}; a model that writes exactly that has given no answer."""
    from rewards import resolve
    from rewards.format import template_placeholders

    texts = ["so \\boxed{answer}.", "\\boxed{ Answer }", "\\boxed{12}", "\\boxed{answer} \\boxed{12}"]
    assert boxed_format_reward(texts) == [1.0, 1.0, 1.0, 0.0]  # without placeholders: any one box
    assert boxed_format_reward(texts, placeholders=["answer"]) == [0.0, 0.0, 1.0, 0.0]
    assert resolve("format", {"placeholders": ["answer"]})(texts) == [0.0, 0.0, 1.0, 0.0]  # as a recipe sets it
    with pytest.raises(TypeError, match="list of strings"):
        resolve("format", {"placeholders": "answer"})
    with pytest.raises(TypeError, match="cannot build BoxedFormat"):
        resolve("format", {"placeholder": ["answer"]})  # misspelt: refused, not silently ignored
    assert [has_boxed(t, ["answer"]) for t in texts] == [False, False, True, True]
    marks = template_placeholders("{prompt}\nThink briefly, then give the final number as \\boxed{{answer}}.")
    assert marks == {"answer"}
    assert template_placeholders("{prompt} Put it in \\boxed{{}}.") == set() and template_placeholders(None) == set()


def test_think_format_reward():
    completions = [
        "<think>2+2 is 4</think>\n\\boxed{4}",
        "<think>a</think><think>b</think> 4",
        "4 <think>late</think>",
        "<think>no answer</think>   ",
        "<think>\n\n</think> 4",
    ]
    assert think_format_reward(completions) == [1.0, 0.0, 0.0, 0.0, 0.0]
