"""Reduce a per-token loss [B, T] to a scalar (docs/algorithms.md §0 "Aggregation modes"; verl ``agg_loss``).

Modes (``m`` = mask, ``l`` = per-token loss, ``S`` = sequences with at least one valid token):
- ``token-mean``:              ``sum_{i,t} m l / num_tokens``                    (default ``sum m``; DAPO)
- ``seq-mean-token-mean``:     ``sum_i (sum_t m l / sum_t m) / num_seqs``        (default ``S``; GSPO)
- ``seq-mean-token-sum``:      ``sum_{i,t} m l / num_seqs``                      (default ``S``)
- ``seq-mean-token-sum-norm``: ``sum_{i,t} m l / (num_seqs * norm_length)``      (defaults ``S``, ``T``; Dr.GRPO)

These are verl's definitions (tested against verl's own ``agg_loss``): a fully masked row (a
truncated sample under ``overlong_filter``) is not counted as a sequence, and Dr.GRPO's form is a
mean over sequences of token sums divided by a constant horizon. The learner passes
``norm_length = algorithm.norm_length``, by default ``engine.max_new_tokens`` (verl's response
length), so the divisor does not depend on how a batch happened to be padded.

Micro-batching / data parallelism: pass the *global* ``num_tokens`` / ``num_seqs`` /
``norm_length`` of the whole mini-batch and each micro-batch's result becomes its exact share, so
summing over micro-batches (and ranks) equals aggregating the full batch at once. The defaults use
the local tensor and are only right when the call sees the whole batch.

Departure: every divisor is clamped to >= 1 so an all-padding batch (or sequence) gives 0, not NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from rlkit.algorithms.registry import AGGREGATIONS, register_aggregation

Count = float | int | Tensor


def _clamp_count(x: Count) -> Count:
    if isinstance(x, Tensor):
        return x.clamp(min=1)
    return max(float(x), 1.0)


def valid_seqs(mask_BT: Tensor) -> Tensor:
    """Number of rows with at least one valid token (verl's sequence count)."""
    return (mask_BT.sum(-1) > 0).sum()


def masked_sum(values_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Sum of ``values_BT`` over positions where ``mask_BT`` is 1 (scalar)."""
    return (values_BT * mask_BT.to(values_BT.dtype)).sum()


def masked_mean(values_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Mean of ``values_BT`` over positions where ``mask_BT`` is 1 (scalar; 0 if the mask is empty)."""
    mask = mask_BT.to(values_BT.dtype)
    return (values_BT * mask).sum() / mask.sum().clamp(min=1)


@dataclass(frozen=True)
class Counts:
    """The divisors of one aggregation: global valid tokens, sequences and the length constant."""

    num_tokens: Count
    num_seqs: Count
    norm_length: Count


@register_aggregation("token-mean")
def token_mean(loss_BT: Tensor, mask_BT: Tensor, n: Counts) -> Tensor:
    """``sum_{i,t} m l / num_tokens``."""
    return masked_sum(loss_BT, mask_BT) / _clamp_count(n.num_tokens)


@register_aggregation("seq-mean-token-mean")
def seq_mean_token_mean(loss_BT: Tensor, mask_BT: Tensor, n: Counts) -> Tensor:
    """``sum_i (sum_t m l / max(sum_t m, 1)) / num_seqs``."""
    mask = mask_BT.to(loss_BT.dtype)
    return ((loss_BT * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / _clamp_count(n.num_seqs)


@register_aggregation("seq-mean-token-sum")
def seq_mean_token_sum(loss_BT: Tensor, mask_BT: Tensor, n: Counts) -> Tensor:
    """``sum_{i,t} m l / num_seqs``."""
    return masked_sum(loss_BT, mask_BT) / _clamp_count(n.num_seqs)


@register_aggregation("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(loss_BT: Tensor, mask_BT: Tensor, n: Counts) -> Tensor:
    """``sum_{i,t} m l / (num_seqs * norm_length)``; a constant ``norm_length`` (e.g. the maximum
    response length) keeps the divisor independent of how a micro-batch was padded."""
    return masked_sum(loss_BT, mask_BT) / _clamp_count(n.num_seqs) / _clamp_count(n.norm_length)


def aggregate(
    loss_BT: Tensor,
    mask_BT: Tensor,
    mode: str,
    *,
    num_tokens: Count | None = None,
    num_seqs: Count | None = None,
    norm_length: Count | None = None,
) -> Tensor:
    """Reduce ``loss_BT`` [B, T] under ``mask_BT`` [B, T] to a scalar with aggregation ``mode``.

    Args:
        loss_BT: per-token loss, unreduced.
        mask_BT: 1 for valid response tokens.
        mode: one of ``AGGREGATIONS.names()``; unknown modes raise ``KeyError``.
        num_tokens: global valid-token count (``token-mean``).
        num_seqs: global sequence count (``seq-mean-*``).
        norm_length: constant length divisor (``seq-mean-token-sum-norm``).

    Returns:
        scalar tensor.
    """
    if loss_BT.shape != mask_BT.shape:
        raise ValueError(f"loss_BT {tuple(loss_BT.shape)} and mask_BT {tuple(mask_BT.shape)} differ")
    fn = AGGREGATIONS.get(mode).fn
    n = Counts(num_tokens=mask_BT.sum() if num_tokens is None else num_tokens,  # local defaults: whole batch
               num_seqs=valid_seqs(mask_BT) if num_seqs is None else num_seqs,
               norm_length=loss_BT.shape[-1] if norm_length is None else norm_length)
    return fn(loss_BT, mask_BT, n)


__all__ = [
    "Counts",
    "aggregate",
    "masked_mean",
    "masked_sum",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "seq_mean_token_sum_norm",
    "token_mean",
]
