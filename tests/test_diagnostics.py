"""Method diagnostics in ``rlkit compare``: first / last / mean of each method's own per-step statistics."""

import json

import pytest
import yaml

from rlkit.cli import main
from rlkit.tools.diagnostics import format_diagnostics, group_diagnostics, run_diagnostics


def _run(tmp_path, name, seed, records):
    d = tmp_path / name
    d.mkdir()
    cfg = {"name": name, "output_dir": str(tmp_path), "seed": seed,
           "algorithm": {"advantage": "spae", "policy_loss": "ppo_clip"}, "reward": {"length_shapers": []},
           "data": {}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    with open(d / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"event": "start"}) + "\n")  # a record without a step is not a step
        for step, rec in enumerate(records, start=1):
            f.write(json.dumps({"step": step, **rec}) + "\n")
    return d


def test_run_diagnostics_first_last_mean_and_kept_keys(tmp_path):
    d = _run(tmp_path, "a", 0, [
        {"spae/num_steps_mean": 2.0, "actor/entropy": 0.7, "spae/probe_time_s": 3.0, "reward/mean": 0.1},
        {"spae/num_steps_mean": 1.0, "actor/entropy": 0.6, "spae/probe_engine_calls": 4, "tempo/branch_frac": 0.2},
        {"spae/num_steps_mean": 3.0, "actor/entropy": 0.5, "actor/clip_frac": 0.0},
    ])
    diag = run_diagnostics(d)
    assert set(diag) == {"spae/num_steps_mean", "actor/entropy", "tempo/branch_frac", "actor/clip_frac"}
    assert diag["spae/num_steps_mean"] == {"first": 2.0, "last": 3.0, "mean": 2.0}
    assert diag["actor/entropy"]["mean"] == pytest.approx(0.6)
    assert diag["tempo/branch_frac"] == {"first": 0.2, "last": 0.2, "mean": 0.2}  # logged at one step only


def test_group_diagnostics_averages_the_runs_that_logged_a_key(tmp_path):
    a = _run(tmp_path, "a", 0, [{"hapo/high_entropy_frac": 0.1}, {"hapo/high_entropy_frac": 0.3}])
    b = _run(tmp_path, "b", 1, [{"hapo/high_entropy_frac": 0.3}, {"hapo/high_entropy_frac": 0.5,
                                                                   "hapo/eps_high_mean": 0.28}])
    g = group_diagnostics([a, b])
    assert g["hapo/high_entropy_frac"] == pytest.approx({"first": 0.2, "last": 0.4, "mean": 0.3})
    assert g["hapo/eps_high_mean"] == pytest.approx({"first": 0.28, "last": 0.28, "mean": 0.28})


def test_format_diagnostics_row():
    table = format_diagnostics([
        ("spae_s0", {"actor/entropy": {"first": 0.72, "last": 0.5, "mean": 0.6},
                     "spae/no_step_frac": {"first": 0.25, "last": 0.0, "mean": 0.125}}),
        ("grpo_s0", {}),
    ])
    lines = table.splitlines()
    assert lines[2] == "| spae_s0 | 0.72 → 0.5 | — | `spae/no_step_frac` 0.25 → 0 (0.125) |"
    assert lines[3] == "| grpo_s0 | — | — | — |"


def test_compare_cli_prints_diagnostics_per_group(tmp_path, capsys):
    runs = [_run(tmp_path, f"q_s{s}", s, [{"spae/num_steps_mean": 1.0 + s}, {"spae/num_steps_mean": 2.0 + s}])
            for s in (0, 1)]
    assert main(["compare", *map(str, runs)]) == 0
    out = capsys.readouterr().out
    assert "Method diagnostics:" in out
    assert "| q [seeds 0,1] | — | — | `spae/num_steps_mean` 1.5 → 2.5 (2) |" in out


def _budgets(d, points):
    recs = [{"mode": "unguided", "budget": b, "accuracy": a, "tokens_mean": t} for b, a, t in points]
    (d / "eval_budgets.json").write_text(json.dumps({"problems": 64, "records": recs}))


def test_compare_overlays_the_runs_budget_curves(tmp_path, capsys, monkeypatch):
    from rlkit.tools.compare import plot_compare_budgets

    runs = [_run(tmp_path, f"q_s{s}", s, [{"reward/mean": 0.1}]) for s in (0, 1)]
    other = _run(tmp_path, "k_s0", 0, [{"reward/mean": 0.1}])
    (other / "config.yaml").write_text((other / "config.yaml").read_text().replace("spae", "grpo"))
    assert plot_compare_budgets([*runs, other], tmp_path / "none.png") is None  # no run has a curve
    assert not (tmp_path / "none.png").exists()
    _budgets(runs[0], [(32, 0.1, 30.0), (64, 0.3, 50.0)])
    _budgets(runs[1], [(32, 0.2, 32.0), (64, 0.4, 60.0)])
    _budgets(other, [(32, 0.25, 20.0)])
    calls = []
    import rlkit.tools.plot as plot

    real = plot.plot_budget_curve
    monkeypatch.setattr(plot, "plot_budget_curve",
                        lambda records, out, title="": calls.append(records) or real(records, out, title))
    png = plot_compare_budgets([*runs, other], tmp_path / "b.png")
    assert png.stat().st_size > 1000
    by = {(r["mode"], r["budget"]): (r["accuracy"], r["tokens_mean"]) for r in calls[0]}
    assert by[("q [seeds 0,1]", 32)] == pytest.approx((0.15, 31.0)) and by[("q [seeds 0,1]", 64)] == pytest.approx((0.35, 55.0))
    assert by[("k_s0", 32)] == (0.25, 20.0) and len(by) == 3
    # a third seed without a budget evaluation: the line still averages, and is labelled by, seeds 0 and 1
    third = _run(tmp_path, "q_s2", 2, [{"reward/mean": 0.1}])
    calls.clear()
    plot_compare_budgets([*runs, third], tmp_path / "b3.png")
    assert {r["mode"] for r in calls[0]} == {"q [seeds 0,1]"}
    assert main(["compare", *map(str, runs), str(other), "--png", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c_budgets.png").stat().st_size > 1000
    assert "c_budgets.png" in capsys.readouterr().out
