"""Segment rollout in the trainer (UloRL, docs/algorithms.md §5.1-5.2): scheduler -> scored groups for ``make_batch``.

:class:`SegmentRollout` owns a :class:`rollout.segments.SegmentScheduler` fed by the trainer's data
cursor and engines. Each step it returns the same ``(kept groups, all groups, metrics)`` triple as
:func:`rlkit.loop.experience.collect`, so the rest of the step (advantages, update, sync) is unchanged:

    sched.step()               rounds of <= seg_len new tokens until prompts_per_step groups finished
    score_groups               the verifiers see the whole response (decoded from all segments)
    apply_truncated_reward     samples cut at engine.max_new_tokens get segments.truncated_reward
    overlong / length shaping  as in experience.collect (L_max = engine.max_new_tokens)
    keep_informative           DAPO filter when algorithm.dynamic_sampling is on (no refill round:
                               the scheduler, not a resampling loop, decides what a step trains on)

Importance sampling needs no code here: ``make_batch`` fills ``rollout_logprobs_BT`` with the
concatenated per-segment behaviour log-probs (SAIS with ``algorithm.old_logprobs=rollout``) and
the learner recomputes whole sequences under the pre-update policy for POIS (``auto|recompute``).

Durability: the scheduler state (both pools, FIFO, counters) goes into the checkpoint next to the
data cursor, and ``RUN_DIR/segments.jsonl`` records, per step, which samples were handed to
training (truncated on resume like the metrics), so a kill -9 + resume can be checked to lose and
repeat nothing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlkit.infra.tracking import append_record, read_metrics
from rlkit.loop import experience as X
from rlkit.methods.base import Stage, register_stage
from rlkit.schema import Config
from rollout.segments import (
    SegmentBatch,
    SegmentConfig,
    SegmentSample,
    SegmentScheduler,
    apply_truncated_reward,
    to_completion,
)

LOG_FILE = "segments.jsonl"
# round metrics of the scheduler; a step that finds enough ready groups runs no round -> zeros
_ROUND_KEYS = ("rounds", "new_groups", "resumed_samples", "finished_samples", "truncated_samples",
               "tokens_generated", "gen_time_s", "resume_prefix_tokens")


def segment_config(cfg: Config) -> SegmentConfig:
    """The scheduler's :class:`SegmentConfig` from ``cfg.segments`` + ``engine`` + ``train``."""
    s = cfg.segments
    return SegmentConfig(
        seg_len=s.resolved_seg_len(cfg.engine.max_new_tokens), global_max_len=cfg.engine.max_new_tokens,
        group_size=cfg.train.samples_per_prompt, train_groups=cfg.train.prompts_per_step,
        group_mode=s.group_mode, truncated_reward=s.truncated_reward, topup=s.topup,
        max_inflight_groups=s.max_inflight_groups, max_rounds_per_step=s.max_rounds_per_step, seed=cfg.seed,
    )


def token_digest(token_ids: list[int]) -> str:
    """Short stable hash of a token sequence (for the durability log)."""
    return hashlib.blake2b(json.dumps(token_ids).encode(), digest_size=8).hexdigest()


class SegmentRollout:
    """The trainer's segment-rollout stage.

    Args:
        cfg: the run config (``segments.enabled``).
        generate: ``requests -> completions`` over the engines (e.g. an engine pool's ``generate``).
        cursor: the data cursor (``next_indices(k)``, checkpointed by the trainer).
        rows: training rows; a group's payload is its row index.
        encode: ``row -> prompt token ids``.
        decode: ``token ids -> text`` (the whole response, for the verifiers).
        run_dir: where ``segments.jsonl`` is written; ``None`` = no log.
    """

    def __init__(self, cfg: Config, generate: Callable[[list], list], cursor, rows: list[dict[str, Any]],
                 encode: Callable[[dict], list[int]], decode: Callable[[list[int]], str],
                 run_dir: str | Path | None = None) -> None:
        self.cfg, self.rows, self.decode = cfg, rows, decode
        self.sched = SegmentScheduler(
            generate, X.sampling_params(cfg, n=1, seed=0), segment_config(cfg),
            lambda k: [(encode(rows[i]), int(i)) for i in cursor.next_indices(k)],
        )
        self.log_path = Path(run_dir) / LOG_FILE if run_dir is not None else None

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """A copy of the scheduler state: its sample lists would otherwise alias the live pools."""
        return copy.deepcopy(self.sched.state_dict())

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore both pools; ``None`` (a checkpoint from a run without segments) keeps them empty."""
        if state is not None:
            self.sched.load_state_dict(copy.deepcopy(state))

    def open_log(self, start_step: int) -> None:
        """Drop log lines of steps after the restored checkpoint (``step > start_step``)."""
        if self.log_path is not None:
            from rlkit.infra.tracking import truncate_metrics

            truncate_metrics(self.log_path, start_step + 1)

    # ------------------------------------------------------------------ one step
    def collect(self, step: int, manager, *, shaping=None, acc_key: str | None = None
                ) -> tuple[list[X.Group], list[X.Group], dict[str, float]]:
        """One segment step -> ``(groups to train on, all handed-out groups, metrics)``."""
        cfg = self.cfg
        batch = self.sched.step()
        groups = self._groups(batch)
        m: dict[str, float] = {f"segments/{k}": 0.0 for k in _ROUND_KEYS}
        m.update(batch.metrics)
        m["time/gen_s"] = m["segments/gen_time_s"]
        m["rollout/gen_rounds"] = m["segments/rounds"]
        m["rollout/tokens_generated"] = m["segments/tokens_generated"]
        t0 = time.perf_counter()
        m.update(X.score_groups(groups, manager))
        for g, samples in zip(groups, self._samples_by_group(batch)):
            g.rewards = apply_truncated_reward(g.rewards, samples, cfg.segments.truncated_reward)
        m.update(X.shape_rewards(groups, cfg, shaping, step, acc_key))
        m["time/reward_s"] = time.perf_counter() - t0
        if cfg.segments.group_mode == "siblings":
            self.sched.record_rewards(batch.samples, [r for g in groups for r in g.rewards])
        ds = cfg.algorithm.dynamic_sampling
        kept = X.keep_informative(groups, acc_key, ds.on) if ds.enabled else groups
        m["rollout/kept_groups"] = float(len(kept))
        self._log(step, batch, groups, kept)
        return kept, groups, m

    def _samples_by_group(self, batch: SegmentBatch) -> list[list[SegmentSample]]:
        """``batch.samples`` split into runs of one group (samples are ordered group by group)."""
        out: list[list[SegmentSample]] = []
        for s in batch.samples:
            if out and out[-1][0].group_uid == s.group_uid:
                out[-1].append(s)
            else:
                out.append([s])
        return out

    def _groups(self, batch: SegmentBatch) -> list[X.Group]:
        by_gid = {g.group_uid: g for g in batch.groups}
        context: dict[int, list[float]] = {}
        for gid, r in batch.context:
            context.setdefault(gid, []).append(float(r))
        out = []
        for samples in self._samples_by_group(batch):
            sg = by_gid[samples[0].group_uid]
            row = self.rows[sg.payload]
            comps = [to_completion(s, sg.prompt_ids, self._text) for s in samples]
            out.append(X.Group(row=row, prompt_ids=list(sg.prompt_ids), completions=comps,
                               problem_id=row.get("id", sg.payload),
                               context_rewards=context.get(sg.group_uid, [])))
        return out

    def _text(self, token_ids: list[int]) -> str:
        return response_text(self.decode(token_ids), self.cfg.engine.stop)

    def _log(self, step: int, batch: SegmentBatch, groups: list[X.Group], kept: list[X.Group]) -> None:
        """Append this step's handed-out samples to ``segments.jsonl`` (flushed + fsynced)."""
        if self.log_path is None:
            return
        trained = {c.meta["segment_uid"] for g in kept for c in g.completions}
        row_of = {g.group_uid: g.payload for g in batch.groups}
        rec = {"step": step, "samples": [
            {"uid": s.uid, "group": s.group_uid, "index": s.sample_index, "row": row_of[s.group_uid],
             "tokens": len(s.token_ids), "digest": token_digest(s.token_ids), "versions": s.seg_versions,
             "status": s.status, "trained": s.uid in trained}
            for s in batch.samples
        ]}
        append_record(self.log_path, rec)


def response_text(text: str, stop: Any) -> str:
    """A response decoded from several pieces as the verifiers see it: cut after the first stop
    string, as the engine does for a one-piece response (a stop string spanning two pieces is not
    detected by the engine, so the sample simply goes on)."""
    cuts = [text.find(s) + len(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text


def read_segment_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """Records of ``RUN_DIR/segments.jsonl`` (one per step)."""
    return read_metrics(Path(run_dir) / LOG_FILE)


@register_stage("segments", order=10)
class SegmentsStage(Stage):
    """UloRL segment rollout (``segments.enabled``): replaces the collector; its pools are
    checkpointed with the stage."""

    collects = True

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        return bool(cfg.segments.enabled)

    @classmethod
    def check(cls, cfg: Any) -> None:
        if not cls.enabled(cfg):
            return
        c = cfg
        s, a = c.segments, c.algorithm
        seg_len, max_len = s.resolved_seg_len(c.engine.max_new_tokens), c.engine.max_new_tokens
        if seg_len > max_len:
            raise ValueError(f"segments.seg_len={seg_len} must be <= engine.max_new_tokens={max_len} "
                             "(the global max response length)")
        if s.importance == "sais" and a.old_logprobs != "rollout":
            raise ValueError("segments.importance=sais divides by each segment's behaviour log-probs: "
                             f"set algorithm.old_logprobs=rollout (got {a.old_logprobs!r})")
        if s.importance == "pois" and a.old_logprobs == "rollout":
            raise ValueError("segments.importance=pois recomputes old log-probs with the current policy: "
                             "set algorithm.old_logprobs=auto or recompute (got 'rollout')")
        if s.max_inflight_groups is not None and s.max_inflight_groups < c.train.prompts_per_step:
            raise ValueError(f"segments.max_inflight_groups={s.max_inflight_groups} must be >= "
                             f"train.prompts_per_step={c.train.prompts_per_step}, else a step may never fill")
        if s.group_mode == "siblings" and a.dynamic_sampling.enabled:
            raise ValueError("segments.group_mode=siblings does not combine with algorithm.dynamic_sampling "
                             "(a partial group's reward variance is unknown); use group_mode=complete")
        if c.data.budget is not None or c.engine.adaptive_temperature.enabled:
            raise ValueError("segments.enabled does not support data.budget or engine.adaptive_temperature yet "
                             "(segment requests carry no per-request budget or logits processors)")

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.rollout = SegmentRollout(
            ctx.cfg, lambda reqs: ctx.engines.generate(reqs)[0], ctx.cursor, ctx.rows, ctx.encode,
            lambda ids: ctx.tokenizer.decode(ids, skip_special_tokens=True), ctx.run_dir,
        )

    def start(self, start_step: int) -> None:
        self.rollout.open_log(start_step)

    def collect(self, step: int, shaping: Any):
        return self.rollout.collect(step, self.ctx.manager, shaping=shaping, acc_key=self.ctx.acc_key)

    def state_dict(self) -> dict[str, Any]:
        return self.rollout.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.rollout.load_state_dict(state)


__all__ = ["LOG_FILE", "SegmentRollout", "SegmentsStage", "read_segment_log", "response_text", "segment_config", "token_digest"]
