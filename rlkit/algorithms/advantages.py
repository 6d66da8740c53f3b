"""Outcome-reward advantage estimators of the GRPO family (docs/algorithms.md §0, §7.2).

Every estimator has the registry signature ``fn(inp: AdvantageInputs, p: Params) -> advantages_BT``:
a scalar advantage per response ``A_B`` broadcast to its valid tokens, ``A_B[:, None] * mask_BT``
(zeros on padding). All are vectorised over arbitrary group ids (no loop over groups).

Departures from the references, all matching verl's ``core_algos.py``:
- groups of size 1 use mean := 0 and std := 1, so GRPO gives ``R / (1 + eps)`` and Dr.GRPO ``R``;
- RLOO on a group of size 1 uses a zero baseline, so ``A = R`` (there is no "other" sample).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlkit.algorithms.groups import GroupStats, group_stats
from rlkit.algorithms.registry import register_advantage
from rlkit.algorithms.types import AdvantageInputs


@dataclass(frozen=True)
class GRPOParams:
    """Hyper-parameters of GRPO (docs/algorithms.md §0).

    Attributes:
        eps: added to the group std before dividing (verl ``epsilon``).
        norm_by_std: divide by the group std (verl ``norm_adv_by_std_in_grpo``); ``False`` is
            Dr.GRPO (docs/algorithms.md §7.2).
    """

    eps: float = 1e-6
    norm_by_std: bool = True

    def __post_init__(self) -> None:
        if self.eps < 0:
            raise ValueError(f"GRPOParams.eps must be >= 0, got {self.eps}")


@dataclass(frozen=True)
class DrGRPOParams:
    """Dr.GRPO has no hyper-parameters of its own (docs/algorithms.md §7.2)."""


@dataclass(frozen=True)
class RLOOParams:
    """RLOO has no hyper-parameters of its own."""


def broadcast_to_tokens(advantages_B: Tensor, response_mask_BT: Tensor) -> Tensor:
    """[B] -> [B, T]: each response's advantage on its valid tokens, 0 on padding."""
    mask_BT = response_mask_BT.to(advantages_B.dtype)
    return advantages_B[:, None] * mask_BT


def _rewards_and_stats(inp: AdvantageInputs) -> tuple[Tensor, GroupStats, Tensor]:
    """Float rewards [B], their group stats, and a bool [B] marking singleton groups."""
    rewards_B = inp.rewards_B if inp.rewards_B.is_floating_point() else inp.rewards_B.float()
    stats = group_stats(rewards_B, inp.group_ids_B)
    singleton_B = stats.count_G[stats.index_B] == 1
    return rewards_B, stats, singleton_B


@register_advantage("grpo", params=GRPOParams)
@torch.no_grad()
def grpo_advantage(inp: AdvantageInputs, p: GRPOParams) -> Tensor:
    """GRPO outcome advantage (docs/algorithms.md §0; verl ``compute_grpo_outcome_advantage``).

    ``A_i = (R_i - mean_g(R)) / (std_g(R) + eps)`` with unbiased std, or ``R_i - mean_g(R)`` when
    ``norm_by_std`` is False. A group of size 1 uses mean 0 and std 1.

    Args:
        inp: ``rewards_B`` [B], ``group_ids_B`` [B], ``response_mask_BT`` [B, T].
        p: :class:`GRPOParams`.

    Returns:
        advantages_BT [B, T], zero on padding.
    """
    rewards_B, stats, singleton_B = _rewards_and_stats(inp)
    mean_B = torch.where(singleton_B, torch.zeros_like(rewards_B), stats.mean_G[stats.index_B])
    advantages_B = rewards_B - mean_B
    if p.norm_by_std:
        std_B = torch.where(singleton_B, torch.ones_like(rewards_B), stats.std_G[stats.index_B])
        advantages_B = advantages_B / (std_B + p.eps)
    return broadcast_to_tokens(advantages_B, inp.response_mask_BT)


@register_advantage("dr_grpo", params=DrGRPOParams)
@torch.no_grad()
def dr_grpo_advantage(inp: AdvantageInputs, p: DrGRPOParams) -> Tensor:
    """Dr.GRPO advantage ``A_i = R_i - mean_g(R)``: no std division (docs/algorithms.md §7.2).

    A group of size 1 uses mean 0, so ``A = R``. Pair it with the ``seq-mean-token-sum-norm``
    aggregation to get the paper's loss.

    Returns:
        advantages_BT [B, T], zero on padding.
    """
    return grpo_advantage(inp, GRPOParams(eps=0.0, norm_by_std=False))


@register_advantage("rloo", params=RLOOParams)
@torch.no_grad()
def rloo_advantage(inp: AdvantageInputs, p: RLOOParams) -> Tensor:
    """REINFORCE Leave-One-Out: ``A_i = R_i - mean_{j != i, j in g} R_j``.

    Computed in closed form as ``(n R_i - S_g) / (n - 1)`` with ``S_g`` the group sum and ``n`` the
    group size. A group of size 1 has no other sample; it uses a zero baseline, ``A = R``
    (as verl's ``compute_rloo_outcome_advantage``).

    Returns:
        advantages_BT [B, T], zero on padding.
    """
    rewards_B, stats, singleton_B = _rewards_and_stats(inp)
    n_B = stats.count_G[stats.index_B]
    loo_mean_B = (stats.sum_G[stats.index_B] - rewards_B) / (n_B - 1).clamp(min=1)
    baseline_B = torch.where(singleton_B, torch.zeros_like(rewards_B), loo_mean_B)
    return broadcast_to_tokens(rewards_B - baseline_B, inp.response_mask_BT)
