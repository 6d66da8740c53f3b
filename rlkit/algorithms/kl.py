"""Per-token KL estimators between the policy and a reference policy (verl ``kl_penalty``).

With ``x = logp - ref_logp`` (log π/π_ref of the sampled token), J. Schulman's estimators of
``KL(π || π_ref)`` are:
- ``k1`` (alias ``kl``):                ``x``                    unbiased, high variance
- ``k2`` (alias ``mse``):               ``0.5 x^2``
- ``k3`` (alias ``low_var_kl``):        ``exp(-x) + x - 1``      unbiased, >= 0, low variance
- ``abs``:                              ``|x|``

Departure / safety, as verl ``low_var_kl``: ``k3`` clamps ``-x`` to [-20, 20] before ``exp`` and the
result to [-10, 10]. The returned tensor is unmasked [B, T]; aggregate it like a loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkit.algorithms.registry import KL_ESTIMATORS, register_kl_estimator

K3_LOG_RATIO_CLAMP = 20.0
K3_RESULT_CLAMP = 10.0


@register_kl_estimator("k1", aliases=("kl",))
def kl_k1(logprobs_BT: Tensor, ref_logprobs_BT: Tensor) -> Tensor:
    """``logp - ref_logp`` [B, T]."""
    return logprobs_BT - ref_logprobs_BT


@register_kl_estimator("k2", aliases=("mse",))
def kl_k2(logprobs_BT: Tensor, ref_logprobs_BT: Tensor) -> Tensor:
    """``0.5 (logp - ref_logp)^2`` [B, T]."""
    return 0.5 * (logprobs_BT - ref_logprobs_BT).square()


@register_kl_estimator("k3", aliases=("low_var_kl",))
def kl_k3(logprobs_BT: Tensor, ref_logprobs_BT: Tensor) -> Tensor:
    """``exp(ref - logp) - (ref - logp) - 1`` [B, T], log-ratio clamped to ±20, result to ±10."""
    log_ratio_BT = torch.clamp(ref_logprobs_BT - logprobs_BT, -K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    kl_BT = torch.exp(log_ratio_BT) - log_ratio_BT - 1.0
    return torch.clamp(kl_BT, -K3_RESULT_CLAMP, K3_RESULT_CLAMP)


@register_kl_estimator("abs")
def kl_abs(logprobs_BT: Tensor, ref_logprobs_BT: Tensor) -> Tensor:
    """``|logp - ref_logp|`` [B, T]."""
    return (logprobs_BT - ref_logprobs_BT).abs()


def kl_penalty(logprobs_BT: Tensor, ref_logprobs_BT: Tensor, kind: str) -> Tensor:
    """Per-token KL estimate [B, T] of kind ``kind`` (a name or alias in ``KL_ESTIMATORS``)."""
    return KL_ESTIMATORS.get(kind).fn(logprobs_BT, ref_logprobs_BT)
