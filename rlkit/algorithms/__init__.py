"""Pure tensor RL algorithms: advantages, policy losses, aggregation, KL, sampling filters.

Imports torch only (STYLE.md #1). Importing this package registers every built-in method in the
name-keyed registries ``ADVANTAGES``, ``POLICY_LOSSES``, ``AGGREGATIONS`` and ``KL_ESTIMATORS``.
Formulas follow ``specs/algorithms.md`` §0 and §7.
"""

from rlkit.algorithms.registry import (  # noqa: I001  (registry first: the modules below use it)
    ADVANTAGES,
    AGGREGATIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    NoParams,
    Registry,
    RegistryEntry,
    register_advantage,
    register_aggregation,
    register_kl_estimator,
    register_policy_loss,
)
from rlkit.algorithms.types import AdvantageInputs, PolicyLossInputs
from rlkit.algorithms.groups import GroupStats, group_index, group_stats
from rlkit.algorithms.advantages import (
    DrGRPOParams,
    GRPOParams,
    RLOOParams,
    broadcast_to_tokens,
    dr_grpo_advantage,
    grpo_advantage,
    rloo_advantage,
)
from rlkit.algorithms.aggregation import aggregate, masked_mean, masked_sum
from rlkit.algorithms.losses import GSPOParams, PPOClipParams, gspo_loss, ppo_clip_loss
from rlkit.algorithms.kl import kl_penalty
from rlkit.algorithms.filters import dynamic_sampling_keep_B, overlong_filter_mask

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "AdvantageInputs",
    "DrGRPOParams",
    "GRPOParams",
    "GSPOParams",
    "GroupStats",
    "NoParams",
    "PPOClipParams",
    "PolicyLossInputs",
    "RLOOParams",
    "Registry",
    "RegistryEntry",
    "aggregate",
    "broadcast_to_tokens",
    "dr_grpo_advantage",
    "dynamic_sampling_keep_B",
    "group_index",
    "group_stats",
    "grpo_advantage",
    "gspo_loss",
    "kl_penalty",
    "masked_mean",
    "masked_sum",
    "overlong_filter_mask",
    "ppo_clip_loss",
    "register_advantage",
    "register_aggregation",
    "register_kl_estimator",
    "register_policy_loss",
    "rloo_advantage",
]
