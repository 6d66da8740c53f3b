"""``rlkit compare``: the table reads each run's config, evals, metrics and summary."""

import json

import pytest
import yaml

from rlkit.cli import main
from rlkit.tools.compare import compare_runs, format_markdown


def _run(tmp_path, name, advantage, acc_after, tokens_after, shapers=()):
    d = tmp_path / name
    d.mkdir()
    cfg = {"algorithm": {"advantage": advantage, "policy_loss": "ppo_clip"},
           "reward": {"length_shapers": [{"name": s} for s in shapers]}, "data": {}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "eval_before.json").write_text(json.dumps({"accuracy": 0.25, "format_rate": 0.03, "tokens_mean": 56.0}))
    (d / "eval_after.json").write_text(json.dumps({"accuracy": acc_after, "format_rate": 0.9,
                                                   "tokens_mean": tokens_after}))
    with open(d / "metrics.jsonl", "w") as f:
        for step, (rew, n) in enumerate([(0.1, 60.0), (0.2, 50.0), (0.4, 40.0), (0.6, 30.0)], start=1):
            f.write(json.dumps({"step": step, "reward/mean": rew, "response/len_mean": n, "time/step_s": 30.0,
                                "sys/mem_pss_peak_gib": 5.0 + step / 10}) + "\n")
    return d


def test_compare_rows_and_table(tmp_path):
    a = _run(tmp_path, "grpo", "grpo", 0.5, 40.0)
    b = _run(tmp_path, "short", "grpo", 0.45, 24.0, shapers=["kimi"])
    rows = compare_runs([a, b], tail=2)
    assert rows[0]["method"] == "grpo / ppo_clip" and rows[1]["method"] == "grpo / ppo_clip / kimi"
    assert rows[1]["train_reward_tail"] == pytest.approx(0.5) and rows[1]["train_tokens_tail"] == pytest.approx(35.0)
    assert rows[0]["steps"] == 4 and rows[0]["step_time_s"] == pytest.approx(120.0)
    assert rows[0]["peak_pss_gib"] == pytest.approx(5.4)
    # a resumed run's summary saw only the last process: the larger of it and the steps' peaks counts
    (a / "summary.json").write_text(json.dumps({"peak_memory_gib": {"pss": 3.0}}))
    assert compare_runs([a])[0]["peak_pss_gib"] == pytest.approx(5.4)
    (a / "summary.json").write_text(json.dumps({"peak_memory_gib": {"pss": 6.5}}))
    assert compare_runs([a])[0]["peak_pss_gib"] == pytest.approx(6.5)
    table = format_markdown(rows)
    assert "| short | grpo / ppo_clip / kimi | 4 | 25.0% → 45.0% |" in table
    cfg = yaml.safe_load((b / "config.yaml").read_text())
    cfg["algorithm"].update(dynamic_sampling={"enabled": True}, overlong_shaping={"enabled": True})
    (b / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert compare_runs([b])[0]["method"] == "grpo / ppo_clip / kimi / dynamic sampling / overlong shaping"
    assert "| -40% |" in table  # 24 tokens vs the baseline's 40


def test_compare_cli_writes_png_and_json(tmp_path, capsys):
    a = _run(tmp_path, "a", "grpo", 0.5, 40.0)
    b = _run(tmp_path, "b", "tempo", 0.55, 38.0)
    assert main(["compare", str(a), str(b), "--png", str(tmp_path / "c.png"), "--json", str(tmp_path / "c.json")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert [r["run"] for r in json.loads((tmp_path / "c.json").read_text())] == ["a", "b"]
    assert "| b | tempo / ppo_clip |" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "nope")]) == 2


# ------------------------------------------------------------------ seeds: grouping and confidence intervals
def _seed_run(tmp_path, name, seed, acc_after, tokens_after=40.0, advantage="grpo", rewards=(0.1, 0.2, 0.4)):
    """A run dir as the trainer leaves it: the resolved config (seed / name / output_dir included)."""
    d = tmp_path / name
    d.mkdir()
    cfg = {"name": name, "output_dir": str(tmp_path), "seed": seed,
           "algorithm": {"advantage": advantage, "policy_loss": "ppo_clip"},
           "reward": {"length_shapers": []}, "data": {}, "train": {"steps": len(rewards)}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (d / "eval_before.json").write_text(json.dumps({"accuracy": 0.25, "format_rate": 0.1 * (seed + 1),
                                                    "tokens_mean": 56.0}))
    (d / "eval_after.json").write_text(json.dumps({"accuracy": acc_after, "format_rate": 0.9,
                                                   "tokens_mean": tokens_after}))
    with open(d / "metrics.jsonl", "w") as f:
        for step, rew in enumerate(rewards, start=1):
            f.write(json.dumps({"step": step, "reward/mean": rew + seed / 10, "acc/mean": rew,
                                "response/len_mean": 50.0 - step, "time/step_s": 10.0}) + "\n")
    return d


def test_t_quantiles_and_ci_half_width():
    from rlkit.tools.compare import mean_ci, t_quantile_975

    assert t_quantile_975(1) == pytest.approx(12.706205)
    assert t_quantile_975(2) == pytest.approx(4.302653)
    assert t_quantile_975(9) == pytest.approx(2.262157)
    assert t_quantile_975(30) == pytest.approx(2.042272)
    assert t_quantile_975(31) == t_quantile_975(200) == 1.96
    with pytest.raises(ValueError):
        t_quantile_975(0)
    mean, hw = mean_ci([0.5, 0.6, 0.7])  # sample std 0.1
    assert mean == pytest.approx(0.6) and hw == pytest.approx(4.302653 * 0.1 / 3 ** 0.5) == pytest.approx(0.2484138)
    mean, hw = mean_ci([10.0, 14.0])  # std 2*sqrt(2), n=2: 12.706205 * 2.828427 / 1.414214 = 25.41241
    assert mean == 12.0 and hw == pytest.approx(25.41241)
    assert mean_ci([0.3]) == (0.3, None) and mean_ci([]) == (None, None)
    assert mean_ci([0.4, 0.4, 0.4])[1] == 0.0


def test_t_table_matches_student_t_cdf():
    """Every tabulated quantile has CDF 0.975: the t density integrated numerically (Simpson)."""
    import math

    from rlkit.tools.compare import t_quantile_975

    for df in (1, 2, 3, 5, 10, 17, 30):
        c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
        t, n = t_quantile_975(df), 2000
        h = t / n
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        area = h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))
        assert 0.5 + area == pytest.approx(0.975, abs=2e-7), df


def test_seeds_of_one_config_form_one_group(tmp_path):
    from rlkit.tools.compare import compare_groups, group_runs

    runs = [_seed_run(tmp_path, f"q_s{s}", s, acc) for s, acc in zip((0, 1, 2), (0.5, 0.6, 0.7))]
    other = _seed_run(tmp_path, "tempo_s0", 0, 0.4, advantage="tempo")
    assert group_runs([runs[0], other, runs[1], runs[2]]) == [[runs[0], runs[1], runs[2]], [other]]
    assert group_runs(runs, by_seed=False) == [[r] for r in runs]
    rows = compare_groups([*runs, other], tail=2)
    assert len(rows) == 2
    g, single = rows
    assert single == compare_runs([other], tail=2)[0]  # a run alone keeps its plain row
    assert g["run"] == "q [seeds 0,1,2]" and g["n"] == 3 and g["seeds"] == [0, 1, 2]
    assert g["runs"] == ["q_s0", "q_s1", "q_s2"] and g["method"] == "grpo / ppo_clip" and g["steps"] == 3
    assert g["acc_after"] == pytest.approx(0.6) and g["acc_after_ci95"] == pytest.approx(0.2484138)
    assert g["acc_after_n"] == 3 and g["acc_before_ci95"] == 0.0
    assert g["format_before"] == pytest.approx(0.2) and g["format_before_ci95"] == pytest.approx(0.2484138)
    # train reward over the last 2 steps: 0.3 + seed/10 -> 0.3, 0.4, 0.5
    assert g["train_reward_tail"] == pytest.approx(0.4) and g["train_reward_tail_ci95"] == pytest.approx(0.2484138)
    assert g["step_time_s"] == pytest.approx(30.0)


def test_a_differing_config_key_splits_groups(tmp_path):
    from rlkit.tools.compare import compare_groups

    a = [_seed_run(tmp_path, f"a_s{s}", s, 0.5) for s in (0, 1)]
    b = [_seed_run(tmp_path, f"b_s{s}", s, 0.5, advantage="tempo") for s in (0, 1)]
    rows = compare_groups([a[0], b[0], a[1], b[1]])
    assert [r["runs"] for r in rows] == [["a_s0", "a_s1"], ["b_s0", "b_s1"]]
    assert [r["method"] for r in rows] == ["grpo / ppo_clip", "tempo / ppo_clip"]
    assert [r["run"] for r in compare_groups([a[0], b[0], a[1], b[1]], by_seed=False)] == [
        "a_s0", "b_s0", "a_s1", "b_s1"]


def test_group_markdown_and_missing_values(tmp_path):
    from rlkit.tools.compare import compare_groups

    runs = [_seed_run(tmp_path, f"q_s{s}", s, acc) for s, acc in zip((0, 1, 2), (0.5, 0.6, 0.7))]
    table = format_markdown(compare_groups(runs))
    assert "| q [seeds 0,1,2] | grpo / ppo_clip | 3 | 25.0% ± 0.0% (n=3) → 60.0% ± 24.8% (n=3) |" in table
    assert "40.00 ± 0.00 (n=3)" in table and "95% confidence interval" in table
    (runs[2] / "eval_after.json").unlink()  # one seed without its final eval: n counts the values present
    (runs[1] / "eval_after.json").write_text(json.dumps({"accuracy": 0.6}))
    g = compare_groups(runs)[0]
    assert g["acc_after"] == pytest.approx(0.55) and g["acc_after_n"] == 2
    table = format_markdown([g])
    assert "→ 55.0% ± 63.5% (n=2) | 90.0% (n=1) |" in table
    assert "| — | 0.00 |" not in table and "| 40.00 (n=1) |" in table


def test_single_runs_table_unchanged_by_grouping(tmp_path):
    from rlkit.tools.compare import compare_groups

    a = _run(tmp_path, "grpo", "grpo", 0.5, 40.0)
    b = _run(tmp_path, "short", "grpo", 0.45, 24.0, shapers=["kimi"])
    assert format_markdown(compare_groups([a, b], tail=2)) == format_markdown(compare_runs([a, b], tail=2))


def test_compare_cli_by_seed(tmp_path, capsys):
    runs = [_seed_run(tmp_path, f"q_s{s}", s, acc) for s, acc in zip((0, 1, 2), (0.5, 0.6, 0.7))]
    png, js = tmp_path / "g.png", tmp_path / "g.json"
    assert main(["compare", *map(str, runs), "--png", str(png), "--json", str(js)]) == 0
    out, diag = capsys.readouterr().out.split("Method diagnostics:")
    assert "± " in out and "(n=3)" in out and out.count("| q [seeds 0,1,2] |") == 1 and "| q_s" not in out
    assert diag.count("| q [seeds 0,1,2] |") == 1
    assert png.stat().st_size > 1000
    rows = json.loads(js.read_text())
    assert len(rows) == 1 and rows[0]["acc_after_ci95"] == pytest.approx(0.2484138)
    assert main(["compare", *map(str, runs), "--no-by-seed", "--json", str(js)]) == 0
    out = capsys.readouterr().out.split("Method diagnostics:")[0]
    assert "± " not in out and "(n=" not in out and out.count("| q_s") == 3
    assert [r["run"] for r in json.loads(js.read_text())] == ["q_s0", "q_s1", "q_s2"]


def test_plot_compare_draws_a_band_per_group(tmp_path):
    from rlkit.infra.tracking import read_metrics
    from rlkit.tools.compare import _mean_band, plot_compare

    runs = [_seed_run(tmp_path, f"q_s{s}", s, 0.5) for s in (0, 1, 2)]
    _seed_run(tmp_path, "short_s3", 3, 0.5, rewards=(0.1, 0.2))
    steps, mean, lo, hi = _mean_band([read_metrics(d) for d in [*runs, tmp_path / "short_s3"]], "reward/mean")
    assert steps == [1, 2]  # only the steps every seed logged
    assert mean == pytest.approx([0.25, 0.35]) and lo == pytest.approx([0.1, 0.2]) and hi == pytest.approx([0.4, 0.5])
    assert plot_compare(runs, tmp_path / "band.png").stat().st_size > 1000
