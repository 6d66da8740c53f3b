"""Extra held-out splits (``eval.splits``): drawn from the run's source with keys changed, never
overlapping training, reported by ``rlkit compare``; bad entries are one-line errors."""

import json
import re

import pytest
import yaml

from rlkit.config import load_config
from rlkit.infra.data import DataError, load_run_rows
from rlkit.infra.eval_splits import load_eval_splits

QUICKSTART = "recipes/quickstart.yaml"


def _cfg(*overrides):
    return load_config(QUICKSTART, ["data.generator={n: 300, max_value: 9, ops: ['+', '-'], n_terms: 3}",
                                    "data.eval_size=16", *overrides])


def test_an_ood_split_has_the_changed_keys_and_no_training_prompt():
    cfg = _cfg("eval.splits={ood: {generator: {n_terms: 4}, size: 20}, near: {generator: {max_value: 12}}}")
    train, held = load_run_rows(cfg)[:2]
    splits = load_eval_splits(cfg, train, held)
    assert list(splits) == ["ood", "near"]
    assert len(splits["ood"]) == 20 and len(splits["near"]) == 64  # the default size
    for r in splits["ood"]:  # four terms: an opening and three steps before the question
        assert len(re.findall(r"\d+", r["prompt"])) == 4
    seen = {r["prompt"] for r in [*train, *held]}
    assert not seen & {r["prompt"] for rows in splits.values() for r in rows}
    # a split whose keys draw overlapping problems keeps only the new ones
    assert any(max(int(x) for x in re.findall(r"\d+", r["prompt"])) > 9 for r in splits["near"])


@pytest.mark.parametrize("split, message", [
    ("{ood: {size: 8}}", r"eval.splits.ood: give the keys that make it differ"),
    ("{'o o d': {generator: {n_terms: 4}}}", r"eval.splits.o o d: a split name may hold"),
    ("{ood: {path: x.jsonl}}", r"eval.splits.ood.path: data.source=arithmetic is generated"),
    ("{ood: {generator: {n_terms: 1}}}", r"eval.splits.ood: n_terms must be >= 2"),
    ("{ood: {generator: {max_value: 9}}}", r"eval.splits.ood: every problem it drew is also in training"),
])
def test_bad_splits_are_one_line_errors(split, message):
    cfg = _cfg(f"eval.splits={split}")
    train, held = load_run_rows(cfg)[:2]
    with pytest.raises(DataError, match=message) as e:
        load_eval_splits(cfg, train, held)
    assert "\n" not in str(e.value)


def test_unknown_split_key_is_a_config_error():
    from rlkit.compose import ConfigError

    with pytest.raises(ConfigError, match="eval.splits.ood.n_terms"):
        _cfg("eval.splits={ood: {n_terms: 4}}")


def test_compare_reports_split_accuracy_with_intervals(tmp_path):
    from rlkit.tools.compare import compare_groups, format_markdown

    dirs = []
    for seed, acc in zip((0, 1, 2), (0.2, 0.3, 0.4)):
        d = tmp_path / f"m_s{seed}"
        d.mkdir()
        (d / "config.yaml").write_text(yaml.safe_dump({"name": d.name, "seed": seed, "output_dir": str(tmp_path),
                                                       "algorithm": {"advantage": "grpo", "policy_loss": "ppo_clip"},
                                                       "reward": {"length_shapers": []}}))
        (d / "eval_after.json").write_text(json.dumps({"accuracy": 0.5, "tokens_mean": 40.0}))
        (d / "eval_after_ood.json").write_text(json.dumps({"accuracy": acc, "tokens_mean": 60.0}))
        (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.1}) + "\n")
        dirs.append(d)
    single = compare_groups(dirs[:1])[0]
    assert single["acc_after:ood"] == 0.2 and single["tokens_after:ood"] == 60.0
    g = compare_groups(dirs)[0]
    assert g["acc_after:ood"] == pytest.approx(0.3) and g["acc_after:ood_ci95"] == pytest.approx(0.2484138)
    table = format_markdown([g])
    assert "| ood acc | ood tokens |" in table
    assert "| 30.0% ± 24.8% (n=3) | 60.00 ± 0.00 (n=3) |" in table


def test_names_loads_only_the_named_splits():
    cfg = _cfg("eval.splits={ood: {generator: {n_terms: 4}, size: 5}, bad: {size: 8}}")
    train, held = load_run_rows(cfg)[:2]
    assert list(load_eval_splits(cfg, train, held, names=["ood"])) == ["ood"]  # the bad entry is not read
    with pytest.raises(DataError, match="eval.splits.bad"):
        load_eval_splits(cfg, train, held)
