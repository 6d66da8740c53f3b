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
    table = format_markdown(rows)
    assert "| short | grpo / ppo_clip / kimi | 4 | 25.0% → 45.0% |" in table
    assert "| -40% |" in table  # 24 tokens vs the baseline's 40


def test_compare_cli_writes_png_and_json(tmp_path, capsys):
    a = _run(tmp_path, "a", "grpo", 0.5, 40.0)
    b = _run(tmp_path, "b", "tempo", 0.55, 38.0)
    assert main(["compare", str(a), str(b), "--png", str(tmp_path / "c.png"), "--json", str(tmp_path / "c.json")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert [r["run"] for r in json.loads((tmp_path / "c.json").read_text())] == ["a", "b"]
    assert "| b | tempo / ppo_clip |" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "nope")]) == 2
