"""Training curves from ``run_dir/metrics.jsonl`` as PNG files (matplotlib, Agg, no pyplot).

``plot_run`` writes, for the keys that are present:

* ``reward.png``  — ``reward/mean`` with a ±``reward/std`` band, and ``acc/mean``
* ``length.png``  — ``response/len_mean``, ``response/len_max``; ``response/clip_rate`` on a twin axis
* ``entropy.png`` — ``actor/entropy``
* ``loss.png``    — ``actor/pg_loss``, ``actor/kl``, ``actor/grad_norm`` (one panel each: scales differ)
* ``overview.png`` — a grid with every available key among the above (or ``keys`` when given)

``plot_budget_curve`` draws the accuracy-vs-mean-tokens curve of ``rlkit eval --budgets`` (one line
per decoding mode, points labelled by budget).

Raw points are drawn faintly with a debiased EMA (TensorBoard-style smoothing) on top once a series
has more than 20 points. Figures are built with ``matplotlib.figure.Figure`` rather than pyplot, so
plotting never touches global backend state and is safe inside a running trainer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rlkit.infra.tracking import METRICS_FILE, read_metrics

__all__ = ["plot_run", "plot_budget_curve", "series", "ema"]

SMOOTHING = 0.6  # EMA weight on the previous value (TensorBoard's default slider value)
SMOOTH_MIN_POINTS = 20
OVERVIEW_KEYS = (
    "reward/mean",
    "acc/mean",
    "response/len_mean",
    "response/len_max",
    "response/clip_rate",
    "actor/entropy",
    "actor/pg_loss",
    "actor/kl",
    "actor/grad_norm",
)
Series = tuple[list[float], list[float]]


def series(records: list[dict[str, Any]], key: str) -> Series:
    """``(steps, values)`` of ``key`` sorted by step; null/missing values are skipped and, when a
    step was logged more than once, the last value wins."""
    by_step: dict[float, float] = {}
    for rec in records:
        v, s = rec.get(key), rec.get("step")
        if isinstance(v, (int, float)) and isinstance(s, (int, float)) and math.isfinite(v):
            by_step[s] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def ema(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Debiased exponential moving average (as TensorBoard's smoothing slider).

    >>> ema([1.0, 1.0, 1.0])
    [1.0, 1.0, 1.0]
    """
    out: list[float] = []
    last, norm = 0.0, 0.0
    for v in values:
        last = weight * last + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(last / norm)
    return out


def _draw(ax: Any, s: Series, label: str, color: str | None = None) -> None:
    """Raw curve, plus its EMA when there are enough points."""
    steps, vals = s
    if len(steps) > SMOOTH_MIN_POINTS:
        (raw,) = ax.plot(steps, vals, color=color, alpha=0.3, linewidth=0.8)
        ax.plot(steps, ema(vals), color=raw.get_color(), linewidth=1.6, label=label)
    else:
        ax.plot(steps, vals, color=color, marker="o", markersize=2.5, linewidth=1.2, label=label)


def _new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (7, 4)) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _finish(ax: Any, title: str, ylabel: str = "") -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def _plot_reward(data: dict[str, Series], out: Path) -> Path | None:
    if "reward/mean" not in data and "acc/mean" not in data:
        return None
    fig, axes = _new_figure()
    ax = axes[0][0]
    if "reward/mean" in data:
        _draw(ax, data["reward/mean"], "reward/mean", color="C0")
        if "reward/std" in data:
            std = dict(zip(*data["reward/std"]))
            pts = [(s, m, std[s]) for s, m in zip(*data["reward/mean"]) if s in std]
            if pts:
                xs = [p[0] for p in pts]
                ax.fill_between(
                    xs,
                    [m - sd for _, m, sd in pts],
                    [m + sd for _, m, sd in pts],
                    color="C0",
                    alpha=0.15,
                    label="±reward/std",
                )
    if "acc/mean" in data:
        _draw(ax, data["acc/mean"], "acc/mean", color="C2")
    _finish(ax, "reward / accuracy")
    ax.legend(fontsize=8, loc="best")
    return _save(fig, out / "reward.png")


def _plot_length(data: dict[str, Series], out: Path) -> Path | None:
    keys = [k for k in ("response/len_mean", "response/len_max") if k in data]
    if not keys and "response/clip_rate" not in data:
        return None
    fig, axes = _new_figure()
    ax = axes[0][0]
    for i, k in enumerate(keys):
        _draw(ax, data[k], k, color=f"C{i}")
    handles, labels = ax.get_legend_handles_labels()
    ax.set_ylabel("tokens")
    if "response/clip_rate" in data:
        ax2 = ax.twinx()
        _draw(ax2, data["response/clip_rate"], "response/clip_rate", color="C3")
        ax2.set_ylabel("clip rate")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    _finish(ax, "response length")
    ax.legend(handles, labels, fontsize=8, loc="best")
    return _save(fig, out / "length.png")


def _plot_single_panel(
    data: dict[str, Series], keys: list[str], out_file: Path, title: str
) -> Path | None:
    present = [k for k in keys if k in data]
    if not present:
        return None
    fig, axes = _new_figure(len(present), 1, size=(7, 2.6 * len(present) + 0.6))
    for ax_row, k in zip(axes, present):
        ax = ax_row[0]
        _draw(ax, data[k], k)
        _finish(ax, k)
    fig.suptitle(title, fontsize=11)
    return _save(fig, out_file)


def _plot_overview(data: dict[str, Series], keys: list[str], out: Path) -> Path | None:
    present = [k for k in keys if k in data]
    if not present:
        return None
    ncols = min(3, len(present))
    nrows = math.ceil(len(present) / ncols)
    fig, axes = _new_figure(nrows, ncols, size=(4.2 * ncols, 3.0 * nrows))
    flat = [ax for row in axes for ax in row]
    for ax, k in zip(flat, present):
        _draw(ax, data[k], k)
        _finish(ax, k)
    for ax in flat[len(present) :]:
        ax.set_visible(False)
    return _save(fig, out / "overview.png")


def plot_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    keys: list[str] | tuple[str, ...] | None = None,
) -> list[Path]:
    """Write PNG training curves of the run in ``run_dir`` and return their paths.

    Args:
        run_dir: run directory containing ``metrics.jsonl``.
        out_dir: where to write the PNGs (default ``run_dir/plots``).
        keys: metric keys for ``overview.png`` (default: the standard keys above that are present).
            Keys absent from the metrics are skipped.

    Raises:
        FileNotFoundError: ``metrics.jsonl`` does not exist.
        ValueError: it contains no metric records.
    """
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}: is it an rlkit run directory?")
    records = read_metrics(path)
    if not records:
        raise ValueError(f"{path} has no metric records yet; nothing to plot")
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)

    wanted = set(OVERVIEW_KEYS) | {"reward/std"} | set(keys or ())
    data: dict[str, Series] = {}
    for k in wanted:
        s = series(records, k)
        if s[0]:
            data[k] = s

    written = [
        _plot_reward(data, out),
        _plot_length(data, out),
        _plot_single_panel(data, ["actor/entropy"], out / "entropy.png", "policy entropy"),
        _plot_single_panel(
            data, ["actor/pg_loss", "actor/kl", "actor/grad_norm"], out / "loss.png", "actor"
        ),
        _plot_overview(data, list(keys) if keys else list(OVERVIEW_KEYS), out),
    ]
    return [p for p in written if p is not None]


def plot_budget_curve(
    records: list[dict[str, Any]] | tuple[dict[str, Any], ...],
    out_file: str | Path,
    title: str = "accuracy vs tokens",
) -> Path:
    """Accuracy (y, %) against mean response tokens (x) per budget: one line per ``mode``, each
    point labelled with its budget (the Pareto view of ``rlkit eval --budgets``).

    ``records``: dicts with ``mode``, ``budget``, ``accuracy`` (0..1) and ``tokens_mean``.
    """
    if not records:
        raise ValueError("no budget records to plot")
    fig, axes = _new_figure(size=(6.5, 4.2))
    ax = axes[0][0]
    modes = list(dict.fromkeys(r["mode"] for r in records))
    for i, mode in enumerate(modes):
        pts = sorted((r for r in records if r["mode"] == mode), key=lambda r: r["budget"])
        xs = [float(r["tokens_mean"]) for r in pts]
        ys = [100.0 * float(r["accuracy"]) for r in pts]
        # distinct marker + dash per mode: identical curves (e.g. guidance that never fires) stay visible
        ax.plot(xs, ys, marker="os^D"[i % 4], markersize=5 - i, linewidth=1.4, linestyle=("-", "--", ":")[i % 3],
                color=f"C{i}", label=mode)
        for r, x, y in zip(pts, xs, ys):
            ax.annotate(f"b={r['budget']}", (x, y), textcoords="offset points", xytext=(4, 4 + 8 * i),
                        fontsize=7, color=f"C{i}")
    ax.margins(x=0.08, y=0.12)  # room for the budget labels
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("mean response tokens")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, out)
