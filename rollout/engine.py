"""The RolloutEngine protocol and the dataclasses that cross it.

An engine turns prompts (token ids) into sampled completions carrying everything the learner
needs: token ids, per-token behaviour log-probabilities, optional per-token entropy and a finish
reason. Engines never import rlkit; rlkit only talks to them through this protocol, so the HF,
vLLM and segment engines are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from rlkit.common import Registry


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    n: int = 1  # samples per prompt
    stop: tuple[str, ...] = ()  # stop strings (matched on decoded text; the match is kept)
    return_entropy: bool = False
    seed: int | None = None


@dataclass
class RolloutRequest:
    """One prompt to sample ``params.n`` completions for."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    group_id: int = 0  # which prompt group the completions belong to
    resume_ids: list[int] = field(default_factory=list)  # already generated prefix (segments)
    budget: int | None = None  # token budget (budget guidance); None = unconstrained
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Completion:
    """One sampled response.

    ``token_ids``, ``logprobs`` and ``entropies`` are aligned, length = number of generated tokens
    (EOS included when the model stopped by itself). ``logprobs`` are under the sampling
    distribution actually used (temperature applied, before top-p/top-k truncation).
    """

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS or stop string) | "length" (hit max_new_tokens) | "segment"
    group_id: int = 0
    entropies: list[float] | None = None
    text: str = ""
    policy_version: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@runtime_checkable
class RolloutEngine(Protocol):
    """What every engine implements. All methods are synchronous and batch-oriented."""

    def generate(self, requests: list[RolloutRequest]) -> list[Completion]:
        """Sample ``r.params.n`` completions per request; returned grouped, request order kept."""
        ...

    def score(self, prefixes: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        """Teacher-forced log-probabilities of each continuation token given its prefix."""
        ...

    def load_weights(self, state: dict[str, Any], version: int | None = None) -> None:
        """Replace (a subset of) model weights in place, by parameter name."""
        ...

    def sleep(self) -> None:
        """Release accelerator memory (colocation). No-op on CPU."""
        ...

    def wake(self) -> None:
        """Undo ``sleep``."""
        ...


def split_per_request(requests: list[RolloutRequest], completions: list[Completion]) -> list[list[Completion]]:
    """Cut one engine call's flat completions into each request's ``params.n`` completions."""
    out, off = [], 0
    for r in requests:
        out.append(completions[off : off + r.params.n])
        off += r.params.n
    if off != len(completions):
        raise RuntimeError(f"engine returned {len(completions)} completions, expected {off}")
    return out


def round_robin(n: int, engines: int) -> list[list[int]]:
    """Item ``i`` goes to engine ``i % engines``: each engine's item indices, in order."""
    return [list(range(k, n, engines)) for k in range(engines)]


def reassemble(requests: list[RolloutRequest], shards: list[list[int]],
               results: list[list[Completion]]) -> list[Completion]:
    """Flat completions in request order from each shard's flat completions (``shards[k]`` are the
    request indices engine ``k`` served, ``results[k]`` what it returned)."""
    per_req: list[list[Completion]] = [[] for _ in requests]
    for idx, comps in zip(shards, results):
        for i, cs in zip(idx, split_per_request([requests[i] for i in idx], comps)):
            per_req[i] = cs
    return [c for cs in per_req for c in cs]


def bucket_indices(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive groups of indices whose ``sizes`` sum to at most ``limit`` (an oversized item
    gets a bucket of its own). ``[3, 3, 5, 1], 6 -> [[0, 1], [2, 3]]``."""
    out: list[list[int]] = []
    cur: list[int] = []
    total = 0
    for i, s in enumerate(sizes):
        if cur and total + s > limit:
            out.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += s
    if cur:
        out.append(cur)
    return out


def generation_stats(completions: list[Completion], elapsed: float) -> dict[str, float]:
    """The ``rollout/*`` throughput figures an engine keeps about its last ``generate`` call."""
    n_tok = sum(len(c.token_ids) for c in completions)
    return {
        "rollout/tokens_generated": float(n_tok),
        "rollout/gen_time_s": elapsed,
        "rollout/tokens_per_s": n_tok / elapsed if elapsed > 0 else 0.0,
        "rollout/num_sequences": float(len(completions)),
    }


_ENGINES: Registry[Any] = Registry("engine")


def register_engine(name: str):
    """Register an engine class under ``name`` (``engine.name`` in YAML)."""

    def deco(cls):
        return _ENGINES.add(name, cls)

    return deco


def get_engine_class(name: str):
    import importlib

    if name not in _ENGINES:
        # built-in engines register on import
        mod = {"hf": "rollout.hf", "vllm": "rollout.vllm"}.get(name)
        if mod is not None:
            importlib.import_module(mod)
    return _ENGINES.get(name)
