"""Paired-by-seed differences against the baseline group in ``rlkit compare`` (hand-computed values)."""

import json

import pytest
import yaml

from rlkit.cli import main
from rlkit.tools.compare import group_runs
from rlkit.tools.paired import format_paired, paired_differences


def _run(tmp_path, name, seed, advantage, acc, tokens, ood=None, boxed=0.9):
    d = tmp_path / name
    d.mkdir()
    cfg = {"name": name, "output_dir": str(tmp_path), "seed": seed,
           "algorithm": {"advantage": advantage, "policy_loss": "ppo_clip"}, "reward": {"length_shapers": []},
           "data": {}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "eval_after.json").write_text(json.dumps({"accuracy": acc, "format_rate": boxed, "tokens_mean": tokens}))
    if ood is not None:
        (d / "eval_after_ood.json").write_text(json.dumps({"accuracy": ood, "tokens_mean": 2 * tokens}))
    (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.1, "time/step_s": 1.0}) + "\n")
    return d


def _runs(tmp_path):
    base = [_run(tmp_path, f"g_s{s}", s, "grpo", a, n, ood=o)
            for s, a, n, o in ((0, 0.25, 50.0, 0.05), (1, 0.30, 40.0, 0.10), (2, 0.35, 60.0, 0.00))]
    # seed 3 has no baseline partner: it is left out of the pairing
    other = [_run(tmp_path, f"t_s{s}", s, "tempo", a, n, ood=o, boxed=b)
             for s, a, n, o, b in ((0, 0.35, 25.0, 0.05, 0.8), (1, 0.30, 30.0, 0.15, 0.9), (2, 0.50, 30.0, 0.05, 1.0),
                                   (3, 0.90, 10.0, 0.50, 1.0))]
    lone = [_run(tmp_path, "s_s0", 0, "spae", 0.20, 55.0, ood=0.0)]
    return base, other, lone


def test_paired_differences_worked_example(tmp_path):
    base, other, lone = _runs(tmp_path)
    rows = paired_differences(group_runs([*base, *other, *lone]))
    assert [r["run"] for r in rows] == ["t_s0, t_s1, t_s2, t_s3", "s_s0"]
    t, s = rows
    assert t["seeds"] == [0, 1, 2]
    # accuracy: +0.10, 0.00, +0.15 -> mean 0.083333; sample sd 0.076376; half-width t(0.975, 2) * sd / sqrt(3)
    assert t["acc_after_values"] == pytest.approx([0.10, 0.0, 0.15])
    assert t["acc_after"] == pytest.approx(0.0833333, abs=1e-6)
    assert t["acc_after_ci95"] == pytest.approx(4.302653 * 0.0763763 / 3 ** 0.5, abs=1e-6)
    # tokens: relative change per seed, 25/50 - 1, 30/40 - 1, 30/60 - 1
    assert t["tokens_after_values"] == pytest.approx([-0.5, -0.25, -0.5])
    assert t["tokens_after"] == pytest.approx(-0.4166667, abs=1e-6)
    assert t["acc_after:ood_values"] == pytest.approx([0.0, 0.05, 0.05])
    assert t["format_after_values"] == pytest.approx([-0.1, 0.0, 0.1])
    # one shared seed: the difference, no interval
    assert s["seeds"] == [0] and s["acc_after"] == pytest.approx(-0.05) and s["acc_after_ci95"] is None
    table = format_paired(rows, "g [seeds 0,1,2]")
    assert "Paired by seed against g [seeds 0,1,2]" in table
    assert "| t_s0, t_s1, t_s2, t_s3 | 0,1,2 | +8.3 ± 19.0 pts (n=3: +10.0, +0.0, +15.0) |" in table
    assert "-41.7 ± 35.9 % (n=3: -50.0, -25.0, -50.0) |" in table
    assert "| s_s0 | 0 | -5.0 pts (n=1) | -5.0 pts (n=1) |" in table
    assert "ood accuracy Δ" in table


def test_no_pairs_no_table(tmp_path):
    base, other, _ = _runs(tmp_path)
    assert paired_differences(group_runs(base)) == []  # one group only
    assert paired_differences(group_runs([base[0], other[3]])) == []  # seeds 0 and 3 share nothing
    assert format_paired([], "g") == ""


def test_compare_cli_prints_the_paired_table(tmp_path, capsys):
    base, other, _ = _runs(tmp_path)
    assert main(["compare", *map(str, base), *map(str, other)]) == 0
    out = capsys.readouterr().out
    assert out.index("Paired by seed against g [seeds 0,1,2]") < out.index("Method diagnostics:")
    assert main(["compare", *map(str, base), *map(str, other), "--no-by-seed"]) == 0
    assert "Paired by seed" not in capsys.readouterr().out
