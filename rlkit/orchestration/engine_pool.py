"""The rollout engine actors, with fault handling: a dead engine is recreated, re-synced, retried.

Every engine call of the trainer (rollouts, SPAE probes, segment rollouts, evaluation, weight sync)
goes through :class:`EnginePool`. Requests are sharded round-robin over the engines (request i goes
to engine ``i % E``, as ``rollout.pool.LocalEnginePool`` does in-process). When an engine actor dies in
the middle of a call (``RayActorError``: process killed, OOM, node lost), the pool

1. recreates it with the same constructor arguments in the same placement slot,
2. loads it with the weights its peers hold (the last synced state, kept in the object store by
   :meth:`EnginePool.sync`, with its policy version) *before* it serves anything, and
3. re-runs that engine's shard of the call; the other engines' results are kept.

Each engine may be recreated ``cluster.max_actor_restarts`` times; one more death raises
:class:`EngineFailure` naming the key. Restarts are counted in ``cluster/actor_restarts``. The cost:
the synced tensors (the full weights, or only the LoRA adapter) stay in the object store until the
next sync replaces them, one copy. With ``cluster.weight_sync=collective|cuda_ipc``
(:mod:`rlkit.orchestration.weight_sync`) nothing is kept: a recreated engine is loaded with the
learner's current state through the object store, and the weight-sync group is formed again, with
the new engine, at the next sync.

Why not Ray's own ``max_restarts`` / ``max_task_retries``: Ray would re-run ``__init__`` and then
replay the failed task right away, on an engine still holding the initial weights (a silently
off-policy rollout). Here nothing reaches a new engine before its weights are loaded.

Engines are seeded per request (``SamplingParams.seed``), so a retried shard yields the same
completions the dead engine would have returned.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rollout.engine import Completion, RolloutRequest, reassemble, round_robin, split_per_request
from rollout.pool import LocalEnginePool

logger = logging.getLogger(__name__)


class EngineFailure(RuntimeError):
    """An engine died more often than ``cluster.max_actor_restarts`` allows, or could not be recreated."""


@dataclass
class EngineSpec:
    """How to (re)create one engine actor: ``RolloutWorker(*args)`` with these Ray actor options."""

    args: tuple
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RestartEvent:
    """One recreated engine: what killed it and what the restart cost (seconds)."""

    engine: int
    error: str
    detected_at: float  # time.time() when the pool saw the death
    restart_s: float  # new actor started and ready (model loaded)
    sync_s: float  # last synced weights loaded into it
    version: int | None  # policy version it now holds (None: never synced, initial weights)


@dataclass
class Call:
    """One method call on one engine: ``engines[engine].<method>(*args)``."""

    engine: int
    method: str
    args: tuple


class EnginePool:
    """Rollout engine actors that survive engine deaths. See the module docstring.

    Args:
        specs: one :class:`EngineSpec` per engine.
        max_restarts: recreations allowed per engine (``cluster.max_actor_restarts``).
        log: where restart messages go (the trainer passes its console printer).
        owned: objects with a ``remove()`` (placement groups) released by :meth:`shutdown`.
    """

    def __init__(self, specs: list[EngineSpec], *, max_restarts: int = 3,
                 log: Callable[[str], Any] | None = None, owned: list[Any] | None = None,
                 weight_sync: Any = None, restart_timeout_s: float | None = None):
        if not specs:
            raise ValueError("an EnginePool needs at least one engine")
        self.specs = list(specs)
        self.max_restarts = max_restarts
        self.log = log or logger.warning
        self.owned = list(owned or [])
        self.actors = [self._start(s) for s in self.specs]
        self.restarts = [0] * len(self.specs)
        self.events: list[RestartEvent] = []
        self._state: Any = None  # ObjectRef of the last synced weights (what every engine holds)
        self.version: int | None = None
        # cluster.weight_sync: a CollectiveSync / CudaIpcSync, None = the object store
        self.weight_sync = weight_sync
        self.restart_timeout_s = restart_timeout_s  # a recreated engine must be placed within this
        self.nodes: list[str] = ["?"] * len(self.specs)  # node address of each engine (note_nodes)
        self._learner: Any = None  # the learner of the last collective/IPC sync (restarts load from it)
        self.last_sync: dict[str, float] = {}  # what the last collective/IPC sync reported (bytes, seconds)
        self._guidance_seen: list[dict[str, int]] = [{} for _ in self.specs]  # last counters read per engine
        # calls may come from two threads (train.async's producer and the trainer): one restart at a time
        self._restart_lock = threading.Lock()

    @classmethod
    def from_actors(cls, actors: list[Any]) -> EnginePool:
        """A pool over ``RolloutWorker`` actors made elsewhere: same calls, no restarts (it does not
        know how to recreate them) and nothing owned."""
        pool = cls.__new__(cls)
        pool.specs, pool.max_restarts, pool.log, pool.owned = [], 0, logger.warning, []
        pool.actors, pool.restarts, pool.events = list(actors), [0] * len(actors), []
        pool._state, pool.version, pool.weight_sync, pool._learner, pool.last_sync = None, None, None, None, {}
        pool._guidance_seen = [{} for _ in actors]
        pool._restart_lock = threading.Lock()
        pool.restart_timeout_s, pool.nodes = None, ["?"] * len(actors)
        return pool

    def note_nodes(self) -> list[str]:
        """Record (and return) the node address each engine runs on."""
        import ray

        self.nodes = [i.get("ip", "?") for i in ray.get([a.info.remote() for a in self.actors])]
        return self.nodes

    # ------------------------------------------------------------------ lifecycle
    @staticmethod
    def _start(spec: EngineSpec):
        import ray

        from rlkit.orchestration.workers import RolloutWorker

        return ray.remote(RolloutWorker).options(**spec.options).remote(*spec.args)

    def ready_refs(self) -> list:
        """References that resolve once every engine has loaded its model."""
        return [a.ready.remote() for a in self.actors]

    def __len__(self) -> int:
        return len(self.actors)

    def shutdown(self) -> None:
        import ray

        if self.weight_sync is not None:
            try:
                self.weight_sync.close()
            except Exception:  # Ray down / actors gone
                pass
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already dead / Ray down
                pass
        for o in self.owned:
            o.remove()
        self.owned = []

    def _restart(self, k: int, dead: Any, err: BaseException) -> None:
        """Recreate engine ``k`` (unless already done since ``dead`` failed) and load the synced weights."""
        with self._restart_lock:  # a death seen by two threads' calls recreates the engine once
            self._restart_locked(k, dead, err)

    def _restart_locked(self, k: int, dead: Any, err: BaseException) -> None:
        import ray

        if self.actors[k] is not dead:
            return  # another failed call on the same dead actor already restarted it
        detected_at = time.time()
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        if self.restarts[k] >= self.max_restarts or not self.specs:
            raise EngineFailure(
                f"rollout engine {k} died ({reason}) and was already recreated {self.restarts[k]} time(s): "
                f"cluster.max_actor_restarts={self.max_restarts} reached") from err
        try:
            ray.kill(dead, no_restart=True)
        except Exception:
            pass
        t0 = time.perf_counter()
        try:
            new = self._place_again(k, reason, err)
            t1 = time.perf_counter()
            state = self._state
            if state is None and self._learner is not None:  # collective/IPC sync: nothing kept, ask the learner
                state = self._learner.state_for_sync.remote()
            if state is not None:  # before it serves: the weights its peers hold
                ray.get(new.load_weights.remote(state, self.version))
        except ray.exceptions.RayError as e:
            raise EngineFailure(f"rollout engine {k} died ({reason}) and could not be recreated: {e}") from e
        t2 = time.perf_counter()
        self.actors[k] = new
        self.restarts[k] += 1
        try:
            self.nodes[k] = ray.get(new.info.remote()).get("ip", "?")
        except ray.exceptions.RayError:
            self.nodes[k] = "?"
        self._guidance_seen[k] = {}  # the new engine's guidance counters start at 0
        ev = RestartEvent(k, reason, detected_at, t1 - t0, t2 - t1, self.version)
        self.events.append(ev)
        self.log(f"rollout engine {k} died ({reason}); recreated on node {self.nodes[k]} in {ev.restart_s:.1f}s, "
                 f"loaded policy version {self.version} in {ev.sync_s:.2f}s; retrying its requests "
                 f"(restart {self.restarts[k]}/{self.max_restarts} of engine {k})")

    def _place_again(self, k: int, reason: str, err: BaseException) -> Any:
        """A new actor for engine ``k``, loaded and ready. An actor placed on a node that is dying
        (its bundle not yet moved: Ray has not declared the node dead) dies too; it is made again
        until one is ready, for at most ``restart_timeout_s`` (cluster.placement_timeout_s)."""
        import ray

        deadline = None if self.restart_timeout_s is None else time.time() + self.restart_timeout_s
        while True:
            new = self._start(self.specs[k])
            left = None if deadline is None else max(deadline - time.time(), 0.1)
            try:
                ray.get(new.ready.remote(), timeout=left)
                return new
            except ray.exceptions.GetTimeoutError:
                ray.kill(new, no_restart=True)
                raise EngineFailure(
                    f"rollout engine {k} died on node {self.nodes[k]} ({reason}) and could not be placed again "
                    f"within cluster.placement_timeout_s={self.restart_timeout_s:g}s: no live node has room for its "
                    "placement bundle (bring the node back or add capacity)") from err
            except ray.exceptions.RayActorError as e:
                if getattr(e, "actor_init_failed", False) or deadline is None or time.time() >= deadline:
                    raise  # its own constructor failed: no use placing it again
                time.sleep(1.0)  # its node is still going down: wait for Ray to move the bundle

    # ------------------------------------------------------------------ calls
    def run(self, calls: list[Call]) -> list[Any]:
        """Run the calls concurrently; a call whose engine died is re-run on the recreated engine.

        Returns the results in call order. Errors raised by the engine code itself (not a death)
        propagate unchanged.
        """
        import ray

        results: list[Any] = [None] * len(calls)
        pending: dict[Any, tuple[int, Any]] = {}

        def submit(i: int) -> None:
            c = calls[i]
            actor = self.actors[c.engine]
            pending[getattr(actor, c.method).remote(*c.args)] = (i, actor)

        for i in range(len(calls)):
            submit(i)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i, actor = pending.pop(done[0])
            try:
                results[i] = ray.get(done[0])
            except ray.exceptions.RayActorError as e:
                if e.actor_id not in (None, actor._actor_id.hex()):
                    raise  # another actor died (e.g. the learner producing an argument): not ours to restart
                self._restart(calls[i].engine, actor, e)
                submit(i)
        return results

    def generate(self, requests: list[RolloutRequest]) -> tuple[list[Completion], float]:
        """Sample every request (``params.n`` completions each, request order kept).

        Returns ``(completions, seconds of the slowest engine)``.
        """
        shards = round_robin(len(requests), len(self.actors))
        calls = [Call(k, "generate", ([requests[i] for i in idx],)) for k, idx in enumerate(shards) if idx]
        out = self.run(calls)
        results = [[] for _ in shards]
        for c, (comps, _secs) in zip(calls, out):
            results[c.engine] = comps
        return reassemble(requests, shards, results), max((s for _, s in out), default=0.0)

    def score(self, prefixes: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        """Teacher-forced log-probabilities of each continuation given its prefix (sharded, order kept)."""
        E = len(self.actors)
        calls = [Call(k, "score", (prefixes[k::E], continuations[k::E])) for k in range(E) if prefixes[k::E]]
        out: list[list[float]] = [[] for _ in prefixes]
        for c, rows in zip(calls, self.run(calls)):
            out[c.engine::E] = list(rows)
        return out

    def generate_and_score(self, requests: list[RolloutRequest], prefixes: list[list[int]],
                           continuations: list[list[int]]) -> tuple[list[list[Completion]], list[list[float]], int]:
        """``generate`` and ``score`` submitted together (they run concurrently on the engines).

        Returns (completions per request, log-probs per continuation, engine calls made).
        """
        E = len(self.actors)
        gen = [(k, idx) for k, idx in enumerate(round_robin(len(requests), E)) if idx]
        sc = [(k, idx) for k, idx in enumerate(round_robin(len(prefixes), E)) if idx]
        res = self.run([Call(k, "generate", ([requests[i] for i in idx],)) for k, idx in gen]
                       + [Call(k, "score", ([prefixes[i] for i in idx], [continuations[i] for i in idx]))
                          for k, idx in sc])
        per_req: list[list[Completion]] = [[] for _ in requests]
        for (_, idx), (comps, _secs) in zip(gen, res[: len(gen)]):
            for i, cs in zip(idx, split_per_request([requests[i] for i in idx], comps)):
                per_req[i] = cs
        scores: list[list[float]] = [[] for _ in prefixes]
        for (_, idx), rows in zip(sc, res[len(gen):]):
            for i, r in zip(idx, rows):
                scores[i] = list(r)
        return per_req, scores, len(gen) + len(sc)

    def score_each(self, prefixes: list[list[int]], continuations: list[list[int]]) -> list[list[list[float]]]:
        """The same rows scored by every engine (not sharded): one result per engine, in engine order."""
        return self.run([Call(k, "score", (prefixes, continuations)) for k in range(len(self.actors))])

    # ------------------------------------------------------------------ weights
    def load_state(self, state: Any, version: int | None) -> float:
        """Load ``state`` (an ObjectRef or a dict) into every engine and keep it for restarts. Seconds."""
        import ray

        t0 = time.perf_counter()
        ref = state if isinstance(state, ray.ObjectRef) else ray.put(state)
        # recorded first: an engine that dies during this load is recreated with the new weights
        before, (self._state, self.version) = (self._state, self.version), (ref, version)
        try:
            self.run([Call(k, "load_weights", (ref, version)) for k in range(len(self.actors))])
        except BaseException:
            self._state, self.version = before  # e.g. the learner failed to produce the state
            raise
        return time.perf_counter() - t0

    def sync(self, learner: Any, version: int) -> float:
        """The learner's weights -> every engine, the ``cluster.weight_sync`` way. Returns seconds spent.

        Object store: the state is kept for restarts. Collective / CUDA IPC: an engine that dies
        during the sync makes this sync fall back to the object store (for all engines, the dead one
        recreated); the group is formed again at the next sync.
        """
        t0 = time.perf_counter()
        if self.weight_sync is None:
            self.load_state(learner.state_for_sync.remote(), version)
            return time.perf_counter() - t0
        from rlkit.orchestration.weight_sync import SyncMemberDied

        try:
            self.last_sync = self.weight_sync.sync(self.actors, learner, version)
        except SyncMemberDied as e:
            self.log(f"{e}; loading policy version {version} through the object store instead "
                     f"(cluster.weight_sync={self.weight_sync.mode} resumes at the next sync)")
            self.load_state(learner.state_for_sync.remote(), version)
            self._learner = learner
            return time.perf_counter() - t0
        self._state, self.version, self._learner = None, version, learner  # frees the stored copy, if any
        return time.perf_counter() - t0

    def sleep(self) -> None:
        """Every engine releases its accelerator memory (colocated placement, while the learner trains)."""
        self.run([Call(k, "sleep", ()) for k in range(len(self.actors))])

    def wake(self) -> None:
        self.run([Call(k, "wake", ()) for k in range(len(self.actors))])

    @contextlib.contextmanager
    def lending_memory(self, cfg: Any):
        """While the learner trains: with ``cluster.placement=colocated`` on GPUs the engines sleep
        (release their accelerator memory) and wake afterwards; otherwise nothing happens."""
        swap = cfg.cluster.placement == "colocated" and cfg.cluster.engine_gpus > 0
        if swap:
            self.sleep()
        yield
        if swap:
            self.wake()

    def metrics(self) -> dict[str, float]:
        """``cluster/actor_restarts`` (engines recreated so far in this process) and the last restart's cost."""
        m = {"cluster/actor_restarts": float(sum(self.restarts))}
        if self.events:
            m["cluster/restart_s"] = self.events[-1].restart_s + self.events[-1].sync_s
        return m

    def guidance_metrics(self) -> dict[str, float]:
        """Budget guidance since the last call, summed over engines (rows x decode steps):
        ``budget_guidance/guided_steps`` (reweighted), ``/unreliable_steps`` (no candidate passed the
        reliability mask) and ``/changed_steps`` (the guided argmax differs from the LM's)."""
        from rollout.budget import BudgetGuidance

        out = dict.fromkeys(BudgetGuidance.COUNTERS, 0.0)
        counts = self.run([Call(k, "guidance_counts", ()) for k in range(len(self.actors))])
        for k, now in enumerate(counts):
            for key, v in now.items():
                out[key] += v - self._guidance_seen[k].get(key, 0)
            self._guidance_seen[k] = dict(now)
        return {f"budget_guidance/{k.replace('_row_steps', '_steps')}": v for k, v in out.items()}


def as_pool(engines: Any) -> EnginePool | LocalEnginePool:
    """An engine pool for ``engines``: a pool as is; Ray ``RolloutWorker`` actor handles (one or a
    list) as an :class:`EnginePool`; engine objects in this process as a ``LocalEnginePool``."""
    if isinstance(engines, (EnginePool, LocalEnginePool)):
        return engines
    import ray

    items = list(engines) if isinstance(engines, (list, tuple)) else [engines]
    actors = [isinstance(e, ray.actor.ActorHandle) for e in items]
    if any(actors) and not all(actors):
        raise TypeError("a mix of Ray actor handles and local engines; pass one kind")
    return EnginePool.from_actors(items) if items and all(actors) else LocalEnginePool(items)
