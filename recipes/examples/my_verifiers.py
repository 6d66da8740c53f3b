"""Example custom verifiers: one of each kind rlkit accepts (see docs/verifiers.md).

Used by ``recipes/examples/custom_verifiers.yaml``. Try them directly:

    python recipes/examples/my_verifiers.py          # runs the examples below as doctests

Every verifier takes the completions (strings) plus any dataset columns it names, and returns one
``float`` per completion, or ``None`` where it does not apply.
"""

from __future__ import annotations

import asyncio
import re

from rewards import reward
from rewards.math import is_correct


@reward("concise_correct")
def concise_correct(completions: list[str], answer: list[str], max_words: int = 60, **kwargs) -> list[float]:
    """1.0 for a correct answer within ``max_words`` words, falling linearly to 0.5 at twice that;
    0.0 when wrong. Registered by name: list this file under ``reward.plugins``.

    >>> concise_correct(["so \\\\boxed{4}", "long " * 89 + "\\\\boxed{4}", "\\\\boxed{5}"], answer=["4"] * 3)
    [1.0, 0.75, 0.0]
    """
    out = []
    for text, gold in zip(completions, answer):
        if not is_correct(text, gold):
            out.append(0.0)
            continue
        words = len(text.split())
        over = min(max(words - max_words, 0) / max_words, 1.0)
        out.append(1.0 - 0.5 * over)
    return out


def no_repetition(completions: list[str], n: int = 4, **kwargs) -> list[float]:
    """A TRL reward function, unchanged (TRL's ``(completions, **kwargs)`` signature): the share of
    distinct word ``n``-grams, penalising loops. Referenced by path, and marked ``sandbox: true``
    in the recipe to show how untrusted verifiers run.

    >>> no_repetition(["a b c d e f", "go go go go go go"])
    [1.0, 0.0]
    """
    out = []
    for text in completions:
        words = text.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        out.append(1.0 if len(grams) <= 1 else (len(set(grams)) - 1) / (len(grams) - 1))
    return out


class ThinkingBudget:
    """A class verifier: ``__init__`` takes the YAML ``params``; ``setup()`` runs once per worker
    before the first call (load a judge model, read a word list, compile patterns); then each
    call scores a batch. -1 for more than ``budget`` words between ``<think>`` tags, else 0.

    >>> v = ThinkingBudget(budget=3); v.setup()
    >>> v(["<think>a b</think> 4", "<think>a b c d</think> 4", "4"])
    [0.0, -1.0, None]
    """

    def __init__(self, budget: int = 50) -> None:
        self.budget = budget
        self.pattern: re.Pattern[str] | None = None

    def setup(self) -> None:
        self.pattern = re.compile(r"<think>(.*?)</think>", re.S)

    def __call__(self, completions: list[str], **kwargs) -> list[float | None]:
        out: list[float | None] = []
        for text in completions:
            match = self.pattern.search(text)
            if match is None:
                out.append(None)  # no thinking block: the budget does not apply
            else:
                out.append(-1.0 if len(match.group(1).split()) > self.budget else 0.0)
        return out


async def has_units(completions: list[str], **kwargs) -> list[float]:
    """An async verifier (e.g. one that awaits a judge API): rlkit awaits it for you.

    >>> asyncio.run(has_units(["12 apples", "12"]))
    [1.0, 0.0]
    """

    async def one(text: str) -> float:
        await asyncio.sleep(0)  # stands in for an HTTP call to a judge
        return 1.0 if re.search(r"\d+\s*[a-zA-Z]{2,}", text) else 0.0

    return list(await asyncio.gather(*(one(t) for t in completions)))


if __name__ == "__main__":
    import doctest

    print(doctest.testmod())
