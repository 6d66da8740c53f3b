"""Sampling filters of DAPO (docs/algorithms.md §7.1): dynamic sampling and overlong filtering.

- :func:`dynamic_sampling_keep_B` keeps the responses of prompt groups whose score varies
  (std > 0) or that have a single response; groups where every response scored the same give
  zero GRPO advantage and only dilute the batch. "std > 0" is tested exactly as ``max > min``,
  which avoids a rounding-dependent float std.
- :func:`overlong_filter_mask` masks out truncated responses entirely.
Accumulating kept groups across generation rounds is the trainer's job, not this module's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkit.algorithms.groups import group_index


@torch.no_grad()
def dynamic_sampling_keep_B(scores_B: Tensor, group_ids_B: Tensor) -> Tensor:
    """bool [B]: True for members of groups whose ``scores_B`` are not all equal, or of size 1.

    Args:
        scores_B: [B] metric per response (e.g. ``acc`` or ``seq_reward``).
        group_ids_B: [B] prompt-group ids, arbitrary integers.
    """
    index_B, G = group_index(group_ids_B)
    scores_B = scores_B if scores_B.is_floating_point() else scores_B.float()
    fill = scores_B.new_zeros(G)
    max_G = fill.scatter_reduce(0, index_B, scores_B, reduce="amax", include_self=False)
    min_G = fill.scatter_reduce(0, index_B, scores_B, reduce="amin", include_self=False)
    count_G = torch.zeros(G, dtype=torch.long, device=scores_B.device).index_add(
        0, index_B, torch.ones_like(index_B)
    )
    keep_G = (max_G > min_G) | (count_G == 1)
    return keep_G[index_B]


def overlong_filter_mask(response_mask_BT: Tensor, truncated_B: Tensor) -> Tensor:
    """[B, T] copy of ``response_mask_BT`` with the rows of truncated responses zeroed.

    Args:
        response_mask_BT: [B, T] valid-token mask.
        truncated_B: bool [B], True where the response hit the length limit without EOS.
    """
    keep_B = ~truncated_B.bool()
    return response_mask_BT * keep_B[:, None].to(response_mask_BT.dtype)
