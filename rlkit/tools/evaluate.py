"""Held-out evaluation: accuracy, pass@k, response length and \\boxed{} format rate.

Used by ``rlkit eval`` (an engine in this process, no Ray) and by ``Trainer`` before/after training
(through the engine actors). Verifiers run inline here: evaluation is not on a training path.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

from rlkit.schema import Config
from rollout.engine import Completion, RolloutRequest


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def evaluate_rows(
    cfg: Config,
    rows: list[dict],
    encode: Callable[[dict], list[int]],
    generate: Callable[[list[RolloutRequest]], list[Completion]],
    *,
    max_new_tokens: int | None = None,
    budget: int | None = None,
    request_meta: dict | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Sample ``eval.num_samples`` completions per row and score them with the math verifier.

    ``format_rate``: answers with a non-empty ``\\boxed{}`` other than a copy of the box the prompt
    template shows as its example (``\\boxed{answer}`` is not an answer).

    ``max_new_tokens`` overrides ``eval.max_new_tokens``; ``budget`` is put on every request
    (budget guidance acts on it); ``request_meta`` is copied into every request's ``meta`` (e.g.
    ``{"logits_processors": [...]}``); ``on_batch(rows_done)`` is called after each batch.
    """
    from rewards import resolve
    from rewards.format import has_boxed, template_placeholders
    from rlkit.loop.experience import sampling_params

    e = cfg.eval
    n = e.num_samples
    params = sampling_params(
        cfg, n=n, seed=cfg.seed + 7919, greedy=e.temperature == 0.0,
        max_new_tokens=max_new_tokens or e.max_new_tokens or cfg.engine.max_new_tokens,
    )
    if e.temperature:
        params = type(params)(**{**params.__dict__, "temperature": e.temperature})
    comps: list[Completion] = []
    for i in range(0, len(rows), e.batch_size):
        chunk = rows[i : i + e.batch_size]
        comps += generate([RolloutRequest(prompt_ids=encode(r), params=params, group_id=i + k, budget=budget,
                                          meta=dict(request_meta or {}))
                           for k, r in enumerate(chunk)])
        if on_batch is not None:
            on_batch(len(chunk))
    math_fn = resolve("math")
    marks = template_placeholders(cfg.data.prompt_template)
    texts = [c.text for c in comps]
    answers = [r["answer"] for r in rows for _ in range(n)]
    correct = [1.0 if (x or 0.0) >= 1.0 else 0.0 for x in math_fn(texts, answer=answers)]
    lens = [len(c.token_ids) for c in comps]
    per_row = [sum(correct[j * n : (j + 1) * n]) for j in range(len(rows))]
    out = {
        "problems": float(len(rows)),
        "accuracy": statistics.fmean(correct) if correct else 0.0,
        # a box that only copies the prompt template's example (\boxed{answer}) is not an answer
        "format_rate": statistics.fmean(1.0 if has_boxed(t, marks) else 0.0 for t in texts) if texts else 0.0,
        "tokens_mean": statistics.fmean(lens) if lens else 0.0,
        "tokens_median": float(statistics.median(lens)) if lens else 0.0,
        "truncated_rate": statistics.fmean(c.truncated for c in comps) if comps else 0.0,
    }
    for k in sorted({1, n} | ({2, 4, 8} & set(range(1, n + 1)))):
        out[f"pass@{k}"] = statistics.fmean(pass_at_k(n, int(c), k) for c in per_row) if rows else 0.0
    return out


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one column per result set (e.g. before / after)."""
    keys = list(next(iter(results.values())).keys())
    names = list(results)
    w = max(len(k) for k in keys) + 2
    lines = [" " * w + "".join(f"{n:>12}" for n in names)]
    for k in keys:
        cells = []
        for n in names:
            v = results[n].get(k, float("nan"))
            pct = k in ("accuracy", "format_rate", "truncated_rate") or k.startswith("pass@")
            cells.append(f"{v * 100:>11.1f}%" if pct else f"{v:>12.1f}")
        lines.append(f"{k:<{w}}" + "".join(cells))
    return "\n".join(lines)
