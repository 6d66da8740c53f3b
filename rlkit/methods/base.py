"""The stage protocol: how a method that needs more than an estimator and a loss joins the loop.

A stage is a class with optional hooks; the trainer calls each hook of every active stage, in
registration order, at a fixed point of the step::

    engine_kwargs(cfg)            before the engines exist: extra engine arguments (class method)
    check(cfg)                    at config time: raise ValueError naming the key (class method)
    start(start_step)             after setup and resume
    sampling(params, step)        the training rollout's sampling params
    request_meta(step)            per-request extras (e.g. logits processors)
    collect(step, shaping)        replaces the default collector (at most one active stage may)
    after_score(step, groups, extras) -> (groups, extras, metrics)
                                  after scoring and before advantages: add groups or estimator inputs
    after_update(learner)         after the learner's update, before the weight sync -> metrics
    after_sync(version)           the engines hold policy ``version`` (after setup/resume and each push)
    metrics()                     once per step, after the update -> metrics
    state_dict() / load_state_dict(state)
                                  checkpointed under the stage's name
    close()                       training is over (before the final evaluation) or the run failed

Hooks run in the stages' ``(order, name)`` order, the same in every process. A stage is active when its ``enabled(cfg)`` says so: built-in stages look at the config block
that turns them on (``segments.enabled``, ``engine.adaptive_temperature.enabled``, ...); a user's
stage (registered from a ``plugins:`` file) is active when it is listed in ``stages:``, by name or
as ``{name: ..., params: {...}}``; ``params`` fill the stage's ``params_cls`` dataclass (unknown
keys are config errors). See docs/extending.md for a walkthrough.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from rlkit.common import Registry, build_dataclass


@dataclass
class StageContext:
    """What a stage may use: the run's config and the live components of the loop."""

    cfg: Any  # rlkit.schema.Config
    engines: Any  # rlkit.orchestration.engine_pool.EnginePool
    tokenizer: Any
    manager: Any  # rewards.RewardManager
    cursor: Any  # rlkit.infra.data.PromptCursor
    rows: list[dict[str, Any]]
    encode: Callable[..., list[int]]  # (row, budget=None) -> prompt token ids
    run_dir: Any
    acc_key: str | None  # the verifier that says "correct"
    log: Callable[[str], None] = print


class Stage:
    """Base class of every stage; each hook's default does nothing."""

    name: ClassVar[str] = ""
    order: ClassVar[int] = 100  # hooks run in (order, name) order; built-ins 10-50, user stages 100
    params_cls: ClassVar[type | None] = None  # dataclass of the ``stages: [{name, params}]`` entry
    # a built-in stage that the advantage estimator asks for: the flag its params class sets
    advantage_flag: ClassVar[str | None] = None
    # its after_score calls the engines and needs them to hold the policy that sampled the groups
    current_policy: ClassVar[bool] = False

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.params = self.build_params(ctx.cfg)

    # ------------------------------------------------------------------ class-level (no instance yet)
    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        if cls.advantage_flag is not None:
            return advantage_wants(cfg, cls.advantage_flag)
        return cls.name in stage_entries(cfg)

    @classmethod
    def build_params(cls, cfg: Any) -> Any:
        """The stage's params from its ``stages:`` entry (None without a ``params_cls``)."""
        given = stage_entries(cfg).get(cls.name) or {}
        if cls.params_cls is None:
            if given:
                raise ValueError(f"stages: {cls.name!r} takes no params (got {sorted(given)})")
            return None
        try:
            return build_dataclass(cls.params_cls, given, f"stage {cls.name!r}")
        except (TypeError, ValueError) as e:
            raise ValueError(f"stages: {e.args[0] if e.args else e}") from None

    @classmethod
    def check(cls, cfg: Any) -> None:
        """Raise ``ValueError("<key>: <why>")`` for a combination this stage cannot carry."""

    @classmethod
    def engine_kwargs(cls, cfg: Any) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------ hooks
    collects: ClassVar[bool] = False  # True: ``collect`` replaces the default collector

    def start(self, start_step: int) -> None:
        pass

    def sampling(self, params: Any, step: int) -> Any:
        return params

    def request_meta(self, step: int) -> dict[str, Any]:
        return {}

    def collect(self, step: int, shaping: Any) -> tuple[list, list, dict[str, float]]:
        raise NotImplementedError

    def after_score(self, step: int, groups: list, extras: dict[str, Any]
                    ) -> tuple[list, dict[str, Any], dict[str, float]]:
        return groups, extras, {}

    def after_update(self, learner: Any) -> dict[str, float]:
        return {}

    def after_sync(self, version: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass

    def state_dict(self) -> Any:
        return None

    def load_state_dict(self, state: Any) -> None:
        pass


STAGES: Registry[type[Stage]] = Registry("stage")


def register_stage(name: str, order: int | None = None) -> Callable[[type[Stage]], type[Stage]]:
    """Class decorator: ``@register_stage("my_stage")`` makes a :class:`Stage` selectable as
    ``stages: [my_stage]`` (or active by its own ``enabled``); ``order`` sets when its hooks run."""

    def deco(cls: type[Stage]) -> type[Stage]:
        if not (isinstance(cls, type) and issubclass(cls, Stage)):
            raise TypeError(f"@register_stage({name!r}) decorates a subclass of rlkit.methods.Stage")
        cls.name = name
        if order is not None:
            cls.order = order
        STAGES.add(name, cls)
        return cls

    return deco


def stage_entries(cfg: Any) -> dict[str, dict[str, Any]]:
    """``{name: params}`` of the config's ``stages:`` list (entries: a name or ``{name, params}``)."""
    out: dict[str, dict[str, Any]] = {}
    for e in getattr(cfg, "stages", ()) or ():
        if isinstance(e, str):
            out[e] = {}
        elif isinstance(e, dict) and isinstance(e.get("name"), str) and set(e) <= {"name", "params"}:
            out[e["name"]] = dict(e.get("params") or {})
        else:
            raise ValueError(f"stages: each entry is a name or {{name: ..., params: {{...}}}}, got {e!r}")
    return out


def active_stages(cfg: Any, checked: bool = True) -> list[type[Stage]]:
    """The stage classes ``cfg`` turns on, in registration order; unknown ``stages:`` names, bad
    params and two collectors are errors (``ValueError`` naming the key); ``checked=False`` only
    selects (for a stage's ``check`` looking at the others)."""
    for name in stage_entries(cfg):
        try:
            STAGES.get(name)
        except KeyError as e:  # unknown name -> did-you-mean
            raise ValueError(f"stages: {e.args[0]}") from None
    classes = sorted((cls for cls in STAGES.values() if cls.enabled(cfg)), key=lambda c: (c.order, c.name))
    if not checked:
        return classes
    for cls in classes:
        cls.build_params(cfg)
    collectors = [c.name for c in classes if c.collects]
    if len(collectors) > 1:
        raise ValueError(f"stages {collectors} each replace the rollout collector; enable one of them")
    return classes


def advantage_wants(cfg: Any, flag: str) -> bool:
    """Does the configured advantage estimator's params class set ``flag`` (e.g. ``needs_step_probes``)?
    False for an unknown estimator: the registry check names it."""
    from rlkit.algorithms import ADVANTAGES

    try:
        return bool(getattr(ADVANTAGES.get(cfg.algorithm.advantage).params, flag, False))
    except KeyError:
        return False


def merge_meta(metas: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-request extras of several stages: list values (logits processors) concatenate."""
    out: dict[str, Any] = {}
    for m in metas:
        for k, v in m.items():
            out[k] = [*out[k], *v] if isinstance(v, list) and isinstance(out.get(k), list) else v
    return out
