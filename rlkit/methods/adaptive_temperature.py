"""HAPO adaptive-temperature sampling as a stage (``engine.adaptive_temperature.enabled``).

After each update the learner reports the entropy statistics of the batch it trained on (at the
request temperature, from the pre-update pass); the next training rollout samples every token at
``T' = T (1 + tau h)`` with ``h`` the token's normalised entropy under those statistics
(:mod:`rollout.adaptive_temperature`, docs/algorithms.md §3.2). The statistics are checkpointed, so
a resumed run samples as an uninterrupted one. The first step has no statistics: plain sampling.
From the second step on it logs how far the temperature moved: ``hapo/temperature_factor_{mean,min,max}``
(``T'/T`` over the step's tokens) and ``hapo/temperature_{heated,cooled}_frac``.
"""

from __future__ import annotations

from typing import Any

from rlkit.methods.base import Stage, register_stage


@register_stage("adaptive_temperature", order=40)
class AdaptiveTemperatureStage(Stage):
    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        return bool(cfg.engine.adaptive_temperature.enabled)

    @classmethod
    def check(cls, cfg: Any) -> None:
        """With the ``hapo`` loss, the sampler's entropy pivot and sign convention are the loss's:
        both normalise the same entropies (docs/algorithms.md §3.1)."""
        at, a = cfg.engine.adaptive_temperature, cfg.algorithm
        if not at.enabled or a.policy_loss != "hapo":
            return
        for mine, theirs, default in (("pivot", "entropy_pivot", 0.8), ("replicate_release_sign", "replicate_release_sign", False)):
            if getattr(at, mine) != a.loss_params.get(theirs, default):
                raise ValueError(f"engine.adaptive_temperature.{mine}={getattr(at, mine)!r} differs from "
                                 f"algorithm.loss_params.{theirs}={a.loss_params.get(theirs, default)!r}: the sampler "
                                 "and the hapo loss normalise the same entropies; set both to one value")

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.stats: list[float] | None = None  # (m, s, scale_pos, scale_neg) of the last update

    def request_meta(self, step: int) -> dict[str, Any]:
        if self.stats is None:
            return {}
        from rlkit.algorithms.hapo import EntropyStats
        from rollout.adaptive_temperature import AdaptiveTemperature

        at = self.ctx.cfg.engine.adaptive_temperature
        return {"logits_processors": [AdaptiveTemperature(EntropyStats(*self.stats), tau=at.tau)]}

    def after_update(self, learner: Any) -> dict[str, float]:
        import ray

        at = self.ctx.cfg.engine.adaptive_temperature
        moved = {}
        if self.stats is not None:  # how the statistics this step sampled with moved its temperature
            moved = ray.get(learner.temperature_stats.remote(self.stats, at.tau))
        self.stats = ray.get(learner.entropy_stats.remote(at.pivot, at.replicate_release_sign))
        return {f"hapo/temperature_{k}": v for k, v in moved.items()}

    def state_dict(self) -> list[float] | None:
        return self.stats

    def load_state_dict(self, state: list[float] | None) -> None:
        self.stats = state
