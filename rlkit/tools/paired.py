"""Paired-by-seed differences against a baseline, for ``rlkit compare``.

Two methods run with the same seed see the same training problems and the same held-out problems (the
seed draws both), so their difference on that seed is free of the held-out set's own difficulty. For
each group of runs (a method's seeds, grouped as in :mod:`rlkit.tools.compare`) and each seed it shares
with the baseline group (the first one), this module takes the difference of the final held-out
accuracy (every split), of the ``\\boxed{}`` rate and of the relative change in mean tokens, then reports
their mean over the shared seeds with the 95% confidence interval of that mean (Student's t, as
:func:`rlkit.tools.compare.mean_ci`) and each seed's own value, so a reader sees both the estimate and
how far it is from settled.

With one shared seed there is no interval (the cell says ``n=1``): a single paired difference says
nothing about the spread between seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlkit.tools.compare import compare_runs, mean_ci, run_seed, split_names

__all__ = ["paired_differences", "format_paired"]


def _delta(key: str, base: dict[str, Any], other: dict[str, Any]) -> float | None:
    """``other - base`` for a rate; the relative change ``other / base - 1`` for tokens."""
    b, o = base.get(key), other.get(key)
    if b is None or o is None:
        return None
    if key.startswith("tokens_after"):
        return o / b - 1 if b else None
    return o - b


def paired_differences(groups: list[list[Path]]) -> list[dict[str, Any]]:
    """One row per non-baseline group that shares at least one seed with the baseline group (the first).

    ``groups``: run dirs grouped by config (:func:`rlkit.tools.compare.group_runs` with ``by_seed``).
    Each row: ``run`` (the group's runs), ``seeds`` (the shared seeds), ``splits`` (the extra held-out
    splits) and, per compared key ``k`` (``acc_after``, ``acc_after:<split>``, ``format_after``,
    ``tokens_after``), ``k`` = mean paired difference, ``k_ci95`` = its 95% half-width (``None`` below two
    seeds) and ``k_values`` = the per-seed differences in seed order. A run without a seed in its config
    is not paired.
    """
    if len(groups) < 2:
        return []
    flat = [d for g in groups for d in g]
    rows = dict(zip(flat, compare_runs(flat)))
    splits = split_names(list(rows.values()))
    keys = ["acc_after", *[f"acc_after:{n}" for n in splits], "format_after", "tokens_after"]

    def by_seed(group: list[Path]) -> dict[int, dict[str, Any]]:
        return {s: rows[d] for d in group if (s := run_seed(d)) is not None}

    base = by_seed(groups[0])
    out = []
    for group in groups[1:]:
        mine = by_seed(group)
        shared = sorted(set(mine) & set(base))
        if not shared:
            continue
        row: dict[str, Any] = {"run": ", ".join(d.name for d in group), "seeds": shared, "splits": splits}
        for k in keys:
            vals = [v for s in shared if (v := _delta(k, base[s], mine[s])) is not None]
            row[k], row[f"{k}_ci95"] = mean_ci(vals)
            row[f"{k}_values"] = vals
        out.append(row)
    return out


def _cell(row: dict[str, Any], key: str, unit: str) -> str:
    vals = row[f"{key}_values"]
    if not vals:
        return "—"
    scale = 100.0
    mean, hw = row[key] * scale, row[f"{key}_ci95"]
    if hw is None:
        return f"{mean:+.1f} {unit} (n=1)"
    each = ", ".join(f"{v * scale:+.1f}" for v in vals)
    return f"{mean:+.1f} ± {hw * scale:.1f} {unit} (n={len(vals)}: {each})"


def format_paired(rows: list[dict[str, Any]], baseline: str) -> str:
    """A markdown table of :func:`paired_differences`; ``""`` when no group shares a seed with the baseline."""
    if not rows:
        return ""
    splits = rows[0]["splits"]
    head = ("| run | seeds | accuracy Δ " + "".join(f"| {n} accuracy Δ " for n in splits)
            + "| `\\boxed{}` Δ | tokens Δ |")
    lines = [f"Paired by seed against {baseline} (other − baseline on each shared seed; mean ± 95% interval "
             "of the mean over the seeds, Student's t; then each seed's value):", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['run']} | {','.join(map(str, r['seeds']))} | {_cell(r, 'acc_after', 'pts')} | "
                     + "".join(f"{_cell(r, 'acc_after:' + n, 'pts')} | " for n in splits)
                     + f"{_cell(r, 'format_after', 'pts')} | {_cell(r, 'tokens_after', '%')} |")
    return "\n".join(lines)
