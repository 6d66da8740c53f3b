"""Math answer checking with math-verify (HF's ``math_verify``): boxed, LaTeX, last number.

The gold answer is wrapped in ``$...$`` unless it already carries LaTeX delimiters, so plain numbers
and bare LaTeX (``\\frac{1}{2}``) both parse. The completion is parsed in two stages: LaTeX with
``\\boxed{}`` at top priority, then (only if nothing was found) plain expressions/numbers, rightmost
first. math-verify's own ranking would put plain LaTeX and the last number in one priority group.

math-verify enforces its timeouts with ``signal.alarm``, which raises outside the main thread and
would clobber an outer ``ITIMER_REAL`` deadline. We pass its timeouts only when called from the main
thread with no interval timer armed; otherwise we pass ``None`` and rely on the caller
(:class:`rewards.RewardManager` kills worker processes past their deadline). ``math_verify`` is
imported lazily so ``import rewards`` stays light.
"""

from __future__ import annotations

import logging
import signal
import threading
from functools import lru_cache
from typing import Any

from rewards.format import last_boxed
from rewards.registry import completion_text, reward

PARSE_TIMEOUT_S = 5
VERIFY_TIMEOUT_S = 5
_LATEX_DELIMS = ("$", "\\(", "\\[", "\\boxed", "\\begin{")


def _mv() -> Any:
    import math_verify

    if not _FILTER_INSTALLED:
        _install_log_filter()
    return math_verify


_FILTER_INSTALLED = False


def _install_log_filter() -> None:
    """Drop math-verify's "Timeout is disabled" warning: we disable its alarm on purpose (see the
    module docstring) and the caller enforces the deadline."""
    global _FILTER_INSTALLED
    _FILTER_INSTALLED = True

    def _keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_keep)


def _alarm_timeout(seconds: int) -> int | None:
    """``seconds`` if math-verify may use ``signal.alarm`` here, else None (no internal timeout)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if hasattr(signal, "getitimer") and signal.getitimer(signal.ITIMER_REAL)[0] > 0:
        return None  # an outer deadline (e.g. RewardManager inline mode) owns the alarm
    return seconds


@lru_cache(maxsize=4)
def _pred_configs() -> tuple[list[Any], list[Any]]:
    mv = _mv()
    return [mv.LatexExtractionConfig(boxed_match_priority=0)], [mv.ExprExtractionConfig()]


def _parse_prediction(text: str, fallback: bool = False) -> list[Any]:
    """Two-stage parse: boxed/LaTeX first, then plain expressions and numbers."""
    if not text or not text.strip():
        return []
    mv = _mv()
    mode = "first_match" if fallback else "no_fallback"
    for config in _pred_configs():
        parsed = mv.parse(text, config, fallback_mode=mode, parsing_timeout=_alarm_timeout(PARSE_TIMEOUT_S))
        if parsed:
            return parsed
    return []


def _gold_text(answer: Any) -> str:
    text = str(answer).strip()
    if any(d in text for d in _LATEX_DELIMS):
        return text
    return f"${text}$"


def parse_gold(answer: Any) -> list[Any]:
    """Parse a dataset's gold answer (``"42"``, ``"\\\\frac{1}{2}"``, ``"$x^2$"``) with math-verify."""
    if answer is None or not str(answer).strip():
        return []
    mv = _mv()
    configs = [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()]
    return mv.parse(_gold_text(answer), configs, parsing_timeout=_alarm_timeout(PARSE_TIMEOUT_S))


def extract_answer(text: Any) -> str | None:
    """The answer a completion commits to (boxed, else LaTeX, else last number), as a string.

    >>> extract_answer("so x = 3, hence \\\\boxed{\\\\frac{1}{2}}")
    '\\\\frac{1}{2}'
    >>> extract_answer("12 apples, 17 pears") , extract_answer("no idea")
    ('17', None)
    """
    parsed = _parse_prediction(completion_text(text), fallback=True)
    if not parsed:
        return None
    strings = [p for p in parsed if isinstance(p, str)]
    return strings[-1] if strings else str(parsed[0])


def is_correct(completion: Any, answer: Any) -> bool:
    """True if math-verify finds the completion's answer equivalent to the gold ``answer``.

    >>> is_correct("The answer is \\\\boxed{42}", "42"), is_correct("so 41", 42)
    (True, False)
    """
    return _score_one(completion_text(completion), parse_gold(answer)) == 1.0


def _score_one(text: str, gold: list[Any]) -> float:
    if not gold:
        return 0.0
    pred = _parse_prediction(text)
    if not pred:
        return 0.0
    ok = _mv().verify(gold, pred, timeout_seconds=_alarm_timeout(VERIFY_TIMEOUT_S))
    return 1.0 if ok else 0.0


def math_reward(
    completions: list[Any], answer: list[Any], *, require_boxed: bool = False, **columns: Any
) -> list[float | None]:
    """1.0 where the completion's final answer equals the gold ``answer`` (math-verify), else 0.0.

    A row whose gold answer is ``None`` returns ``None`` (not applicable) instead of a score.
    ``require_boxed``: only the last well-formed ``\\boxed{}`` counts (no box scores 0), the
    DAPO/DeepScaleR convention; it keeps a length reward from trading the box away for tokens.

    >>> math_reward(["The answer is \\\\boxed{42}", "so 41", "x = 17", "$\\\\frac{1}{2}$"],
    ...             answer=["42", "42", "17", "0.5"])
    [1.0, 0.0, 1.0, 1.0]
    """
    if len(answer) != len(completions):
        raise ValueError(f"math_reward: {len(completions)} completions but {len(answer)} answers")
    gold_cache: dict[str, list[Any]] = {}  # GRPO groups repeat each gold answer many times
    out: list[float | None] = []
    for completion, gold_answer in zip(completions, answer):
        if gold_answer is None:
            out.append(None)
            continue
        key = str(gold_answer)
        if key not in gold_cache:
            gold_cache[key] = parse_gold(gold_answer)
        text = completion_text(completion)
        if require_boxed:
            boxed = last_boxed(text)
            if boxed is None:
                out.append(0.0)
                continue
            text = f"\\boxed{{{boxed}}}"
        out.append(_score_one(text, gold_cache[key]))
    return out


@reward("math")
class MathVerifier:
    """Registered form of :func:`math_reward`; ``setup()`` imports math-verify once per worker.

    >>> v = MathVerifier(); v.setup(); v(["\\\\boxed{6}"], answer=["6"])
    [1.0]
    >>> MathVerifier(require_boxed=True)(["so 6", "\\\\boxed{6}"], answer=["6", "6"])
    [0.0, 1.0]
    """

    def __init__(self, require_boxed: bool = False) -> None:
        self.require_boxed = bool(require_boxed)

    def setup(self) -> None:
        mv = _mv()
        _pred_configs()
        mv.verify(
            parse_gold("1"), parse_gold("1"), timeout_seconds=_alarm_timeout(VERIFY_TIMEOUT_S)
        )  # warm sympy paths

    def __call__(self, completions: list[Any], answer: list[Any], **columns: Any) -> list[float | None]:
        return math_reward(completions, answer, require_boxed=self.require_boxed, **columns)
