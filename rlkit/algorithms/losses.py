"""Policy losses: PPO-clip with decoupled/dual clip (docs/algorithms.md §0, §7.1 DAPO, §7.2) and GSPO-token (§7.3).

Registry signature: ``fn(inp: PolicyLossInputs, p: Params) -> (loss_BT, metrics)``. The loss is
per token and unreduced (negated objective, to be minimised); reduce it with
:func:`rlkit.algorithms.aggregation.aggregate`. Metrics are detached scalar tensors, masked token
means over this micro-batch, with un-namespaced keys (the trainer prefixes ``actor/``):
``clip_frac``, ``ppo_kl`` (mean of old - new log-prob) and, for ``ppo_clip``, ``dual_clip_frac``.

Departures: log-ratios are clamped to [-20, 20] before ``exp`` in ``ppo_clip`` (and at max 10 in
``gspo``, as verl) so a stale or diverged token cannot overflow to inf/NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlkit.algorithms.aggregation import masked_mean
from rlkit.algorithms.registry import register_policy_loss
from rlkit.algorithms.types import PolicyLossInputs

LOG_RATIO_CLAMP = 20.0
GSPO_LOG_RATIO_MAX = 10.0


@dataclass(frozen=True)
class PPOClipParams:
    """Hyper-parameters of the PPO-clip token loss (docs/algorithms.md §0).

    Attributes:
        clip_low: ε_low, the ratio is clipped below at ``1 - clip_low``.
        clip_high: ε_high, clipped above at ``1 + clip_high`` (DAPO clip-higher: 0.28, §7.1).
        clip_c: dual-clip constant c (verl ``clip_ratio_c``); for A < 0 the loss is capped at
            ``-A * c``. ``None`` disables dual clip. DAPO/HAPO recipes use 10.0.
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_c: float | None = 3.0

    def __post_init__(self) -> None:
        check_clip(self.clip_low, self.clip_high, self.clip_c)


def check_clip(low: float, high: float, c: float | None, names: tuple[str, str, str] = ("clip_low", "clip_high", "clip_c")) -> None:
    """PPO clip bounds: ``low`` in [0, 1), ``high`` >= 0, dual-clip ``c`` > 1 or None (off)."""
    if not 0.0 <= low < 1.0:
        raise ValueError(f"{names[0]} must be in [0, 1), got {low}")
    if high < 0.0:
        raise ValueError(f"{names[1]} must be >= 0, got {high}")
    if c is not None and c <= 1.0:
        raise ValueError(f"{names[2]} must be > 1 (or None to disable dual clip), got {c}")


@dataclass(frozen=True)
class GSPOParams:
    """Hyper-parameters of GSPO (docs/algorithms.md §7.3). Sequence ratios are clipped to [1-clip_low, 1+clip_high].

    Attributes:
        clip_low: ε_low (verl GSPO recipe: 3e-4).
        clip_high: ε_high (verl GSPO recipe: 4e-4).
    """

    clip_low: float = 3e-4
    clip_high: float = 4e-4

    def __post_init__(self) -> None:
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"clip_low must be in [0, 1), got {self.clip_low}")
        if self.clip_high < 0.0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high}")


def _clipped_surrogate(
    advantages_BT: Tensor, ratio_BT: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor]:
    """``max(-A r, -A clip(r, 1-ε_low, 1+ε_high))`` per token, and a bool mask where the clip won."""
    unclipped_BT = -advantages_BT * ratio_BT
    clipped_BT = -advantages_BT * torch.clamp(ratio_BT, 1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped_BT, clipped_BT), clipped_BT > unclipped_BT


def dual_clip(loss_BT: Tensor, advantages_BT: Tensor, clip_c: float | None) -> tuple[Tensor, Tensor]:
    """Dual clip (Ye et al. 2020): where ``A < 0`` cap the token loss at ``-A * clip_c``.

    For a negative advantage a huge ratio would give an unbounded loss. Returns the capped loss
    and a bool [B, T] of tokens the cap changed (all False when ``clip_c`` is None).
    """
    if clip_c is None:
        return loss_BT, torch.zeros_like(loss_BT, dtype=torch.bool)
    cap_BT = -advantages_BT * clip_c
    negative_BT = advantages_BT < 0
    capped_BT = negative_BT & (loss_BT > cap_BT)
    return torch.where(negative_BT, torch.minimum(loss_BT, cap_BT), loss_BT), capped_BT


@register_policy_loss("ppo_clip", params=PPOClipParams)
def ppo_clip_loss(inp: PolicyLossInputs, p: PPOClipParams) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip token loss with decoupled clip range and dual clip (docs/algorithms.md §0; DAPO §7.1).

    ``l_t = max(-A_t r_t, -A_t clip(r_t, 1-ε_low, 1+ε_high))`` with ``r_t = exp(logp_t - old_t)``;
    where ``A_t < 0`` and dual clip is on, ``l_t = min(l_t, -A_t c)``.

    Returns:
        loss_BT [B, T] (unreduced, not masked) and metrics ``clip_frac``, ``ppo_kl``,
        ``dual_clip_frac``.
    """
    mask_BT = inp.response_mask_BT
    log_ratio_BT = torch.clamp(inp.logprobs_BT - inp.old_logprobs_BT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio_BT = torch.exp(log_ratio_BT)
    advantages_BT = inp.advantages_BT.to(ratio_BT.dtype)

    loss_BT, clipped_BT = _clipped_surrogate(advantages_BT, ratio_BT, p.clip_low, p.clip_high)
    loss_BT, dual_clipped_BT = dual_clip(loss_BT, advantages_BT, p.clip_c)

    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean(clipped_BT.to(ratio_BT.dtype), mask_BT),
            "ppo_kl": masked_mean(-log_ratio_BT, mask_BT),
            "dual_clip_frac": masked_mean(dual_clipped_BT.to(ratio_BT.dtype), mask_BT),
        }
    return loss_BT, metrics


@register_policy_loss("gspo", params=GSPOParams)
def gspo_loss(inp: PolicyLossInputs, p: GSPOParams) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO-token loss (docs/algorithms.md §7.3; verl ``compute_policy_loss_gspo``).

    ``log s_i = (1/|y_i|) sum_t m (logp - old)`` is the sequence log-ratio (length-normalised);
    ``log s_{i,t} = sg[log s_i] + logp_t - sg[logp_t]`` has the value of ``log s_i`` and the
    gradient of ``logp_t``; ``s_{i,t} = exp(min(log s_{i,t}, 10))`` and
    ``l_{i,t} = max(-A s_{i,t}, -A clip(s_{i,t}, 1-ε_low, 1+ε_high))``. With sequence-level
    advantages this equals sequence-level GSPO. Aggregate with ``seq-mean-token-mean``
    (verl forces it for GSPO).

    Returns:
        loss_BT [B, T] (unreduced) and metrics ``clip_frac`` (fraction of valid tokens whose
        sequence ratio was clipped) and ``ppo_kl`` (token mean of old - new).
    """
    mask_BT = inp.response_mask_BT.to(inp.logprobs_BT.dtype)
    log_ratio_BT = inp.logprobs_BT - inp.old_logprobs_BT
    seq_log_ratio_B = (log_ratio_BT * mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1)
    logprobs_BT = inp.logprobs_BT
    log_seq_ratio_BT = seq_log_ratio_B.detach()[:, None] + logprobs_BT - logprobs_BT.detach()
    seq_ratio_BT = torch.exp(torch.clamp(log_seq_ratio_BT, max=GSPO_LOG_RATIO_MAX))
    advantages_BT = inp.advantages_BT.to(seq_ratio_BT.dtype)

    loss_BT, clipped_BT = _clipped_surrogate(advantages_BT, seq_ratio_BT, p.clip_low, p.clip_high)
    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean(clipped_BT.to(seq_ratio_BT.dtype), mask_BT),
            "ppo_kl": masked_mean(-log_ratio_BT.detach(), mask_BT),
        }
    return loss_BT, metrics
