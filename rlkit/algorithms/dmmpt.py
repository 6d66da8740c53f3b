"""DMMPT: Dynamic Masking of well-Mastered Positive Tokens (UloRL, docs/algorithms.md §5.3; paper Eq. 9-10).

A token is a *mastered positive token* (MPT) when it belongs to a positive sample (reward 1) and
the model already gives it probability ``p >= tau``. MPTs are masked out of the policy-gradient
numerator, but only while the entropy is low (``H̄ < sigma``); static masking makes the entropy
climb without bound (docs/algorithms.md §5.3), the entropy gate lets it settle around ``sigma``::

    I_msk(i, t) = 1  if  H̄_i < sigma  and  r_i = 1  and  p_{i,t} >= tau,   else 0      (Eq. 10)
    J = (1 / sum_i |o_i|) sum_{i,t} (1 - I_msk(i, t)) * surrogate_{i,t}

Masked tokens stay in the denominator ``sum_i |o_i|``: apply the returned *keep* mask
``1 - I_msk`` multiplicatively to ``loss_BT`` and aggregate with the original response mask.

Two forms:
- :func:`mask_mastered_positive` — the pure function on explicit tensors (``positive_B`` given).
- :func:`dmmpt_loss_mask` — the same as a *loss mask* on :class:`PolicyLossInputs`, registered in
  :data:`LOSS_MASKS` as ``"mask_mastered_positive"``. A learner applies every configured loss mask
  after the policy loss: ``keep_BT, m = entry.fn(inp, params); loss_BT = loss_BT * keep_BT``.

Choices the paper leaves open [INFERRED, exposed as parameters]:
- ``p = exp(old_logprobs_BT)``; under POIS with one update per step ``old == current``.
- ``entropy_scope="sample"`` (Eq. 10, default) gates per sample on its own mean token entropy;
  ``"batch"`` gates every sample on the token-mean entropy of the batch. Under micro-batching,
  pass the mini-batch value as ``batch_mean_entropy`` so the gate does not depend on sharding.
- Positive = correct: the trainer passes ``positive_B`` from the accuracy verifier (the batch's
  ``correct_B``), so a wrong sample whose advantage is positive (a format bonus or a length
  shaper lifted it above its group's mean) is never masked. Only without that signal does a
  sample count as positive when its mean advantage over valid tokens is > 0 (exactly ``r = 1``
  with {0, 1} rewards and GRPO).
- ``p >= tau`` (the PDF loses the glyph; ``>=`` vs ``>`` is immaterial, docs/algorithms.md §5.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rlkit.algorithms.registry import Registry
from rlkit.algorithms.types import PolicyLossInputs

LOSS_MASKS = Registry("loss mask")
"""Name -> ``fn(inp: PolicyLossInputs, p, **context) -> (keep_BT, metrics)``; ``keep`` multiplies loss_BT."""


@dataclass(frozen=True)
class DMMPTParams:
    """Hyper-parameters of DMMPT (docs/algorithms.md §5.3-5.4).

    Attributes:
        tau: probability threshold of a well-mastered token (paper: 0.99).
        sigma: target entropy; masking is active only while the mean entropy is below it (0.2).
        entropy_scope: ``"sample"`` (H̄_i per sample, Eq. 10) or ``"batch"`` (one batch mean).
    """

    tau: float = 0.99
    sigma: float = 0.2
    entropy_scope: Literal["sample", "batch"] = "sample"

    def __post_init__(self) -> None:
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"DMMPTParams.tau must be in (0, 1], got {self.tau}")
        if self.sigma < 0.0:
            raise ValueError(f"DMMPTParams.sigma must be >= 0, got {self.sigma}")
        if self.entropy_scope not in ("sample", "batch"):
            raise ValueError(f"DMMPTParams.entropy_scope must be 'sample' or 'batch', got {self.entropy_scope!r}")


def _check_shapes(**tensors_BT: Tensor) -> tuple[int, int]:
    shapes = {name: tuple(t.shape) for name, t in tensors_BT.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(s != first for s in shapes.values()):
        raise ValueError(f"expected equal [B, T] shapes, got {shapes}")
    return first[0], first[1]


@torch.no_grad()
def entropy_gate_B(
    entropy_BT: Tensor,
    response_mask_BT: Tensor,
    positive_B: Tensor,
    p: DMMPTParams,
    *,
    batch_mean_entropy: float | Tensor | None = None,
) -> Tensor:
    """bool [B]: positive samples whose entropy gate is open (``H̄ < sigma``, docs/algorithms.md §5.3 Eq. 10).

    ``H̄_i`` is the mean token entropy of sample i (``entropy_scope="sample"``) or one batch
    token-mean (``"batch"``; ``batch_mean_entropy`` if given).
    """
    valid_BT = response_mask_BT > 0
    ent_BT = entropy_BT.float() * valid_BT
    B = ent_BT.shape[0]
    if p.entropy_scope == "sample":
        mean_ent_B = ent_BT.sum(-1) / valid_BT.sum(-1).clamp(min=1)
    else:
        if batch_mean_entropy is None:
            batch_mean_entropy = ent_BT.sum() / valid_BT.sum().clamp(min=1)
        mean_ent_B = torch.as_tensor(batch_mean_entropy, dtype=torch.float32, device=ent_BT.device).expand(B)
    return positive_B.bool().to(ent_BT.device) & (mean_ent_B < p.sigma)


@torch.no_grad()
def mask_mastered_positive(
    token_logprobs_BT: Tensor,
    entropy_BT: Tensor,
    positive_B: Tensor,
    response_mask_BT: Tensor,
    p: DMMPTParams,
    *,
    batch_mean_entropy: float | Tensor | None = None,
) -> Tensor:
    """The DMMPT indicator ``I_msk`` [B, T] (1.0 = masked), docs/algorithms.md §5.3 Eq. 9-10.

    Args:
        token_logprobs_BT: log-probability of each sampled token (``old_logprobs``), float [B, T].
        entropy_BT: per-token entropy of the policy distribution, float [B, T].
        positive_B: bool [B], True for positive samples (reward 1).
        response_mask_BT: 1 on valid response tokens, 0 on padding, [B, T].
        p: :class:`DMMPTParams`.
        batch_mean_entropy: for ``entropy_scope="batch"``, the global token-mean entropy; default
            the token-mean over ``entropy_BT`` under ``response_mask_BT``.

    Returns:
        float [B, T] in {0, 1}; zero on padding.
    """
    B, _ = _check_shapes(token_logprobs_BT=token_logprobs_BT, entropy_BT=entropy_BT,
                         response_mask_BT=response_mask_BT)
    if tuple(positive_B.shape) != (B,):
        raise ValueError(f"positive_B must have shape ({B},), got {tuple(positive_B.shape)}")
    valid_BT = response_mask_BT > 0
    gate_B = entropy_gate_B(entropy_BT, response_mask_BT, positive_B, p, batch_mean_entropy=batch_mean_entropy)
    mastered_BT = token_logprobs_BT.float().exp() >= p.tau
    return (mastered_BT & gate_B[:, None] & valid_BT).to(token_logprobs_BT.dtype)


def positive_from_advantages(advantages_BT: Tensor, response_mask_BT: Tensor) -> Tensor:
    """bool [B]: samples whose mean advantage over valid tokens is > 0 (proxy for ``r = 1``)."""
    mask = response_mask_BT.to(advantages_BT.dtype)
    return (advantages_BT * mask).sum(-1) / mask.sum(-1).clamp(min=1) > 0


@LOSS_MASKS.register("mask_mastered_positive", params=DMMPTParams, aliases=("dmmpt",))
@torch.no_grad()
def dmmpt_loss_mask(
    inp: PolicyLossInputs,
    p: DMMPTParams,
    *,
    positive_B: Tensor | None = None,
    batch_mean_entropy: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DMMPT as a loss mask: ``keep_BT = 1 - I_msk`` to multiply into the per-token loss.

    Aggregate the masked loss with the *original* ``response_mask_BT`` so masked tokens stay in
    the token-mean denominator (docs/algorithms.md §5.3). ``p(t) = exp(inp.old_logprobs_BT)``; the entropy is
    ``inp.entropy_BT`` (current policy, same forward pass). Without ``positive_B`` a sample is
    positive when its mean advantage is > 0.

    Returns:
        keep_BT float [B, T] (0 on masked tokens, 1 elsewhere, padding included) and metrics
        (detached scalars, token means over valid tokens of this call): ``dmmpt/masked_frac``,
        ``dmmpt/mpt_frac`` (MPTs before the entropy gate), ``dmmpt/mean_entropy``,
        ``dmmpt/gate_open_frac`` (fraction of positive samples whose gate is open).
    """
    if inp.entropy_BT is None:
        raise ValueError("mask_mastered_positive needs PolicyLossInputs.entropy_BT (per-token entropy)")
    mask_BT = inp.response_mask_BT
    if positive_B is None:
        positive_B = positive_from_advantages(inp.advantages_BT, mask_BT)
    old_BT = inp.old_logprobs_BT.detach()
    ent_BT = inp.entropy_BT.detach()
    masked_BT = mask_mastered_positive(old_BT, ent_BT, positive_B, mask_BT, p,
                                       batch_mean_entropy=batch_mean_entropy)
    valid_BT = (mask_BT > 0).float()
    n_valid = valid_BT.sum().clamp(min=1)
    mpt_BT = (old_BT.float().exp() >= p.tau).float() * positive_B.float()[:, None] * valid_BT
    gate_B = entropy_gate_B(ent_BT, mask_BT, positive_B, p, batch_mean_entropy=batch_mean_entropy)
    n_pos = positive_B.float().sum()
    metrics = {
        "dmmpt/masked_frac": masked_BT.float().sum() / n_valid,
        "dmmpt/mpt_frac": mpt_BT.sum() / n_valid,
        "dmmpt/mean_entropy": (ent_BT.float() * valid_BT).sum() / n_valid,
        "dmmpt/gate_open_frac": gate_B.float().sum() / n_pos.clamp(min=1),
    }
    return (1.0 - masked_BT).to(inp.logprobs_BT.dtype), metrics


def apply_loss_masks(
    loss_BT: Tensor,
    inp: PolicyLossInputs,
    masks: dict[str, dict] | None,
    **context: Tensor | float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Multiply ``loss_BT`` by every configured loss mask (``{name: params}``, config order).

    ``context`` (e.g. ``positive_B``, ``batch_mean_entropy``) is forwarded to each mask. Keep
    aggregating with ``inp.response_mask_BT``: masked tokens remain in the denominator.
    """
    metrics: dict[str, Tensor] = {}
    for name, kwargs in (masks or {}).items():
        entry = LOSS_MASKS.get(name)
        keep_BT, m = entry.fn(inp, LOSS_MASKS.build_params(name, kwargs), **context)
        loss_BT = loss_BT * keep_BT
        metrics.update(m)
    return loss_BT, metrics


__all__ = [
    "LOSS_MASKS",
    "DMMPTParams",
    "apply_loss_masks",
    "dmmpt_loss_mask",
    "entropy_gate_B",
    "mask_mastered_positive",
    "positive_from_advantages",
]
