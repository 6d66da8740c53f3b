"""A method stage in one file: a response-length curriculum, selected from a recipe through
``plugins:`` and ``stages:`` (see ``recipes/examples/my_method.yaml``), without touching ``rlkit/``.

Training starts with a short generation cap that grows linearly to ``engine.max_new_tokens``
over ``warmup_steps`` steps (staged context lengths, as in DeepScaleR's 8K -> 16K -> 24K schedule):
early steps are cheap and reward concise answers, later ones allow the full length. It uses two
hooks of :class:`rlkit.methods.Stage`: ``sampling`` (the training rollout's params of the step)
and ``metrics`` (logged every step); ``check`` rejects impossible settings at config time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rlkit.methods import Stage, register_stage


@dataclass
class CurriculumParams:
    """Attributes:
        start: generation cap (tokens) at step 1.
        warmup_steps: steps until the cap reaches ``engine.max_new_tokens``.
    """

    start: int = 16
    warmup_steps: int = 10


@register_stage("length_curriculum")
class LengthCurriculum(Stage):
    params_cls = CurriculumParams

    @classmethod
    def check(cls, cfg: Any) -> None:
        if not cls.enabled(cfg):
            return
        p = cls.build_params(cfg)
        if not 1 <= p.start <= cfg.engine.max_new_tokens or p.warmup_steps < 1:
            raise ValueError(f"stages: length_curriculum needs 1 <= start <= engine.max_new_tokens="
                             f"{cfg.engine.max_new_tokens} and warmup_steps >= 1 (got {p})")

    def cap(self, step: int) -> int:
        """The step's generation cap: ``start`` at step 1, ``engine.max_new_tokens`` from
        ``warmup_steps + 1`` on, linear in between."""
        full, p = self.ctx.cfg.engine.max_new_tokens, self.params
        frac = min(1.0, (step - 1) / p.warmup_steps)
        return round(p.start + frac * (full - p.start))

    def sampling(self, params: Any, step: int) -> Any:
        self.last_cap = self.cap(step)
        return dataclasses.replace(params, max_new_tokens=self.last_cap)

    def metrics(self) -> dict[str, float]:
        return {"length_curriculum/max_new_tokens": float(self.last_cap)}
