"""Sampling primitives and the per-step logits-processor hook used by the decode loops.

A ``LogitsProcessor`` sees the raw next-token logits of the rows still decoding and returns
(possibly modified) logits. Processors run *before* temperature, so what they change is part of
the behaviour distribution whose log-probabilities the engine records (as in HAPO's adaptive
temperature and budget-guided sampling). They may also write per-row temperatures into
``state.temperature_B``. Top-k / top-p truncation comes after the logprob is recorded, matching
the ``Completion.logprobs`` contract ("temperature applied, before top-p/top-k truncation").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class DecodeState:
    """What a logits processor may read (and, for ``temperature_B``/``extra``, write).

    Row ``i`` of the current batch is sample ``sample_index_B[i]`` of
    ``requests[request_index_B[i]]``. Rows shrink when finished rows are pruned, so index by
    these tensors, never by position across steps.
    """

    requests: list[Any]  # the RolloutRequest objects of this generate() call
    request_index_B: torch.Tensor  # (B,) long, index into ``requests``
    sample_index_B: torch.Tensor  # (B,) long, 0..n-1 within the request
    num_generated_B: torch.Tensor  # (B,) long, tokens generated so far (resume prefix excluded)
    temperature_B: torch.Tensor  # (B,) float, 0 = greedy; processors may overwrite
    budget_B: torch.Tensor  # (B,) long, token budget per row, -1 = none
    extra: dict[str, Any] = field(default_factory=dict)  # scratch space kept across steps


@runtime_checkable
class LogitsProcessor(Protocol):
    """``(step, input_ids_BT, logits_BV, state) -> logits_BV``, called once per decode step.

    ``input_ids_BT`` are the left-padded context rows (prompt + resume prefix + generated so
    far) for the rows in the current batch; ``step`` counts from 0 (first new token).
    """

    def __call__(
        self, step: int, input_ids: torch.Tensor, logits_BV: torch.Tensor, state: DecodeState
    ) -> torch.Tensor: ...


def unique_rows(ids_BP: torch.Tensor, attn_BP: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with identical (left-padded) token contexts, e.g. the n samples of one prompt.

    Returns ``(first_U, inverse_B)``: one representative row per distinct context and, per row,
    the index of its context, so ``ids_BP[first_U][inverse_B]`` equals ``ids_BP`` on attended tokens.
    """
    key = torch.where(attn_BP > 0, ids_BP, -1)
    _, inverse_B = torch.unique(key, dim=0, return_inverse=True)
    U = int(inverse_B.max()) + 1 if inverse_B.numel() else 0
    rows_B = torch.arange(len(inverse_B), device=ids_BP.device)
    first_U = torch.full((U,), len(inverse_B), dtype=torch.long, device=ids_BP.device)
    return first_U.scatter_reduce(0, inverse_B, rows_B, reduce="amin"), inverse_B


def apply_processors(
    processors: list[LogitsProcessor],
    step: int,
    input_ids: torch.Tensor,
    logits_BV: torch.Tensor,
    state: DecodeState,
) -> torch.Tensor:
    """Run ``processors`` in order."""
    for proc in processors:
        logits_BV = proc(step, input_ids, logits_BV, state)
    return logits_BV


def logprobs_and_entropy(
    logits_BV: torch.Tensor, temperature_B: torch.Tensor, want_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-softmax of ``logits / T`` (T=1 where T == 0, i.e. greedy rows) and optional entropy.

    Returns ``(logp_BV, entropy_B | None)`` in float32.
    """
    t_B = torch.where(temperature_B > 0, temperature_B, torch.ones_like(temperature_B))
    logp_BV = torch.log_softmax(logits_BV.float() / t_B[:, None], dim=-1)
    entropy_B = None
    if want_entropy:
        entropy_B = -(logp_BV.exp() * logp_BV).sum(-1)  # 0 * -inf: exp(-inf)=0 -> nan guard below
        entropy_B = torch.nan_to_num(entropy_B, nan=0.0)
    return logp_BV, entropy_B


def filter_top_k_top_p(
    logp_BV: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor
) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k / nucleus top-p set.

    ``top_k_B``: (B,) long, 0 = off; ``top_p_B``: (B,) float, 1 = off. Always keeps the argmax.
    """
    use_k = bool((top_k_B > 0).any())
    use_p = bool((top_p_B < 1.0).any())
    if not (use_k or use_p):
        return logp_BV
    sorted_BV, order_BV = logp_BV.sort(dim=-1, descending=True)
    V = logp_BV.shape[-1]
    rank_V = torch.arange(V, device=logp_BV.device)
    remove_BV = torch.zeros_like(sorted_BV, dtype=torch.bool)
    if use_k:
        k_B = torch.where(top_k_B > 0, top_k_B, torch.full_like(top_k_B, V))
        remove_BV |= rank_V[None, :] >= k_B[:, None]
    if use_p:
        probs_BV = sorted_BV.exp()
        # mass strictly before each token; drop tokens once top_p is already covered
        before_BV = probs_BV.cumsum(-1) - probs_BV
        remove_BV |= before_BV > top_p_B[:, None]
    remove_BV[:, 0] = False
    mask_BV = torch.zeros_like(remove_BV).scatter(-1, order_BV, remove_BV)
    return logp_BV.masked_fill(mask_BV, float("-inf"))


def sample_rows(
    logp_BV: torch.Tensor,
    temperature_B: torch.Tensor,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """Draw one token per row: argmax where ``T == 0``, else from ``softmax(logp)``.

    One generator per row makes a row's draws independent of which other rows share the batch
    (and of pruning), so a (request, sample) pair reproduces under the same seed.
    Returns (B,) long.
    """
    greedy_B = logp_BV.argmax(-1)
    sampled_B = temperature_B > 0
    if not bool(sampled_B.any()):
        return greedy_B
    # inverse-CDF sampling: one uniform per row from its own generator, then a batched
    # searchsorted (~15x faster on CPU than a per-row torch.multinomial over a 50k vocab).
    rows = torch.nonzero(sampled_B).flatten()
    u_R = torch.cat([torch.rand(1, generator=generators[i], device=logp_BV.device)
                     for i in rows.tolist()]).double()
    cdf_RV = logp_BV[rows].double().exp().cumsum(-1)
    u_R1 = (u_R * cdf_RV[:, -1])[:, None]
    # first index with cdf > u: zero-probability (filtered) tokens can never be drawn
    draw_R = torch.searchsorted(cdf_RV, u_R1, right=True)[:, 0].clamp(max=logp_BV.shape[-1] - 1)
    out_B = greedy_B.clone()
    out_B[rows] = draw_R
    return out_B
