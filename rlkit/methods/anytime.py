"""AnytimeReasoner rollouts (docs/algorithms.md §6b): summaries of truncated thinking, sampled through the engines.

Flow of one BRPO step (the math is in :mod:`rlkit.algorithms.brpo`)::

    think = thinking_params(base_params, ap)                   # stop at </think>, max b_max tokens
    thinking = generate(engines, [RolloutRequest(q, think, group_id=g) ...])
    summaries = sample_summaries(engines, thinking, ap, tokenizer=tok, seed=step_seed)   # ONE call
    correct = verifier([s.completion.text for s in summaries], ...)   # per summary, 0/1
    rows = brpo_rows(thinking, group_ids, summaries, summary_scores(summaries, correct, ap.think_end), ap)
    batch = build_batch(rows.prompts, rows.responses, pad_id=..., rollout_logprobs=rows.logprobs)
    AdvantageInputs(rows.rewards_B, rows.group_ids_B, batch.response_mask_BT, extras=rows.extras)

Engines are ``RolloutEngine`` objects or Ray actor handles of them (as in
:func:`rlkit.orchestration.engine_pool.as_pool`); every summary of the batch goes out in one ``generate`` call
per engine. A summary scores 1 when the verifier accepts it and the whole trace has exactly one
think-end marker (the summary itself must not emit another one); summaries of a thinking that
ended with EOS are not sampled and score 0 (unless ``eos_ends_thinking``). The trainer runs this
flow through :mod:`rlkit.methods.anytime`.

In the training step (the ``anytime`` stage at the end of this module):

AnytimeReasoner / BRPO in the training step (docs/algorithms.md §6b): thinking groups -> summary groups.

The trainer's normal collect samples the thinking ``z`` (sampling params from
``BRPOParams.rollout_params``: at most ``b_max`` new tokens, stop at ``think_end``). Then, for the
whole batch at once, :func:`summarize_groups`

1. plans the summary prompts of every thinking at every budget of the prior and samples
   ``n_summary`` summaries per budget with ONE ``generate`` call per engine
   (:func:`rlkit.methods.anytime.sample_summaries`, requests sharded round-robin like every engine call);
2. scores the summaries with the reward manager, given the dataset columns of their thinking's
   row; a summary scores 1 iff the accuracy verifier (``math`` if configured, else the first)
   accepts it and it emits no further ``think_end`` (:func:`rlkit.methods.anytime.summary_scores`);
3. turns the scores into per-budget rewards ``r̄`` and the ``brpo`` advantage's extras
   (:func:`rlkit.methods.anytime.brpo_rows`).

The training batch holds the thinking groups first, then one group per summary prompt (its
``n_summary`` x budgets-served samples share that prompt), so :func:`rlkit.loop.experience.make_batch`
packs rows in the order of ``brpo_rows``: thinking tokens train with ``A^cot`` of their budget
segment, summary tokens with ``A^sum``. A thinking group's rewards become ``J = sum_j p_j r̄_j``
(logged as ``reward/mean``); its per-verifier values stay those of the thinking text, so
``acc/mean`` is the accuracy of the thinking read as an answer, and the per-budget accuracy of
the summaries is ``anytime/acc@<budget>``.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlkit.algorithms import ADVANTAGES
from rlkit.algorithms.brpo import (
    AnytimeParams,
    BRPOParams,
    SummaryPrompt,
    budget_rewards,
    plan_summary_prompts,
)
from rlkit.common import stable_seed
from rlkit.loop.experience import Group, sampling_params, score_groups
from rlkit.methods.base import Stage, register_stage
from rollout.engine import Completion, RolloutRequest, SamplingParams

__all__ = ["AnytimeParams", "AnytimeStage", "AnytimeStep", "BRPORows", "SummarySample", "brpo_rows", "check_config",
           "generate_once", "sample_summaries", "summarize_groups", "summary_groups", "summary_scores",
           "thinking_params", "thinking_status"]


def thinking_params(base: SamplingParams, ap: AnytimeParams) -> SamplingParams:
    """Sampling params of the thinking rollout: at most ``b_max`` tokens, stop at ``think_end``."""
    return ap.rollout_params(base)


def thinking_status(c: Completion, think_end: str, eos_ids: Sequence[int]) -> tuple[bool, bool]:
    """``(closed, eos_ended)`` of a thinking completion: ended with ``think_end``, or with EOS."""
    closed = c.finish_reason == "stop" and c.text.rstrip().endswith(think_end)
    eos_ended = (not closed and c.finish_reason == "stop" and bool(c.token_ids)
                 and c.token_ids[-1] in set(eos_ids))
    return closed, eos_ended


@dataclass
class SummarySample:
    """One sampled summary of thinking ``parent`` at summary prompt ``prompt_index``.

    A prompt stands for every budget in ``budget_indices`` (a thinking that ended before several
    budgets has one prompt for all of them): its summaries count toward ``r̄`` at each of those
    budgets and are trained once. ``budget_index`` is the largest of them (the row's label).
    """

    parent: int
    prompt_index: int
    budget_index: int
    prompt_ids: list[int]
    completion: Completion
    budget_indices: tuple[int, ...] = ()

    @property
    def budgets(self) -> tuple[int, ...]:
        """Budget indices this summary stands for."""
        return self.budget_indices or (self.budget_index,)


_seed = stable_seed


def generate_once(engines: Any, requests: list[RolloutRequest]) -> list[Completion]:
    """One ``generate`` call per engine (round-robin shards), completions in request order.

    ``engines``: the trainer's engine pool, Ray actor handles or engine objects (see
    :func:`rlkit.orchestration.engine_pool.as_pool`).
    """
    if not requests:
        return []
    from rlkit.orchestration.engine_pool import as_pool

    return as_pool(engines).generate(requests)[0]


def sample_summaries(
    engines: Sequence[Any],
    thinking: Sequence[Completion],
    ap: AnytimeParams,
    *,
    tokenizer: Any,
    eos_ids: Sequence[int] | None = None,
    summary_params: SamplingParams | None = None,
    seed: int = 0,
) -> tuple[list[SummarySample], list[list[SummaryPrompt]]]:
    """Sample ``n_summary`` summaries per summary prompt for every thinking, in one engine call.

    Budgets that share a prompt (all those at or beyond a thinking's end) share its ``n_summary``
    summaries, as in the paper: a thinking shorter than every budget gets ``A`` summaries, not
    ``S * A``, and each is trained once.

    Args:
        engines: ``RolloutEngine`` objects or Ray handles (a list), or the trainer's engine pool.
        thinking: thinking completions (``prompt_ids`` = question).
        ap: :class:`AnytimeParams`.
        tokenizer: encodes the inserted texts (``add_special_tokens=False``).
        eos_ids: EOS ids (default ``tokenizer.eos_token_id``).
        summary_params: temperature/top-p of the summaries (default: T=1); ``n``,
            ``max_new_tokens`` and ``seed`` are set here.
        seed: base seed; each summary prompt gets ``hash(seed, parent, prompt)``.

    Returns:
        (samples ordered by parent, budget, sample; the per-thinking prompt plans).
    """
    budgets = ap.prior.budgets
    trunc = tokenizer.encode(ap.truncation_text, add_special_tokens=False)
    answer = tokenizer.encode(ap.answer_delimiter, add_special_tokens=False)
    if eos_ids is None:
        eos = tokenizer.eos_token_id
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    base = summary_params or SamplingParams(temperature=1.0)
    plans: list[list[SummaryPrompt]] = []
    requests: list[RolloutRequest] = []
    keys: list[tuple[int, int]] = []
    for n, c in enumerate(thinking):
        closed, eos_ended = thinking_status(c, ap.think_end, eos_ids)
        z = list(c.token_ids)
        if eos_ended and ap.eos_ends_thinking:  # the plain response is the thinking: summarise its end
            closed, eos_ended, z = True, False, z[:-1]
        plan = plan_summary_prompts(c.prompt_ids, z, budgets, closed=closed,
                                    truncation_ids=trunc, answer_ids=answer, eos_ended=eos_ended)
        plans.append(plan)
        for k, sp in enumerate(plan):
            if sp.dead:
                continue
            params = dataclasses.replace(base, n=ap.n_summary, max_new_tokens=ap.summary_max_new_tokens,
                                         seed=_seed(seed, n, k))
            requests.append(RolloutRequest(sp.prompt_ids, params, group_id=n, meta={"parent": n, "prompt": k}))
            keys.append((n, k))
    comps = generate_once(engines, requests)
    samples: list[SummarySample] = []
    off = 0
    for (n, k), req in zip(keys, requests):
        sp = plans[n][k]
        for a in range(req.params.n):
            samples.append(SummarySample(n, k, sp.budget_indices[-1], sp.prompt_ids, comps[off + a],
                                         tuple(sp.budget_indices)))  # fmt: skip
        off += req.params.n
    samples.sort(key=lambda s: (s.parent, s.budget_index))  # stable: sample order kept
    return samples, plans


def summary_scores(samples: Sequence[SummarySample], correct: Sequence[float], think_end: str) -> list[float]:
    """Score 1 iff the verifier accepted the summary (``correct >= 1``) and the summary emits no
    further ``think_end`` (the trace has exactly one), else 0."""
    if len(samples) != len(correct):
        raise ValueError(f"{len(samples)} summaries but {len(correct)} verifier results")
    return [float(c is not None and c >= 1.0 and think_end not in s.completion.text)
            for s, c in zip(samples, correct)]


@dataclass
class BRPORows:
    """Training rows of a BRPO step: N thinking rows then M summary rows (see ``EXTRAS_DOC``)."""

    prompts: list[list[int]]
    responses: list[list[int]]
    logprobs: list[list[float]]
    rewards_B: torch.Tensor
    group_ids_B: torch.Tensor
    extras: dict[str, Any]
    rbar_NS: torch.Tensor


def brpo_rows(
    thinking: Sequence[Completion],
    group_ids: Sequence[int],
    samples: Sequence[SummarySample],
    scores: Sequence[float],
    ap: AnytimeParams,
) -> BRPORows:
    """Batch rows and ``AdvantageInputs.extras`` for the ``brpo`` advantage.

    Thinking rows carry ``J = sum_j p_j r̄_j`` as reward (for logging; the advantage reads
    ``r̄``); summary rows carry their score.
    """
    N, M = len(thinking), len(samples)
    if len(group_ids) != N or len(scores) != M:
        raise ValueError("brpo_rows: group_ids must match thinking and scores must match samples")
    prior = ap.prior
    S = prior.n_support
    scores_M = torch.tensor(list(scores), dtype=torch.float64)
    # r̄ at every budget a summary stands for (a shared prompt's summaries count at each of its budgets)
    per_budget = [(s.parent, j, sc) for s, sc in zip(samples, scores) for j in s.budgets]
    rbar_NS = budget_rewards(torch.tensor([sc for *_, sc in per_budget], dtype=torch.float64),
                             torch.tensor([n for n, *_ in per_budget], dtype=torch.long),
                             torch.tensor([j for _, j, _ in per_budget], dtype=torch.long), N, S)  # fmt: skip
    probs_S = prior.probs_S
    B = N + M
    rbar_BS = torch.zeros(B, S, dtype=torch.float64)
    rbar_BS[:N] = rbar_NS
    neg = [-1] * N
    extras: dict[str, Any] = {
        "brpo_kind_B": torch.tensor([0] * N + [1] * M, dtype=torch.long),
        "brpo_budget_rewards_BS": rbar_BS,
        "brpo_budgets_S": torch.tensor(prior.budgets, dtype=torch.long),
        "brpo_probs_S": probs_S,
        "brpo_parent_B": torch.tensor(neg + [s.parent for s in samples], dtype=torch.long),
        "brpo_prompt_B": torch.tensor(neg + [s.prompt_index for s in samples], dtype=torch.long),
        "brpo_budget_index_B": torch.tensor(neg + [s.budget_index for s in samples], dtype=torch.long),
    }
    rewards_B = torch.cat([(rbar_NS * probs_S).sum(-1), scores_M]).float()
    gids = list(group_ids) + [group_ids[s.parent] for s in samples]
    return BRPORows(
        prompts=[list(c.prompt_ids) for c in thinking] + [list(s.prompt_ids) for s in samples],
        responses=[list(c.token_ids) for c in thinking] + [list(s.completion.token_ids) for s in samples],
        logprobs=[list(c.logprobs) for c in thinking] + [list(s.completion.logprobs) for s in samples],
        rewards_B=rewards_B,
        group_ids_B=torch.tensor(gids, dtype=torch.long),
        extras=extras,
        rbar_NS=rbar_NS,
    )




@dataclass
class AnytimeStep:
    """What :func:`summarize_groups` adds to a training step.

    Attributes:
        summary_groups: one group per sampled summary prompt, to pack after the thinking groups.
        extras: ``AdvantageInputs.extras`` of the ``brpo`` advantage (rows: thinking, then summaries).
        metrics: ``anytime/*`` diagnostics.
    """

    summary_groups: list[Group]
    extras: dict[str, Any]
    metrics: dict[str, float]


def summary_groups(groups: Sequence[Group], samples: Sequence[SummarySample]) -> list[Group]:
    """Group consecutive summaries of the same (thinking, summary prompt); rows keep ``samples`` order.

    ``samples[i].parent`` indexes the thinking completions of ``groups`` flattened group by group.
    """
    owner = [g for g in groups for _ in g.completions]
    out: list[Group] = []
    seen: set[tuple[int, int]] = set()
    key = None
    for s in samples:
        k = (s.parent, s.prompt_index)
        if k != key:
            if k in seen:
                raise ValueError(f"summaries of thinking {s.parent}, prompt {s.prompt_index} are not contiguous")
            seen.add(k)
            key, parent = k, owner[s.parent]
            out.append(Group(row=parent.row, prompt_ids=list(s.prompt_ids), completions=[],
                             problem_id=parent.problem_id, budget=parent.budget))
        out[-1].completions.append(s.completion)
    return out


def summarize_groups(
    groups: Sequence[Group],
    engines: Any,
    tokenizer: Any,
    manager: Any,
    p: BRPOParams,
    *,
    base_params: SamplingParams,
    seed: int,
    acc_key: str,
) -> AnytimeStep:
    """Sample, score and pack the summaries of every thinking in ``groups`` (one engine call).

    Args:
        groups: the step's thinking groups (scored; their ``rewards`` are replaced by ``J``).
        engines: the trainer's engine pool, Ray ``RolloutWorker`` handles or local engines.
        tokenizer: encodes the inserted texts; its EOS marks a thinking that ended with EOS.
        manager: a ``rewards.RewardManager`` (``score(texts, columns)``).
        p: the ``brpo`` params (rollout settings and advantage settings).
        base_params: temperature / top-p / top-k / stop of the summaries (``n``,
            ``max_new_tokens`` and ``seed`` are set per summary prompt).
        seed: per-step base seed.
        acc_key: the verifier whose value >= 1 means "correct".
    """
    thinking = [c for g in groups for c in g.completions]
    group_ids = [gi for gi, g in enumerate(groups) for _ in g.completions]
    t0 = time.perf_counter()
    samples, plans = sample_summaries(engines, thinking, p, tokenizer=tokenizer, summary_params=base_params,
                                      seed=seed)
    t_gen = time.perf_counter() - t0
    sgroups = summary_groups(groups, samples)
    reward_metrics = score_groups(sgroups, manager) if sgroups else {}
    if sgroups and acc_key not in sgroups[0].per_verifier:
        raise KeyError(f"brpo scores summaries with verifier {acc_key!r}, which the reward manager did not report "
                       f"(it reported {sorted(sgroups[0].per_verifier)})")
    correct = [v for g in sgroups for v in g.per_verifier.get(acc_key, [])]
    scores = summary_scores(samples, correct, p.think_end)
    rows = brpo_rows(thinking, group_ids, samples, scores, p)
    i = 0
    for g in sgroups:
        g.rewards = scores[i : i + len(g.completions)]
        i += len(g.completions)
    J = rows.rewards_B[: len(thinking)].tolist()
    i = 0
    for g in groups:
        g.rewards = J[i : i + len(g.completions)]
        i += len(g.completions)
    m = _metrics(samples, plans, correct, p, n_engines=len(engines))
    m.update({f"anytime/{k}": float(v) for k, v in reward_metrics.items()})
    m["time/summary_gen_s"] = t_gen
    m["time/summary_reward_s"] = time.perf_counter() - t0 - t_gen
    return AnytimeStep(sgroups, rows.extras, m)


def _metrics(samples: Sequence[SummarySample], plans: list, correct: Sequence[Any], p: BRPOParams, *,
             n_engines: int) -> dict[str, float]:
    lens = [len(s.completion.token_ids) for s in samples]
    sampled = sum(not sp.dead for plan in plans for sp in plan)
    N = max(len(plans), 1)
    m = {
        "anytime/summaries": float(len(samples)),
        "anytime/summary_prompts": float(sampled),
        "anytime/summary_tokens": float(sum(lens)),
        "anytime/summary_len_mean": statistics.fmean(lens) if lens else 0.0,
        "anytime/summary_clip_rate": statistics.fmean(s.completion.truncated for s in samples) if samples else 0.0,
        "anytime/thinking_closed_rate": sum(bool(pl) and not pl[-1].truncated for pl in plans) / N,
        "anytime/thinking_dead_rate": sum(bool(pl) and pl[-1].dead for pl in plans) / N,
        "anytime/engine_calls": float(min(n_engines, sampled)),
    }
    for j, b in enumerate(p.prior.budgets):  # accuracy of the summaries sampled at budget b
        vals = [float(c is not None and c >= 1.0) for s, c in zip(samples, correct) if j in s.budgets]
        m[f"anytime/acc@{b}"] = statistics.fmean(vals) if vals else 0.0
    return m


def check_config(cfg: Any) -> None:
    """Combinations the ``brpo`` rollout does not support; raises ``ValueError`` naming the key."""
    a = cfg.algorithm
    why = ("algorithm.advantage=brpo replaces the thinking's verifier reward by the rewards of its "
           "summaries at each budget")
    if cfg.segments.enabled:
        raise ValueError("segments.enabled does not combine with algorithm.advantage=brpo: BRPO samples each "
                         "thinking whole (up to advantage_params.b_max tokens) and summarises it in the same step")
    if a.dynamic_sampling.enabled:
        raise ValueError(f"algorithm.dynamic_sampling would filter groups on the thinking's verifier reward; {why}")
    if cfg.reward.length_shapers or a.overlong_shaping.enabled:
        raise ValueError("reward.length_shapers / algorithm.overlong_shaping would shape the thinking's verifier "
                         f"reward; {why}, and the budget prior already rewards early answers")
    if a.overlong_filter:
        raise ValueError("algorithm.overlong_filter masks truncated samples, but brpo cuts the thinking at "
                         "advantage_params.b_max by design (its summaries are what gets scored)")


@register_stage("anytime", order=20)
class AnytimeStage(Stage):
    """BRPO's anytime rollout: the training rollout samples the thinking (``rollout_params``); after
    scoring, the summaries of every thinking at every budget are sampled, scored and packed after
    the thinking groups, and the ``brpo`` advantage gets its extras."""

    advantage_flag = "needs_anytime_rollout"
    current_policy = True  # samples summaries / probes from the step's responses with the engines

    @classmethod
    def check(cls, cfg: Any) -> None:
        if cls.enabled(cfg):
            try:
                check_config(cfg)
            except ValueError as e:
                raise ValueError(f"algorithm.advantage: {e}") from None

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        a = ctx.cfg.algorithm
        self.params = ADVANTAGES.build_params(a.advantage, a.advantage_params)

    def sampling(self, params: SamplingParams, step: int) -> SamplingParams:
        return self.params.rollout_params(params)

    def after_score(self, step: int, groups: list, extras: dict[str, Any]):
        c = self.ctx
        t0 = time.perf_counter()
        base = dataclasses.replace(sampling_params(c.cfg, n=1, seed=0), return_entropy=False)
        res = summarize_groups(groups, c.engines, c.tokenizer, c.manager, self.params, base_params=base,
                               seed=stable_seed(c.cfg.seed, step, 104729), acc_key=c.acc_key)
        return groups + res.summary_groups, {**extras, **res.extras}, {
            **res.metrics, "time/summary_s": time.perf_counter() - t0}
