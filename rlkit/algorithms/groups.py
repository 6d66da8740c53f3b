"""Vectorised per-group statistics over prompt-group ids (no Python loop over groups).

Group ids may be arbitrary integers in any order; they are mapped to dense indices
``0..G-1`` with ``torch.unique(return_inverse=True)`` and reduced with ``index_add_`` /
``scatter_reduce``. Used by the GRPO-family advantages and by DAPO dynamic sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GroupStats:
    """Per-group statistics of a [B] tensor.

    Attributes:
        index_B: long [B], dense group index of each response (0..G-1).
        count_G: [G] number of responses per group.
        sum_G: [G] sum of values per group.
        mean_G: [G] mean per group.
        std_G: [G] unbiased (n-1) std per group; 0 for groups of size 1 (docs/algorithms.md §0).
    """

    index_B: Tensor
    count_G: Tensor
    sum_G: Tensor
    mean_G: Tensor
    std_G: Tensor


def group_index(group_ids_B: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary group ids [B] to dense indices [B] in ``0..G-1``; returns (index_B, G)."""
    uniq_G, index_B = torch.unique(group_ids_B, return_inverse=True)
    return index_B, int(uniq_G.numel())


@torch.no_grad()
def group_stats(values_B: Tensor, group_ids_B: Tensor) -> GroupStats:
    """Count, sum, mean and unbiased std of ``values_B`` per group of ``group_ids_B``.

    ``values_B`` is promoted to a floating dtype (float32 for integer/bool inputs).
    """
    if not values_B.is_floating_point():
        values_B = values_B.float()
    index_B, G = group_index(group_ids_B)
    zeros_G = values_B.new_zeros(G)
    count_G = zeros_G.index_add(0, index_B, torch.ones_like(values_B))
    sum_G = zeros_G.index_add(0, index_B, values_B)
    mean_G = sum_G / count_G
    sq_dev_B = (values_B - mean_G[index_B]) ** 2
    # Bessel correction; a singleton group has 0 squared deviation, so clamping n-1 to 1 gives 0.
    var_G = zeros_G.index_add(0, index_B, sq_dev_B) / (count_G - 1).clamp(min=1)
    return GroupStats(index_B=index_B, count_G=count_G, sum_G=sum_G, mean_G=mean_G, std_G=var_G.sqrt())
