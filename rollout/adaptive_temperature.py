"""HAPO adaptive-temperature sampling as a ``rollout.sampling`` logits processor (docs/algorithms.md §3.2).

At every decode step, for each row: ``H`` = entropy of the logits at the row's request
temperature ``T`` (``logits / T``, the scale on which the learner measured its statistics),
``ĥ = clamp(norm(log max(H, 1e-6)), -1, 1)`` with the previous training step's statistics
``(m, s, scale_pos, scale_neg)`` (``rlkit.algorithms.hapo.hapo_sampling_stats``), and the row is
sampled at ``T' = T·(1 + τ ĥ)`` (release: patched vLLM ``Sampler.sample``). ``T`` is the row's
request temperature, not the previous step's ``T'``, so the adaptation never compounds. The
engine records behaviour log-probs under ``T'`` (processors run before temperature).

Departure: the release computes ``H`` from the un-tempered logits, which matches its
statistics only at ``T = 1`` (every HAPO recipe of the paper); at ``T != 1`` the two sides would
compare entropies on different scales (at ``T = 0.5`` nearly every token reads as high-entropy).
rlkit measures both at ``T``; at ``T = 1`` this is the release exactly.

Rows with ``T == 0`` stay greedy. ``stats=None`` (the first training step) is a no-op. This module
must not import ``rlkit``: ``stats`` is any 4-sequence of floats (``EntropyStats`` is a NamedTuple).

Departure: entropies are computed with ``0·log 0 = 0``, so logits already masked to ``-inf`` by an
earlier processor do not make ``H`` NaN. A processor earlier in the chain that sets
``state.temperature_B`` is overridden for sampled rows (the release has no such processors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

SAMPLING_EPS = 1e-6  # release sampler eps: log-entropy clamp and std offset


def logits_entropy(logits_BV: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of ``softmax(logits)`` per row, float32, ``0·log 0 := 0``. (B, V) -> (B,)."""
    logp_BV = torch.log_softmax(logits_BV.float(), dim=-1)
    p_BV = logp_BV.exp()
    return -(p_BV * torch.where(p_BV > 0, logp_BV, torch.zeros_like(logp_BV))).sum(-1)


def normalized_entropy(
    entropy_B: torch.Tensor, stats: Sequence[float], eps: float = SAMPLING_EPS
) -> torch.Tensor:
    """Sampling-time ĥ (docs/algorithms.md §3.2 step 2-3): ``h = (log max(H, eps) - m)/(s + eps)``, then
    ``h·scale_pos`` if ``h > 0`` else ``h·scale_neg``, clamped to [-1, 1]. (B,) -> (B,)."""
    median, std, scale_pos, scale_neg = (float(x) for x in stats)
    h_B = (torch.log(entropy_B.float().clamp_min(eps)) - median) / (std + eps)
    return torch.where(h_B > 0, h_B * scale_pos, h_B * scale_neg).clamp(-1.0, 1.0)


def adapted_temperature(
    logits_BV: torch.Tensor,
    temperature_B: torch.Tensor,
    stats: Sequence[float] | None,
    tau: float = 0.05,
    eps: float = SAMPLING_EPS,
) -> torch.Tensor:
    """``T' = T·(1 + τ ĥ)`` per row, ĥ from the entropy of ``logits / T`` (the scale of the
    learner's statistics); ``T`` unchanged where ``T == 0`` or ``stats is None``.
    (B, V), (B,) -> (B,) float32."""
    temperature_B = temperature_B.float()
    if stats is None:
        return temperature_B
    scale_B = temperature_B.to(logits_BV.device).clamp_min(eps)[:, None]  # greedy rows: any finite scale
    factor_B = temperature_factor(logits_entropy(logits_BV.float() / scale_B), stats, tau, eps)
    return torch.where(temperature_B > 0, temperature_B * factor_B, temperature_B)


def temperature_factor(
    entropy_B: torch.Tensor, stats: Sequence[float], tau: float = 0.05, eps: float = SAMPLING_EPS
) -> torch.Tensor:
    """``T'/T = 1 + τ ĥ`` for entropies measured at the request temperature. (B,) -> (B,)."""
    return 1.0 + tau * normalized_entropy(entropy_B, stats, eps)


def temperature_factor_summary(
    entropy_N: torch.Tensor, stats: Sequence[float], tau: float = 0.05, eps: float = SAMPLING_EPS
) -> dict[str, float]:
    """How a step's sampling temperature moved: ``factor_mean`` / ``factor_min`` / ``factor_max`` of
    ``T'/T`` over the tokens whose entropies (at ``T``, under the policy that sampled them) are
    ``entropy_N``, and the fractions sampled hotter (``heated_frac``: ``T' > T``) and colder
    (``cooled_frac``) than asked. Empty dict for no tokens."""
    if entropy_N.numel() == 0:
        return {}
    f_N = temperature_factor(entropy_N.reshape(-1), stats, tau, eps)
    return {"factor_mean": float(f_N.mean()), "factor_min": float(f_N.min()), "factor_max": float(f_N.max()),
            "heated_frac": float((f_N > 1).float().mean()), "cooled_frac": float((f_N < 1).float().mean())}


class AdaptiveTemperature:
    """HAPO adaptive temperature as a picklable ``LogitsProcessor`` (docs/algorithms.md §3.2).

    Args:
        stats: ``(median, std, scale_pos, scale_neg)`` from the previous training step
            (``rlkit.algorithms.hapo.hapo_sampling_stats``); ``None`` = no adaptation.
        tau: ``temperature_tau`` (0.05 in every HAPO recipe; lower it if training collapses).
        eps: the sampler's log-entropy clamp and std offset (1e-6 in the release).

    Use one instance for all requests of a ``generate`` call (the HF engine batches rows whose
    processor lists are the same objects), e.g. ``request.meta["logits_processors"] = [proc]``.
    Returns the logits unchanged and writes ``T'`` into ``state.temperature_B``.
    """

    def __init__(self, stats: Sequence[float] | None, tau: float = 0.05, eps: float = SAMPLING_EPS) -> None:
        if stats is not None:
            stats = tuple(float(x) for x in stats)
            if len(stats) != 4 or not all(math.isfinite(x) for x in stats):
                raise ValueError(f"stats must be 4 finite floats (median, std, scale_pos, scale_neg), got {stats}")
            if stats[1] < 0:
                raise ValueError(f"stats std must be >= 0, got {stats[1]}")
        if not (tau >= 0 and math.isfinite(tau)):
            raise ValueError(f"tau must be a finite number >= 0, got {tau}")
        if tau >= 1:
            # T' = T(1 + τĥ) with ĥ = -1 would be <= 0 (greedy / invalid); the release uses 0.05
            raise ValueError(f"tau must be < 1 so that T' stays positive, got {tau}")
        self.stats: tuple[float, ...] | None = stats
        self.tau = float(tau)
        self.eps = float(eps)

    def __call__(self, step: int, input_ids: torch.Tensor, logits_BV: torch.Tensor, state: Any) -> torch.Tensor:
        if self.stats is None:
            return logits_BV
        base_R = state.extra.get("_hapo_request_temperature")
        if base_R is None:  # request temperatures, cached once per chunk (rows shrink, requests don't)
            base_R = torch.tensor([float(r.params.temperature) for r in state.requests],
                                  dtype=torch.float32, device=logits_BV.device)
            state.extra["_hapo_request_temperature"] = base_R
        base_B = base_R[state.request_index_B.to(base_R.device)]
        new_B = adapted_temperature(logits_BV, base_B, self.stats, self.tau, self.eps)
        current_B = state.temperature_B
        state.temperature_B = torch.where(base_B > 0, new_B.to(current_B.dtype), current_B)
        return logits_BV

    def __repr__(self) -> str:
        return f"AdaptiveTemperature(stats={self.stats}, tau={self.tau}, eps={self.eps})"
