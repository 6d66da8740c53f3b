"""``rlkit compare RUN_DIR...``: one table (and one figure) for runs that differ in method, reward or seed.

Per run: the method (advantage / policy loss / length shapers), steps done, held-out accuracy and
``\\boxed{}`` rate before and after training (``eval_before.json`` / ``eval_after.json``), mean response
tokens of the final greedy evaluation, the accuracy and tokens on each extra held-out split
(``eval_after_<split>.json``, from ``eval.splits``), the training reward and response length averaged over the last
``tail`` steps, wall time of the steps and the peak memory. The figure overlays the runs' training
reward, accuracy and response length per step.

Seeds: runs whose saved ``config.yaml`` are identical except for ``seed``, ``name`` and ``output_dir``
form one group (``compare_groups``, ``rlkit compare --by-seed``, the default). A group of n >= 2 runs
is one row whose metrics are the mean over the seeds with a 95% confidence interval half-width,
``t(0.975, n-1) * sample std / sqrt(n)`` (Student's t), shown as ``mean ± half-width (n=3)``; in the
figure it is the mean curve with a min–max band across the seeds. A run alone in its group is shown
exactly as without grouping.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

from rlkit.infra.tracking import read_metrics

__all__ = ["compare_runs", "compare_groups", "group_runs", "mean_ci", "t_quantile_975", "format_markdown",
           "plot_compare", "plot_compare_budgets", "config_key", "read_config", "run_seed", "split_names", "SEED_KEYS"]

CURVES = (("reward/mean", "training reward"), ("acc/mean", "training accuracy"),
          ("response/len_mean", "response tokens"))
SEED_KEYS = ("seed", "name", "output_dir")  # config keys that may differ inside one group
# per-run values that a group reports as mean ± 95% CI half-width
STAT_KEYS = ("acc_before", "acc_after", "format_before", "format_after", "tokens_before", "tokens_after",
             "train_reward_tail", "train_tokens_tail")
# t_{0.975, df} for df = 1..30 (two-sided 95%); beyond 30 the normal 1.96 is used
_T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157,
         2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922,
         2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831,
         2.048407, 2.045230, 2.042272)
Z975 = 1.96


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (exact to 6 decimals for
    df <= 30, 1.96 beyond)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else Z975


def mean_ci(values: list[float]) -> tuple[float | None, float | None]:
    """``(mean, 95% CI half-width)`` of ``values``: ``t(0.975, n-1) * sample std / sqrt(n)``.

    The half-width is ``None`` for fewer than two values, the mean ``None`` for none.

    >>> m, h = mean_ci([0.5, 0.6, 0.7]); round(m, 6), round(h, 6)
    (0.6, 0.248414)
    """
    vals = [float(v) for v in values]
    if not vals:
        return None, None
    mean = statistics.fmean(vals)
    if len(vals) < 2:
        return mean, None
    return mean, t_quantile_975(len(vals) - 1) * statistics.stdev(vals) / math.sqrt(len(vals))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def read_config(cfg_path: Path, fill_defaults: bool = False) -> dict[str, Any] | None:
    """A run's saved ``config.yaml`` as a dict (``None`` if unreadable). With ``fill_defaults``, keys that
    rlkit added after the run was saved get their defaults, so a run saved by an older rlkit still
    matches a new config that leaves those keys alone (a config the schema refuses is returned as is)."""
    import yaml

    try:
        c = yaml.safe_load(cfg_path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(c, dict):
        return None
    return with_defaults(c) if fill_defaults else c


def with_defaults(c: dict[str, Any]) -> dict[str, Any]:
    """A config dict with every key the schema knows filled in (``c`` itself if the schema refuses it)."""
    from pydantic import ValidationError

    from rlkit.config import config_dict
    from rlkit.schema import Config

    try:
        return config_dict(Config.model_validate(c))
    except ValidationError:
        return c


def _method(cfg_path: Path) -> str:
    c = read_config(cfg_path)
    if c is None:
        return "?"
    a = c.get("algorithm", {})
    parts = [str(a.get("advantage", "?")), str(a.get("policy_loss", "?"))]
    shapers = [s.get("name", "?") for s in c.get("reward", {}).get("length_shapers", []) or []]
    if shapers:
        parts.append("+".join(shapers))
    if (a.get("dynamic_sampling") or {}).get("enabled"):
        parts.append("dynamic sampling")
    if (a.get("overlong_shaping") or {}).get("enabled"):
        parts.append("overlong shaping")
    if (c.get("data") or {}).get("budget"):
        parts.append("budget-in-prompt")
    return " / ".join(parts)


def config_key(cfg: dict[str, Any]) -> str:
    """A canonical string of a resolved config without the keys that differ between seeds of one run."""
    return json.dumps({k: v for k, v in cfg.items() if k not in SEED_KEYS}, sort_keys=True, default=str)


def _tail_mean(records: list[dict[str, Any]], key: str, tail: int) -> float | None:
    vals = [float(r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return statistics.fmean(vals[-tail:]) if vals else None


def compare_runs(run_dirs: list[str | Path], tail: int = 3) -> list[dict[str, Any]]:
    """One summary row per run directory (missing pieces are ``None``)."""
    rows = []
    for d in map(Path, run_dirs):
        if not (d / "config.yaml").is_file():
            raise FileNotFoundError(f"{d} is not an rlkit run dir (no config.yaml)")
        recs = [r for r in read_metrics(d) if "step" in r]
        before, after = _read_json(d / "eval_before.json"), _read_json(d / "eval_after.json")
        summary = _read_json(d / "summary.json")
        peaks = [r["sys/mem_pss_peak_gib"] for r in recs if isinstance(r.get("sys/mem_pss_peak_gib"), (int, float))]
        summary_pss = (summary.get("peak_memory_gib") or {}).get("pss")
        if isinstance(summary_pss, (int, float)):  # a resumed run's summary saw only its last process
            peaks.append(summary_pss)
        rows.append({
            "run": d.name,
            "method": _method(d / "config.yaml"),
            "steps": int(max((r["step"] for r in recs), default=0)),
            "acc_before": before.get("accuracy"),
            "acc_after": after.get("accuracy"),
            "format_before": before.get("format_rate"),
            "format_after": after.get("format_rate"),
            "tokens_before": before.get("tokens_mean"),
            "tokens_after": after.get("tokens_mean"),
            "train_reward_tail": _tail_mean(recs, "reward/mean", tail),
            "train_tokens_tail": _tail_mean(recs, "response/len_mean", tail),
            "step_time_s": sum(float(r.get("time/step_s", 0.0)) for r in recs),
            "peak_pss_gib": max(peaks, default=None),
            **_split_values(d),
        })
    return rows


def _split_values(d: Path) -> dict[str, float | None]:
    """``{"acc_after:<split>": ..., "tokens_after:<split>": ...}`` from the run's ``eval_after_<split>.json``."""
    out: dict[str, float | None] = {}
    for f in sorted(d.glob("eval_after_*.json")):
        res = _read_json(f)
        name = f.stem[len("eval_after_"):]
        out[f"acc_after:{name}"], out[f"tokens_after:{name}"] = res.get("accuracy"), res.get("tokens_mean")
    return out


def split_names(rows: list[dict[str, Any]]) -> list[str]:
    """The extra held-out splits any row has, in first-seen order."""
    names: list[str] = []
    for r in rows:
        names += [k.split(":", 1)[1] for k in r if k.startswith("acc_after:") and not k.endswith(("_ci95", "_n"))
                  and k.split(":", 1)[1] not in names]
    return names


def _group_indices(run_dirs: list[Path], by_seed: bool) -> list[list[int]]:
    """Indices of ``run_dirs`` grouped by config (first-appearance order); singletons without ``by_seed``."""
    if not by_seed:
        return [[i] for i in range(len(run_dirs))]
    groups: dict[str, list[int]] = {}
    for i, d in enumerate(run_dirs):
        cfg = read_config(d / "config.yaml", fill_defaults=True)
        key = config_key(cfg) if cfg is not None else f"unreadable:{i}"  # an unreadable config stays alone
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def group_runs(run_dirs: list[str | Path], by_seed: bool = True) -> list[list[Path]]:
    """The run dirs grouped by resolved config up to ``seed`` / ``name`` / ``output_dir``."""
    dirs = [Path(d) for d in run_dirs]
    return [[dirs[i] for i in g] for g in _group_indices(dirs, by_seed)]


def run_seed(d: Path) -> int | None:
    """The ``seed`` in the run dir's saved config (``None`` if missing or not an integer)."""
    s = (read_config(d / "config.yaml") or {}).get("seed")
    return s if isinstance(s, int) else None


def _group_label(names: list[str], seeds: list[int | None]) -> str:
    stems = {re.sub(r"_s\d+$", "", n) for n in names}
    base = stems.pop() if len(stems) == 1 else ", ".join(names)
    return f"{base} [seeds {','.join('?' if s is None else str(s) for s in seeds)}]"


def _aggregate(rows: list[dict[str, Any]], dirs: list[Path]) -> dict[str, Any]:
    """One row for a group of seeds: ``key`` = mean, ``key_ci95`` = half-width, ``key_n`` = runs with a value."""
    seeds = [run_seed(d) for d in dirs]
    steps = sorted({r["steps"] for r in rows})
    out: dict[str, Any] = {
        "run": _group_label([r["run"] for r in rows], seeds),
        "method": rows[0]["method"],
        "steps": steps[0] if len(steps) == 1 else f"{steps[0]}–{steps[-1]}",
        "n": len(rows), "runs": [r["run"] for r in rows], "seeds": seeds,
    }
    split_keys = [f"{m}:{n}" for n in split_names(rows) for m in ("acc_after", "tokens_after")]
    for k in (*STAT_KEYS, *split_keys):
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k], out[f"{k}_ci95"] = mean_ci(vals)
        out[f"{k}_n"] = len(vals)
    times = [r["step_time_s"] for r in rows if r["step_time_s"] is not None]
    out["step_time_s"] = statistics.fmean(times) if times else None  # mean over the seeds
    peaks = [r["peak_pss_gib"] for r in rows if r["peak_pss_gib"] is not None]
    out["peak_pss_gib"] = max(peaks) if peaks else None  # the largest of the seeds
    return out


def compare_groups(run_dirs: list[str | Path], tail: int = 3, by_seed: bool = True) -> list[dict[str, Any]]:
    """``compare_runs`` rows, with each group of >= 2 seeds of one config merged into one row (see
    :func:`_aggregate`); a run alone in its group keeps its ``compare_runs`` row unchanged."""
    dirs = [Path(d) for d in run_dirs]
    rows = compare_runs(dirs, tail=tail)
    out = []
    for g in _group_indices(dirs, by_seed):
        out.append(rows[g[0]] if len(g) == 1 else _aggregate([rows[i] for i in g], [dirs[i] for i in g]))
    return out


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "—"
    if kind == "pct":
        return f"{100 * v:.1f}%"
    if kind == "min":
        return f"{v / 60:.1f} min"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def _cell(r: dict[str, Any], key: str, kind: str) -> str:
    """A value; for a group row ``mean ± half-width (n=k)`` (``mean (n=1)`` with one value)."""
    if f"{key}_n" not in r:
        return _fmt(r.get(key), kind)
    n = r[f"{key}_n"]
    if n == 0:
        return "—"
    hw = r[f"{key}_ci95"]
    return f"{_fmt(r[key], kind)} (n=1)" if hw is None else f"{_fmt(r[key], kind)} ± {_fmt(hw, kind)} (n={n})"


def format_markdown(rows: list[dict[str, Any]], baseline: int = 0) -> str:
    """A markdown table; the last column is each run's final tokens relative to row ``baseline``."""
    splits = split_names(rows)
    head = ("| run | method | steps | acc before → after | format after | tokens after | vs baseline tokens "
            + "".join(f"| {n} acc | {n} tokens " for n in splits)
            + "| train reward (last) | train tokens (last) | train time (sum of steps) | peak PSS |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    base = rows[baseline]["tokens_after"] if rows else None
    for r in rows:
        rel = (f"{100 * (r['tokens_after'] / base - 1):+.0f}%" if base and r["tokens_after"] is not None else "—")
        lines.append(
            f"| {r['run']} | {r['method']} | {r['steps']} | {_cell(r, 'acc_before', 'pct')} → "
            f"{_cell(r, 'acc_after', 'pct')} | {_cell(r, 'format_after', 'pct')} | "
            f"{_cell(r, 'tokens_after', 'num')} | {rel} | "
            + "".join(f"{_cell(r, 'acc_after:' + n, 'pct')} | {_cell(r, 'tokens_after:' + n, 'num')} | " for n in splits)
            + f"{_cell(r, 'train_reward_tail', 'num')} "
            f"| {_cell(r, 'train_tokens_tail', 'num')} | {_fmt(r['step_time_s'], 'min')} "
            f"| {_fmt(r['peak_pss_gib'], 'num')} GiB |"
        )
    if any("n" in r for r in rows):
        lines.append("\nRows over several seeds: mean ± half-width of the 95% confidence interval of the mean "
                     "(Student's t, n = seeds with that value); train time is the mean over the seeds, peak "
                     "PSS the largest.")
    return "\n".join(lines)


def _mean_band(runs: list[list[dict[str, Any]]], key: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per step logged by every run: ``(steps, mean, min, max)`` of ``key`` across the runs."""
    from rlkit.tools.plot import series

    per_run = [dict(zip(*series(rr, key))) for rr in runs]
    steps = sorted(set.intersection(*(set(s) for s in per_run))) if per_run else []
    vals = [[s[x] for s in per_run] for x in steps]
    return steps, [statistics.fmean(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def plot_compare(run_dirs: list[str | Path], out: str | Path, by_seed: bool = True) -> Path:
    """Overlay the runs' training reward, accuracy and response length per step in one PNG; a group of
    seeds (``by_seed``) is drawn as its mean curve with a min–max band across the seeds."""
    from rlkit.tools.plot import _draw, _finish, _new_figure, _save, series

    dirs = [Path(d) for d in run_dirs]
    groups = [[dirs[i] for i in g] for g in _group_indices(dirs, by_seed)]
    fig, axes = _new_figure(1, len(CURVES), size=(5 * len(CURVES), 3.8))
    recs = {d: read_metrics(d) for d in dirs}
    for ax, (key, title) in zip(axes[0], CURVES):
        for g in groups:
            if len(g) == 1:
                s = series(recs[g[0]], key)
                if s[0]:
                    _draw(ax, s, g[0].name)
                continue
            steps, mean, lo, hi = _mean_band([recs[d] for d in g], key)
            if steps:
                label = _group_label([d.name for d in g], [run_seed(d) for d in g])
                _draw(ax, (steps, mean), f"{label}: mean, band min–max over {len(g)} seeds")
                ax.fill_between(steps, lo, hi, color=ax.lines[-1].get_color(), alpha=0.2, linewidth=0)
        _finish(ax, title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _save(fig, Path(out))


def _budget_points(d: Path) -> dict[tuple[str, int], tuple[float, float]]:
    """``{(mode, budget): (accuracy, tokens_mean)}`` from a run's ``eval_budgets.json`` (``rlkit eval
    RUN --budgets ...``); empty if it has none."""
    from rlkit.tools.budget_eval import REPORT_NAME

    recs = _read_json(d / f"{REPORT_NAME}.json").get("records") or []
    return {(r["mode"], int(r["budget"])): (float(r["accuracy"]), float(r["tokens_mean"])) for r in recs
            if isinstance(r, dict) and {"mode", "budget", "accuracy", "tokens_mean"} <= set(r)}


def plot_compare_budgets(run_dirs: list[str | Path], out: str | Path, by_seed: bool = True) -> Path | None:
    """Accuracy against mean tokens per token budget, one line per run (or per group of seeds: the mean
    over the seeds that evaluated that budget), from the runs' ``eval_budgets.json``; ``None`` (nothing
    written) when no run has one."""
    from rlkit.tools.plot import plot_budget_curve

    dirs = [Path(d) for d in run_dirs]
    records = []
    for g in _group_indices(dirs, by_seed):
        members = [dirs[i] for i in g]
        points = [_budget_points(d) for d in members]
        done = [d for d, p in zip(members, points) if p]  # the label names the seeds that were evaluated
        if not done:
            continue
        label = members[0].name if len(g) == 1 else _group_label([d.name for d in done], [run_seed(d) for d in done])
        for mode, budget in sorted({k for p in points for k in p}):
            vals = [p[(mode, budget)] for p in points if (mode, budget) in p]
            records.append({"mode": label if mode == "unguided" else f"{label} ({mode})", "budget": budget,
                            "accuracy": statistics.fmean(v[0] for v in vals),
                            "tokens_mean": statistics.fmean(v[1] for v in vals)})
    if not records:
        return None
    return plot_budget_curve(records, out, title="held-out accuracy vs mean tokens at each token budget")
