"""AnytimeReasoner / BRPO: Budget Relative Policy Optimization (docs/algorithms.md §6b). Pure torch math.

The thinking ``z`` of each response is cut at every budget ``b_j`` of a prior (``b_j = b_max j/S``
with probabilities ``p_j``), a summary is sampled after each cut, and the mean summary score at
budget ``j`` is the dense reward ``r̄_{g,j}``. Thinking tokens in segment ``s`` (positions
``[b_{s-1}, b_s)``) get the reward-to-go advantage ``A^cot_{g,s}`` (no std normalisation); summary
tokens get ``A^sum`` relative to the other summaries of the same summary prompt.

This module holds the math: the budget prior, the summary-prompt plan on token ids, per-budget
rewards, both advantages, and the registered advantage ``brpo`` with its params (the rollout
settings, :class:`AnytimeParams`, plus the advantage's own). Sampling the summaries through the
engines lives in :mod:`rlkit.methods.anytime`; the training step's glue in :mod:`rlkit.methods.anytime`.

Departures from ``sail-sg/AnytimeReasoner`` (all behaviour-neutral for the gradients):
- summaries are separate batch rows whose prompt holds the thinking prefix, instead of one tree
  packed with flex-attention masks; the inserted marker tokens are prompt (not trained) in both;
- when the thinking ended with EOS, the summary prompt covering its end is not sampled: its
  budgets score 0, as in the reference, and no summary rows are trained for them;
- ``b_j = b_max * j // S`` for any ``b_max`` and ``S`` (the reference asserts ``b_max`` in
  {8000, 16000} and ``S`` dividing it, where both formulas agree);
- a prompt group of size 1 has ``V2 = 0`` (reference: ``avg_return = 0`` when ``G == 1``).

One option changes behaviour and is off by default: ``eos_ends_thinking`` treats a thinking that
ended with EOS as closed, for models without think tags whose plain response is the thinking
[INFERRED].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from rlkit.algorithms.groups import group_index
from rlkit.algorithms.registry import register_advantage
from rlkit.algorithms.types import AdvantageInputs, AdvantageOutput

__all__ = [
    "AnytimeParams",
    "BRPOParams",
    "BudgetPrior",
    "SummaryPrompt",
    "brpo_advantage",
    "brpo_summary_advantages",
    "brpo_thinking_advantages",
    "budget_probs",
    "budget_rewards",
    "budget_support",
    "plan_summary_prompts",
    "segment_index",
]

VARIANCE_REDUCTIONS = ("brpo", "v1only", "v2only", "none")
SUMMARY_METHODS = ("brpo", "grpo")


# ----------------------------------------------------------------------------- budget prior


def budget_support(b_max: int, n_support: int) -> list[int]:
    """Budgets ``b_j = b_max * j // S`` for ``j = 1..S``.

    >>> budget_support(8000, 4)
    [2000, 4000, 6000, 8000]
    """
    if n_support < 1 or b_max < n_support:
        raise ValueError(f"need 1 <= n_support <= b_max, got n_support={n_support}, b_max={b_max}")
    return [b_max * j // n_support for j in range(1, n_support + 1)]


def budget_probs(kind: str, budgets: Sequence[int]) -> Tensor:
    """Prior ``p_j`` over the budgets: ``uniform`` 1/S, ``linear`` b_j / sum b, ``base`` (0,..,0,1).

    >>> budget_probs("linear", [2000, 4000, 6000, 8000]).tolist()
    [0.1, 0.2, 0.3, 0.4]
    """
    S = len(budgets)
    if S == 0:
        raise ValueError("budget_probs needs at least one budget")
    b = torch.tensor([float(x) for x in budgets], dtype=torch.float64)
    if kind == "uniform":
        return torch.full((S,), 1.0 / S, dtype=torch.float64)
    if kind == "linear":
        return b / b.sum()
    if kind == "base":
        p = torch.zeros(S, dtype=torch.float64)
        p[-1] = 1.0
        return p
    raise ValueError(f"unknown budget prior {kind!r}; valid: uniform, linear, base")


@dataclass(frozen=True)
class BudgetPrior:
    """Training budget prior (docs/algorithms.md §6b): ``S = n_support`` budgets up to ``b_max``.

    Attributes:
        b_max: maximum thinking length (paper: 8000 or 16000).
        n_support: number of budgets ``S`` (paper: 1, 2, 4 or 8).
        probs: ``uniform`` | ``linear`` | ``base`` (``base`` is the GRPO-like setting).
    """

    b_max: int = 8000
    n_support: int = 4
    probs: Literal["uniform", "linear", "base"] = "uniform"

    def __post_init__(self) -> None:
        budget_support(self.b_max, self.n_support)
        budget_probs(self.probs, [1])  # validates the name

    @property
    def budgets(self) -> list[int]:
        return budget_support(self.b_max, self.n_support)

    @property
    def probs_S(self) -> Tensor:
        """float64 [S], sums to 1."""
        return budget_probs(self.probs, self.budgets)

    @classmethod
    def validation(cls, b_max: int = 8000) -> BudgetPrior:
        """Evaluation prior: the four quarters of ``b_max`` with uniform 0.25 (docs/algorithms.md §6b)."""
        return cls(b_max=b_max, n_support=4, probs="uniform")


# ----------------------------------------------------------------------------- summary prompts


@dataclass(frozen=True)
class SummaryPrompt:
    """One summary prompt of one thinking ``z``.

    Attributes:
        prompt_ids: ``question + z[:prefix_len] (+ truncation marker) + answer delimiter``.
        budget_indices: budgets ``j`` this prompt serves (several when they all exceed ``|z|``).
        prefix_len: thinking tokens kept.
        truncated: the truncation marker was inserted (cut before the thinking end, or ``z``
            never closed).
        dead: the thinking ended with EOS and this prompt covers its end: nothing to summarise,
            its budgets score 0 and it is not sampled.
    """

    prompt_ids: list[int]
    budget_indices: tuple[int, ...]
    prefix_len: int
    truncated: bool
    dead: bool = False


def plan_summary_prompts(
    question_ids: Sequence[int],
    thinking_ids: Sequence[int],
    budgets: Sequence[int],
    *,
    closed: bool,
    truncation_ids: Sequence[int],
    answer_ids: Sequence[int],
    eos_ended: bool = False,
) -> list[SummaryPrompt]:
    """Summary prompts of one thinking at each budget (docs/algorithms.md §6b, ``sample_partial_cot``).

    For budget ``b_j``: if ``|z| > b_j`` or ``z`` never closed, the prompt is
    ``question + z[:min(b_j, |z|)] + truncation_ids + answer_ids``; otherwise it is
    ``question + z + answer_ids``. Budgets at or beyond ``|z|`` share one prompt. Prompts come
    in increasing prefix length.

    Args:
        question_ids: prompt token ids.
        thinking_ids: the sampled thinking ``z`` (ends with the think-end tokens when ``closed``).
        budgets: increasing budgets ``b_1..b_S``.
        closed: ``z`` ended with the think-end marker.
        truncation_ids: tokens of ``"...\\n\\n...\\n\\n</think>"``.
        answer_ids: tokens of ``"\\n\\n**Final Answer**\\n"``.
        eos_ended: ``z`` ended with EOS instead (its end prompt is marked ``dead``).

    >>> [p.prompt_ids for p in plan_summary_prompts([1], [5, 6, 7], [2, 4, 6], closed=True,
    ...                                              truncation_ids=[8], answer_ids=[9])]
    [[1, 5, 6, 8, 9], [1, 5, 6, 7, 9]]
    """
    if list(budgets) != sorted(set(budgets)) or not budgets or budgets[0] < 1:
        raise ValueError(f"budgets must be positive and strictly increasing, got {list(budgets)}")
    if closed and eos_ended:
        raise ValueError("a thinking cannot both close with the think-end marker and end with EOS")
    n = len(thinking_ids)
    cut_to: dict[int, list[int]] = {}
    for j, b in enumerate(budgets):
        cut_to.setdefault(b if n > b else n, []).append(j)
    plans = []
    for cut in sorted(cut_to):
        truncated = n > cut or not closed
        ids = list(question_ids) + list(thinking_ids[:cut])
        ids += list(truncation_ids) + list(answer_ids) if truncated else list(answer_ids)
        plans.append(SummaryPrompt(ids, tuple(cut_to[cut]), cut, truncated, dead=eos_ended and cut == n))
    return plans


# ----------------------------------------------------------------------------- rewards and advantages


@torch.no_grad()
def budget_rewards(scores_M: Tensor, parent_M: Tensor, budget_index_M: Tensor, N: int, S: int) -> Tensor:
    """``r̄_{n,j}``: mean score of the summaries of thinking ``n`` at budget ``j``.

    Args:
        scores_M: float [M] summary scores (0/1).
        parent_M: long [M] thinking index ``n`` in ``0..N-1``.
        budget_index_M: long [M] budget index ``j`` in ``0..S-1``.

    Returns:
        float64 [N, S]; a budget without summaries (dead prompt) scores 0.
    """
    key_M = parent_M.long() * S + budget_index_M.long()
    total = torch.zeros(N * S, dtype=torch.float64).index_add(0, key_M, scores_M.to(torch.float64))
    count = torch.zeros(N * S, dtype=torch.float64).index_add(0, key_M, torch.ones(key_M.numel(), dtype=torch.float64))
    return (total / count.clamp(min=1)).view(N, S)


@torch.no_grad()
def brpo_thinking_advantages(
    rbar_NS: Tensor,
    probs_S: Tensor,
    group_ids_N: Tensor,
    variance_reduction: str = "brpo",
    discount: float = 2.0,
) -> dict[str, Tensor]:
    """BRPO advantage of each thinking segment (docs/algorithms.md §6b, ``compute_cot_advantage``).

    ``Ret_{g,s} = sum_{k>=s} p_k r̄_{g,k}``; ``V2_s`` the group mean of ``Ret_{.,s}``;
    ``V1_{g,s} = [sum_{k<s} 2^k r̄_{g,k} / sum_{k<s} 2^k] * sum_{k>=s} p_k`` (0 at ``s=0``);
    baseline ``(s V1 + (S-s) V2) / S`` for ``brpo``, ``V1`` / ``V2`` / ``0`` for
    ``v1only`` / ``v2only`` / ``none``. Vectorised over arbitrary group ids.

    Args:
        rbar_NS: [N, S] per-budget rewards of N thinking responses.
        probs_S: [S] budget prior (renormalised here).
        group_ids_N: long [N] prompt group of each response.

    Returns:
        dict of float64 [N, S] tensors: ``adv``, ``ret``, ``v1``, ``v2``, ``baseline``.
    """
    if variance_reduction not in VARIANCE_REDUCTIONS:
        raise ValueError(f"unknown variance_reduction {variance_reduction!r}; valid: {', '.join(VARIANCE_REDUCTIONS)}")
    r = rbar_NS.to(torch.float64)
    N, S = r.shape
    p = probs_S.to(torch.float64)
    if p.shape != (S,) or p.sum() <= 0:
        raise ValueError(f"probs_S must be a non-zero [S={S}] vector, got shape {tuple(p.shape)}")
    p = p / p.sum()
    ret = (r * p).flip(-1).cumsum(-1).flip(-1)  # reward-to-go
    index_N, G = group_index(group_ids_N)
    count_G = torch.zeros(G, dtype=torch.float64).index_add(0, index_N, torch.ones(N, dtype=torch.float64))
    v2_G = torch.zeros(G, S, dtype=torch.float64).index_add(0, index_N, ret) / count_G[:, None]
    v2 = torch.where((count_G[index_N] > 1)[:, None], v2_G[index_N], torch.zeros_like(ret))
    w = discount ** torch.arange(S, dtype=torch.float64)
    prev_num = torch.cumsum(r * w, -1) - r * w  # sum_{k<s}
    prev_den = torch.cumsum(w, -1) - w
    tail_p = p.flip(-1).cumsum(-1).flip(-1)  # sum_{k>=s} p_k
    v1 = torch.where(prev_den > 0, prev_num / prev_den.clamp(min=1e-30), torch.zeros_like(r)) * tail_p
    s = torch.arange(S, dtype=torch.float64)
    baseline = {
        "brpo": (s * v1 + (S - s) * v2) / S,
        "v1only": v1,
        "v2only": v2,
        "none": torch.zeros_like(ret),
    }[variance_reduction]
    return {"adv": ret - baseline, "ret": ret, "v1": v1, "v2": v2, "baseline": baseline}


@torch.no_grad()
def brpo_summary_advantages(
    scores_M: Tensor,
    parent_M: Tensor,
    prompt_M: Tensor,
    budget_index_M: Tensor,
    rbar_NS: Tensor,
    group_ids_N: Tensor,
    method: str = "brpo",
) -> Tensor:
    """Summary-policy advantage (docs/algorithms.md §6b, ``compute_summary_advantage``).

    With several summaries per (response, budget): ``score - mean`` over the summaries of the same
    summary prompt (a prompt with one summary has baseline 0). With one summary per budget
    (``A = 1``): ``score - mean_g r̄_{g,j}`` over the responses of the prompt group. ``grpo``
    keeps only each response's last summary at the largest budget; the others get 0.

    Args:
        scores_M: float [M]; parent_M, prompt_M, budget_index_M: long [M] (thinking row,
            summary-prompt index within it, budget index).
        rbar_NS: [N, S] per-budget rewards; group_ids_N: long [N].

    Returns:
        float64 [M].
    """
    if method not in SUMMARY_METHODS:
        raise ValueError(f"unknown summary_method {method!r}; valid: {', '.join(SUMMARY_METHODS)}")
    M = scores_M.numel()
    if M == 0:
        return torch.zeros(0, dtype=torch.float64)
    scores = scores_M.to(torch.float64)
    N, S = rbar_NS.shape
    parent, budget = parent_M.long(), budget_index_M.long()
    per_budget, _ = group_index(parent * S + budget)
    one_each = bool((torch.bincount(per_budget) == 1).all())
    if one_each:  # A = 1: GRPO-like baseline over the group's responses at the same budget
        index_N, G = group_index(group_ids_N)
        r = rbar_NS.to(torch.float64)
        count_G = torch.zeros(G, dtype=torch.float64).index_add(0, index_N, torch.ones(N, dtype=torch.float64))
        mean_GS = torch.zeros(G, S, dtype=torch.float64).index_add(0, index_N, r) / count_G[:, None]
        baseline = mean_GS[index_N[parent], budget]
    else:
        key, K = group_index(parent * (int(prompt_M.max()) + 1) + prompt_M.long())
        total = torch.zeros(K, dtype=torch.float64).index_add(0, key, scores)
        count = torch.bincount(key, minlength=K).to(torch.float64)
        baseline = torch.where(count[key] > 1, total[key] / count[key], torch.zeros_like(scores))
    adv = scores - baseline
    if method == "grpo":
        last = torch.full((N,), -1, dtype=torch.long)
        rows = torch.arange(M)
        at_last_budget = budget == S - 1
        last.scatter_reduce_(0, parent[at_last_budget], rows[at_last_budget], reduce="amax")
        adv = torch.where(last[parent] == rows, adv, torch.zeros_like(adv))
    return adv


def segment_index(budgets_S: Tensor, T: int) -> Tensor:
    """long [T]: segment ``s`` of each response position, ``t in [b_{s-1}, b_s)`` (clamped to S-1).

    >>> segment_index(torch.tensor([2, 4, 6]), 7).tolist()
    [0, 0, 1, 1, 2, 2, 2]
    """
    S = budgets_S.numel()
    return torch.searchsorted(budgets_S.long(), torch.arange(T), right=True).clamp(max=S - 1)


# ----------------------------------------------------------------------------- registered advantage


@dataclass(frozen=True)
class AnytimeParams:
    """AnytimeReasoner rollout settings (docs/algorithms.md §6b); the ``brpo`` advantage's params extend them.

    Attributes:
        b_max: thinking length cap (the thinking rollout's ``max_new_tokens``; paper 8000).
        n_support: number of budgets ``S``, ``b_j = b_max j / S`` (paper 4).
        budget_probs: budget prior ``uniform`` | ``linear`` | ``base`` (``base``: GRPO-like).
        n_summary: summaries ``A`` per summary prompt, i.e. per budget, except that the budgets at or
            beyond a thinking's end share one prompt and so one set of ``A`` (paper 4; 1 is the
            GRPO baseline).
        summary_max_new_tokens: summary length cap (paper 128 - 10).
        think_end: marker closing the thinking (a stop string of the thinking rollout).
        truncation_text: inserted after a cut thinking (it closes the thinking).
        answer_delimiter: inserted before every summary.
        eos_ends_thinking: a thinking that ended with EOS counts as closed (its EOS dropped from the
            summary prompt) instead of scoring 0 at the budgets beyond its end; for models that
            answer without think tags [INFERRED option; off in the paper].
    """

    b_max: int = 8000
    n_support: int = 4
    budget_probs: Literal["uniform", "linear", "base"] = "uniform"
    n_summary: int = 4
    summary_max_new_tokens: int = 118
    think_end: str = "</think>"
    truncation_text: str = "...\n\n...\n\n</think>"
    answer_delimiter: str = "\n\n**Final Answer**\n"
    eos_ends_thinking: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.n_summary, int) or self.n_summary < 1:
            raise ValueError(f"n_summary must be an integer >= 1, got {self.n_summary!r}")
        if not isinstance(self.summary_max_new_tokens, int) or self.summary_max_new_tokens < 1:
            raise ValueError(f"summary_max_new_tokens must be an integer >= 1, got {self.summary_max_new_tokens!r}")
        if not isinstance(self.b_max, int) or not isinstance(self.n_support, int):
            raise ValueError(f"b_max and n_support must be integers, got {self.b_max!r} and {self.n_support!r}")
        if not self.think_end:
            raise ValueError("think_end must be a non-empty string")
        BudgetPrior(self.b_max, self.n_support, self.budget_probs)  # validates the prior

    @property
    def prior(self) -> BudgetPrior:
        return BudgetPrior(self.b_max, self.n_support, self.budget_probs)

    def rollout_params(self, base: Any) -> Any:
        """Sampling params of the thinking rollout: ``base`` (a ``rollout.engine.SamplingParams``)
        with at most ``b_max`` new tokens and ``think_end`` added to its stop strings."""
        stop = tuple(base.stop) if self.think_end in base.stop else (*base.stop, self.think_end)
        return dataclasses.replace(base, max_new_tokens=self.b_max, stop=stop)


@dataclass(frozen=True)
class BRPOParams(AnytimeParams):
    """Hyper-parameters of the ``brpo`` advantage (docs/algorithms.md §6b defaults): the rollout settings of
    :class:`AnytimeParams` plus the advantage's own.

    Attributes:
        variance_reduction: thinking baseline: ``brpo`` | ``v1only`` | ``v2only`` | ``none``.
        summary_method: ``brpo`` (every summary, decoupled baseline) | ``grpo`` (last only).
        discount: weight base of ``V1``'s mean over previous budgets (reference: 2).
    """

    variance_reduction: Literal["brpo", "v1only", "v2only", "none"] = "brpo"
    summary_method: Literal["brpo", "grpo"] = "brpo"
    discount: float = 2.0

    # read by the trainer (no name branching): this estimator needs the AnytimeReasoner rollout
    # (summaries of the truncated thinking, rlkit.methods.anytime) and its thinking sampling params
    needs_anytime_rollout: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variance_reduction not in VARIANCE_REDUCTIONS:
            raise ValueError(
                f"brpo.variance_reduction must be one of {VARIANCE_REDUCTIONS}, got {self.variance_reduction!r}"
            )
        if self.summary_method not in SUMMARY_METHODS:
            raise ValueError(f"brpo.summary_method must be one of {SUMMARY_METHODS}, got {self.summary_method!r}")
        if self.discount <= 0:
            raise ValueError(f"brpo.discount must be > 0, got {self.discount}")


EXTRAS_DOC = """
``inp.extras`` keys read by ``brpo`` (B rows = N thinking rows + M summary rows, any order):

- ``brpo_kind_B``: long [B], 0 = thinking row (response = thinking ``z``), 1 = summary row.
- ``brpo_budget_rewards_BS``: float [B, S], ``r̄`` of thinking rows (summary rows ignored).
- ``brpo_budgets_S``: long [S], budgets ``b_1..b_S`` in response tokens.
- ``brpo_probs_S``: float [S], budget prior ``p``.
- ``brpo_parent_B``: long [B], batch row of the thinking a summary row summarises (-1 otherwise).
- ``brpo_prompt_B``: long [B], summary-prompt index within its parent (summary rows).
- ``brpo_budget_index_B``: long [B], budget index ``j`` of a summary row.

Summary rows' scores are ``inp.rewards_B``; thinking rows' ``inp.group_ids_B`` are prompt groups.
``rlkit.methods.anytime.brpo_rows`` builds all of them.
"""


def _extra(inp: AdvantageInputs, key: str) -> Tensor:
    if key not in inp.extras:
        raise KeyError(f"advantage 'brpo' needs inp.extras[{key!r}] (see rlkit.algorithms.brpo.EXTRAS_DOC)")
    return torch.as_tensor(inp.extras[key])


@register_advantage("brpo", params=BRPOParams)
@torch.no_grad()
def brpo_advantage(inp: AdvantageInputs, p: BRPOParams) -> Tensor:
    """BRPO token advantages: thinking tokens get ``A^cot`` of their segment, summary tokens
    ``A^sum`` (docs/algorithms.md §6b). Inputs travel in ``inp.extras``, see :data:`EXTRAS_DOC`.

    Returns:
        advantages_BT [B, T] (dtype of ``response_mask_BT`` if floating, else float32), 0 on padding.
    """
    mask_BT = inp.response_mask_BT
    B, T = mask_BT.shape
    kind_B = _extra(inp, "brpo_kind_B").long()
    budgets_S = _extra(inp, "brpo_budgets_S").long()
    probs_S = _extra(inp, "brpo_probs_S")
    S = budgets_S.numel()
    think_B = kind_B == 0
    think_idx = torch.nonzero(think_B).flatten()
    summ_idx = torch.nonzero(~think_B).flatten()
    rbar_BS = _extra(inp, "brpo_budget_rewards_BS")
    if tuple(rbar_BS.shape) != (B, S) or tuple(kind_B.shape) != (B,):
        raise ValueError(f"brpo extras: expected brpo_kind_B [{B}] and brpo_budget_rewards_BS [{B}, {S}], "
                         f"got {tuple(kind_B.shape)} and {tuple(rbar_BS.shape)}")
    rbar_NS, gids_N = rbar_BS[think_idx].to(torch.float64), inp.group_ids_B[think_idx]
    parts = brpo_thinking_advantages(rbar_NS, probs_S, gids_N, p.variance_reduction, p.discount)
    seg_T = segment_index(budgets_S, T)
    adv_BT = torch.zeros(B, T, dtype=torch.float64)
    adv_BT[think_idx] = parts["adv"][:, seg_T]
    metrics: dict[str, float] = {}
    if summ_idx.numel():
        parent_B = _extra(inp, "brpo_parent_B").long()
        row_to_n = torch.full((B,), -1, dtype=torch.long)
        row_to_n[think_idx] = torch.arange(think_idx.numel())
        parent_M = row_to_n[parent_B[summ_idx]]
        if bool((parent_M < 0).any()):
            raise ValueError("brpo: every summary row's brpo_parent_B must point at a thinking row")
        sum_adv = brpo_summary_advantages(
            inp.rewards_B[summ_idx], parent_M, _extra(inp, "brpo_prompt_B").long()[summ_idx],
            _extra(inp, "brpo_budget_index_B").long()[summ_idx], rbar_NS, gids_N, p.summary_method,
        )
        adv_BT[summ_idx] = sum_adv[:, None].expand(-1, T)
        metrics["brpo/summary_adv_abs_mean"] = float(sum_adv.abs().mean())
    if think_idx.numel():
        for key in ("ret", "v1", "v2", "baseline", "adv"):
            metrics[f"brpo/{key}_mean"] = float(parts[key].mean())
        for j, b in enumerate(budgets_S.tolist()):
            metrics[f"brpo/score@{b}"] = float(rbar_NS[:, j].mean())
        metrics["brpo/objective"] = float((rbar_NS * probs_S.to(torch.float64) / probs_S.sum()).sum(-1).mean())
    seg_BT = torch.where(think_B[:, None], seg_T[None, :].expand(B, T), torch.full((B, T), -1))
    seg_BT = torch.where(mask_BT > 0, seg_BT, torch.full_like(seg_BT, -1))
    out_dtype = mask_BT.dtype if mask_BT.is_floating_point() else torch.float32
    return AdvantageOutput((adv_BT * mask_BT.to(torch.float64)).to(out_dtype), metrics,
                           {"brpo_segment": seg_BT.float()})  # -1: summary / padding
