"""Method stages: methods that need more than an advantage estimator and a loss.

Each built-in stage is one module; importing this package registers them (in this order):

- ``async``: generation overlapped with training (replaces the collector) -- async_rollout.py
- ``segments``: UloRL segment rollout (replaces the collector)            -- segments.py
- ``anytime``: BRPO's summaries of truncated thinking                    -- anytime.py
- ``step_probes``: SPAE's per-step probes                                -- step_probes.py
- ``adaptive_temperature``: HAPO's entropy-adaptive sampling temperature -- adaptive_temperature.py
- ``budget_guidance``: predictor-guided decoding under a token budget    -- budget_guidance.py

The protocol (hooks, registry, selection) is in base.py.
"""

from rlkit.methods import adaptive_temperature as _adaptive_temperature  # noqa: F401,E402
from rlkit.methods import anytime as _anytime  # noqa: F401,E402
from rlkit.methods import async_rollout as _async_rollout  # noqa: F401,E402
from rlkit.methods import budget_guidance as _budget_guidance  # noqa: F401,E402
from rlkit.methods import segments as _segments  # noqa: F401,E402  (registers the built-in stages)
from rlkit.methods import step_probes as _step_probes  # noqa: F401,E402
from rlkit.methods.base import STAGES, Stage, StageContext, active_stages, merge_meta, register_stage

__all__ = ["STAGES", "Stage", "StageContext", "active_stages", "merge_meta", "register_stage"]
