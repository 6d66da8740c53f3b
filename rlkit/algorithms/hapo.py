"""HAPO: Heterogeneous Adaptive Policy Optimization (docs/algorithms.md §3; release ``starriver030515/HAPO``).

Three pieces share one building block, the normalised token entropy ĥ (§3.1):

- :func:`compute_entropy_h` -> ``(h_hat_BT, EntropyStats)``; :func:`hapo_sampling_stats` gives the
  whole-batch statistics that the adaptive-temperature sampler (``rollout.adaptive_temperature``,
  §3.2) uses at the *next* step.
- ``hapo_token_mean`` advantage (§3.3): token-weighted group mean / population std, with the
  "smooth score" fallback to plain GRPO when any ``|A| >= 5`` in a group.
- ``hapo`` policy loss (§3.4-3.6): per-token asymmetric clip bounds from ĥ and differential
  advantage redistribution, then dual-clip PPO. Aggregate with ``token-mean`` (recipe default).

Departures from the release, each a flag with the spec's default:
- ``replicate_release_sign=False``: the release computes ``scale_neg = 1/neg_min < 0``, so
  low-entropy tokens get ĥ >= 0 (every token looks "high entropy"). The default is the paper's
  intended ĥ in [-1, 1]; ``True`` reproduces the release exactly (docs/algorithms.md §3.1 "Discrepancy").
- ``fallback_on_padding=False``: the release also evaluates ``(0 - μ)/σ`` on padded positions and
  lets them trigger the GRPO fallback; by default the ``>= 5`` test sees valid tokens only (§3.3).
  Padded positions are always 0 in the returned advantages.
- log-ratios are clamped to [-20, 20] before ``exp`` (as ``ppo_clip``), so the loss equals
  ``ppo_clip`` exactly when both adaptive switches are off.
- a batch (or micro-batch) without valid tokens gives ĥ = 0 and ``stats=None`` (release: NaN or an
  error), so the sampler does not adapt on empty statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from rlkit.algorithms.advantages import GRPOParams, grpo_advantage
from rlkit.algorithms.aggregation import masked_mean
from rlkit.algorithms.groups import group_index
from rlkit.algorithms.losses import LOG_RATIO_CLAMP, _clipped_surrogate, check_clip, dual_clip
from rlkit.algorithms.registry import register_advantage, register_policy_loss
from rlkit.algorithms.types import AdvantageInputs, AdvantageOutput, PolicyLossInputs

ENTROPY_EPS = 1e-8  # release ``compute_entropy_h`` eps: log clamp, variance clamp, pos/neg clamps


class EntropyStats(NamedTuple):
    """Statistics of ĥ (docs/algorithms.md §3.1) as plain floats (picklable; a 4-tuple for the sampler).

    ``ĥ = h·scale_pos`` where ``h = (log H - median)/std > 0``, else ``h·scale_neg``.

    Attributes:
        median: ``m``, the ``entropy_pivot`` quantile of the valid log-entropies.
        std: ``s``, RMS deviation of the log-entropies around ``m`` (not around the mean).
        scale_pos: ``1/pos_max`` (> 0).
        scale_neg: ``1/|neg_min|`` (> 0, intended) or ``1/neg_min`` (< 0, release sign).
    """

    median: float
    std: float
    scale_pos: float
    scale_neg: float


def _nearest_quantile_index(q: float, n: int) -> int:
    """Index into the sorted values for the release's ``torch_quantile(..., "nearest")``.

    ``round(q·(n-1))`` with Python's round-half-to-even (banker's rounding), as the release.
    """
    return round(q * (n - 1))


def _check_pivot(pivot: float) -> None:
    if not 0.0 <= pivot <= 1.0:
        raise ValueError(f"entropy_pivot must be in [0, 1], got {pivot}")


@torch.no_grad()
def _entropy_h(
    entropy_BT: Tensor, mask_BT: Tensor, pivot: float, replicate_release_sign: bool
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor] | None]:
    """ĥ [B, T] (float32 or wider, 0 on padding) and the stats as 0-dim tensors (no host sync
    beyond the valid-token count). ``None`` stats when no token is valid."""
    _check_pivot(pivot)
    if entropy_BT.shape != mask_BT.shape:
        raise ValueError(
            f"entropy_BT {tuple(entropy_BT.shape)} and mask_BT {tuple(mask_BT.shape)} differ in shape"
        )
    dtype = torch.promote_types(entropy_BT.dtype, torch.float32)
    valid_BT = mask_BT > 0
    n = int(valid_BT.sum())
    if n == 0:
        return torch.zeros_like(entropy_BT, dtype=dtype), None
    # padding may hold anything (0, inf, NaN): every reduction below sees valid tokens only
    e_BT = torch.log(entropy_BT.to(dtype).clamp_min(ENTROPY_EPS))
    median = torch.kthvalue(e_BT[valid_BT], _nearest_quantile_index(pivot, n) + 1).values
    h_BT = torch.where(valid_BT, e_BT - median, torch.zeros_like(e_BT))
    std = (h_BT.pow(2).sum() / n).clamp_min(ENTROPY_EPS).sqrt()
    h_BT = h_BT / std
    pos_max = h_BT.masked_fill(~(valid_BT & (h_BT > 0)), 0.0).max().clamp_min(ENTROPY_EPS)
    neg_min = h_BT.masked_fill(~(valid_BT & (h_BT < 0)), 0.0).min().clamp_max(-ENTROPY_EPS)
    scale_pos = 1.0 / pos_max
    # Release: 1/neg_min (< 0) maps low-entropy tokens to ĥ >= 0; intended: 1/|neg_min| -> [-1, 0].
    scale_neg = 1.0 / neg_min if replicate_release_sign else -1.0 / neg_min
    h_hat_BT = torch.where(h_BT > 0, h_BT * scale_pos, h_BT * scale_neg)
    return h_hat_BT, (median, std, scale_pos, scale_neg)


def compute_entropy_h(
    entropy_BT: Tensor,
    mask_BT: Tensor,
    pivot: float = 0.8,
    replicate_release_sign: bool = False,
) -> tuple[Tensor, EntropyStats | None]:
    """Normalised token entropy ĥ (docs/algorithms.md §3.1; release ``compute_entropy_h``).

    ``e = log(max(H, 1e-8))``; ``m`` = the ``pivot`` quantile of the valid ``e`` ("nearest":
    ``sorted(e)[round(pivot·(n-1))]``, banker's rounding); ``h = (e - m)/s`` with
    ``s = sqrt(max(mean_valid((e - m)²), 1e-8))``; then ``ĥ = h/pos_max`` for ``h > 0`` and
    ``h/|neg_min|`` for ``h <= 0`` (intended, ĥ in [-1, 1]) or ``h/neg_min`` (release sign).

    Args:
        entropy_BT: float [B, T] per-token entropies (any floating dtype; computed in >= float32).
        mask_BT: [B, T], > 0 marks valid tokens; statistics use valid tokens only.
        pivot: ``entropy_pivot`` quantile (0.8 in every HAPO recipe: 20% of tokens above it).
        replicate_release_sign: reproduce the release's sign of ``scale_neg`` (see module doc).

    Returns:
        ``h_hat_BT`` [B, T] (0 on padding) and :class:`EntropyStats` of floats, or ``None`` when
        no token is valid (then ĥ is all zeros).
    """
    h_hat_BT, raw = _entropy_h(entropy_BT, mask_BT, pivot, replicate_release_sign)
    if raw is None:
        return h_hat_BT, None
    return h_hat_BT, EntropyStats(*torch.stack(raw).double().tolist())


@torch.no_grad()
def hapo_sampling_stats(
    entropy_BT: Tensor,
    mask_BT: Tensor | None = None,
    pivot: float = 0.8,
    replicate_release_sign: bool = False,
) -> EntropyStats | None:
    """Sampling-time ĥ statistics over a whole batch of old-policy entropies (docs/algorithms.md §3.1).

    The release computes them right after ``compute_log_prob`` from the old-policy entropies of
    the *entire* training batch and hands them to the *next* step's rollout (``None`` at step 1,
    i.e. no adaptation). Pass the result to ``rollout.adaptive_temperature.AdaptiveTemperature``.

    Args:
        entropy_BT: float [B, T] old-policy entropies (un-tempered logits), or a 1-D tensor of
            valid entropies only (then ``mask_BT`` must be ``None``).
        mask_BT: [B, T] response mask; ``None`` = every entry is valid.
        pivot: ``entropy_pivot`` (the same value the loss uses).
        replicate_release_sign: see :func:`compute_entropy_h`.

    Returns:
        :class:`EntropyStats` (floats) or ``None`` if there is no valid token.
    """
    if mask_BT is None:
        mask_BT = torch.ones_like(entropy_BT)
    return compute_entropy_h(entropy_BT, mask_BT, pivot, replicate_release_sign)[1]


# ----------------------------------------------------------------------------- advantage (§3.3)


@dataclass(frozen=True)
class HAPOAdvantageParams:
    """Hyper-parameters of the token-level group-average advantage (docs/algorithms.md §3.3).

    Attributes:
        eps: added to the group std before dividing.
        norm_by_std: divide by the (token-weighted, population) group std (verl
            ``norm_adv_by_std_in_grpo``); also passed to the GRPO fallback.
        fallback_threshold: if any ``|A| >=`` this in a group, the whole group uses plain GRPO
            advantages ("smooth score"; 5 in the release).
        fallback_on_padding: release quirk: also test ``(0 - μ)/(σ + eps)`` (the value the release
            computes on padded positions) against the threshold [docs/algorithms.md §3.3, INFERRED default off].
    """

    eps: float = 1e-6
    norm_by_std: bool = True
    fallback_threshold: float = 5.0
    fallback_on_padding: bool = False

    def __post_init__(self) -> None:
        if self.eps < 0:
            raise ValueError(f"HAPOAdvantageParams.eps must be >= 0, got {self.eps}")
        if not self.fallback_threshold > 0:
            raise ValueError(f"fallback_threshold must be > 0, got {self.fallback_threshold}")


@register_advantage("hapo_token_mean", params=HAPOAdvantageParams, aliases=("hapo_token_avg", "hapo"))
@torch.no_grad()
def hapo_token_mean_advantage(inp: AdvantageInputs, p: HAPOAdvantageParams) -> Tensor:
    """Token-level group-average advantage (docs/algorithms.md §3.3; release ``compute_hapo_outcome_advantage``).

    Each response's reward counts once per valid token (``|o_i|`` = its valid-token count)::

        N_g = Σ_i |o_i|,  μ_g = Σ_i |o_i| R_i / N_g,  σ_g = sqrt(Σ_i |o_i| (R_i - μ_g)² / N_g)
        A_i = (R_i - μ_g) / (σ_g + eps)        (R_i - μ_g if not norm_by_std)

    If any valid token of the group has ``|A| >= fallback_threshold`` the whole group takes the
    plain GRPO advantage (:func:`grpo_advantage`, unbiased std). A group whose responses have no
    valid token gets 0; a singleton group gets ``R - R = 0`` (unless it falls back to GRPO, where
    a singleton uses mean 0 / std 1). ``inp.entropy_BT`` is accepted but unused (as the release).

    Args:
        inp: ``rewards_B`` [B], ``group_ids_B`` [B], ``response_mask_BT`` [B, T].
        p: :class:`HAPOAdvantageParams`.

    Returns:
        advantages_BT [B, T] in the rewards' float dtype (float32 for integer rewards), 0 on
        padding. Metric ``hapo_token_mean/fallback_group_frac`` is returned in the ``AdvantageOutput``.
    """
    rewards_B = inp.rewards_B if inp.rewards_B.is_floating_point() else inp.rewards_B.float()
    out_dtype = rewards_B.dtype
    mask_BT = inp.response_mask_BT.to(out_dtype)
    T = mask_BT.shape[1]
    r_B = rewards_B.double()  # group sums over up to ~10^7 tokens: accumulate in float64
    len_B = mask_BT.double().sum(-1)
    index_B, G = group_index(inp.group_ids_B)
    zeros_G = r_B.new_zeros(G)
    n_G = zeros_G.index_add(0, index_B, len_B)
    has_tokens_G = n_G > 0
    safe_n_G = torch.where(has_tokens_G, n_G, torch.ones_like(n_G))
    mean_G = zeros_G.index_add(0, index_B, len_B * r_B) / safe_n_G
    dev_B = r_B - mean_G[index_B]
    std_G = (zeros_G.index_add(0, index_B, len_B * dev_B**2) / safe_n_G).sqrt()
    scale_B = (std_G[index_B] + p.eps) if p.norm_by_std else torch.ones_like(r_B)
    adv_B = dev_B / scale_B

    big_B = (adv_B.abs() >= p.fallback_threshold) & (len_B > 0)
    if p.fallback_on_padding:
        # release: padded positions hold score 0, so they carry (0 - μ)/(σ + eps)
        pad_adv_B = -mean_G[index_B] / scale_B
        big_B |= (pad_adv_B.abs() >= p.fallback_threshold) & (len_B < T) & has_tokens_G[index_B]
    fallback_G = zeros_G.index_add(0, index_B, big_B.double()) > 0
    fallback_B = fallback_G[index_B]

    token_BT = adv_B.to(out_dtype)[:, None] * mask_BT
    if bool(fallback_G.any()):
        grpo_BT = grpo_advantage(inp, GRPOParams(eps=p.eps, norm_by_std=p.norm_by_std)).to(out_dtype)
        token_BT = torch.where(fallback_B[:, None], grpo_BT, token_BT)
    return AdvantageOutput(token_BT, {"hapo_token_mean/fallback_group_frac": float(fallback_G.double().mean())})


# ----------------------------------------------------------------------------- loss (§3.4-3.6)


@dataclass(frozen=True)
class HAPOLossParams:
    """Hyper-parameters of the HAPO policy loss (docs/algorithms.md §3.4-3.7; release recipe defaults).

    Attributes:
        entropy_pivot: quantile of the micro-batch log-entropies that separates high/low entropy.
        adaptive_clip: per-token clip bounds from ĥ (§3.4).
        clip_alpha: α_clip.
        adaptive_advantage: differential advantage redistribution (§3.5).
        adv_beta: β.
        clip_ratio_low: base ε_low (HAPO recipes: 0.2, not DAPO's 0.28).
        clip_ratio_high: base ε_high.
        clip_ratio_c: dual-clip constant c (recipes: 10); ``None`` disables dual clip.
        replicate_release_sign: use the release's sign of ĥ for low-entropy tokens (§3.1).
    """

    entropy_pivot: float = 0.8
    adaptive_clip: bool = True
    clip_alpha: float = 1.0
    adaptive_advantage: bool = True
    adv_beta: float = 1.0
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: float | None = 10.0
    replicate_release_sign: bool = False

    def __post_init__(self) -> None:
        _check_pivot(self.entropy_pivot)
        check_clip(self.clip_ratio_low, self.clip_ratio_high, self.clip_ratio_c,
                   ("clip_ratio_low", "clip_ratio_high", "clip_ratio_c"))
        if self.clip_alpha < 0 or self.adv_beta < 0:
            raise ValueError(f"clip_alpha and adv_beta must be >= 0, got {self.clip_alpha}, {self.adv_beta}")


def adaptive_clip_bounds(
    h_hat_BT: Tensor, clip_low: float, clip_high: float, alpha: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Asymmetric adaptive clipping (docs/algorithms.md §3.4; release ``ada_clip``): ``(eps_low_BT, eps_high_BT)``.

    ``ε_low(t) = ε_low·(1 - α ĥ)`` where ``ĥ <= 0`` (wider lower bound for low-entropy tokens),
    ``ε_high(t) = ε_high·(1 + α ĥ)`` where ``ĥ > 0`` (wider upper bound for high-entropy tokens);
    the base value elsewhere.
    """
    low_BT = torch.where(h_hat_BT <= 0, clip_low * (1.0 - alpha * h_hat_BT), torch.full_like(h_hat_BT, clip_low))
    high_BT = torch.where(h_hat_BT > 0, clip_high * (1.0 + alpha * h_hat_BT), torch.full_like(h_hat_BT, clip_high))
    return low_BT, high_BT


def redistribute_advantages(
    advantages_BT: Tensor,
    h_hat_BT: Tensor,
    ratio_BT: Tensor,
    eps_low_BT: Tensor,
    eps_high_BT: Tensor,
    beta: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Differential advantage redistribution (docs/algorithms.md §3.5; release ``ada_advantage``).

    ``A_ent = A (1 + β ĥ)``; ``neutral = 1 - ε_low(t)/2 < r < 1 + ε_high(t)/2``. High entropy
    (ĥ > 0): ``A`` inside the neutral zone, ``A_ent`` outside; low entropy (ĥ <= 0): ``A_ent``
    inside, ``A`` outside. Call under ``no_grad`` with the detached ratio.

    Returns:
        ``(new_advantages_BT, used_ent_BT)``; ``used_ent_BT`` (bool) marks tokens that took the
        ``A_ent`` branch.
    """
    neutral_BT = (ratio_BT > 1.0 - eps_low_BT / 2) & (ratio_BT < 1.0 + eps_high_BT / 2)
    used_ent_BT = torch.where(h_hat_BT > 0, ~neutral_BT, neutral_BT)
    adv_ent_BT = advantages_BT * (1.0 + beta * h_hat_BT)
    return torch.where(used_ent_BT, adv_ent_BT, advantages_BT), used_ent_BT


@register_policy_loss("hapo", params=HAPOLossParams)
def hapo_loss(inp: PolicyLossInputs, p: HAPOLossParams) -> tuple[Tensor, dict[str, Tensor]]:
    """HAPO token loss (docs/algorithms.md §3.6; release ``compute_policy_loss``).

    ĥ is computed under ``no_grad`` from ``inp.entropy_BT`` (current policy, same forward pass) over
    the valid tokens of *this micro-batch*, as the release does; then ``(ε_low(t), ε_high(t))`` by
    :func:`adaptive_clip_bounds`, ``A'`` by :func:`redistribute_advantages`, and
    ``l = max(-A' r, -A' clip(r, 1-ε_low(t), 1+ε_high(t)))``, capped at ``-A' c`` where ``A' < 0``.
    With both adaptive switches off this is exactly ``ppo_clip`` (clip_low/high/c).

    Returns:
        loss_BT [B, T] (unreduced, not masked; aggregate with ``token-mean``) and metrics
        (detached scalars, token means over this micro-batch): ``clip_frac``, ``clip_frac_low``
        (r below its lower bound), ``clip_frac_high``, ``dual_clip_frac``, ``ppo_kl``,
        ``hapo/high_entropy_frac`` (ĥ > 0), ``hapo/eps_low_mean``, ``hapo/eps_high_mean``,
        ``hapo/adv_redistributed_frac`` (tokens whose advantage was rescaled, ĥ != 0).
    """
    mask_BT = inp.response_mask_BT
    log_ratio_BT = torch.clamp(inp.logprobs_BT - inp.old_logprobs_BT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio_BT = torch.exp(log_ratio_BT)
    advantages_BT = inp.advantages_BT.to(ratio_BT.dtype)

    with torch.no_grad():
        if p.adaptive_clip or p.adaptive_advantage:
            if inp.entropy_BT is None:
                raise ValueError(
                    "the hapo loss needs PolicyLossInputs.entropy_BT (current-policy entropy); "
                    "pass it, or set adaptive_clip=False and adaptive_advantage=False"
                )
            h_hat_BT, _ = _entropy_h(inp.entropy_BT.detach(), mask_BT, p.entropy_pivot, p.replicate_release_sign)
            h_hat_BT = h_hat_BT.to(ratio_BT.dtype)
        else:
            h_hat_BT = torch.zeros_like(ratio_BT)
        if p.adaptive_clip:
            eps_low_BT, eps_high_BT = adaptive_clip_bounds(h_hat_BT, p.clip_ratio_low, p.clip_ratio_high, p.clip_alpha)
        else:
            eps_low_BT = torch.full_like(ratio_BT, p.clip_ratio_low)
            eps_high_BT = torch.full_like(ratio_BT, p.clip_ratio_high)
        used_ent_BT = torch.zeros_like(ratio_BT, dtype=torch.bool)
        if p.adaptive_advantage:
            advantages_BT, used_ent_BT = redistribute_advantages(
                advantages_BT, h_hat_BT, ratio_BT.detach(), eps_low_BT, eps_high_BT, p.adv_beta
            )

    loss_BT, clipped_BT = _clipped_surrogate(advantages_BT, ratio_BT, eps_low_BT, eps_high_BT)
    loss_BT, dual_clipped_BT = dual_clip(loss_BT, advantages_BT, p.clip_ratio_c)

    with torch.no_grad():
        ratio_d_BT = ratio_BT.detach()
        clipped_d_BT = clipped_BT.detach()
        dt = ratio_BT.dtype
        metrics = {
            "clip_frac": masked_mean(clipped_d_BT.to(dt), mask_BT),
            "clip_frac_low": masked_mean((clipped_d_BT & (ratio_d_BT < 1.0)).to(dt), mask_BT),
            "clip_frac_high": masked_mean((clipped_d_BT & (ratio_d_BT > 1.0)).to(dt), mask_BT),
            "dual_clip_frac": masked_mean(dual_clipped_BT.detach().to(dt), mask_BT),
            "ppo_kl": masked_mean(-log_ratio_BT.detach(), mask_BT),
            "hapo/high_entropy_frac": masked_mean((h_hat_BT > 0).to(dt), mask_BT),
            "hapo/eps_low_mean": masked_mean(eps_low_BT, mask_BT),
            "hapo/eps_high_mean": masked_mean(eps_high_BT, mask_BT),
            "hapo/adv_redistributed_frac": masked_mean((used_ent_BT & (h_hat_BT != 0)).to(dt), mask_BT),
        }
    return loss_BT, metrics
