"""Rollout–training mismatch correction (truncated / masked importance sampling).

The engine that samples a response (vLLM kernels, bf16, a guided or adapted sampler, weights
synced a step ago) is not numerically the learner's policy. PPO's ratio ``pi_theta / pi_old``
compares the learner with itself (``old`` = the learner's pre-update log-probs), so the gap
between ``pi_old`` and the behaviour policy ``pi_rollout`` that really produced the tokens goes
uncorrected unless it is weighted back in:

    w = pi_old / pi_rollout                    per token, or per sequence (product over its tokens)
    tis: loss_t *= min(w, C)                   truncated importance sampling (Ionides 2008; Yao et al.
                                               2025, "Your efficient RL framework secretly brings you
                                               off-policy RL training")
    mis: loss_t *= 1[1/C <= w <= C]            masked importance sampling: drop what is too far off

The weights multiply the policy-gradient loss only (not the KL term) and are constants (computed
from detached log-probs). Masked tokens stay in the aggregation denominator, as with loss masks.

Diagnostics, whatever the mode (token means over valid tokens): ``mismatch/kl`` — the k3
estimate of ``KL(pi_rollout || pi_old)`` from the sampled tokens, ``E[w - 1 - log w]``;
``mismatch/ratio_mean`` and ``mismatch/ratio_max`` of the token ratios ``w``;
``mismatch/corrected_frac`` — the share of tokens whose weight the mode changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

LOG_W_CLAMP = 20.0  # exp(20) ~ 5e8: far past any clip, still finite in float32


@dataclass(frozen=True)
class RolloutCorrectionParams:
    """``mode``: none | tis | mis; ``level``: token | sequence; ``clip``: C > 1."""

    mode: Literal["none", "tis", "mis"] = "none"
    level: Literal["token", "sequence"] = "token"
    clip: float = 2.0

    def __post_init__(self) -> None:
        if self.mode not in ("none", "tis", "mis"):
            raise ValueError(f"rollout_correction.mode must be none, tis or mis, got {self.mode!r}")
        if self.level not in ("token", "sequence"):
            raise ValueError(f"rollout_correction.level must be token or sequence, got {self.level!r}")
        if not self.clip > 1.0:
            raise ValueError(f"rollout_correction.clip must be > 1, got {self.clip}")


@torch.no_grad()
def rollout_correction(
    old_logprobs_BT: Tensor, rollout_logprobs_BT: Tensor, mask_BT: Tensor, p: RolloutCorrectionParams
) -> tuple[Tensor, dict[str, Tensor]]:
    """Importance weights [B, T] for the policy-gradient loss, and the mismatch diagnostics.

    Args:
        old_logprobs_BT: the learner's pre-update log-probs of the sampled tokens.
        rollout_logprobs_BT: the engine's log-probs of the same tokens (behaviour policy).
        mask_BT: 1 on valid response tokens.
        p: :class:`RolloutCorrectionParams`.

    Returns:
        ``weight_BT`` (1 everywhere for ``mode: none``) and metrics as token *means over this
        call's valid tokens* (``kl``, ``ratio_mean``, ``corrected_frac``) plus ``ratio_max``.
    """
    mask = mask_BT.to(old_logprobs_BT.dtype)
    valid = mask > 0
    log_r_BT = ((old_logprobs_BT - rollout_logprobs_BT) * mask).clamp(-LOG_W_CLAMP, LOG_W_CLAMP)
    log_w_BT = log_r_BT if p.level == "token" else log_r_BT.sum(-1, keepdim=True).clamp(
        -LOG_W_CLAMP, LOG_W_CLAMP).expand_as(log_r_BT)  # fmt: skip
    w_BT = log_w_BT.exp()
    if p.mode == "tis":
        weight_BT, changed_BT = w_BT.clamp(max=p.clip), w_BT > p.clip
    elif p.mode == "mis":
        changed_BT = (w_BT < 1.0 / p.clip) | (w_BT > p.clip)
        weight_BT = (~changed_BT).to(w_BT.dtype)
    else:
        weight_BT, changed_BT = torch.ones_like(w_BT), torch.zeros_like(valid)
    n = mask.sum().clamp(min=1)
    r_BT = log_r_BT.exp()
    metrics = {
        "kl": ((r_BT - 1 - log_r_BT) * mask).sum() / n,
        "ratio_mean": (r_BT * mask).sum() / n,
        "ratio_max": r_BT[valid].max() if bool(valid.any()) else r_BT.new_tensor(1.0),
        "corrected_frac": (changed_BT & valid).to(mask.dtype).sum() / n,
    }
    return weight_BT, metrics


__all__ = ["RolloutCorrectionParams", "rollout_correction"]
