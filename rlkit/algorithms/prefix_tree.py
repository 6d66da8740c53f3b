"""P2T prefix trees and the TEMPO advantage (docs/algorithms.md §1).

TEMPO (Tran, Yao, Yu, arXiv 2509.18314; code ``fatebreaker/tempo``) adds to the GRPO advantage a
TD term read off the token trie of each prompt group:

    A_{i,t} = (R_i - mu_g + V(s_{t+1}) - V(s_t)) / (sigma_g + eps)       (docs/algorithms.md §1.3)

where ``V(s)`` is the mean outcome of the responses that pass through prefix ``s``. The term is
non-zero only at tokens that leave a branching node; elsewhere TEMPO is GRPO.

P2T ("prefix to tree") here stores each group's trie implicitly as the longest-common-prefix
(LCP) length of every pair of responses in the group: responses ``i`` and ``k`` share the node
``s_t = y_{<t}`` iff ``lcp(i, k) >= t``. The LCPs are found with chunked tensor comparisons that
drop each pair once it has diverged, so the cost is about ``sum over same-group pairs of their LCP``
element compares, plus ``O(B * n log n)`` for the prefix values (the TD term is sparse: one entry
per branch token) and the dense [B, T] output. No Python loop over responses, groups or positions;
the reference loop of docs/algorithms.md §1.4 is ``O(B * T * G)`` Python.

Departures from the reference code, each an option of :class:`TEMPOParams`:
- ``pad_aware`` (INFERRED, default True): positions are compared as ``(token_id, valid)`` pairs, so
  padding never matches a real token. False reproduces the reference, which compares raw ids (a
  PAD id equal to an EOS id then counts as the same child).
- ``singleton`` (INFERRED, default "grpo"): a group of size 1 uses mean 0 and std 1 like GRPO
  (the reference yields NaN); "zero" gives such responses advantage 0 instead.
- Non-contiguous masks (multi-turn ``loss_mask``): every valid token gets the §1.3 value; the
  reference loop stops at the first masked position. Identical for ordinary response masks.
- Rows without a valid token (a truncated sample whose loss ``overlong_filter`` masked, the
  all-masked sibling context rows of segment rollouts) count in the group's mean and std but are
  left out of the tree. In the tree they would differ from every real response at token 0 (their
  first position is padding), so every response, wrong ones included, got a spurious TD term there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import rlkit.algorithms.advantages  # noqa: F401  (registers the default outcome estimator "grpo")
from rlkit.algorithms.groups import group_index, group_stats
from rlkit.algorithms.registry import ADVANTAGES, register_advantage
from rlkit.algorithms.types import AdvantageInputs, AdvantageOutput

__all__ = ["PrefixTree", "TEMPOParams", "build_prefix_tree", "tempo_advantage"]

_SINGLETON_CHOICES = ("grpo", "zero")
_SHARED_OUTCOME_FIELDS = ("eps", "norm_by_std")


@dataclass(frozen=True)
class TEMPOParams:
    """Hyper-parameters of TEMPO (docs/algorithms.md §1.2, §1.5). There is no TD coefficient and no discount.

    Attributes:
        eps: added to the group std before dividing (verl ``epsilon``).
        norm_by_std: divide outcome and TD term by ``sigma_g + eps`` (verl
            ``norm_adv_by_std_in_grpo``); False gives ``R_i - mu_g + delta`` (Dr.GRPO form).
        pad_aware: INFERRED (docs/algorithms.md §1.5). Compare ``(token_id, valid)`` pairs so padding never
            matches a real token; False compares raw ids like the reference code.
        singleton: INFERRED (docs/algorithms.md §1.5). ``"grpo"``: a group of size 1 uses mean 0, std 1 (its TD
            term is 0, so ``A = R / (1 + eps)``); ``"zero"``: its advantages are 0.
        outcome: registered advantage estimator giving the per-response part the TD term is added
            to. ``"grpo"`` is the spec's formula; ``"dr_grpo"``/``"rloo"`` etc. combine TEMPO with
            another GRPO-family baseline. Its ``eps``/``norm_by_std`` fields, if any, are taken
            from this dataclass so both parts use the same normaliser.
        outcome_params: other hyper-parameters of ``outcome``.
    """

    eps: float = 1e-6
    norm_by_std: bool = True
    pad_aware: bool = True
    singleton: str = "grpo"
    outcome: str = "grpo"
    outcome_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.eps < 0:
            raise ValueError(f"TEMPOParams.eps must be >= 0, got {self.eps}")
        if self.singleton not in _SINGLETON_CHOICES:
            raise ValueError(
                f"TEMPOParams.singleton must be one of {_SINGLETON_CHOICES}, got {self.singleton!r}"
            )
        try:
            canonical = ADVANTAGES.resolve(self.outcome)
        except KeyError as e:
            raise ValueError(f"TEMPOParams.outcome: {e.args[0]}") from None
        if canonical == "tempo":
            raise ValueError("TEMPOParams.outcome cannot be 'tempo' itself; use e.g. 'grpo'")
        shared = sorted(set(self.outcome_params) & set(_SHARED_OUTCOME_FIELDS))
        if shared:
            raise ValueError(
                f"TEMPOParams.outcome_params must not set {shared}: set them on TEMPO itself so the "
                "outcome and the TD term share one normaliser"
            )
        _outcome_params(self)  # unknown outcome parameters fail here, not mid-training


@dataclass
class PrefixTree:
    """The tries of all groups of a batch, as pairwise longest-common-prefix lengths (P2T).

    ``M`` is the largest group size. Response ``i`` and the ``j``-th member ``k`` of its group share
    the prefix node ``s_t = y_{<t}`` iff ``lcp_BM[i, j] >= t``; so ``D(s_t) = {k : lcp >= t}``.

    Attributes:
        index_B: long [B], dense group index (0..G-1) of each response.
        slot_B: long [B], position of each response inside its group (0..n_g-1).
        members_GM: long [G, M], batch index of each group member; -1 beyond the group's size.
        lcp_BM: long [B, M], LCP length (0..T) of response ``i`` with each member of its group;
            ``T`` for itself and for the missing members of smaller groups.
        T: padded length.
    """

    index_B: Tensor
    slot_B: Tensor
    members_GM: Tensor
    lcp_BM: Tensor
    T: int

    @property
    def size_B(self) -> Tensor:
        """long [B], size of each response's group."""
        return (self.members_GM >= 0).sum(1)[self.index_B]

    @torch.no_grad()
    def branch_events(self, values_B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Sparse TD of prefix means, ``delta_{i,t} = V(s_{t+1}) - V(s_t)`` at every branch token.

        ``V(s) = mean_{k in D(s)} values_k``. Member ``k`` leaves response ``i``'s path at
        ``t = lcp(i, k)``; these are the only positions where ``D(s_{t+1}) != D(s_t)`` (branch
        tokens: ``s_t`` has more than one child), so ``delta`` is 0 everywhere else. Counts and sums
        of ``D`` come from one sort of each LCP row: ``D(s_t) = {lcp >= t}``, ``D(s_{t+1}) = {lcp > t}``.

        Args:
            values_B: float [B], outcome per response (``R_i``).

        Returns:
            (rows_E, cols_E, delta_E): long [E], long [E], float64 [E]; one entry per distinct branch
            position. Padded positions are included (a longer sibling can branch off there); callers
            mask them.
        """
        B, M = self.lcp_BM.shape
        T = self.T
        member_BM = self.members_GM[self.index_B]
        real_BM = member_BM >= 0
        weight_BM = real_BM.to(torch.float64)
        vals_BM = values_B.to(torch.float64).cpu()[member_BM.clamp(min=0)] * weight_BM

        lcp_BM, perm_BM = self.lcp_BM.sort(dim=1)  # self and missing members (lcp == T) sort last
        weight_BM, vals_BM = weight_BM.gather(1, perm_BM), vals_BM.gather(1, perm_BM)
        # Inclusive prefix counts/sums: members with lcp <= the current one.
        cnt_le, sum_le = weight_BM.cumsum(1), vals_BM.cumsum(1)
        n_B1, s_B1 = cnt_le[:, -1:], sum_le[:, -1:]
        # One event per distinct lcp value t < T: at the last member with that value (cumsums then
        # cover lcp <= t) and with the previous distinct value's cumsums giving lcp < t.
        last_BM = torch.ones_like(real_BM)
        last_BM[:, :-1] = lcp_BM[:, 1:] != lcp_BM[:, :-1]
        event_BM = last_BM & (lcp_BM < T) & (weight_BM > 0)
        first_BM = torch.ones_like(real_BM)
        first_BM[:, 1:] = lcp_BM[:, 1:] != lcp_BM[:, :-1]
        # cumsum just before the first member with this value = lcp < t
        idx_BM = torch.arange(M).expand(B, M)
        start_BM = torch.where(first_BM, idx_BM, torch.zeros_like(idx_BM)).cummax(1).values
        cnt_lt = torch.cat([cnt_le.new_zeros(B, 1), cnt_le], 1).gather(1, start_BM)
        sum_lt = torch.cat([sum_le.new_zeros(B, 1), sum_le], 1).gather(1, start_BM)
        rows_E, j_E = event_BM.nonzero(as_tuple=True)
        cnt_prev, sum_prev = (n_B1 - cnt_lt)[rows_E, j_E], (s_B1 - sum_lt)[rows_E, j_E]
        cnt_next, sum_next = (n_B1 - cnt_le)[rows_E, j_E], (s_B1 - sum_le)[rows_E, j_E]
        # cnt_next >= 1: the response itself (lcp == T > t) is in every D on its path.
        delta_E = sum_next / cnt_next - sum_prev / cnt_prev
        return rows_E, lcp_BM[rows_E, j_E], delta_E

    @torch.no_grad()
    def prefix_td(self, values_B: Tensor) -> tuple[Tensor, Tensor]:
        """Dense form of :meth:`branch_events`: float64 [B, T] TD and bool [B, T] branch map."""
        rows, cols, delta = self.branch_events(values_B)
        B = self.lcp_BM.shape[0]
        td_BT = torch.zeros(B, self.T, dtype=torch.float64)
        td_BT[rows, cols] = delta
        branch_BT = torch.zeros(B, self.T, dtype=torch.bool)
        branch_BT[rows, cols] = True
        return td_BT, branch_BT

    @torch.no_grad()
    def prefix_values(self, values_B: Tensor) -> Tensor:
        """float64 [B, T]: ``V(s_{t+1})``, the mean outcome below the prefix ending at token t.

        Telescoping: ``V(s_{t+1}) = V(root) + sum_{t' <= t} delta_{t'}``.
        """
        td_BT, _ = self.prefix_td(values_B)
        root_B = group_stats(values_B.to(torch.float64).cpu(), self.index_B).mean_G[self.index_B]
        return root_B.unsqueeze(1) + td_BT.cumsum(1)


def _pair_lcp(
    tokens_BT: Tensor, valid_BT: Tensor | None, a_P: Tensor, b_P: Tensor, first_chunk: int = 128
) -> Tensor:
    """long [P]: length of the common prefix of rows ``a_P`` and ``b_P``.

    Positions are equal when their ids are equal and, if bool ``valid_BT`` is given, their validity
    too. Scans the columns in chunks growing by 1.5x and drops pairs once they differ, so the work stays
    within about 1.5x ``sum_pairs lcp`` (+ one chunk); chunks are capped near 4M gathered elements.
    """
    T = tokens_BT.shape[1]
    lcp_P = torch.full((a_P.numel(),), T, dtype=torch.long)
    active = torch.arange(a_P.numel())
    c0, chunk = 0, float(first_chunk)
    while active.numel() > 0 and c0 < T:
        width = min(int(chunk), max(first_chunk, (1 << 22) // active.numel()))
        c1 = min(T, c0 + width)
        a, b = a_P[active], b_P[active]
        # index_select copies whole row slices (several times faster than block[a] on CPU).
        block = tokens_BT[:, c0:c1]
        neq = block.index_select(0, a) != block.index_select(0, b)  # [P_active, c1 - c0]
        if valid_BT is not None:
            vblock = valid_BT[:, c0:c1]
            neq |= vblock.index_select(0, a) != vblock.index_select(0, b)
        first = neq.view(torch.uint8).argmax(1)  # first mismatch, or 0 when there is none
        hit = neq.gather(1, first.unsqueeze(1)).squeeze(1)
        lcp_P[active[hit]] = c0 + first[hit]
        active = active[~hit]
        c0, chunk = c1, chunk * 1.5
    return lcp_P


@torch.no_grad()
def build_prefix_tree(
    tokens_BT: Tensor, valid_BT: Tensor, group_ids_B: Tensor, *, pad_aware: bool = True
) -> PrefixTree:
    """Build every group's prefix tree once (P2T), vectorised over the whole batch.

    Args:
        tokens_BT: integer [B, T] response token ids (padded).
        valid_BT: bool/float [B, T], nonzero on valid tokens.
        group_ids_B: integer [B], prompt-group ids (arbitrary values, any order).
        pad_aware: compare ``(token_id, valid)`` pairs (True) or raw ids (False), docs/algorithms.md §1.5.

    Returns:
        :class:`PrefixTree`.
    """
    if tokens_BT.dim() != 2:
        raise ValueError(f"tokens_BT must be 2-D [B, T], got shape {tuple(tokens_BT.shape)}")
    if tokens_BT.is_floating_point() or tokens_BT.is_complex():
        raise TypeError(f"tokens_BT must hold integer token ids, got dtype {tokens_BT.dtype}")
    B, T = tokens_BT.shape
    if tuple(valid_BT.shape) != (B, T):
        raise ValueError(f"valid_BT must have shape {(B, T)} like tokens_BT, got {tuple(valid_BT.shape)}")
    if tuple(group_ids_B.shape) != (B,):
        raise ValueError(f"group_ids_B must have shape ({B},), got {tuple(group_ids_B.shape)}")
    tokens_BT, group_ids_B = tokens_BT.cpu(), group_ids_B.cpu()
    valid_BT = None if not pad_aware else (valid_BT if valid_BT.dtype == torch.bool else valid_BT != 0).cpu()

    index_B, G = group_index(group_ids_B)
    order_B = torch.argsort(index_B, stable=True)
    size_G = torch.bincount(index_B, minlength=G)
    start_G = size_G.cumsum(0) - size_G
    slot_sorted = torch.arange(B) - start_G[index_B[order_B]]
    slot_B = torch.empty(B, dtype=torch.long)
    slot_B[order_B] = slot_sorted
    M = int(size_G.max()) if B > 0 else 0
    members_GM = torch.full((G, M), -1, dtype=torch.long)
    members_GM[index_B, slot_B] = torch.arange(B)

    # Unordered pairs (p, q), p < q in the group-sorted order: each member pairs with those after it.
    n_after = size_G[index_B[order_B]] - 1 - slot_sorted
    a_sorted = torch.repeat_interleave(torch.arange(B), n_after)
    seg_start = torch.repeat_interleave(n_after.cumsum(0) - n_after, n_after)
    b_sorted = a_sorted + 1 + (torch.arange(a_sorted.numel()) - seg_start)
    a_P, b_P = order_B[a_sorted], order_B[b_sorted]
    lcp_P = _pair_lcp(tokens_BT, valid_BT, a_P, b_P)

    lcp_BM = torch.full((B, M), T, dtype=torch.long)
    lcp_BM[a_P, slot_B[b_P]] = lcp_P
    lcp_BM[b_P, slot_B[a_P]] = lcp_P
    return PrefixTree(index_B=index_B, slot_B=slot_B, members_GM=members_GM, lcp_BM=lcp_BM, T=T)


def _outcome_params(p: TEMPOParams) -> Any:
    """Params of the outcome estimator: ``outcome_params`` plus TEMPO's shared fields."""
    entry = ADVANTAGES.get(p.outcome)
    fields = {f.name for f in dataclasses.fields(entry.params) if f.init}
    kwargs = {k: getattr(p, k) for k in _SHARED_OUTCOME_FIELDS if k in fields}
    kwargs.update(p.outcome_params)
    return ADVANTAGES.build_params(p.outcome, kwargs)


def _check_inputs(inp: AdvantageInputs) -> Tensor:
    if inp.response_ids_BT is None:
        raise ValueError("tempo needs AdvantageInputs.response_ids_BT (the response token ids)")
    ids = inp.response_ids_BT
    if tuple(ids.shape) != tuple(inp.response_mask_BT.shape):
        raise ValueError(
            f"response_ids_BT must have shape {tuple(inp.response_mask_BT.shape)} like "
            f"response_mask_BT, got {tuple(ids.shape)}"
        )
    return ids


@register_advantage("tempo", params=TEMPOParams)
@torch.no_grad()
def tempo_advantage(inp: AdvantageInputs, p: TEMPOParams) -> Tensor:
    """TEMPO advantage: outcome advantage plus the branch-gated prefix-value TD term (docs/algorithms.md §1.3).

    ``A_{i,t} = A^outcome_i + (V(s_{t+1}) - V(s_t)) / (sigma_g + eps)`` (no division when
    ``norm_by_std`` is False); with ``outcome="grpo"`` this is the spec's formula exactly.

    Diagnostics returned in the :class:`AdvantageOutput`: metrics ``tempo/branch_frac`` (branch tokens / valid
    tokens), ``tempo/mean_abs_td_branch`` (mean |TD term| over branch tokens, advantage units),
    ``tempo/branch_per_response``; token maps ``tempo/branch`` (1 at branch tokens) and
    ``tempo/td`` (TD term added to each token). Prefix values themselves are
    :meth:`PrefixTree.prefix_values` (not computed here: a dense [B, T] pass).

    Args:
        inp: ``rewards_B`` [B], ``group_ids_B`` [B], ``response_mask_BT`` [B, T] and
            ``response_ids_BT`` [B, T] (required).
        p: :class:`TEMPOParams`.

    Returns:
        advantages_BT [B, T] in the outcome estimator's dtype, zero on padding.
    """
    ids_BT = _check_inputs(inp)
    mask_BT = inp.response_mask_BT.cpu()
    rewards_B = inp.rewards_B if inp.rewards_B.is_floating_point() else inp.rewards_B.float()
    B, T = mask_BT.shape

    outcome = AdvantageOutput.of(ADVANTAGES.get(p.outcome).fn(inp, _outcome_params(p)))
    outcome_BT = outcome.advantages_BT
    # A row without a valid token (a truncated sample under overlong_filter, a segments sibling
    # context row) has no prefix to share: it stays in its group's statistics, but not in the tree,
    # where the pad-aware comparison would make it "diverge" at token 0 from every real response.
    index_B, G = group_index(inp.group_ids_B.cpu())
    has_tokens_B = (mask_BT != 0).any(1)
    tree_ids_B = torch.where(has_tokens_B, index_B, G + torch.arange(B))
    tree = build_prefix_tree(ids_BT, mask_BT, tree_ids_B, pad_aware=p.pad_aware)
    rows, cols, delta = tree.branch_events(rewards_B)
    on_valid = mask_BT[rows, cols] != 0  # drop events in the padding of a shorter response
    rows, cols, delta = rows[on_valid], cols[on_valid], delta[on_valid]

    stats = group_stats(rewards_B.to(torch.float64).cpu(), index_B)
    singleton_B = stats.count_G[index_B] == 1  # a lone response: no baseline and no branch events
    td_E = delta
    if p.norm_by_std:
        std_B = torch.where(singleton_B, torch.ones(B, dtype=torch.float64), stats.std_G[stats.index_B])
        td_E = delta / (std_B[rows] + p.eps)

    # The TD term is sparse (branch tokens only): add it in place of a dense [B, T] pass.
    advantages_BT = outcome_BT if _is_fresh(outcome_BT, inp) else outcome_BT.clone()
    device, dtype = advantages_BT.device, advantages_BT.dtype
    advantages_BT.index_put_((rows.to(device), cols.to(device)), td_E.to(device=device, dtype=dtype),
                             accumulate=True)
    if p.singleton == "zero":
        advantages_BT[singleton_B.to(device)] = 0.0

    n_branch, n_valid = int(rows.numel()), int(torch.count_nonzero(mask_BT))
    metrics = {**outcome.metrics,
               "tempo/branch_frac": n_branch / max(n_valid, 1),
               "tempo/mean_abs_td_branch": float(td_E.abs().mean()) if n_branch else 0.0,
               "tempo/branch_per_response": n_branch / max(B, 1)}
    token_maps = {**outcome.token_maps,
                  "tempo/branch": _scatter_map(B, T, rows, cols, torch.ones_like(td_E)),
                  "tempo/td": _scatter_map(B, T, rows, cols, td_E)}
    return AdvantageOutput(advantages_BT, metrics, token_maps)


def _scatter_map(B: int, T: int, rows: Tensor, cols: Tensor, vals_E: Tensor) -> Tensor:
    """float32 [B, T] zeros with ``vals_E`` at ``(rows, cols)`` (positions are distinct)."""
    out = torch.zeros(B, T, dtype=torch.float32)
    out[rows, cols] = vals_E.float()
    return out


def _is_fresh(t: Tensor, inp: AdvantageInputs) -> bool:
    """True when ``t`` shares memory with no input tensor, so it may be updated in place."""
    tensors = [inp.rewards_B, inp.group_ids_B, inp.response_mask_BT, inp.response_ids_BT, inp.entropy_BT]
    tensors += [v for v in inp.extras.values() if isinstance(v, Tensor)]
    ptr = t.untyped_storage().data_ptr()
    return t._base is None and all(x is None or x.untyped_storage().data_ptr() != ptr for x in tensors)
