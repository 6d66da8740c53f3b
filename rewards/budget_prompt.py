"""Token budgets written into prompts (L1 / LCPO prompt augmentation, docs/algorithms.md §6f). Plain Python.

Each prompt gets a budget ``n_gold`` drawn from a configurable prior and a *kind* (``exact`` or
``max``), and the budget is written into the prompt with a template::

    p = BudgetPromptParams(prior="uniform", low=100, high=4000)
    a = sample_budget(p, seed=0, step=3, prompt_key=17)      # same (seed, step, key) -> same a
    messages = apply_budget(messages, a, p)                   # last user message gets the text

The draw depends only on ``(seed, step, prompt_key)`` (a string-seeded ``random.Random``, which
hashes with SHA-512), so resumed runs and different worker counts give the same budgets. The
L1-Exact phrasing ``"Think for {budget} tokens."`` is from the paper notes [SECONDARY]; the
L1-Max phrasing and the blank line before both are [INFERRED] (the exact wording was not verified).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rewards.length import build_dataclass

__all__ = [
    "BudgetAssignment",
    "BudgetPromptParams",
    "apply_budget",
    "budget_params",
    "sample_budget",
    "sample_budgets",
]


@dataclass(frozen=True)
class BudgetPromptParams:
    """Budget prior and prompt templates (proposed config block ``data.budget``).

    Attributes:
        prior: ``uniform`` integers in ``[low, high]`` (L1: U{100..4000}); ``log_uniform`` in
            ``[low, high]`` (more short budgets); ``choice`` among ``choices`` (``weights``
            optional); ``fixed`` always ``low``.
        low, high: bounds of the uniform / log-uniform priors (inclusive).
        choices, weights: support and (unnormalised) probabilities of the ``choice`` prior.
        multiple_of: round the draw to a multiple of this (>= ``multiple_of``).
        template: ``exact`` phrasing; ``{prompt}`` and ``{budget}`` fields.
        max_template: ``max`` phrasing (L1-Max).
        max_prob: probability that a prompt gets the ``max`` kind (0 = all exact; L1's second
            stage mixes both).
    """

    prior: Literal["uniform", "log_uniform", "choice", "fixed"] = "uniform"
    low: int = 100
    high: int = 4000
    choices: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()
    multiple_of: int = 1
    template: str = "{prompt}\n\nThink for {budget} tokens."
    max_template: str = "{prompt}\n\nThink for maximum {budget} tokens."
    max_prob: float = 0.0

    def __post_init__(self) -> None:
        if self.prior not in ("uniform", "log_uniform", "choice", "fixed"):
            raise ValueError(
                f"budget prior {self.prior!r} is unknown; valid: uniform, log_uniform, choice, fixed"
            )
        if self.prior in ("uniform", "log_uniform", "fixed") and not 1 <= self.low <= self.high:
            raise ValueError(f"budget bounds need 1 <= low <= high, got low={self.low}, high={self.high}")
        if self.prior == "choice":
            if not self.choices or any(int(c) < 1 for c in self.choices):
                raise ValueError("budget prior 'choice' needs non-empty positive `choices`")
            if self.weights and (
                len(self.weights) != len(self.choices) or min(self.weights) < 0 or sum(self.weights) <= 0
            ):
                raise ValueError("budget `weights` must match `choices` in length, be >= 0 and not all 0")
        if self.multiple_of < 1:
            raise ValueError(f"budget multiple_of must be >= 1, got {self.multiple_of}")
        if not 0.0 <= self.max_prob <= 1.0:
            raise ValueError(f"budget max_prob must be in [0, 1], got {self.max_prob}")
        for name in ("template", "max_template"):
            t = getattr(self, name)
            if "{budget}" not in t or "{prompt}" not in t:
                raise ValueError(f"budget {name} must contain '{{prompt}}' and '{{budget}}', got {t!r}")


def budget_params(config: Mapping[str, Any] | None) -> BudgetPromptParams:
    """:class:`BudgetPromptParams` from a config dict; unknown keys name the nearest field."""
    config = dict(config or {})
    for key in ("choices", "weights"):
        if key in config:
            config[key] = tuple(config[key])
    return build_dataclass(BudgetPromptParams, config, "data.budget")


@dataclass(frozen=True)
class BudgetAssignment:
    """One prompt's budget (tokens) and phrasing kind (``exact`` | ``max``)."""

    budget: int
    kind: Literal["exact", "max"] = "exact"


def _draw(p: BudgetPromptParams, rng: random.Random) -> int:
    if p.prior == "fixed":
        return p.low
    if p.prior == "uniform":
        return rng.randint(p.low, p.high)
    if p.prior == "log_uniform":
        return min(p.high, max(p.low, round(math.exp(rng.uniform(math.log(p.low), math.log(p.high))))))
    return int(rng.choices(p.choices, weights=p.weights or None, k=1)[0])


def sample_budget(p: BudgetPromptParams, *, seed: int, step: int, prompt_key: Any) -> BudgetAssignment:
    """Budget of one prompt, a pure function of ``(seed, step, prompt_key)``.

    >>> p = BudgetPromptParams(low=100, high=4000)
    >>> sample_budget(p, seed=0, step=1, prompt_key=5) == sample_budget(p, seed=0, step=1, prompt_key=5)
    True
    """
    rng = random.Random(f"rlkit.budget:{seed}:{step}:{prompt_key}")
    budget = _draw(p, rng)
    if p.multiple_of > 1:
        budget = max(p.multiple_of, round(budget / p.multiple_of) * p.multiple_of)
    kind: Literal["exact", "max"] = "max" if rng.random() < p.max_prob else "exact"
    return BudgetAssignment(int(budget), kind)


def sample_budgets(
    p: BudgetPromptParams, *, seed: int, step: int, prompt_keys: Sequence[Any]
) -> list[BudgetAssignment]:
    """:func:`sample_budget` for each key (e.g. each prompt's problem id in this step)."""
    return [sample_budget(p, seed=seed, step=step, prompt_key=k) for k in prompt_keys]


def apply_budget(
    prompt: str | list[dict[str, Any]], assignment: BudgetAssignment, p: BudgetPromptParams
) -> str | list[dict[str, Any]]:
    """Write the budget into a prompt: a string, or chat messages (the last user message).

    >>> apply_budget("2+2?", BudgetAssignment(500), BudgetPromptParams())
    '2+2?\\n\\nThink for 500 tokens.'
    >>> apply_budget([{"role": "user", "content": "2+2?"}], BudgetAssignment(50, "max"), BudgetPromptParams())
    [{'role': 'user', 'content': '2+2?\\n\\nThink for maximum 50 tokens.'}]
    """
    template = p.max_template if assignment.kind == "max" else p.template
    if isinstance(prompt, str):
        return template.format(prompt=prompt, budget=assignment.budget)
    messages = [dict(m) for m in prompt]
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise ValueError("apply_budget: the chat prompt has no user message to write the budget into")
    i = users[-1]
    content = messages[i].get("content")
    if not isinstance(content, str):
        raise ValueError(
            f"apply_budget: the last user message content must be a string, got {type(content).__name__}"
        )
    messages[i]["content"] = template.format(prompt=content, budget=assignment.budget)
    return messages
