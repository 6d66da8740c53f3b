"""Segment rollout (UloRL, docs/algorithms.md §5.1-5.2): decode at most ``seg_len`` tokens per step, carry the rest.

Long-tailed response lengths leave rollout hardware idle while the slowest sample of a batch
finishes. The :class:`SegmentScheduler` bounds every generation *round* to ``seg_len`` new tokens
per sample; samples that neither stopped nor reached ``global_max_len`` wait in the *unfinished
pool* and resume from their full prefix (``RolloutRequest.resume_ids``) in the next round, under
whatever policy version the engines then hold::

    each round:  rollout(unfinished pool ∪ new prompts, max_new_tokens <= seg_len)
      stop (EOS / stop string)          -> experience pool
      total length == global_max_len    -> experience pool, truncated (reward: truncated_reward)
      otherwise                         -> unfinished pool
    each step:   rounds until train_groups groups (x G samples) are ready, hand them out FIFO

Engine-agnostic: it drives any list of ``RolloutEngine``s (requests are sharded by row count and
the engines called in turn) or one ``generate(requests) -> completions`` callable (e.g. a Ray
fan-out). Every segment records the policy version the engine reported and its behaviour
log-probs, so both importance-sampling modes of §5.2 can be built (:func:`old_logprobs_BT`).
:meth:`SegmentScheduler.state_dict` is plain JSON, so the pools go into checkpoints: a restored
scheduler neither loses nor repeats a sample, and (with the same weights) samples the same tokens,
since every request seed derives from (seed, round, sample id).

Choices the paper leaves open [INFERRED, exposed as :class:`SegmentConfig` fields]:
- ``group_mode="complete"`` (default): a prompt group enters training only when all G samples
  have finished, so GRPO statistics see the whole group. ``"siblings"``: a finished sample trains
  at once; its group statistics use the siblings finished so far (``SegmentBatch.context`` holds
  the rewards of those already trained, recorded with :meth:`SegmentScheduler.record_rewards`).
- Top-up (``topup``): a step runs rounds until ``train_groups`` groups (``x G`` samples) are
  ready, so every update has the same size. ``"constant"`` (default, Algorithm 1's fixed batch
  of new prompts) adds ``train_groups`` new groups per round: arrivals match consumption, so in
  steady state a step takes one round and groups that finish beyond ``train_groups`` wait, FIFO,
  for the next step (a step finding enough ready groups runs no round at all). ``"deficit"``
  adds only ``train_groups - ready`` (siblings: ``ceil((train_groups*G - ready_samples) / G)``):
  less waiting, but the in-flight pool stays too small to fill a step in one round when groups
  need several segments (measured in ``bench/segments.py``). Both are capped by
  ``max_inflight_groups`` (default ``train_groups * max_segments``). A step needs at most
  ``max_segments`` rounds in complete mode (after the top-up, ready + in-flight groups cover
  ``train_groups`` and every sample in flight finishes within that many rounds), at most
  ``2 * max_segments + 1`` in siblings mode.
- Groups that became ready beyond ``train_groups`` wait (FIFO) for the next step.

This module imports nothing of ``rlkit`` but :mod:`rlkit.common` (engines are usable on their own).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from rlkit.common import hash_seed
from rollout.engine import Completion, RolloutEngine, RolloutRequest, SamplingParams
from rollout.segment_samples import (  # noqa: F401  (re-exported: the sample store, importance sampling)
    SegmentBatch,
    SegmentGroup,
    SegmentSample,
    apply_truncated_reward,
    learner_old_logprobs_mode,
    old_logprobs_BT,
    pad_lists_BT,
    to_completion,
    token_versions_BT,
)

GenerateFn = Callable[[list[RolloutRequest]], list[Completion]]
PromptSource = Callable[[int], list[tuple[list[int], Any]]]
STATE_FORMAT = 1


def _seed(*parts: Any) -> int:
    return hash_seed(*parts, algo="blake2b")


@dataclass(frozen=True)
class SegmentConfig:
    """Segment-rollout knobs (docs/algorithms.md §5.1; UloRL: 128K global, 8 segments x 16K).

    Attributes:
        seg_len: max new tokens a sample gets per round.
        global_max_len: max response length; reaching it finishes the sample as truncated.
        group_size: G, samples per prompt.
        train_groups: prompt groups per update (``train_batch_size``); ``train_groups * G``
            finished samples per step.
        group_mode: ``"complete"`` or ``"siblings"`` (see module docstring).
        truncated_reward: reward of a truncated sample (docs/algorithms.md §5.4: 0); ``None`` keeps the
            verifier's reward. Applied by :func:`apply_truncated_reward`.
        topup: ``"constant"`` or ``"deficit"`` new groups per round (see module docstring).
        max_inflight_groups: cap on unfinished groups; ``None`` = ``train_groups * max_segments``.
        max_rounds_per_step: stop a step after this many rounds even if fewer groups are ready
            (0 = until ready; always <= ``max_segments`` rounds then).
        seed: base of every request seed.
    """

    seg_len: int
    global_max_len: int
    group_size: int
    train_groups: int
    group_mode: Literal["complete", "siblings"] = "complete"
    truncated_reward: float | None = 0.0
    topup: Literal["constant", "deficit"] = "constant"
    max_inflight_groups: int | None = None
    max_rounds_per_step: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("seg_len", "global_max_len", "group_size", "train_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"SegmentConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.group_mode not in ("complete", "siblings"):
            raise ValueError(f"group_mode must be 'complete' or 'siblings', got {self.group_mode!r}")
        if self.topup not in ("constant", "deficit"):
            raise ValueError(f"topup must be 'constant' or 'deficit', got {self.topup!r}")
        if self.max_inflight_groups is not None and self.max_inflight_groups < self.train_groups:
            raise ValueError(f"max_inflight_groups ({self.max_inflight_groups}) must be >= train_groups "
                             f"({self.train_groups}), else a step may never fill")
        if self.max_rounds_per_step < 0:
            raise ValueError("max_rounds_per_step must be >= 0")

    @property
    def max_segments(self) -> int:
        """Rounds after which any sample is finished: ``ceil(global_max_len / seg_len)``."""
        return math.ceil(self.global_max_len / self.seg_len)

    @property
    def inflight_cap(self) -> int:
        return self.max_inflight_groups or self.train_groups * self.max_segments


def shard_generate(engines: Sequence[RolloutEngine]) -> GenerateFn:
    """``generate`` over several in-process engines (a :class:`rollout.pool.LocalEnginePool`)."""
    from rollout.pool import LocalEnginePool

    pool = LocalEnginePool(list(engines))
    return lambda requests: pool.generate(requests)[0]


class SegmentScheduler:
    """Segment rollout with an unfinished pool and an experience pool (docs/algorithms.md §5.1).

    Args:
        engines: a ``RolloutEngine``, a list of them (called in turn, rows balanced) or a
            ``generate(requests) -> completions`` callable (e.g. a Ray fan-out).
        sampling: sampling template; ``n``, ``max_new_tokens`` and ``seed`` are set per request.
        cfg: :class:`SegmentConfig`.
        prompt_source: ``k -> [(prompt_ids, payload)] * k`` new prompts (e.g. from a data cursor;
            keep its state in the same checkpoint as :meth:`state_dict`).

    Use: ``batch = sched.step()`` -> score ``batch.completions()`` -> train -> sync weights
    (engines report their ``policy_version``, which each new segment records).
    """

    def __init__(self, engines: Sequence[RolloutEngine] | GenerateFn, sampling: SamplingParams,
                 cfg: SegmentConfig, prompt_source: PromptSource) -> None:
        if hasattr(engines, "generate"):  # a single engine
            engines = [engines]  # type: ignore[list-item]
        if callable(engines):
            self._generate: GenerateFn = engines
        elif isinstance(engines, Sequence) and all(hasattr(e, "generate") for e in engines):
            self._generate = shard_generate(list(engines))
        else:
            raise TypeError("engines must be a RolloutEngine, a list of them or a generate(requests) callable, "
                            f"got {type(engines).__name__}")
        self.sampling = sampling
        self.cfg = cfg
        self.prompt_source = prompt_source
        self.groups: dict[int, SegmentGroup] = {}  # every group with a sample not yet handed out
        self._ready: list[int] = []  # FIFO: group uids (complete mode) or sample uids (siblings)
        self.round = 0
        self.steps = 0
        self._next_uid = 0
        self._next_gid = 0
        self.totals: Counter[str] = Counter()

    # ------------------------------------------------------------------ pools
    def unfinished_samples(self) -> list[SegmentSample]:
        """The unfinished pool, in uid order."""
        return [s for g in self.groups.values() for s in g.samples if not s.finished]

    def experience_samples(self) -> list[SegmentSample]:
        """Finished samples not yet handed to training."""
        return [s for g in self.groups.values() for s in g.samples if s.finished and not s.handed_out]

    def ready_queue(self) -> list[int]:
        """FIFO of ready group uids (complete mode) or sample uids (siblings mode)."""
        return list(self._ready)

    def _inflight_groups(self) -> int:
        return sum(1 for g in self.groups.values() if not g.complete)

    def _ready_units(self) -> int:
        """Ready groups (complete mode) or ready samples (siblings mode)."""
        return len(self._ready)

    def _target(self) -> int:
        G = self.cfg.group_size
        return self.cfg.train_groups * (G if self.cfg.group_mode == "siblings" else 1)

    # ------------------------------------------------------------------ one round
    def _new_groups_wanted(self) -> int:
        if self.cfg.topup == "constant":
            want = self.cfg.train_groups
        else:
            want = self._target() - self._ready_units()
            if self.cfg.group_mode == "siblings":
                want = math.ceil(want / self.cfg.group_size)
        return max(0, min(want, self.cfg.inflight_cap - self._inflight_groups()))

    def run_round(self) -> dict[str, float]:
        """One generate call: resume every unfinished sample + top up new groups."""
        cfg = self.cfg
        self.round += 1
        resumed = self.unfinished_samples()
        k = self._new_groups_wanted()
        new_groups = []
        for prompt_ids, payload in (self.prompt_source(k) if k else []):
            if not prompt_ids:
                raise ValueError("prompt_source returned an empty prompt")
            gid, self._next_gid = self._next_gid, self._next_gid + 1
            samples = [SegmentSample(self._next_uid + j, gid, j) for j in range(cfg.group_size)]
            self._next_uid += cfg.group_size
            new_groups.append(SegmentGroup(gid, list(prompt_ids), payload, samples, self.round))
        if not resumed and not new_groups:
            raise RuntimeError("segment round with nothing to generate: prompt_source returned no "
                               "prompt and the unfinished pool is empty")
        for g in new_groups:
            self.groups[g.group_uid] = g
        reqs: list[RolloutRequest] = []
        targets: list[list[SegmentSample]] = []
        for s in resumed:
            g = self.groups[s.group_uid]
            params = replace(self.sampling, n=1, seed=_seed(cfg.seed, self.round, "s", s.uid),
                             max_new_tokens=min(cfg.seg_len, cfg.global_max_len - len(s.token_ids)))
            reqs.append(RolloutRequest(g.prompt_ids, params, group_id=g.group_uid,
                                       resume_ids=list(s.token_ids), meta={"segment_uid": s.uid}))
            targets.append([s])
        for g in new_groups:
            params = replace(self.sampling, n=cfg.group_size, seed=_seed(cfg.seed, self.round, "g", g.group_uid),
                             max_new_tokens=min(cfg.seg_len, cfg.global_max_len))
            reqs.append(RolloutRequest(g.prompt_ids, params, group_id=g.group_uid,
                                       meta={"segment_uid": g.samples[0].uid}))
            targets.append(g.samples)
        t0 = time.perf_counter()
        comps = self._generate(reqs)
        gen_s = time.perf_counter() - t0
        rows = [s for ss in targets for s in ss]
        if len(comps) != len(rows):
            raise RuntimeError(f"engines returned {len(comps)} completions for {len(rows)} rows")
        finished = truncated = 0
        for s, c in zip(rows, comps):
            s.append(c, self.round, cfg.global_max_len)
            if s.finished:
                finished += 1
                truncated += s.truncated
                if cfg.group_mode == "siblings":
                    self._ready.append(s.uid)
        if cfg.group_mode == "complete":
            touched = dict.fromkeys(s.group_uid for s in rows if s.finished_round == self.round)
            self._ready += [gid for gid in touched if self.groups[gid].complete]
        n_tok = sum(len(c.token_ids) for c in comps)
        self.totals.update(rounds=1, new_groups=len(new_groups), finished=finished, truncated=truncated,
                           tokens=n_tok)
        return {"rounds": 1.0, "new_groups": float(len(new_groups)), "resumed_samples": float(len(resumed)),
                "finished_samples": float(finished), "truncated_samples": float(truncated),
                "tokens_generated": float(n_tok), "gen_time_s": gen_s,
                "resume_prefix_tokens": float(sum(len(s.token_ids) - len(c.token_ids)
                                                  for s, c in zip(rows, comps)))}

    # ------------------------------------------------------------------ one step
    def step(self) -> SegmentBatch:
        """Rounds until ``train_groups`` groups (x G samples) are ready; hand them out FIFO.

        With ``max_rounds_per_step`` set, the batch may be smaller (whatever was ready).
        """
        cfg = self.cfg
        acc: Counter[str] = Counter()
        while self._ready_units() < self._target():
            if cfg.max_rounds_per_step and acc["rounds"] >= cfg.max_rounds_per_step:
                break
            # every group in flight is finished after max_segments rounds and the top-up then
            # covers the rest, so a step needs at most 2 * max_segments + 1 rounds
            if acc["rounds"] > 2 * cfg.max_segments + 1:
                raise RuntimeError("segment step did not fill after 2 * max_segments + 1 rounds")
            acc.update(self.run_round())
        self.steps += 1
        take, self._ready = self._ready[: self._target()], self._ready[self._target():]
        if cfg.group_mode == "complete":
            groups = [self.groups.pop(gid) for gid in take]
            samples = [s for g in groups for s in g.samples]
            context: list[tuple[int, float]] = []
        else:
            by_uid = {s.uid: s for g in self.groups.values() for s in g.samples}
            samples = sorted((by_uid[u] for u in take), key=lambda s: (s.group_uid, s.sample_index))
            gids = list(dict.fromkeys(s.group_uid for s in samples))
            groups = [self.groups[gid] for gid in gids]
            context = [(s.group_uid, s.reward) for g in groups for s in g.samples
                       if s.handed_out and s.reward is not None]
        for s in samples:
            s.handed_out = True
        if cfg.group_mode == "siblings":
            for g in groups:
                if all(s.handed_out for s in g.samples):
                    del self.groups[g.group_uid]
        self.totals.update(handed_out=len(samples))
        metrics = {f"segments/{k}": float(v) for k, v in acc.items()}
        metrics.update(self._pool_metrics(samples))
        return SegmentBatch(samples, groups, context, metrics)

    def record_rewards(self, samples: Sequence[SegmentSample], rewards: Sequence[float]) -> None:
        """Siblings mode: remember trained samples' rewards for their later siblings' statistics."""
        if len(samples) != len(rewards):
            raise ValueError(f"{len(samples)} samples but {len(rewards)} rewards")
        for s, r in zip(samples, rewards):
            s.reward = float(r)
            g = self.groups.get(s.group_uid)
            if g is not None:  # the group is still in flight: update the stored copy
                g.samples[s.sample_index].reward = float(r)

    def _pool_metrics(self, trained: list[SegmentSample]) -> dict[str, float]:
        unfinished = self.unfinished_samples()
        m = {
            "segments/unfinished_pool": float(len(unfinished)),
            "segments/unfinished_groups": float(self._inflight_groups()),
            "segments/experience_pool": float(len(self.experience_samples())),
            "segments/ready_waiting": float(self._ready_units()),
            "segments/trained_samples": float(len(trained)),
        }
        if trained:
            counts = [s.num_segments for s in trained]
            versions = [len(set(s.seg_versions)) for s in trained]
            lags = [s.seg_versions[-1] - s.seg_versions[0] for s in trained]
            m.update({
                "segments/seg_count_mean": sum(counts) / len(counts),
                "segments/seg_count_max": float(max(counts)),
                "segments/versions_per_sample_mean": sum(versions) / len(versions),
                "segments/version_lag_mean": sum(lags) / len(lags),
                "segments/version_lag_max": float(max(lags)),
                "segments/truncated_frac": sum(s.truncated for s in trained) / len(trained),
            })
            hist = Counter(counts)
            for k in range(1, self.cfg.max_segments + 1):
                m[f"segments/seg_count_frac_{k}"] = hist.get(k, 0) / len(trained)
        return m

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Plain-JSON state: both pools, FIFO order, counters (payloads must be JSON-able)."""
        return {"format": STATE_FORMAT, "round": self.round, "steps": self.steps, "next_uid": self._next_uid,
                "next_gid": self._next_gid, "ready": list(self._ready), "totals": dict(self.totals),
                "groups": [g.to_dict() for g in self.groups.values()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown segment scheduler state format {state.get('format')!r}")
        self.round, self.steps = int(state["round"]), int(state["steps"])
        self._next_uid, self._next_gid = int(state["next_uid"]), int(state["next_gid"])
        self._ready = [int(x) for x in state["ready"]]
        self.totals = Counter({k: int(v) for k, v in state["totals"].items()})
        self.groups = {}
        for d in state["groups"]:
            g = SegmentGroup.from_dict(d)
            self.groups[g.group_uid] = g



__all__ = [
    "SegmentBatch",
    "SegmentConfig",
    "SegmentGroup",
    "SegmentSample",
    "SegmentScheduler",
    "apply_truncated_reward",
    "learner_old_logprobs_mode",
    "old_logprobs_BT",
    "pad_lists_BT",
    "shard_generate",
    "to_completion",
    "token_versions_BT",
]
