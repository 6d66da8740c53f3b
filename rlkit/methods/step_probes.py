"""SPAE training-free step probes (docs/algorithms.md §2.1–2.2) run through any RolloutEngine.

For every step boundary ``b`` of response ``i`` (see :func:`rlkit.algorithms.spae.find_step_boundaries`)
the probe context is ``h = prompt_ids + response[:b+1] + tokens(p_probe)`` with
``p_probe = "**Final Answer**\\n\\\\boxed{"``. Two kinds of engine work, each batched over ALL
boundaries of the batch into ONE call per engine (requests are sharded round-robin over a list of
engines, like every engine-pool call; on Ray actors both kinds run concurrently):

- ``generate``: N short samples per boundary (``max_new_tokens`` 10, temperature 0.6) with
  per-token entropies -> ``Conf = mean_n exp(-mean_l H_{n,l})`` (§2.2, paper form);
- ``score``: the gold answer tokens ``y*`` teacher-forced after ``h`` ->
  ``Acc = mean_m exp(log p(y*_m | h, y*_<m))`` (paper form; the N-average is redundant for a
  deterministic teacher-forced value, so it is computed once [INFERRED, §2.2]).

Departures and choices (documented, configurable in :class:`ProbeParams`):
- the entropy H is the one the engine reports for its sampling distribution, i.e. at the probe
  temperature (HFEngine: ``log_softmax(z / T)``); the paper's p_θ is not pinned down further;
- the gold answer is teacher-forced as written in the dataset with surrounding ``$`` removed, plus
  ``answer_suffix`` (default ``""``; ``"}"`` also scores the closing brace) [INFERRED];
- ``acc_source="sampled"`` [INFERRED option] replaces Acc by the share of the N probe samples whose
  boxed answer math-verify (:func:`rewards.math.is_correct`) accepts; no ``score`` call is made then.
  ``verify_samples=True`` computes that share as the diagnostic ``spae/probe_match_rate`` only;
- the probe code's top-20 approximations of Acc/Conf (§2.2 "code variants") are not implemented;
- a response whose row has no gold answer is not probed (K = 0: plain group advantage).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from rlkit.algorithms.spae import (
    EXTRA_ACC,
    EXTRA_BOUNDARIES,
    EXTRA_CONF,
    PROBE_STRING,
    STEP_SUFFIXES,
    THINK_END,
    find_step_boundaries,
    pad_steps,
)
from rlkit.common import build_dataclass, stable_seed
from rlkit.loop.experience import step_seed
from rlkit.methods.base import Stage, register_stage
from rollout.engine import Completion, RolloutRequest, SamplingParams


@dataclass(frozen=True)
class ProbeParams:
    """How to segment responses and probe each step (docs/algorithms.md §2.1, §2.2, §2.5 defaults).

    Attributes:
        probe: p_probe appended after the step (§2.2).
        num_samples: N probe continuations per boundary (5).
        max_new_tokens: length of each probe continuation (10).
        temperature: probe sampling temperature (0.6, example code).
        top_p: nucleus filter of the probe samples (1 = off).
        top_k: top-k filter of the probe samples (0 = off).
        step_suffixes: a token whose text ends with one of these ends a step (``".\\n\\n"``).
        boundary_match: ``"token"`` (spec) or ``"text"`` (decoded text so far ends with a suffix,
            for tokenizers that split ``"."`` from ``"\\n\\n"``) [INFERRED option].
        think_end: boundaries are searched only before the first occurrence of this tag; None
            searches the whole response.
        max_steps: probe at most the first ``max_steps`` boundaries per response (None: all)
            [INFERRED cost cap; later steps become tail tokens].
        acc_source: ``"teacher_forced"`` (paper) or ``"sampled"`` (math-verify match rate of the N
            probe samples) [INFERRED option].
        answer_suffix: text appended to the gold answer before teacher forcing [INFERRED].
        verify_samples: also compute ``spae/probe_match_rate`` with math-verify (diagnostic).
    """

    probe: str = PROBE_STRING
    num_samples: int = 5
    max_new_tokens: int = 10
    temperature: float = 0.6
    top_p: float = 1.0
    top_k: int = 0
    step_suffixes: tuple[str, ...] = STEP_SUFFIXES
    boundary_match: Literal["token", "text"] = "token"
    think_end: str | None = THINK_END
    max_steps: int | None = None
    acc_source: Literal["teacher_forced", "sampled"] = "teacher_forced"
    answer_suffix: str = ""
    verify_samples: bool = False

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"ProbeParams.num_samples must be >= 1, got {self.num_samples}")
        if self.max_new_tokens < 1:
            raise ValueError(f"ProbeParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError("ProbeParams.temperature must be > 0 (confidence needs sampled probes)")
        if self.acc_source not in ("teacher_forced", "sampled"):
            raise ValueError(f"ProbeParams.acc_source must be 'teacher_forced' or 'sampled', got {self.acc_source!r}")
        if not self.probe:
            raise ValueError("ProbeParams.probe must be a non-empty string")
        object.__setattr__(self, "step_suffixes", tuple(self.step_suffixes))


@dataclass
class ProbeResult:
    """Probe values per response, ragged over steps (rows in the order of the inputs).

    Attributes:
        boundaries: per response, the probed boundary token positions (response-relative).
        acc: per response, Acc_{i,k} per boundary.
        conf: per response, Conf_{i,k} per boundary.
        metrics: ``spae/probe_*`` diagnostics.
    """

    boundaries: list[list[int]]
    acc: list[list[float]]
    conf: list[list[float]]
    metrics: dict[str, float] = field(default_factory=dict)

    def extras(self) -> dict[str, torch.Tensor]:
        """The ``AdvantageInputs.extras`` the ``spae`` estimator reads: [B, K] tensors, -1/0 padded."""
        return {
            EXTRA_BOUNDARIES: pad_steps(self.boundaries, -1, torch.long),
            EXTRA_ACC: pad_steps(self.acc, 0.0, torch.float32),
            EXTRA_CONF: pad_steps(self.conf, 0.0, torch.float32),
        }


class TokenTexts:
    """Per-token decoded text with a cache over token ids (each id is decoded once)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, ids: Sequence[int]) -> list[str]:
        new = sorted({int(t) for t in ids} - self._cache.keys())
        if new:
            texts = self.tokenizer.batch_decode([[t] for t in new], skip_special_tokens=False,
                                                clean_up_tokenization_spaces=False)
            self._cache.update(zip(new, texts))
        return [self._cache[int(t)] for t in ids]


def segment_responses(responses: Sequence[Sequence[int]], tokenizer: Any, p: ProbeParams) -> list[list[int]]:
    """Step-boundary positions of each response (docs/algorithms.md §2.1), decoding tokens one by one."""
    texts = tokenizer if isinstance(tokenizer, TokenTexts) else TokenTexts(tokenizer)
    return [find_step_boundaries(texts(r), suffixes=p.step_suffixes, think_end=p.think_end,
                                 match=p.boundary_match, max_steps=p.max_steps) for r in responses]


def _answer_text(answer: Any) -> str | None:
    """Gold answer as text to teacher-force: stripped, surrounding ``$...$`` removed."""
    if answer is None:
        return None
    text = str(answer).strip()
    while len(text) >= 2 and text[0] == "$" and text[-1] == "$":
        text = text[1:-1].strip()
    return text or None


def _boxed_content(continuation: str) -> str:
    """The probe sample's answer: text up to the brace closing ``\\boxed{`` (all of it if unclosed)."""
    depth = 0
    for i, ch in enumerate(continuation):
        if ch == "{":
            depth += 1
        elif ch == "}":
            if depth == 0:
                return continuation[:i]
            depth -= 1
    return continuation


def call_engines(engines: Any, requests: list[RolloutRequest], prefixes: list[list[int]],
                 continuations: list[list[int]]) -> tuple[list[list[Completion]], list[list[float]], int]:
    """One ``generate`` and one ``score`` call per engine, requests sharded round-robin.

    ``engines``: the trainer's engine pool (dead engines recreated, retried), Ray actor handles
    or engine objects (see :func:`rlkit.orchestration.engine_pool.as_pool`); on actors the two
    kinds run concurrently. Returns (completions per request, logprobs per continuation, engine
    calls made).
    """
    from rlkit.orchestration.engine_pool import as_pool

    if isinstance(engines, (list, tuple)) and not engines:
        raise ValueError("no engines to probe with")
    return as_pool(engines).generate_and_score(requests, prefixes, continuations)


def _confidence(comps: list[Completion]) -> float:
    """Conf = (1/N) Σ_n exp(−(1/L_n) Σ_l H_{n,l}) (§2.2)."""
    vals = []
    for c in comps:
        if c.entropies is None:
            raise RuntimeError("engine returned no per-token entropies; SPAE probes need "
                               "SamplingParams.return_entropy support")
        ent = c.entropies[: len(c.token_ids)]
        vals.append(float(torch.exp(-torch.tensor(ent, dtype=torch.float64).mean())) if ent else 1.0)
    return sum(vals) / len(vals)


def run_step_probes(
    engines: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    answers: Sequence[Any],
    p: ProbeParams | None = None,
    *,
    seed: int = 0,
    boundaries: Sequence[Sequence[int]] | None = None,
) -> ProbeResult:
    """Segment every response and probe every step boundary of the batch (docs/algorithms.md §2.1–2.2).

    Args:
        engines: one engine or a list (local engines or Ray ``RolloutWorker`` handles).
        tokenizer: the policy's tokenizer (per-token decoding, probe and answer encoding).
        prompts: B prompt token ids (chat template applied), one per response.
        responses: B response token ids.
        answers: B gold answers (None or empty: the response is not probed).
        p: :class:`ProbeParams` (defaults: docs/algorithms.md §2.5).
        seed: base seed; sample seeds derive from (seed, response, step), so results do not depend
            on how requests are sharded. Pass a per-RL-step seed.
        boundaries: precomputed boundary positions (skips segmentation).

    Returns:
        :class:`ProbeResult` with Acc/Conf per boundary (``.extras()`` feeds the ``spae`` advantage).
    """
    p = p or ProbeParams()
    t0 = time.perf_counter()
    B = len(responses)
    if not (len(prompts) == len(answers) == B):
        raise ValueError(f"prompts ({len(prompts)}), responses ({B}) and answers ({len(answers)}) differ in length")
    if boundaries is None:
        boundaries = segment_responses(responses, tokenizer, p)
    elif len(boundaries) != B:
        raise ValueError(f"boundaries has {len(boundaries)} rows, expected {B}")
    probe_ids = tokenizer.encode(p.probe, add_special_tokens=False)
    gold_texts = [_answer_text(a) for a in answers]
    bounds = [list(b) if g is not None else [] for b, g in zip(boundaries, gold_texts)]
    for i, b in enumerate(bounds):
        if b and (b[-1] >= len(responses[i]) or b[0] < 0):
            raise ValueError(f"response {i}: boundary positions {b} out of range [0, {len(responses[i])})")

    sp = SamplingParams(max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p,
                        top_k=p.top_k, n=p.num_samples, return_entropy=True)
    requests: list[RolloutRequest] = []
    prefixes: list[list[int]] = []
    conts: list[list[int]] = []
    where: list[tuple[int, int]] = []
    gold_ids: dict[str, list[int]] = {}
    for i, b in enumerate(bounds):
        g = gold_texts[i]
        if g is not None and g not in gold_ids:
            gold_ids[g] = tokenizer.encode(g + p.answer_suffix, add_special_tokens=False)
        for k, pos in enumerate(b):
            ctx = list(prompts[i]) + list(responses[i][: pos + 1]) + probe_ids
            params = dataclasses.replace(sp, seed=step_seed(seed, i, k))
            requests.append(RolloutRequest(prompt_ids=ctx, params=params, group_id=i))
            where.append((i, k))
            if p.acc_source == "teacher_forced":
                prefixes.append(ctx)
                conts.append(gold_ids[g])  # type: ignore[index]
    per_req, scores, n_calls = call_engines(engines, requests, prefixes, conts)

    acc = [[0.0] * len(b) for b in bounds]
    conf = [[0.0] * len(b) for b in bounds]
    for r, (i, k) in enumerate(where):
        conf[i][k] = _confidence(per_req[r])
        if p.acc_source == "teacher_forced":
            acc[i][k] = float(torch.tensor(scores[r], dtype=torch.float64).exp().mean())
    metrics = {
        "spae/probe_boundaries": float(len(requests)),
        "spae/probe_rows_no_answer": float(sum(g is None for g in gold_texts)),
        "spae/probe_gen_tokens": float(sum(len(c.token_ids) for cs in per_req for c in cs)),
        "spae/probe_engine_calls": float(n_calls),
    }
    if p.acc_source == "sampled" or p.verify_samples:
        rates = _match_rates(per_req, [gold_texts[i] for i, _ in where])
        for r, (i, k) in enumerate(where):
            if p.acc_source == "sampled":
                acc[i][k] = rates[r]
        metrics["spae/probe_match_rate"] = sum(rates) / len(rates) if rates else 0.0
    metrics["spae/probe_time_s"] = time.perf_counter() - t0
    return ProbeResult(boundaries=bounds, acc=acc, conf=conf, metrics=metrics)


def _match_rates(per_req: list[list[Completion]], golds: list[str | None]) -> list[float]:
    """Share of each request's probe samples whose boxed answer math-verify accepts."""
    from rewards.math import is_correct

    cache: dict[tuple[str, str], bool] = {}
    out = []
    for comps, gold in zip(per_req, golds):
        hits = 0
        for c in comps:
            key = (_boxed_content(c.text).strip(), str(gold))
            if key not in cache:
                cache[key] = bool(key[0]) and is_correct("\\boxed{" + key[0] + "}", gold)
            hits += cache[key]
        out.append(hits / len(comps) if comps else 0.0)
    return out


def probe_groups(groups: Sequence[Any], engines: Any, tokenizer: Any, p: ProbeParams | None = None, *,
                 seed: int = 0, answer_key: str = "answer") -> ProbeResult:
    """:func:`run_step_probes` over trainer groups (``rlkit.loop.experience.Group``), rows in the order
    :func:`rlkit.loop.experience.make_batch` packs them (group by group, completion by completion).

    The gold answer of a group is ``group.row[answer_key]``.
    """
    prompts, responses, answers = [], [], []
    for g in groups:
        for c in g.completions:
            prompts.append(g.prompt_ids)
            responses.append(c.token_ids)
            answers.append(g.row.get(answer_key))
    return run_step_probes(engines, tokenizer, prompts, responses, answers, p, seed=seed)


@register_stage("step_probes", order=30)
class StepProbeStage(Stage):
    """SPAE's step probes: after scoring, each response is cut at its step boundaries and probed
    (``algorithm.step_probe``); the estimator gets the per-step correctness and confidence."""

    advantage_flag = "needs_step_probes"
    current_policy = True  # samples summaries / probes from the step's responses with the engines

    @classmethod
    def check(cls, cfg: Any) -> None:
        try:
            build_dataclass(ProbeParams, cfg.algorithm.step_probe, "step_probe")
        except (ValueError, TypeError) as e:
            raise ValueError(f"algorithm.step_probe: {e.args[0] if e.args else e}") from None

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.params = build_dataclass(ProbeParams, ctx.cfg.algorithm.step_probe, "step_probe")

    def after_score(self, step: int, groups: list, extras: dict[str, Any]):
        c = self.ctx
        t0 = time.perf_counter()
        res = probe_groups(groups, c.engines, c.tokenizer, self.params, seed=stable_seed(c.cfg.seed, step, 7919))
        metrics = {k: float(v) for k, v in res.metrics.items()}
        metrics["time/probe_s"] = time.perf_counter() - t0
        return groups, {**extras, **res.extras()}, metrics
