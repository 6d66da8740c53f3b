"""Asynchronous rollout (``train.async``): the engines generate while the learner trains.

One collector stage serves both overlapped modes; a background thread of the driver (the
*producer*) keeps the engines busy, the trainer's step (the *consumer*) takes finished groups::

    producer  while allowed: rounds of prompts_per_step prompts -> engine pool -> sample store
    consumer  collect(t):   wait for enough complete groups, drop (and regenerate) stale ones,
                            score, shape, DAPO-filter -> the step's groups
    trainer   update -> weight push (queued on each engine behind the call it is running) -> after_sync

Exact versions: every sample is a :class:`rollout.segment_samples.SegmentSample` (the versioned
store the segment rollout uses too): each piece records the policy version *the engine reported*
for it, so the staleness of a sample at step t is ``learner version - oldest token's version``.

The bound is enforced twice. The producer starts a round only when its groups, consumed in FIFO
order, cannot be older than ``max_staleness`` when their turn comes (``ahead / prompts_per_step``
steps of lookahead, plus one while an update is pending); and the consumer checks every group's
recorded versions before training on it: a group over the bound is never trained on, its prompt
is queued to be generated again (``async/dropped_stale``), so no prompt is skipped either.

- ``one_step_off``: a lookahead of one round with whole requests: the engines generate step
  t+1's batch while the learner trains on step t's (every sample exactly one version old).
- ``async``: a lookahead of ``max_staleness`` rounds; with ``partial_rollout`` requests run in
  chunks of ``chunk_tokens``, so a weight push waits for one chunk at most, and running samples
  continue under the new weights (``async/partial_resumed`` counts samples spanning versions).
- ``max_staleness: 0`` (async): nothing is generated before the weights of the step are pushed,
  and rounds are seeded as the synchronous collector seeds them, so the run is the sync run.

Lossless resume: the stage's state (under one lock with the data cursor) holds every live group:
complete ones with tokens, behaviour log-probs and versions, running ones with the tokens they
have; prompts whose request was on an engine at the checkpoint are generated again after a
resume. ``RUN_DIR/async.jsonl`` records which rows each step trained on (fsynced, truncated on
resume), so a kill -9 + resume can be checked to skip and repeat no prompt.
"""

from __future__ import annotations

import collections
import copy
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rlkit.common import hash_seed
from rlkit.infra.tracking import append_record, read_metrics, truncate_metrics
from rlkit.loop import experience as X
from rlkit.methods.base import Stage, active_stages, register_stage
from rollout.engine import RolloutRequest
from rollout.segment_samples import SegmentGroup, SegmentSample, to_completion

LOG_FILE = "async.jsonl"


def async_settings(cfg: Any) -> tuple[str, int, bool]:
    """``(mode, max_staleness, partial_rollout)`` as the stage applies them."""
    a = cfg.train.async_
    if a.mode == "one_step_off":
        return a.mode, 1, False
    return a.mode, a.max_staleness, a.partial_rollout and a.max_staleness > 0


class AsyncRollout:
    """The producer thread, the versioned sample store and the consumer's ``collect``."""

    def __init__(self, cfg: Any, pool: Any, cursor: Any, rows: list[dict[str, Any]], encode: Any,
                 decode: Any, manager: Any, acc_key: str | None, run_dir: Any = None, log: Any = print) -> None:
        self.cfg, self.pool, self.cursor, self.rows = cfg, pool, cursor, rows
        self.encode, self.decode, self.manager, self.acc_key = encode, decode, manager, acc_key
        _, self.k, self.partial = async_settings(cfg)
        self.log = log
        self.P, self.G = cfg.train.prompts_per_step, cfg.train.samples_per_prompt
        self.max_len = cfg.engine.max_new_tokens
        self.chunk = cfg.train.async_.resolved_chunk(self.max_len) if self.partial else self.max_len
        self.log_path = Path(run_dir) / LOG_FILE if run_dir is not None else None
        self.cond = threading.Condition()
        # ---- state (checkpointed) ----
        self.groups: dict[int, SegmentGroup] = {}  # live groups: running or complete, not yet trained
        self.ready: list[int] = []  # complete groups, in completion order (the FIFO the consumer reads)
        self.todo: list[int] = []  # row indices to generate again (stale, or on an engine at a resume)
        self.labels: dict[int, list[int]] = {}  # group -> [target step, round]: its sampling seed
        self.budgets: dict[int, Any] = {}  # group -> data.budget assignment (dict) or None
        self.next_uid = 0
        self.round_of: dict[int, int] = {}  # target step -> rounds labelled with it so far
        # ---- live ----
        self.version = 0  # the learner's (= the engines') policy version after the last push
        # idle: the engines hold the learner's version | collecting: a step is taking groups (it still
        # needs ``demand``) | pending: a step took its groups, its weights are not pushed yet
        self.phase = "idle"
        self.demand = 0
        self.busy: set[int] = set()  # sample uids on an engine right now
        self.last_step = cfg.train.steps
        self.error: BaseException | None = None
        self.stop = False
        self.thread: threading.Thread | None = None
        self.counters = collections.Counter()  # since the last collect: gen_s, idle_s, tokens

    # ------------------------------------------------------------------ lifecycle
    def start(self, start_step: int) -> None:
        if self.log_path is not None:
            truncate_metrics(self.log_path, start_step + 1)

    def close(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=120)
            self.thread = None

    def after_sync(self, version: int) -> None:
        """The engines hold ``version`` now (the producer starts at the first ``collect``, so nothing
        is generated during an evaluation before training)."""
        with self.cond:
            self.version = version
            self.phase = "idle"
            self.cond.notify_all()

    # ------------------------------------------------------------------ producer
    def _position(self) -> tuple[int, int]:
        """Where a round started now lands: ``(staleness when trained, target step)``. Its groups join
        the FIFO behind the live groups and the prompts waiting to be generated again; the step being
        collected still takes ``demand`` groups (when the live groups cannot cover it, the round
        serves this step); after that step, or a step whose push is pending, the learner is one
        version further than the engines generating now."""
        live = len(self.groups)
        if self.phase == "collecting" and live < self.demand:
            return 0, self.version + 1
        behind = live + len(self.todo) - (self.demand if self.phase == "collecting" else 0)
        lag = int(self.phase != "idle") + behind // self.P
        return lag, self.version + 1 + lag

    def _round_allowed(self) -> bool:
        """A new round's groups, consumed FIFO, will be at most max_staleness versions old."""
        lag, target = self._position()
        return lag <= self.k and target <= self.last_step

    def _running(self) -> list[SegmentSample]:
        return [s for g in self.groups.values() for s in g.samples
                if s.token_ids and not s.finished and s.uid not in self.busy]

    def _produce(self) -> None:
        try:
            while True:
                with self.cond:
                    t_idle = time.perf_counter()
                    while not self.stop and not (self._running() or self._round_allowed()):
                        self.cond.wait()
                    self.counters["idle_s"] += time.perf_counter() - t_idle
                    if self.stop:
                        return
                    reqs, targets = self._build_call()
                t0 = time.perf_counter()
                comps, _ = self.pool.generate(reqs)
                with self.cond:
                    self.counters["gen_s"] += time.perf_counter() - t0
                    self._absorb(targets, comps)
                    self.cond.notify_all()
        except BaseException as e:  # engine failure, Ray gone: the consumer raises it
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def _new_round(self) -> list[SegmentGroup]:
        """Take prompts_per_step prompts (regenerations first, then the cursor) as new groups."""
        take = self.todo[: self.P]
        self.todo = self.todo[self.P:]
        if len(take) < self.P:
            take += [int(i) for i in self.cursor.next_indices(self.P - len(take))]
        target = self._position()[1]
        self.round_of[target] = r = self.round_of.get(target, 0) + 1
        budgets: list[Any] = [None] * len(take)
        if self.cfg.data.budget is not None:
            from rewards.budget_prompt import budget_params, sample_budgets

            budgets = sample_budgets(budget_params(self.cfg.data.budget), seed=self.cfg.seed, step=target,
                                     prompt_keys=take)
        out = []
        for i, b in zip(take, budgets):
            gid = self.next_uid
            samples = [SegmentSample(gid + 1 + j, gid, j) for j in range(self.G)]
            self.next_uid += 1 + self.G
            g = SegmentGroup(gid, list(self.encode(self.rows[i], b)), i, samples, target)
            self.groups[gid], self.labels[gid] = g, [target, r]
            self.budgets[gid] = None if b is None else {"budget": b.budget, "kind": b.kind}
            out.append(g)
        return out

    def _build_call(self) -> tuple[list[RolloutRequest], list[list[SegmentSample]]]:
        """One engine call: every running sample's next chunk, plus a new round if allowed."""
        base = X.sampling_params(self.cfg, n=self.G, seed=0)
        reqs, targets = [], []
        for s in self._running():
            g = self.groups[s.group_uid]
            p = replace(base, n=1, seed=hash_seed(self.cfg.seed, "async", s.uid, len(s.seg_lens)),
                        max_new_tokens=min(self.chunk, self.max_len - len(s.token_ids)))
            reqs.append(RolloutRequest(g.prompt_ids, p, group_id=g.group_uid, resume_ids=list(s.token_ids),
                                       budget=(self.budgets[g.group_uid] or {}).get("budget")))
            targets.append([s])
        if self._round_allowed():
            for k, g in enumerate(self._new_round()):  # seeded and numbered as the sync collector does
                target, r = self.labels[g.group_uid]
                p = replace(base, seed=X.step_seed(self.cfg.seed, target, r), max_new_tokens=self.chunk)
                reqs.append(RolloutRequest(g.prompt_ids, p, group_id=k,
                                           budget=(self.budgets[g.group_uid] or {}).get("budget")))
                targets.append(g.samples)
        self.busy = {s.uid for ss in targets for s in ss}
        return reqs, targets

    def _absorb(self, targets: list[list[SegmentSample]], comps: list[Any]) -> None:
        rows = [s for ss in targets for s in ss]
        if len(comps) != len(rows):
            raise RuntimeError(f"engines returned {len(comps)} completions for {len(rows)} samples")
        touched = {}
        for s, c in zip(rows, comps):  # groups on an engine are not complete, so none was taken meanwhile
            s.append(c, 0, self.max_len)
            self.counters["tokens"] += len(c.token_ids)
            touched[s.group_uid] = True
        self.busy = set()
        for gid in touched:
            if self.groups[gid].complete and gid not in self.ready:
                self.ready.append(gid)

    # ------------------------------------------------------------------ consumer
    def _take(self, n: int, dropped: list[int], labels: set[tuple[int, int]]) -> list[SegmentGroup]:
        """Up to ``n`` complete groups, oldest first; a group over the staleness bound goes back to be
        generated again (its row into ``todo``). Called with the lock held."""
        out = []
        self.ready.sort()  # oldest first (group ids grow with creation): the later ones can wait
        while self.ready and len(out) < n:
            gid = self.ready.pop(0)
            g = self.groups.pop(gid)
            if self.version - min(v for s in g.samples for v in s.seg_versions) > self.k:
                self.todo.append(int(g.payload))
                dropped.append(int(g.payload))
                self.labels.pop(gid, None)
                self.budgets.pop(gid, None)
                continue
            labels.add(tuple(self.labels.pop(gid, (0, 0))))
            out.append(g)
        return out

    def _wait_ready(self, n: int) -> float:
        """Block until ``n`` groups are complete (or the producer failed). Lock held. Seconds waited."""
        t0 = time.perf_counter()
        if self.thread is None:
            self.thread = threading.Thread(target=self._produce, name="rlkit-async-producer", daemon=True)
            self.thread.start()
        while len(self.ready) < n:
            if self.error is not None:
                raise RuntimeError(f"async rollout producer failed: {type(self.error).__name__}: "
                                   f"{self.error}") from self.error
            if self.thread is None or not self.thread.is_alive():
                raise RuntimeError("async rollout producer is not running")
            if not self.busy and not self._running() and not self._round_allowed():
                raise RuntimeError(f"async rollout: the step needs {n - len(self.ready)} more group(s) and the "
                                   f"staleness bound lets none be generated (version {self.version}, phase "
                                   f"{self.phase}, {len(self.groups)} live groups, {len(self.todo)} to regenerate)")
            self.cond.wait(timeout=1.0)
        return time.perf_counter() - t0

    def _group(self, g: SegmentGroup) -> X.Group:
        from rewards.budget_prompt import BudgetAssignment

        row = self.rows[g.payload]
        b = self.budgets.pop(g.group_uid, None)
        comps = [to_completion(s, g.prompt_ids, None if s.num_segments == 1 else self._text) for s in g.samples]
        return X.Group(row=row, prompt_ids=list(g.prompt_ids), completions=comps, problem_id=row.get("id", g.payload),
                       budget=None if b is None else BudgetAssignment(**b))

    def _text(self, token_ids: list[int]) -> str:
        from rlkit.methods.segments import response_text

        return response_text(self.decode(token_ids), self.cfg.engine.stop)

    def collect(self, step: int, shaping: Any = None) -> tuple[list[X.Group], list[X.Group], dict[str, float]]:
        """The step's groups: ``(kept, all taken, metrics)`` like the synchronous collector."""
        cfg, ds = self.cfg, self.cfg.algorithm.dynamic_sampling
        kept: list[X.Group] = []
        all_groups: list[X.Group] = []
        taken: list[SegmentGroup] = []
        dropped: list[int] = []
        labels: set[tuple[int, int]] = set()
        m: dict[str, float] = {"time/reward_s": 0.0}
        reward_metrics: dict[str, float] = {}
        wait_s = 0.0
        cap = self.P * ds.max_gen_batches if ds.enabled and ds.max_gen_batches else None
        while True:
            need = self.P - (len(kept) if ds.enabled else len(all_groups))
            if need <= 0:
                break
            if cap is not None and len(all_groups) >= cap:
                self.log(f"step {step}: dynamic sampling kept {len(kept)}/{self.P} groups after {len(all_groups)} "
                         "groups; training on what was kept")
                break
            with self.cond:
                self.phase, self.demand = "collecting", need
                self.cond.notify_all()
                wait_s += self._wait_ready(min(need, self.P))
                got = self._take(need, dropped, labels)
                self.demand = need - len(got)
                groups = [self._group(g) for g in got]
                self.cond.notify_all()  # dropped rows: the producer may start a round
            if not got:
                continue
            taken += got
            reward_metrics = X.score_round(groups, cfg, self.manager, m, reward_metrics, shaping=shaping, step=step,
                                           acc_key=self.acc_key)
            all_groups += groups
            kept += X.keep_informative(groups, self.acc_key, ds.on) if ds.enabled else groups
        kept = kept[: self.P]
        with self.cond:
            self.phase = "pending" if kept else "idle"  # no update -> no push: the same version goes on
            self.demand = 0
            c, self.counters = self.counters, collections.Counter()
            buffered = len(self.ready)
            self.cond.notify_all()
        stale = [self.version - min(s.seg_versions) for g in taken for s in g.samples]
        m.update(reward_metrics)
        m.update({
            "time/gen_s": c["gen_s"], "time/learner_wait_s": wait_s, "time/engine_idle_s": c["idle_s"],
            "rollout/gen_rounds": float(len(labels)),
            "rollout/kept_groups": float(len(kept)), "rollout/tokens_generated": float(c["tokens"]),
            "async/staleness_mean": sum(stale) / len(stale) if stale else 0.0,
            "async/staleness_max": float(max(stale, default=0)), "async/dropped_stale": float(len(dropped)),
            "async/buffer_groups": float(buffered),
            "async/partial_resumed": float(sum(len(set(s.seg_versions)) > 1 for g in taken for s in g.samples)),
        })
        self._log_step(step, taken, kept, dropped)
        return kept, all_groups, m

    def _log_step(self, step: int, taken: list[SegmentGroup], kept: list[X.Group], dropped: list[int]) -> None:
        """Append the rows this step used (trained or filtered) and sent back to ``async.jsonl``."""
        if self.log_path is None:
            return
        kept_ids = {id(g.row) for g in kept}
        rec = {"step": step, "version": self.version,
               "rows": [int(g.payload) for g in taken],
               "trained": [int(g.payload) for g in taken if id(self.rows[g.payload]) in kept_ids],
               "regenerate": dropped,
               "versions": [[min(s.seg_versions), max(s.seg_versions)] for g in taken for s in g.samples]}
        append_record(self.log_path, rec)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Every prompt the cursor handed out and no step trained on yet, with what was generated for it."""
        with self.cond:
            return copy.deepcopy({
                "cursor": self.cursor.state_dict(), "groups": [g.to_dict() for g in self.groups.values()],
                "ready": list(self.ready), "todo": list(self.todo),
                "labels": {str(k): v for k, v in self.labels.items()},
                "budgets": {str(k): v for k, v in self.budgets.items()},
                "round_of": {str(k): v for k, v in self.round_of.items()}, "next_uid": self.next_uid,
            })

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore the store (and the cursor it was taken with). Groups whose request was on an
        engine at the checkpoint (no token back yet) are generated again from their prompt."""
        if not state:
            return
        self.cursor.load_state_dict(state["cursor"])
        self.todo = [int(i) for i in state["todo"]]
        self.round_of = {int(k): int(v) for k, v in state["round_of"].items()}
        self.next_uid = int(state["next_uid"])
        ready = [int(g) for g in state["ready"]]
        self.groups, self.ready = {}, []
        for d in state["groups"]:
            g = SegmentGroup.from_dict(d)
            if all(not s.token_ids for s in g.samples):
                self.todo.append(int(g.payload))
                continue
            self.groups[g.group_uid] = g
            self.labels[g.group_uid] = list(state["labels"][str(g.group_uid)])
            self.budgets[g.group_uid] = state["budgets"].get(str(g.group_uid))
        self.ready = [gid for gid in ready if gid in self.groups]
        self.ready += [gid for gid, g in self.groups.items() if g.complete and gid not in self.ready]

    def pending_rows(self) -> list[int]:
        """Rows handed out by the cursor and not trained yet (live groups + regenerations)."""
        with self.cond:
            return [int(g.payload) for g in self.groups.values()] + list(self.todo)


@register_stage("async", order=5)
class AsyncStage(Stage):
    """``train.async.mode: one_step_off | async``: replaces the collector (see the module docstring)."""

    collects = True

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        return cfg.train.async_.mode != "sync"

    @classmethod
    def check(cls, cfg: Any) -> None:
        if not cls.enabled(cfg):
            return
        a = cfg.train.async_
        if a.mode == "one_step_off" and a.max_staleness < 1:
            raise ValueError("train.async.mode=one_step_off trains every batch one version late: max_staleness "
                             f"must be >= 1 (got {a.max_staleness}); mode=async with max_staleness=0 is the sync run")
        if cfg.cluster.placement == "colocated" and cfg.cluster.engine_gpus > 0:
            raise ValueError("train.async overlaps generation with training: it needs the engines and the learner "
                             "on separate GPUs (cluster.placement=split), not colocated")
        for st in active_stages(cfg, checked=False):
            if st is cls:
                continue
            if st.current_policy:
                raise ValueError(f"train.async.mode={a.mode}: stage {st.name!r} calls the engines on the step's "
                                 "groups and needs them to hold the policy that sampled them; use train.async.mode=sync")
            if st.sampling is not Stage.sampling or st.request_meta is not Stage.request_meta:
                raise ValueError(f"train.async.mode={a.mode}: stage {st.name!r} changes each step's sampling, which "
                                 "the async producer (generating ahead) does not apply; use train.async.mode=sync")

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.rollout = AsyncRollout(ctx.cfg, ctx.engines, ctx.cursor, ctx.rows, ctx.encode,
                                    lambda ids: ctx.tokenizer.decode(ids, skip_special_tokens=True),
                                    ctx.manager, ctx.acc_key, ctx.run_dir, log=lambda msg: ctx.log(msg))

    def start(self, start_step: int) -> None:
        self.rollout.start(start_step)

    def collect(self, step: int, shaping: Any):
        return self.rollout.collect(step, shaping)

    def after_sync(self, version: int) -> None:
        self.rollout.after_sync(version)

    def close(self) -> None:
        self.rollout.close()

    def state_dict(self) -> dict[str, Any]:
        return self.rollout.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.rollout.load_state_dict(state)


def read_async_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """Records of ``RUN_DIR/async.jsonl`` (one per step)."""
    return read_metrics(Path(run_dir) / LOG_FILE)


__all__ = ["LOG_FILE", "AsyncRollout", "AsyncStage", "async_settings", "read_async_log"]
