"""Turning rollouts into training experience: rewards, DAPO dynamic sampling, batches, advantages.

Everything here is driver-side glue between the engines (:mod:`rollout`), the verifiers
(:mod:`rewards`) and the pure algorithms (:mod:`rlkit.algorithms`). No method names are
special-cased: the advantage estimator comes from the registry by name.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from rlkit.algorithms import (
    ADVANTAGES,
    AdvantageInputs,
    AdvantageOutput,
    dynamic_sampling_keep_B,
    overlong_filter_mask,
)
from rlkit.common import stable_seed
from rlkit.loop.batch import TrainBatch, build_batch
from rlkit.schema import Config
from rollout.engine import Completion, RolloutRequest, SamplingParams


def step_seed(seed: int, *parts: int) -> int:
    """A stable 31-bit seed for (run seed, step, round...): resumed runs sample the same tokens."""
    return stable_seed(seed, *parts)


@dataclass
class Group:
    """The G completions of one prompt with their rewards."""

    row: dict[str, Any]
    prompt_ids: list[int]
    completions: list[Completion]
    rewards: list[float] = field(default_factory=list)
    per_verifier: dict[str, list[float]] = field(default_factory=dict)
    problem_id: Any = None  # stable key of the training row (history-based length rewards)
    budget: Any = None  # rewards.budget_prompt.BudgetAssignment written into the prompt, if any
    # rewards of siblings trained in earlier steps (segment rollout, group_mode=siblings): they enter
    # the group statistics of the advantage estimator, not the loss
    context_rewards: list[float] = field(default_factory=list)


def sampling_params(cfg: Config, *, n: int, seed: int, greedy: bool = False, max_new_tokens: int | None = None):
    e = cfg.engine
    return SamplingParams(
        max_new_tokens=max_new_tokens or e.max_new_tokens,
        temperature=0.0 if greedy else e.temperature,
        top_p=e.top_p,
        top_k=e.top_k,
        n=n,
        stop=tuple(e.stop),
        return_entropy=cfg.tracking.inspect_groups > 0 and not greedy,
        seed=seed,
    )


def score_groups(groups: list[Group], manager, answer_columns: list[str] | None = None) -> dict[str, float]:
    """Run the verifiers on every completion; fills ``group.rewards``. Returns reward metrics."""
    texts, columns = [], {}
    keys = sorted({k for g in groups for k in g.row if k != "prompt"})
    for g in groups:
        for c in g.completions:
            texts.append(c.text)
            columns.setdefault("prompts", []).append(g.row.get("prompt"))  # TRL's name for the prompt
            for k in keys:
                columns.setdefault(k, []).append(g.row.get(k))
    totals, metrics, per_verifier = manager.score(texts, columns)
    i = 0
    for g in groups:
        n = len(g.completions)
        g.rewards = [float(x) for x in totals[i : i + n]]
        g.per_verifier = {name: vals[i : i + n] for name, vals in per_verifier.items()}
        i += n
    return metrics


def overlong_shaping(groups: list[Group], cfg: Config) -> None:
    """DAPO soft overlong punishment (docs/algorithms.md §6e) added to each reward, L_max = max_new_tokens."""
    from rewards.length import dapo_overlong_penalty

    o = cfg.algorithm.overlong_shaping
    for g in groups:
        for j, c in enumerate(g.completions):
            g.rewards[j] += dapo_overlong_penalty(
                len(c.token_ids), max_len=cfg.engine.max_new_tokens, buffer_len=o.buffer_len,
                penalty_factor=o.penalty_factor,
            )


def keep_informative(groups: list[Group], acc_key: str | None = None, on: str = "accuracy") -> list[Group]:
    """DAPO dynamic sampling: keep groups whose scores are not all equal (docs/algorithms.md §7.1).

    ``on="accuracy"`` (DAPO's filter): the score is correctness, the ``acc_key`` verifier's value
    ``>= 1``, so a group in which every sample is wrong (or every one right) is dropped even when a
    length shaper or a format bonus makes its rewards differ: its advantages would train on length
    or format alone. ``on="reward"``: the final shaped reward (the looser filter). Groups without
    the ``acc_key`` verifier fall back to the reward.
    """
    if not groups:
        return []
    correct = correct_flags(groups, acc_key) if on == "accuracy" else None
    scores = [r for g in groups for r in g.rewards] if correct is None else [float(c) for c in correct]
    rewards = torch.tensor(scores, dtype=torch.float64)
    gids = torch.tensor([i for i, g in enumerate(groups) for _ in g.rewards])
    keep = dynamic_sampling_keep_B(rewards, gids)
    return [g for i, g in enumerate(groups) if bool(keep[gids == i].all())]


def correct_flags(groups: list[Group], acc_key: str | None) -> list[bool] | None:
    """Per sample, did the ``acc_key`` verifier score it correct (``>= 1``); None unless every
    group was scored by that verifier."""
    if not acc_key or not groups or not all(acc_key in g.per_verifier for g in groups):
        return None
    return [v >= 1.0 for g in groups for v in g.per_verifier[acc_key]]


def apply_length_shaping(groups: list[Group], cfg: Config, shaping, step: int, acc_key: str | None) -> dict[str, float]:
    """Add the configured length-aware reward terms (``reward.length_shapers``) to every reward."""
    from rewards.length import LengthContext

    comps = [(g, gi, c) for gi, g in enumerate(groups) for c in g.completions]
    if not comps:
        return {}
    acc = [v for g in groups for v in g.per_verifier.get(acc_key, [0.0] * len(g.completions))]
    budgets = [g.budget for g, _, _ in comps]
    ctx = LengthContext(
        rewards=[r for g in groups for r in g.rewards],
        correct=[v is not None and v >= 1.0 for v in acc],
        lengths=[len(c.token_ids) for _, _, c in comps],
        max_len=cfg.engine.max_new_tokens,
        group_ids=[gi for _, gi, _ in comps],
        problem_ids=[g.problem_id for g, _, _ in comps],
        step=step,
        budgets=[b.budget if b is not None else None for b in budgets],
        budget_kinds=[b.kind if b is not None else "exact" for b in budgets],
    )
    rewards, metrics = shaping(ctx)
    i = 0
    for g in groups:
        g.rewards = [float(x) for x in rewards[i : i + len(g.completions)]]
        i += len(g.completions)
    return {f"length/{k}" if "/" not in k else k: float(v) for k, v in metrics.items()}


def make_batch(
    groups: list[Group], cfg: Config, pad_id: int, extras: dict[str, Any] | None = None, acc_key: str | None = None
) -> tuple[TrainBatch, torch.Tensor, dict[str, Any]]:
    """Pack groups into a TrainBatch with advantages (and ``correct_B`` from the ``acc_key``
    verifier, when every group has it: loss masks such as DMMPT act on correct samples).

    ``extras`` (e.g. SPAE probe values) reach the advantage estimator; returns
    ``(batch, rewards_B, extras)``: ``extras`` plus the estimator's ``metrics`` and ``token_maps``
    (from its :class:`~rlkit.algorithms.AdvantageOutput`; the inputs are never modified).
    """
    prompts, responses, lps, gids, rewards, trunc = [], [], [], [], [], []
    for gi, g in enumerate(groups):
        for c, r in zip(g.completions, g.rewards):
            prompts.append(g.prompt_ids)
            responses.append(c.token_ids)
            lps.append(c.logprobs)
            gids.append(gi)
            rewards.append(r)
            trunc.append(c.truncated)
    batch = build_batch(prompts, responses, pad_id=pad_id, rollout_logprobs=lps,
                        temperature=cfg.engine.temperature or 1.0)
    rewards_B = torch.tensor(rewards, dtype=torch.float32)
    correct = correct_flags(groups, acc_key)
    if correct is not None:
        batch.correct_B = torch.tensor(correct)
    if cfg.algorithm.overlong_filter:
        batch.response_mask_BT = overlong_filter_mask(batch.response_mask_BT, torch.tensor(trunc))
    a = cfg.algorithm
    entry = ADVANTAGES.get(a.advantage)
    inputs = AdvantageInputs(
        rewards_B=rewards_B,
        group_ids_B=torch.tensor(gids, dtype=torch.long),
        response_mask_BT=batch.response_mask_BT,
        response_ids_BT=batch.response_ids_BT,
        extras=dict(extras or {}),
    )
    ctx = [(gi, float(r)) for gi, g in enumerate(groups) for r in g.context_rewards]
    if ctx:
        inputs = _with_context_rows(inputs, ctx)
    out = AdvantageOutput.of(entry.fn(inputs, ADVANTAGES.build_params(a.advantage, a.advantage_params)))
    B = len(rewards)
    batch.advantages_BT = out.advantages_BT.float()[:B]  # context rows (if any) were appended after B
    extras = dict(inputs.extras)
    extras["metrics"] = {**extras.get("metrics", {}), **out.metrics}
    extras["token_maps"] = {**extras.get("token_maps", {}), **{k: t[:B] for k, t in out.token_maps.items()}}
    return batch, rewards_B, extras


def _with_context_rows(inp: AdvantageInputs, ctx: list[tuple[int, float]]) -> AdvantageInputs:
    """Append rows (all-masked, no tokens) carrying ``(group index, reward)`` of already-trained siblings,
    so group statistics see them; the caller keeps only the first B rows of the advantages."""
    if any(k not in ("metrics", "token_maps") for k in inp.extras):
        raise ValueError("sibling context rewards (segments.group_mode=siblings) do not combine with estimator "
                         f"extras {sorted(inp.extras)}; use segments.group_mode=complete")
    C, T = len(ctx), inp.response_mask_BT.shape[1]
    return AdvantageInputs(
        rewards_B=torch.cat([inp.rewards_B, torch.tensor([r for _, r in ctx], dtype=inp.rewards_B.dtype)]),
        group_ids_B=torch.cat([inp.group_ids_B, torch.tensor([g for g, _ in ctx], dtype=torch.long)]),
        response_mask_BT=torch.cat([inp.response_mask_BT, inp.response_mask_BT.new_zeros((C, T))]),
        response_ids_BT=torch.cat([inp.response_ids_BT, inp.response_ids_BT.new_zeros((C, T))]),
        extras=inp.extras,
    )


def rollout_metrics(groups: list[Group], acc_key: str | None) -> dict[str, float]:
    comps = [c for g in groups for c in g.completions]
    rewards = [r for g in groups for r in g.rewards]
    lens = [len(c.token_ids) for c in comps]
    m = {
        "reward/mean": statistics.fmean(rewards) if rewards else 0.0,
        "reward/std": statistics.pstdev(rewards) if len(rewards) > 1 else 0.0,
        "response/len_mean": statistics.fmean(lens) if lens else 0.0,
        "response/len_max": float(max(lens, default=0)),
        "response/clip_rate": statistics.fmean([c.truncated for c in comps]) if comps else 0.0,
    }
    if acc_key:
        accs = [v for g in groups for v in g.per_verifier.get(acc_key, [])]
        if accs:
            m["acc/mean"] = statistics.fmean(1.0 if v >= 1.0 else 0.0 for v in accs)
    return m


def collect(step: int, cfg: Config, engines, cursor, rows, encode, manager, tracker_print=None, *,
            shaping=None, acc_key: str | None = None, request_meta: dict[str, Any] | None = None,
            params_fn: Callable[[SamplingParams], SamplingParams] | None = None):
    """Generate and score until the step has ``prompts_per_step`` groups (DAPO refill if enabled).

    Returns (kept groups, all generated groups, metrics). ``encode(row, budget) -> prompt token
    ids``; budgets (``data.budget``) are a pure function of (seed, step, row index). ``shaping``
    adds length-aware reward terms; ``request_meta`` goes into every request (logits processors);
    ``params_fn`` adapts the sampling params (BRPO's thinking: stop at ``</think>``, ``b_max`` tokens).
    """
    budget_p = None
    if cfg.data.budget is not None:
        from rewards.budget_prompt import budget_params

        budget_p = budget_params(cfg.data.budget)
    t = cfg.train
    ds = cfg.algorithm.dynamic_sampling
    kept: list[Group] = []
    m: dict[str, float] = {"time/gen_s": 0.0, "time/reward_s": 0.0}
    all_groups: list[Group] = []
    rounds = 0
    reward_metrics: dict[str, float] = {}
    while True:
        rounds += 1
        idx = cursor.next_indices(t.prompts_per_step)
        batch_rows = [rows[i] for i in idx]
        budgets = [None] * len(idx)
        if budget_p is not None:
            from rewards.budget_prompt import sample_budgets

            budgets = sample_budgets(budget_p, seed=cfg.seed, step=step, prompt_keys=idx)
        params = sampling_params(cfg, n=t.samples_per_prompt, seed=step_seed(cfg.seed, step, rounds))
        if params_fn is not None:
            params = params_fn(params)
        reqs = [RolloutRequest(prompt_ids=encode(r, b), params=params, group_id=k,
                               budget=None if b is None else b.budget, meta=dict(request_meta or {}))
                for k, (r, b) in enumerate(zip(batch_rows, budgets))]
        comps, gen_s = engines.generate(reqs)
        m["time/gen_s"] += gen_s
        groups = [
            Group(row=r, prompt_ids=q.prompt_ids,
                  completions=comps[k * t.samples_per_prompt : (k + 1) * t.samples_per_prompt],
                  problem_id=r.get("id", i), budget=b)
            for k, (r, q, i, b) in enumerate(zip(batch_rows, reqs, idx, budgets))
        ]
        reward_metrics = score_round(groups, cfg, manager, m, reward_metrics, shaping=shaping, step=step,
                                     acc_key=acc_key)
        all_groups += groups
        if not ds.enabled:
            kept = groups
            break
        kept += keep_informative(groups, acc_key, ds.on)
        if len(kept) >= t.prompts_per_step:
            break
        if ds.max_gen_batches and rounds >= ds.max_gen_batches:
            if tracker_print:
                tracker_print(f"step {step}: dynamic sampling kept {len(kept)}/{t.prompts_per_step} groups "
                              f"after {rounds} rounds; training on what was kept")
            break
    kept = kept[: t.prompts_per_step]
    m.update(reward_metrics)
    m["rollout/gen_rounds"] = float(rounds)
    m["rollout/kept_groups"] = float(len(kept))
    return kept, all_groups, m


def shape_rewards(groups: list[Group], cfg: Config, shaping, step: int, acc_key: str | None) -> dict[str, float]:
    """Add DAPO's overlong punishment (``algorithm.overlong_shaping``) and the length shapers to
    every reward of scored groups; returns the length metrics."""
    if cfg.algorithm.overlong_shaping.enabled:
        overlong_shaping(groups, cfg)
    return apply_length_shaping(groups, cfg, shaping, step, acc_key) if shaping else {}


def score_round(groups: list[Group], cfg: Config, manager, m: dict[str, float], reward_metrics: dict[str, float], *,
                shaping=None, step: int, acc_key: str | None) -> dict[str, float]:
    """Score and shape one round of groups (collectors that take groups round by round): length
    metrics go into ``m`` and the seconds into ``m["time/reward_s"]``; returns ``reward_metrics``
    merged with this round's (:func:`_merge_counts`)."""
    t0 = time.perf_counter()
    reward_metrics = _merge_counts(reward_metrics, score_groups(groups, manager))
    m.update(shape_rewards(groups, cfg, shaping, step, acc_key))
    m["time/reward_s"] += time.perf_counter() - t0
    return reward_metrics


def _merge_counts(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Merge reward metrics across refill rounds: counters add up, other values take the latest."""
    out = dict(a)
    for k, v in b.items():
        counter = k.endswith(("failures", "timeouts", "none"))
        out[k] = out.get(k, 0.0) + v if counter else v
    return out
