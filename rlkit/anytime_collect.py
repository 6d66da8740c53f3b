"""AnytimeReasoner / BRPO in the training step (spec §6b): thinking groups -> summary groups.

The trainer's normal collect samples the thinking ``z`` (sampling params from
``BRPOParams.rollout_params``: at most ``b_max`` new tokens, stop at ``think_end``). Then, for the
whole batch at once, :func:`summarize_groups`

1. plans the summary prompts of every thinking at every budget of the prior and samples
   ``n_summary`` summaries per budget with ONE ``generate`` call per engine
   (:func:`rlkit.anytime.sample_summaries`, requests sharded round-robin like every engine call);
2. scores the summaries with the reward manager, given the dataset columns of their thinking's
   row; a summary scores 1 iff the accuracy verifier (``math`` if configured, else the first)
   accepts it and it emits no further ``think_end`` (:func:`rlkit.anytime.summary_scores`);
3. turns the scores into per-budget rewards ``r̄`` and the ``brpo`` advantage's extras
   (:func:`rlkit.anytime.brpo_rows`).

The training batch holds the thinking groups first, then one group per summary prompt (its
``n_summary`` x budgets-served samples share that prompt), so :func:`rlkit.experience.make_batch`
packs rows in the order of ``brpo_rows``: thinking tokens train with ``A^cot`` of their budget
segment, summary tokens with ``A^sum``. A thinking group's rewards become ``J = sum_j p_j r̄_j``
(logged as ``reward/mean``); its per-verifier values stay those of the thinking text, so
``acc/mean`` is the accuracy of the thinking read as an answer, and the per-budget accuracy of
the summaries is ``anytime/acc@<budget>``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rlkit.algorithms.brpo import BRPOParams
from rlkit.anytime import SummarySample, brpo_rows, sample_summaries, summary_scores
from rlkit.experience import Group, score_groups
from rollout.engine import SamplingParams

__all__ = ["AnytimeStep", "check_config", "summarize_groups", "summary_groups"]


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
