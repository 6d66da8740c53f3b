"""Length and budget shapers added to verifier rewards (docs/algorithms.md §6). Plain Python: no torch, no rlkit.

A *length shaper* is called once per step on the whole batch, after the verifiers::

    shaping = LengthShaping.from_config([{"name": "kimi", "params": {"weight": 0.5}}])
    rewards, metrics = shaping(LengthContext(rewards=..., correct=..., lengths=..., max_len=128,
                                             group_ids=..., problem_ids=..., step=step))

Every shaper is **additive**: it returns ``rewards + term`` where ``term = r_paper - 1[correct]``,
``r_paper`` being the paper's total reward. With a single 0/1 accuracy verifier the result is
exactly the paper's reward; with a verifier mix (e.g. ``math + 0.2 format``) the other verifiers'
terms are kept untouched. Shapers compose left to right (each sees the previous one's rewards).

Registered shapers (``SHAPERS.names()``):

- ``dapo_overlong`` (§6e) soft overlong punishment;
- ``kimi`` (§6d) group length penalty with a delay/linear warm-up of its weight [warm-up INFERRED]
  (every shaper takes the same schedule as ``warmup: {delay_steps, ramp_steps}`` beside its params);
- ``l1_exact`` / ``l1_max`` / ``l1_dual`` (§6f) LCPO rewards against the budget written into the
  prompt (see :mod:`rewards.budget_prompt`); ``l1_dual`` picks Exact or Max per row by its budget
  kind, the paper's dual objective;
- ``hapo_history`` (§6a) cosine/linear length reward against a per-problem history (min or mean
  of correct lengths); stateful: ``state_dict()`` is JSON-serialisable and belongs in checkpoints;
- ``budget_penalty``: ``correct - lam * max(0, len - budget) / budget`` [INFERRED].

The framework (``LengthContext``, the registry, ``LengthShaper``) lives in :mod:`rewards.shaping`
and is re-exported here; the pipeline (``LengthShaping``) is at the end of this module.

Departure, deliberately kept: a length is the number of generated tokens *including* the EOS
token of a response that stopped by itself (the trainer passes ``len(token_ids)``, the tokens the
loss sees). The HAPO and L1 reference code counts the decoded answer without EOS, so a stopped
response is one token longer here. HAPO-history compares lengths with a history measured the same
way, so the extra token cancels (it separates only stopped from truncated responses); for L1 the
budget boundary moves by one token (``budget`` answer tokens plus EOS count as one over).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from rewards.shaping import (
    SHAPERS,
    LengthContext,
    LengthShaper,
    Warmup,
    build_dataclass,
    register_shaper,
)

__all__ = [
    "SHAPERS", "HAPO_NULL_LEN", "BudgetPenaltyParams", "DAPOOverlongParams", "HAPOHistoryParams", "KimiParams",
    "L1Params", "LengthContext", "LengthShaper", "LengthShaping", "Warmup", "build_dataclass", "build_shaper",
    "dapo_overlong_penalty", "hapo_length_reward", "kimi_length_rewards", "l1_exact_reward", "l1_max_reward",
    "register_shaper",
]

HAPO_NULL_LEN = 100000
"""HAPO's ``MAX_LEN``: a history at or above it (or <= 0) means "no correct answer seen yet"."""


# ----------------------------------------------------------------------------- pure formulas


def dapo_overlong_penalty(
    length: int, *, max_len: int, buffer_len: int, penalty_factor: float = 1.0
) -> float:
    """DAPO soft overlong punishment (docs/algorithms.md §6e, verl ``dapo.py``).

    ``0`` while ``length <= max_len - buffer_len``, then linear down to ``-penalty_factor`` at
    ``max_len`` (and capped at ``-penalty_factor`` beyond it).

    >>> [round(dapo_overlong_penalty(n, max_len=20480, buffer_len=4096), 4) for n in (16000, 16384, 18432, 20480)]
    [0.0, 0.0, -0.5, -1.0]
    """
    expected = max_len - buffer_len
    over = length - expected
    return max(min(-over / buffer_len * penalty_factor, 0.0), -penalty_factor)


def kimi_length_rewards(lengths: Sequence[int], correct: Sequence[bool]) -> list[float]:
    """Kimi k1.5 length reward of the k responses of ONE prompt (docs/algorithms.md §6d).

    ``lam_i = 0.5 - (len_i - min_len) / (max_len - min_len)``; ``lam_i`` if correct else
    ``min(0, lam_i)``; all 0 when every length is equal.

    >>> [round(x, 4) for x in kimi_length_rewards([100, 400, 150, 300], [0, 1, 1, 0])]
    [0.0, -0.5, 0.3333, -0.1667]
    """
    lo, hi = min(lengths), max(lengths)
    if hi == lo:
        return [0.0] * len(lengths)
    out = []
    for n, c in zip(lengths, correct):
        lam = 0.5 - (n - lo) / (hi - lo)
        out.append(lam if c else min(0.0, lam))
    return out


def l1_exact_reward(correct: bool, n_y: int, n_gold: int, alpha: float = 0.0003) -> float:
    """L1-Exact (docs/algorithms.md §6f Eq. 1): ``1[correct] - alpha * |n_gold - n_y|``.

    >>> round(l1_exact_reward(True, 1500, 1000), 4)
    0.85
    """
    return float(bool(correct)) - alpha * abs(n_gold - n_y)


def l1_max_reward(correct: bool, n_y: int, n_gold: int, alpha: float = 0.0003, delta: float = 0.5) -> float:
    """L1-Max (docs/algorithms.md §6f Eq. 2): ``1[correct] * clip(alpha * (n_gold - n_y) + delta, 0, 1)``.

    >>> round(l1_max_reward(True, 500, 1000), 4)
    0.65
    """
    return float(bool(correct)) * min(1.0, max(0.0, alpha * (n_gold - n_y) + delta))


def _hapo_known(h: float | None) -> bool:
    return h is not None and 0 < h < HAPO_NULL_LEN


def hapo_length_reward(
    length: int,
    correct: bool,
    history: float | None,
    *,
    type_lr: str = "cosine",
    tolerance: float = 0.1,
    correct_floor: float = -0.7,
) -> float:
    """HAPO ``r_len`` of one response against the problem's history ``h_q`` (docs/algorithms.md §6a).

    ``history`` None (or outside ``(0, 100000)``) is HAPO's Null and gives 0. Cosine:
    ``x = cos(L/h * pi/2)`` if ``L < 2h`` else ``-1``; ``max(correct_floor, x)`` when correct,
    ``min(0, x)`` otherwise. Linear: see docs/algorithms.md §6a (tolerance band ``[h, (1+tol) h)`` gives 0).
    The weight ``w_lr`` is applied by the shaper, not here.

    >>> [round(hapo_length_reward(n, c, 300), 4) for n, c in [(150, 1), (450, 1), (450, 0), (700, 0)]]
    [0.7071, -0.7, -0.7071, -1.0]
    """
    if not _hapo_known(history):
        return 0.0
    h = float(history)  # type: ignore[arg-type]
    if type_lr == "cosine":
        x = math.cos((length / h) * (math.pi / 2)) if length < 2 * h else -1.0
        return max(correct_floor, x) if correct else min(0.0, x)
    if type_lr == "linear":
        over = -(length - (1 + tolerance) * h) / h
        if correct:
            if length < h:
                return 1.0 - length / h
            if length < (1 + tolerance) * h:
                return 0.0
            return max(correct_floor, over)
        return 0.0 if length < (1 + tolerance) * h else max(-1.0, over)
    raise ValueError(f"unknown HAPO type_lr {type_lr!r}; valid: 'cosine', 'linear'")


# ----------------------------------------------------------------------------- shapers


@dataclass(frozen=True)
class DAPOOverlongParams:
    """§6e. ``max_len`` None = ``LengthContext.max_len`` (the generation cap)."""

    buffer_len: int = 4096
    penalty_factor: float = 1.0
    max_len: int | None = None

    def __post_init__(self) -> None:
        if self.buffer_len < 1:
            raise ValueError(f"dapo_overlong.buffer_len must be >= 1, got {self.buffer_len}")


@register_shaper("dapo_overlong", DAPOOverlongParams)
class DAPOOverlong(LengthShaper):
    """DAPO soft overlong punishment added to the reward (docs/algorithms.md §6e)."""

    def terms(self, ctx: LengthContext) -> list[float]:
        p = self.params
        max_len = p.max_len or ctx.max_len
        if p.buffer_len >= max_len:
            raise ValueError(f"dapo_overlong.buffer_len ({p.buffer_len}) must be < max_len ({max_len})")
        return [
            dapo_overlong_penalty(
                n, max_len=max_len, buffer_len=p.buffer_len, penalty_factor=p.penalty_factor
            )
            for n in ctx.lengths
        ]


@dataclass(frozen=True)
class KimiParams:
    """§6d. ``weight`` multiplies the length reward [INFERRED default 1.0].

    Warm-up [INFERRED: the report delays the penalty, schedule unpublished]: ``delay_steps`` and
    ``ramp_steps`` apply the :class:`~rewards.shaping.Warmup` schedule to ``weight``; the same as a
    ``warmup`` beside the params, which every shaper takes.
    """

    weight: float = 1.0
    delay_steps: int = 0
    ramp_steps: int = 0

    def __post_init__(self) -> None:
        if self.delay_steps < 0 or self.ramp_steps < 0:
            raise ValueError("kimi.delay_steps and kimi.ramp_steps must be >= 0")

    def weight_at(self, step: int) -> float:
        """Effective weight at 1-based ``step``.

        >>> [KimiParams(1.0, delay_steps=2, ramp_steps=2).weight_at(s) for s in (1, 2, 3, 4, 5)]
        [0.0, 0.0, 0.5, 1.0, 1.0]
        """
        return self.weight * Warmup(self.delay_steps, self.ramp_steps).factor(step)


@register_shaper("kimi", KimiParams)
class KimiLength(LengthShaper):
    """Kimi k1.5 group length penalty, weighted by the warm-up schedule (docs/algorithms.md §6d)."""

    def terms(self, ctx: LengthContext) -> list[float]:
        w = self.params.weight_at(ctx.step)
        groups: dict[Any, list[int]] = {}
        for i, g in enumerate(ctx.need("group_ids", self.name)):
            groups.setdefault(g, []).append(i)
        out = [0.0] * len(ctx)
        for idx in groups.values():
            vals = kimi_length_rewards([ctx.lengths[i] for i in idx], [bool(ctx.correct[i]) for i in idx])
            for i, v in zip(idx, vals):
                out[i] = w * v
        return out

    def metrics(self, ctx: LengthContext, terms: list[float]) -> dict[str, float]:
        return {**super().metrics(ctx, terms), "length/kimi/weight": self.params.weight_at(ctx.step)}


@dataclass(frozen=True)
class L1Params:
    """§6f: ``alpha`` (per-token slope) and ``delta`` (L1-Max offset)."""

    alpha: float = 0.0003
    delta: float = 0.5

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise ValueError(f"L1 alpha must be >= 0, got {self.alpha}")


def _l1_term(kind: str, c: bool, n: int, b: int, p: L1Params) -> float:
    if kind == "exact":
        return l1_exact_reward(c, n, b, p.alpha) - float(c)
    if kind == "max":
        return l1_max_reward(c, n, b, p.alpha, p.delta) - float(c)
    raise ValueError(f"unknown budget kind {kind!r}; valid: 'exact', 'max'")


@register_shaper("l1_exact", L1Params)
class L1Exact(LengthShaper):
    """L1-Exact: ``r = 1[correct] - alpha |n_gold - n_y|`` (docs/algorithms.md §6f Eq. 1)."""

    def terms(self, ctx: LengthContext) -> list[float]:
        budgets = ctx.need_budgets(self.name)
        return [
            _l1_term("exact", bool(c), n, b, self.params)
            for c, n, b in zip(ctx.correct, ctx.lengths, budgets)
        ]


@register_shaper("l1_max", L1Params)
class L1Max(LengthShaper):
    """L1-Max: ``r = 1[correct] clip(alpha (n_gold - n_y) + delta, 0, 1)`` (docs/algorithms.md §6f Eq. 2)."""

    def terms(self, ctx: LengthContext) -> list[float]:
        budgets = ctx.need_budgets(self.name)
        return [
            _l1_term("max", bool(c), n, b, self.params) for c, n, b in zip(ctx.correct, ctx.lengths, budgets)
        ]


@register_shaper("l1_dual", L1Params)
class L1Dual(LengthShaper):
    """L1 dual objective: Eq. 1 for rows whose budget kind is ``exact``, Eq. 2 for ``max``."""

    def terms(self, ctx: LengthContext) -> list[float]:
        budgets = ctx.need_budgets(self.name)
        kinds = ctx.need("budget_kinds", self.name)
        return [
            _l1_term(k, bool(c), n, b, self.params)
            for k, c, n, b in zip(kinds, ctx.correct, ctx.lengths, budgets)
        ]


@dataclass(frozen=True)
class BudgetPenaltyParams:
    """Plain budget penalty ``correct - lam * max(0, len - budget) / budget`` [INFERRED lam=1]."""

    lam: float = 1.0

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError(f"budget_penalty.lam must be >= 0, got {self.lam}")


@register_shaper("budget_penalty", BudgetPenaltyParams)
class BudgetPenalty(LengthShaper):
    """Penalise only the tokens over the prompt's budget, relative to the budget."""

    def terms(self, ctx: LengthContext) -> list[float]:
        budgets = ctx.need_budgets(self.name)
        return [-self.params.lam * max(0, n - b) / b for n, b in zip(ctx.lengths, budgets)]


@dataclass(frozen=True)
class HAPOHistoryParams:
    """§6a, defaults from ``HCY123902/HAPO``.

    Attributes:
        w_lr: weight of ``r_len``; in [0, 1] so any correct response outranks any incorrect one.
        mode: ``min`` (shortest correct length so far) or ``mean`` (running mean of correct lengths).
        type_lr: ``cosine`` (default) or ``linear``.
        tolerance: linear variant's band ``[h, (1 + tolerance) h)`` that scores 0.
        correct_floor: lowest ``r_len`` of a correct response (keeps ``r > 0.3``).
    """

    w_lr: float = 1.0
    mode: Literal["min", "mean"] = "min"
    type_lr: Literal["cosine", "linear"] = "cosine"
    tolerance: float = 0.1
    correct_floor: float = -0.7

    def __post_init__(self) -> None:
        if not 0.0 <= self.w_lr <= 1.0:
            raise ValueError(f"hapo_history.w_lr must be in [0, 1], got {self.w_lr}")
        if self.mode not in ("min", "mean"):
            raise ValueError(f"hapo_history.mode must be 'min' or 'mean', got {self.mode!r}")
        if self.type_lr not in ("cosine", "linear"):
            raise ValueError(f"hapo_history.type_lr must be 'cosine' or 'linear', got {self.type_lr!r}")


@register_shaper("hapo_history", HAPOHistoryParams)
class HAPOHistory(LengthShaper):
    """HAPO history-aware length reward (docs/algorithms.md §6a). The batch is scored against the *old* history,
    then the history absorbs this batch's correct lengths.

    State (JSON-serialisable): ``{"mode", "h": {problem: length}, "count": {problem: n}}``;
    problems without a correct answer yet are absent (HAPO's Null).
    """

    def __init__(self, params: HAPOHistoryParams) -> None:
        super().__init__(params)
        self.h: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def history(self, problem_id: Any) -> float | None:
        """``h_q`` of a problem, or None (Null)."""
        return self.h.get(str(problem_id))

    def terms(self, ctx: LengthContext) -> list[float]:
        p = self.params
        pids = ctx.need("problem_ids", self.name)
        return [
            p.w_lr
            * hapo_length_reward(
                n,
                bool(c),
                self.h.get(str(q)),
                type_lr=p.type_lr,
                tolerance=p.tolerance,
                correct_floor=p.correct_floor,
            )
            for q, c, n in zip(pids, ctx.correct, ctx.lengths)
        ]

    def update(self, ctx: LengthContext) -> None:
        correct_lens: dict[str, list[int]] = {}
        for q, c, n in zip(ctx.need("problem_ids", self.name), ctx.correct, ctx.lengths):
            if c:
                correct_lens.setdefault(str(q), []).append(int(n))
        for q, lens in correct_lens.items():
            old, k = self.h.get(q), self.count.get(q, 0)
            if self.params.mode == "min":
                self.h[q] = min(lens) if old is None else min(old, min(lens))
            else:  # count-weighted running mean, as HAPO's HistroyTracker
                batch_mean = sum(lens) / len(lens)
                if old is None or k <= 0:
                    self.h[q] = batch_mean
                else:
                    ratio = len(lens) / (k + len(lens))
                    self.h[q] = ratio * batch_mean + (1 - ratio) * old
            self.count[q] = k + len(lens)

    def metrics(self, ctx: LengthContext, terms: list[float]) -> dict[str, float]:
        pids = ctx.problem_ids or []
        known = sum(_hapo_known(self.h.get(str(q))) for q in pids)
        return {
            **super().metrics(ctx, terms),
            "length/hapo_history/problems": float(len(self.h)),
            "length/hapo_history/known_frac": known / len(pids) if pids else 0.0,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.params.mode, "h": dict(self.h), "count": dict(self.count)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("mode") != self.params.mode:
            raise ValueError(
                f"hapo_history state was saved with mode={state.get('mode')!r} but this run uses "
                f"mode={self.params.mode!r}; a min history cannot be resumed as a mean one"
            )
        self.h = {str(k): v for k, v in state["h"].items()}
        self.count = {str(k): int(v) for k, v in state.get("count", {}).items()}


# ----------------------------------------------------------------------------- the pipeline


def build_shaper(name: str, params: Mapping[str, Any] | None = None) -> LengthShaper:
    """Instantiate the shaper registered as ``name`` with ``params`` (a dict of its fields)."""
    cls, params_cls = SHAPERS.get(name)
    return cls(build_dataclass(params_cls, params, f"length shaper {name!r}"))


@dataclass
class LengthShaping:
    """An ordered list of shapers applied after the verifiers; its state goes into checkpoints.

    Each shaper may have a :class:`~rewards.shaping.Warmup` (``warmup: {delay_steps, ramp_steps}`` beside
    its ``params``) that scales its terms by the schedule's factor at the batch's step.

    >>> s = LengthShaping.from_config([{"name": "l1_exact"}])
    >>> s(LengthContext(rewards=[1.0], correct=[True], lengths=[1500], max_len=4000, budgets=[1000]))[0]
    [0.85]
    """

    shapers: list[LengthShaper] = field(default_factory=list)
    warmups: list[Warmup] = field(default_factory=list)  # one per shaper; none given = no warm-up

    def __post_init__(self) -> None:
        self.warmups = list(self.warmups) or [Warmup() for _ in self.shapers]
        if len(self.warmups) != len(self.shapers):
            raise ValueError(f"LengthShaping has {len(self.shapers)} shapers but {len(self.warmups)} warm-ups")

    @classmethod
    def from_config(cls, specs: Sequence[Mapping[str, Any]] | None) -> LengthShaping:
        """Build from ``[{"name": ..., "params": {...}, "warmup": {...}}, ...]`` (``reward.length_shapers``)."""
        shapers, warmups = [], []
        for i, spec in enumerate(specs or []):
            extra = sorted(set(spec) - {"name", "params", "warmup"})
            if "name" not in spec or extra:
                raise ValueError(
                    f"length_shapers[{i}] must be {{name: ..., params: {{...}}, warmup: {{...}}}} (params and "
                    f"warmup optional), got keys {sorted(spec)}"
                )
            shapers.append(build_shaper(spec["name"], spec.get("params")))
            warmups.append(build_dataclass(Warmup, spec.get("warmup"), f"length_shapers[{i}].warmup"))
        return cls(shapers, warmups)

    def __bool__(self) -> bool:
        return bool(self.shapers)

    def __call__(self, ctx: LengthContext) -> tuple[list[float], dict[str, float]]:
        """Apply every shaper in order; returns (rewards_B, metrics)."""
        metrics: dict[str, float] = {}
        for shaper, warmup in zip(self.shapers, self.warmups):
            terms = shaper.terms(ctx)
            if warmup:
                f = warmup.factor(ctx.step)
                terms = [f * t for t in terms]
                metrics[f"length/{shaper.name}/warmup"] = f
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
