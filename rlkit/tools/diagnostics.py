"""Method diagnostics of finished runs, for ``rlkit compare``: does a method have something to act on?

Every method logs its own per-step statistics (``spae/num_steps_mean``: step boundaries found per
response; ``tempo/branch_frac``: tokens at a prefix-tree branch point; ``actor/hapo/high_entropy_frac``:
tokens above the entropy threshold, ``hapo/temperature_factor_mean``: HAPO's sampling temperature over the
asked one; ``length/kimi/weight``: the ramped length weight; ``rollout/gen_rounds``: generation rounds of
DAPO's dynamic sampling; ...). This module reads
them from each run's ``metrics.jsonl`` and reports, per key, the value at the first and last logged step
and the mean over all steps, so a result table can say *why* a method did or did not change anything
(SPAE with no steps, TEMPO with no branches, HAPO with no high-entropy tokens).

Kept: the keys under a method prefix (``METHOD_PREFIXES``) plus the policy entropy and clip fraction
every run logs; dropped: timings (``..._s``) and the SPAE probe's bookkeeping counters.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from rlkit.infra.tracking import read_metrics

__all__ = ["METHOD_PREFIXES", "COMMON_KEYS", "run_diagnostics", "group_diagnostics", "format_diagnostics",
           "diagnostics_table"]

METHOD_PREFIXES = ("tempo/", "spae/", "hapo/", "actor/hapo/", "hapo_token_mean/", "dmmpt/", "brpo/", "length/",
                   "anytime/", "segments/", "rollout/")
COMMON_KEYS = ("actor/entropy", "actor/clip_frac")
_DROPPED = ("spae/probe_engine_calls", "spae/probe_gen_tokens", "spae/probe_rows_no_answer",
            "spae/probe_boundaries", "spae/saturation_count")


def _kept(key: str) -> bool:
    if key in COMMON_KEYS:
        return True
    return key.startswith(METHOD_PREFIXES) and not key.endswith("_s") and key not in _DROPPED


def run_diagnostics(run_dir: str | Path) -> dict[str, dict[str, float]]:
    """``{key: {"first": v, "last": v, "mean": v}}`` over the run's logged steps, for the kept keys
    (a key missing from a step is skipped for that step; a key never logged is absent)."""
    series: dict[str, list[float]] = {}
    for rec in read_metrics(Path(run_dir)):
        if "step" not in rec:
            continue
        for k, v in rec.items():
            if _kept(k) and isinstance(v, (int, float)) and not isinstance(v, bool):
                series.setdefault(k, []).append(float(v))
    return {k: {"first": v[0], "last": v[-1], "mean": statistics.fmean(v)} for k, v in sorted(series.items())}


def group_diagnostics(run_dirs: list[str | Path]) -> dict[str, dict[str, float]]:
    """The per-key ``first`` / ``last`` / ``mean`` averaged over several runs (seeds of one config);
    a key counts only the runs that logged it."""
    per_run = [run_diagnostics(d) for d in run_dirs]
    keys = sorted({k for d in per_run for k in d})
    return {k: {f: statistics.fmean(d[k][f] for d in per_run if k in d) for f in ("first", "last", "mean")}
            for k in keys}


def _num(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def format_diagnostics(labelled: list[tuple[str, dict[str, dict[str, float]]]]) -> str:
    """A markdown table, one row per run (or group): entropy and clip fraction first → last, then each
    method key as ``key first → last (mean m)``."""
    lines = ["| run | policy entropy (first → last) | clip fraction (first → last) | method diagnostics: "
             "first step → last step (mean over steps) |", "|---|---|---|---|"]
    for label, diag in labelled:
        common = [f"{_num(diag[k]['first'])} → {_num(diag[k]['last'])}" if k in diag else "—" for k in COMMON_KEYS]
        method = "; ".join(f"`{k}` {_num(v['first'])} → {_num(v['last'])} ({_num(v['mean'])})"
                           for k, v in diag.items() if k not in COMMON_KEYS) or "—"
        lines.append(f"| {label} | {common[0]} | {common[1]} | {method} |")
    return "\n".join(lines)


def diagnostics_table(groups: list[list[Path]], labels: list[str]) -> str:
    """``format_diagnostics`` of ``compare``'s groups (one run, or the seeds of one config, per row; a
    group of one is that run's own values)."""
    return format_diagnostics([(label, group_diagnostics(g)) for g, label in zip(groups, labels)])
