"""Tests for rlkit.tools.plot: PNG curves from metrics.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from rlkit.infra.tracking import Tracker  # noqa: E402
from rlkit.tools.plot import ema, plot_run, series  # noqa: E402


def _write_run(run_dir: Path, n: int, keys: dict[str, float]) -> None:
    with Tracker(run_dir, total_steps=n, tensorboard=False, console=False) as tr:
        for step in range(n):
            tr.log(step, {k: v + 0.1 * math.sin(step) for k, v in keys.items()})


ALL = {
    "reward/mean": 0.3, "reward/std": 0.2, "acc/mean": 0.4, "response/len_mean": 200.0,
    "response/len_max": 512.0, "response/clip_rate": 0.05, "actor/entropy": 0.7,
    "actor/pg_loss": 0.01, "actor/kl": 0.001, "actor/grad_norm": 1.2,
}


@pytest.mark.parametrize("n", [5, 30])  # with and without EMA smoothing
def test_plot_all_figures(tmp_path: Path, n: int) -> None:
    _write_run(tmp_path, n, ALL)
    paths = plot_run(tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["entropy.png", "length.png", "loss.png", "overview.png", "reward.png"]
    for p in paths:
        assert p.parent == tmp_path / "plots"
        assert p.stat().st_size > 1000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_keys_skipped_and_nan(tmp_path: Path) -> None:
    _write_run(tmp_path, 4, {"reward/mean": 0.5, "actor/kl": float("nan")})
    out = tmp_path / "figs"
    paths = plot_run(tmp_path, out_dir=out)
    assert sorted(p.name for p in paths) == ["overview.png", "reward.png"]
    assert all(p.parent == out and p.stat().st_size > 0 for p in paths)


def test_custom_overview_keys(tmp_path: Path) -> None:
    _write_run(tmp_path, 3, {"rollout/tokens_per_s": 100.0, "reward/mean": 0.1})
    paths = plot_run(tmp_path, keys=["rollout/tokens_per_s", "not/present"])
    assert {p.name for p in paths} == {"reward.png", "overview.png"}


def test_missing_or_empty_metrics_raise(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no metric records"):
        plot_run(tmp_path)


def test_series_dedupes_steps_and_ema() -> None:
    recs = [{"step": 1, "x": 1.0}, {"step": 0, "x": 0.0}, {"step": 1, "x": 2.0},
            {"step": 2, "x": None}, {"step": 3}]
    assert series(recs, "x") == ([0, 1], [0.0, 2.0])
    # Debiased EMA, weight 0.5: [2, (0.5*0.5*2 + 0.5*4)/0.75 = 3.333...]
    assert ema([2.0, 4.0], weight=0.5) == pytest.approx([2.0, 10 / 3])


def test_torn_last_line_is_ignored(tmp_path: Path) -> None:
    lines = [json.dumps({"step": s, "reward/mean": s / 10}) for s in range(3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 3, "rew')
    assert {p.name for p in plot_run(tmp_path)} == {"reward.png", "overview.png"}
