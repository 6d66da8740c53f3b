"""The length-shaping framework: batch context, shaper registry, base class and the ordered pipeline.

The built-in shapers (spec §6) live in :mod:`rewards.length`, which registers them on import;
:func:`build_shaper` imports it, so ``LengthShaping.from_config`` always sees them. Plain Python:
no torch, no rlkit. The registry is a small torch-free twin of
``rlkit.algorithms.registry.Registry`` (same errors), because ``rewards`` must not import
``rlkit``/torch (DESIGN.md).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["SHAPERS", "LengthContext", "LengthShaper", "LengthShaping", "ShaperRegistry", "build_dataclass",
           "build_shaper", "nearest", "register_shaper"]

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


# ----------------------------------------------------------------------------- registry

S = TypeVar("S", bound="type[LengthShaper]")


def nearest(word: str, candidates: Sequence[str]) -> str | None:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return close[0] if close else None


def build_dataclass(cls: type, kwargs: Mapping[str, Any] | None, what: str) -> Any:
    """``cls(**kwargs)`` with unknown keys reported with the nearest valid field.

    >>> from rewards.length import L1Params
    >>> build_dataclass(L1Params, {"alpah": 1.0}, "shaper 'l1_exact'")
    Traceback (most recent call last):
    ...
    ValueError: unknown parameter 'alpah' for shaper 'l1_exact'. Did you mean 'alpha'? Valid parameters: alpha, delta
    """
    kwargs = dict(kwargs or {})
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in kwargs:
        if key not in fields:
            hint = nearest(key, fields)
            did_you_mean = f" Did you mean {hint!r}?" if hint else ""
            raise ValueError(
                f"unknown parameter {key!r} for {what}.{did_you_mean} Valid parameters: {', '.join(fields) or '(none)'}"
            )
    return cls(**kwargs)


class ShaperRegistry:
    """Name -> (shaper class, params dataclass); duplicate names raise, unknown ones suggest."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[type[LengthShaper], type]] = {}

    def register(self, name: str, params: type) -> Callable[[S], S]:
        if not dataclasses.is_dataclass(params):
            raise TypeError(f"params of length shaper {name!r} must be a dataclass type")

        def deco(cls: S) -> S:
            if name in self._entries:
                raise ValueError(f"length shaper {name!r} is already registered")
            self._entries[name] = (cls, params)
            cls.name = name
            return cls

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> tuple[type[LengthShaper], type]:
        if name not in self._entries:
            hint = nearest(name, self.names())
            did_you_mean = f" Did you mean {hint!r}?" if hint else ""
            raise KeyError(
                f"unknown length shaper {name!r}.{did_you_mean} Valid names: {', '.join(self.names())}"
            )
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries


SHAPERS = ShaperRegistry()


def register_shaper(name: str, params: type) -> Callable[[S], S]:
    """Register a :class:`LengthShaper` subclass under ``name`` with its params dataclass."""
    return SHAPERS.register(name, params)


def build_shaper(name: str, params: Mapping[str, Any] | None = None) -> LengthShaper:
    """Instantiate the shaper registered as ``name`` with ``params`` (a dict of its fields)."""
    import rewards.length  # noqa: F401  (registers the built-in shapers)

    cls, params_cls = SHAPERS.get(name)
    return cls(build_dataclass(params_cls, params, f"length shaper {name!r}"))


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


@dataclass
class LengthShaping:
    """An ordered list of shapers applied after the verifiers; its state goes into checkpoints.

    >>> s = LengthShaping.from_config([{"name": "l1_exact"}])
    >>> s(LengthContext(rewards=[1.0], correct=[True], lengths=[1500], max_len=4000, budgets=[1000]))[0]
    [0.85]
    """

    shapers: list[LengthShaper] = field(default_factory=list)

    @classmethod
    def from_config(cls, specs: Sequence[Mapping[str, Any]] | None) -> LengthShaping:
        """Build from ``[{"name": ..., "params": {...}}, ...]`` (e.g. ``reward.length_shapers``)."""
        shapers = []
        for i, spec in enumerate(specs or []):
            extra = sorted(set(spec) - {"name", "params"})
            if "name" not in spec or extra:
                raise ValueError(
                    f"length_shapers[{i}] must be {{name: ..., params: {{...}}}}, got keys {sorted(spec)}"
                )
            shapers.append(build_shaper(spec["name"], spec.get("params")))
        return cls(shapers)

    def __bool__(self) -> bool:
        return bool(self.shapers)

    def __call__(self, ctx: LengthContext) -> tuple[list[float], dict[str, float]]:
        """Apply every shaper in order; returns (rewards_B, metrics)."""
        metrics: dict[str, float] = {}
        for shaper in self.shapers:
            terms = shaper.terms(ctx)
            metrics.update(shaper.metrics(ctx, terms))
            shaper.update(ctx)
            ctx = dataclasses.replace(ctx, rewards=[float(r) + t for r, t in zip(ctx.rewards, terms)])
        return list(ctx.rewards), metrics

    def state_dict(self) -> dict[str, Any]:
        """``{"shapers": [{"name", "state"}, ...]}``, JSON-serialisable."""
        return {"shapers": [{"name": s.name, "state": s.state_dict()} for s in self.shapers]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = list(state.get("shapers", []))
        names = [s.name for s in self.shapers]
        if [e["name"] for e in saved] != names:
            raise ValueError(
                f"checkpoint has length shapers {[e['name'] for e in saved]} but the config has {names}; "
                "keep reward.length_shapers unchanged when resuming"
            )
        for shaper, entry in zip(self.shapers, saved):
            shaper.load_state_dict(entry["state"])
