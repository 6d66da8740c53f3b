"""The length-shaping framework: batch context, shaper registry and base class.

The built-in shapers (docs/algorithms.md §6) and the ordered pipeline (``LengthShaping``,
``build_shaper``) live in :mod:`rewards.length`, which registers the built-ins on import. Plain
Python: no torch; the shared helpers come from :mod:`rlkit.common` (standard library only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from rlkit.common import Registry, build_dataclass, nearest

__all__ = ["SHAPERS", "LengthContext", "LengthShaper", "ShaperRegistry", "Warmup", "build_dataclass", "nearest",
           "register_shaper"]

# ----------------------------------------------------------------------------- batch context


@dataclass(frozen=True)
class LengthContext:
    """Everything a shaper may read about one step's batch; every sequence has length ``B``.

    Attributes:
        rewards: reward of each response after the verifiers (and any earlier shaper).
        correct: 1[answer correct], from the accuracy verifier (``reward >= 1``).
        lengths: response length in tokens (``len(completion.token_ids)``, EOS included).
        max_len: generation cap ``L_max`` (``engine.max_new_tokens``).
        group_ids: prompt-group index of each response (Kimi needs it).
        problem_ids: stable problem key across steps and resumes (HAPO-history needs it);
            stored as ``str(id)`` in the state.
        step: 1-based RL step (Kimi's warm-up reads it).
        budgets: token budget of each response's prompt (L1 and budget penalty need it).
        budget_kinds: ``"exact"`` or ``"max"`` per response (``l1_dual`` needs it).
    """

    rewards: Sequence[float]
    correct: Sequence[bool]
    lengths: Sequence[int]
    max_len: int
    group_ids: Sequence[int] | None = None
    problem_ids: Sequence[Any] | None = None
    step: int = 0
    budgets: Sequence[int | None] | None = None
    budget_kinds: Sequence[str] | None = None

    def __post_init__(self) -> None:
        B = len(self.rewards)
        for name in ("correct", "lengths", "group_ids", "problem_ids", "budgets", "budget_kinds"):
            value = getattr(self, name)
            if value is not None and len(value) != B:
                raise ValueError(
                    f"LengthContext.{name} has length {len(value)}, expected B={B} (len(rewards))"
                )
        if self.max_len < 1:
            raise ValueError(f"LengthContext.max_len must be >= 1, got {self.max_len}")
        if any(n < 0 for n in self.lengths):
            raise ValueError("LengthContext.lengths must be >= 0")

    def __len__(self) -> int:
        return len(self.rewards)

    def need(self, name: str, shaper: str) -> Sequence[Any]:
        """``getattr(self, name)``, or a ValueError saying which shaper needs it."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(
                f"length shaper {shaper!r} needs LengthContext.{name}; the trainer did not provide it"
            )
        return value

    def need_budgets(self, shaper: str) -> list[int]:
        budgets = self.need("budgets", shaper)
        if any(b is None or b <= 0 for b in budgets):
            raise ValueError(
                f"length shaper {shaper!r} needs a positive budget for every response; "
                "enable data.budget so every prompt gets one"
            )
        return [int(b) for b in budgets]  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- warm-up


@dataclass(frozen=True)
class Warmup:
    """Length pressure that starts late: a shaper's terms are scaled by :meth:`factor`, 0 for steps
    ``<= delay_steps``, then rising linearly to 1 over ``ramp_steps`` steps (``ramp_steps = 0``: full
    strength right after the delay). From the base model, a length penalty that binds at once can
    shorten answers before the format reward has taught them the answer box; a delay lets the box come
    first. The default (no delay, no ramp) is full strength from step 1.
    """

    delay_steps: int = 0
    ramp_steps: int = 0

    def __post_init__(self) -> None:
        for name in ("delay_steps", "ramp_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"warmup.{name} must be an integer >= 0, got {value!r}")

    def __bool__(self) -> bool:
        return bool(self.delay_steps or self.ramp_steps)

    def factor(self, step: int) -> float:
        """Strength at 1-based ``step``.

        >>> [Warmup(delay_steps=2, ramp_steps=2).factor(s) for s in (1, 2, 3, 4, 5)]
        [0.0, 0.0, 0.5, 1.0, 1.0]
        """
        since = step - self.delay_steps
        if since <= 0:
            return 0.0
        return 1.0 if self.ramp_steps == 0 else min(1.0, since / self.ramp_steps)


# ----------------------------------------------------------------------------- registry

S = TypeVar("S", bound="type[LengthShaper]")


class ShaperRegistry(Registry):
    """Name -> (shaper class, params dataclass); duplicate names raise, unknown ones suggest."""

    def __init__(self) -> None:
        super().__init__("length shaper")

    def register(self, name: str, params: type) -> Callable[[S], S]:
        if not dataclasses.is_dataclass(params):
            raise TypeError(f"params of length shaper {name!r} must be a dataclass type")

        def deco(cls: S) -> S:
            self.add(name, (cls, params))
            cls.name = name
            return cls

        return deco

    def names(self) -> list[str]:
        return sorted(super().names())


SHAPERS = ShaperRegistry()


def register_shaper(name: str, params: type) -> Callable[[S], S]:
    """Register a :class:`LengthShaper` subclass under ``name`` with its params dataclass."""
    return SHAPERS.register(name, params)


class LengthShaper:
    """Base class: subclasses implement :meth:`terms` (and stateful ones :meth:`update`)."""

    name: str = "?"

    def __init__(self, params: Any) -> None:
        self.params = params

    def terms(self, ctx: LengthContext) -> list[float]:
        """Additive term per response, ``r_paper - 1[correct]``; must not change state."""
        raise NotImplementedError

    def update(self, ctx: LengthContext) -> None:
        """Advance internal state after the batch was shaped (default: stateless)."""

    def metrics(self, ctx: LengthContext, terms: list[float]) -> dict[str, float]:
        return {f"length/{self.name}/term_mean": sum(terms) / len(terms) if terms else 0.0}

    def __call__(self, ctx: LengthContext) -> list[float]:
        """Shaped rewards ``rewards + terms``; then the state (if any) is updated."""
        terms = self.terms(ctx)
        self.update(ctx)
        return [float(r) + t for r, t in zip(ctx.rewards, terms)]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"length shaper {self.name!r} is stateless but got state keys {sorted(state)}")


# ----------------------------------------------------------------------------- pipeline
