"""Pure tensor RL algorithms: advantages, policy losses, aggregation, KL, sampling filters.

Imports torch only. Importing this package registers every built-in method in the
name-keyed registries ``ADVANTAGES``, ``POLICY_LOSSES``, ``AGGREGATIONS`` and ``KL_ESTIMATORS``.
Formulas follow ``docs/algorithms.md`` §0 and §7.
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
from rlkit.algorithms.types import AdvantageInputs, AdvantageOutput, PolicyLossInputs
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
from rlkit.algorithms.spae import SPAEParams, find_step_boundaries, spae_advantage, step_potential
from rlkit.algorithms.prefix_tree import PrefixTree, TEMPOParams, build_prefix_tree, tempo_advantage
from rlkit.algorithms.hapo import EntropyStats, HAPOAdvantageParams, HAPOLossParams, compute_entropy_h, hapo_loss, hapo_sampling_stats, hapo_token_mean_advantage
from rlkit.algorithms.brpo import BRPOParams, BudgetPrior, brpo_advantage  # noqa: F401  (registers "brpo")
from rlkit.algorithms.dmmpt import LOSS_MASKS, DMMPTParams, apply_loss_masks, mask_mastered_positive  # noqa: F401
from rlkit.algorithms.correction import RolloutCorrectionParams, rollout_correction

__all__ = [
    "RolloutCorrectionParams",
    "rollout_correction",
    "ADVANTAGES",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "AdvantageInputs",
    "AdvantageOutput",
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
    # TEMPO / P2T (docs/algorithms.md §1)
    "PrefixTree",
    "TEMPOParams",
    "build_prefix_tree",
    "tempo_advantage",
    # HAPO (docs/algorithms.md §3)
    "EntropyStats",
    "HAPOAdvantageParams",
    "HAPOLossParams",
    "compute_entropy_h",
    "hapo_loss",
    "hapo_sampling_stats",
    "hapo_token_mean_advantage",
    # SPAE (docs/algorithms.md §2)
    "SPAEParams",
    "find_step_boundaries",
    "spae_advantage",
    "step_potential",
]
