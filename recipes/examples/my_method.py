"""A new method as one file: an advantage estimator and a policy loss, selected by name from a
recipe through ``plugins:`` (see ``recipes/examples/my_method.yaml``), without touching ``rlkit/``.

- ``reinforce_pp_batch``: REINFORCE++'s baseline (Hu et al. 2025, "REINFORCE++"): each reward
  minus its prompt group's mean, then normalised by the mean and std of the whole batch, the same
  for every token of the response.
- ``ppo_clip_counted``: the built-in PPO-clip loss (same parameters), plus a metric
  ``plugin_calls`` (1.0 per update) showing the loss ran in the learner's worker, where the
  plugins are imported too.
"""

from __future__ import annotations

import torch

from rlkit.algorithms import (
    AdvantageInputs,
    PolicyLossInputs,
    PPOClipParams,
    ppo_clip_loss,
    register_advantage,
    register_policy_loss,
)
from rlkit.algorithms.groups import group_stats


@register_advantage("reinforce_pp_batch")
def reinforce_pp_batch(inp: AdvantageInputs, p: object = None) -> torch.Tensor:
    """``(R - mean_group(R) - mu_batch) / sigma_batch`` on every valid token. (B,) -> (B, T)

    >>> inp = AdvantageInputs(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1]), torch.ones(4, 2))
    >>> reinforce_pp_batch(inp)[:, 0].tolist()
    [1.2247..., -1.2247..., 0.0, 0.0]
    """
    r = inp.rewards_B.to(torch.float64)
    stats = group_stats(r, inp.group_ids_B)
    centred = r - stats.mean_G[stats.index_B]
    normed = (centred - centred.mean()) / (centred.std() + 1e-6) if r.numel() > 1 else centred
    return normed.to(inp.response_mask_BT.dtype)[:, None] * inp.response_mask_BT


@register_policy_loss("ppo_clip_counted", params=PPOClipParams)
def ppo_clip_counted(inp: PolicyLossInputs, p: PPOClipParams):
    """PPO-clip, reporting ``plugin_calls`` (token shares that add up to 1.0 per update)."""
    loss_BT, metrics = ppo_clip_loss(inp, p)
    return loss_BT, {**metrics, "plugin_calls": torch.tensor(1.0)}
