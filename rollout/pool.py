"""In-process engines behind the engine-pool interface (tests, benches, single-process tools).

:class:`LocalEnginePool` serves the same calls as the Ray-backed
``rlkit.orchestration.engine_pool.EnginePool`` (``generate``, ``score``, ``score_each``,
``generate_and_score``, ``metrics``) over engine objects in this process, with the same sharding
(request ``i`` to engine ``i % E``), so code written against a pool runs unchanged on either.
"""

from __future__ import annotations

import time
from typing import Any

from rollout.engine import Completion, RolloutRequest, reassemble, round_robin, split_per_request


class LocalEnginePool:
    def __init__(self, engines: list[Any]) -> None:
        self.engines = list(engines)
        if not self.engines:
            raise ValueError("an engine pool needs at least one engine")

    def __len__(self) -> int:
        return len(self.engines)

    def generate(self, requests: list[RolloutRequest]) -> tuple[list[Completion], float]:
        """Every request's ``params.n`` completions in request order, and the slowest engine's seconds."""
        shards = round_robin(len(requests), len(self.engines))
        results, secs = [], 0.0
        for engine, idx in zip(self.engines, shards):
            t0 = time.perf_counter()
            results.append(engine.generate([requests[i] for i in idx]) if idx else [])
            secs = max(secs, time.perf_counter() - t0)
        return reassemble(requests, shards, results), secs

    def score(self, prefixes: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        """Teacher-forced log-probs of each continuation given its prefix (sharded, order kept)."""
        out: list[list[float]] = [[] for _ in prefixes]
        for engine, idx in zip(self.engines, round_robin(len(prefixes), len(self.engines))):
            if idx:
                rows = engine.score([prefixes[i] for i in idx], [continuations[i] for i in idx])
                for i, r in zip(idx, rows):
                    out[i] = list(r)
        return out

    def score_each(self, prefixes: list[list[int]], continuations: list[list[int]]) -> list[list[list[float]]]:
        """The same rows scored by every engine: one result per engine."""
        return [e.score(prefixes, continuations) for e in self.engines]

    def generate_and_score(self, requests: list[RolloutRequest], prefixes: list[list[int]],
                           continuations: list[list[int]]) -> tuple[list[list[Completion]], list[list[float]], int]:
        """Both kinds of call at once: completions per request, log-probs per continuation, and the
        number of engine calls made (one of each kind per engine that has work)."""
        per_req = split_per_request(requests, self.generate(requests)[0])
        E = len(self.engines)
        calls = sum(1 for idx in round_robin(len(requests), E) if idx)
        calls += sum(1 for idx in round_robin(len(prefixes), E) if idx)
        return per_req, self.score(prefixes, continuations), calls

    def metrics(self) -> dict[str, float]:
        return {}
