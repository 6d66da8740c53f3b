"""``rlkit compare RUN_DIR...``: one table (and one figure) for runs that differ in method or reward.

Per run: the method (advantage / policy loss / length shapers), steps done, held-out accuracy and
``\\boxed{}`` rate before and after training (``eval_before.json`` / ``eval_after.json``), mean response
tokens of the final greedy evaluation, the training reward and response length averaged over the last
``tail`` steps, wall time of the steps and the peak memory. The figure overlays the runs' training
reward, accuracy and response length per step.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from rlkit.infra.tracking import read_metrics

__all__ = ["compare_runs", "format_markdown", "plot_compare"]

CURVES = (("reward/mean", "training reward"), ("acc/mean", "training accuracy"),
          ("response/len_mean", "response tokens"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _method(cfg_path: Path) -> str:
    import yaml

    try:
        c = yaml.safe_load(cfg_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return "?"
    a = c.get("algorithm", {})
    parts = [str(a.get("advantage", "?")), str(a.get("policy_loss", "?"))]
    shapers = [s.get("name", "?") for s in c.get("reward", {}).get("length_shapers", []) or []]
    if shapers:
        parts.append("+".join(shapers))
    if (c.get("data") or {}).get("budget"):
        parts.append("budget-in-prompt")
    return " / ".join(parts)


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
        rows.append({
            "run": d.name,
            "method": _method(d / "config.yaml"),
            "steps": int(max((r["step"] for r in recs), default=0)),
            "acc_before": before.get("accuracy"),
            "acc_after": after.get("accuracy"),
            "format_after": after.get("format_rate"),
            "tokens_before": before.get("tokens_mean"),
            "tokens_after": after.get("tokens_mean"),
            "train_reward_tail": _tail_mean(recs, "reward/mean", tail),
            "train_tokens_tail": _tail_mean(recs, "response/len_mean", tail),
            "step_time_s": sum(float(r.get("time/step_s", 0.0)) for r in recs),
            "peak_pss_gib": (summary.get("peak_memory_gib") or {}).get("pss") or (max(peaks) if peaks else None),
        })
    return rows


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "—"
    if kind == "pct":
        return f"{100 * v:.1f}%"
    if kind == "min":
        return f"{v / 60:.1f} min"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def format_markdown(rows: list[dict[str, Any]], baseline: int = 0) -> str:
    """A markdown table; the last column is each run's final tokens relative to row ``baseline``."""
    head = ("| run | method | steps | acc before → after | format after | tokens after | vs baseline tokens "
            "| train reward (last) | train tokens (last) | train time (sum of steps) | peak PSS |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    base = rows[baseline]["tokens_after"] if rows else None
    for r in rows:
        rel = (f"{100 * (r['tokens_after'] / base - 1):+.0f}%" if base and r["tokens_after"] is not None else "—")
        lines.append(
            f"| {r['run']} | {r['method']} | {r['steps']} | {_fmt(r['acc_before'], 'pct')} → "
            f"{_fmt(r['acc_after'], 'pct')} | {_fmt(r['format_after'], 'pct')} | {_fmt(r['tokens_after'], 'num')} "
            f"| {rel} | {_fmt(r['train_reward_tail'], 'num')} | {_fmt(r['train_tokens_tail'], 'num')} "
            f"| {_fmt(r['step_time_s'], 'min')} | {_fmt(r['peak_pss_gib'], 'num')} GiB |"
        )
    return "\n".join(lines)


def plot_compare(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Overlay the runs' training reward, accuracy and response length per step in one PNG."""
    from rlkit.tools.plot import _draw, _finish, _new_figure, _save, series

    fig, axes = _new_figure(1, len(CURVES), size=(5 * len(CURVES), 3.8))
    recs = {Path(d).name: read_metrics(d) for d in run_dirs}
    for ax, (key, title) in zip(axes[0], CURVES):
        for name, rr in recs.items():
            s = series(rr, key)
            if s[0]:
                _draw(ax, s, name)
        _finish(ax, title)
        ax.legend(fontsize=7)
    return _save(fig, Path(out))
