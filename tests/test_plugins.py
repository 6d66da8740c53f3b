"""Top-level ``plugins:``: a user's estimator and loss in their own file, selected by name from a
recipe, imported before the config is checked and in every worker; import errors name the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlkit.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "examples" / "my_method.yaml"


def test_a_method_from_a_users_file_is_selected_by_name(monkeypatch):
    monkeypatch.chdir(ROOT)  # plugin paths resolve against the current directory
    cfg = load_config(RECIPE)
    assert cfg.algorithm.advantage == "reinforce_pp_batch" and cfg.algorithm.policy_loss == "ppo_clip_counted"
    assert cfg.plugins == [str(ROOT / "recipes/examples/my_method.py")]  # absolute: workers find it too


def test_without_the_plugin_the_name_is_unknown():
    with pytest.raises(ConfigError, match="unknown advantage estimator 'reinforce_pp_batch_x'"):
        load_config(None, ["algorithm.advantage=reinforce_pp_batch_x"])


@pytest.mark.parametrize(("body", "match"), [
    ("import torch\nx = 1 / 0\n", r"ZeroDivisionError: division by zero \(.*bad\.py:2\)"),
    ("def f(:\n    pass\n", r"SyntaxError: .*\(.*bad\.py:1\)"),
])  # fmt: skip
def test_a_broken_plugin_is_a_config_error_naming_the_line(tmp_path, body, match):
    bad = tmp_path / "bad.py"
    bad.write_text(body)
    with pytest.raises(ConfigError, match=match):
        load_config(None, [f"plugins=[{bad}]"])
    with pytest.raises(ConfigError, match=r"cannot import 'no_such_plugin_module': ModuleNotFoundError"):
        load_config(None, ["plugins=[no_such_plugin_module]"])


@pytest.mark.slow
def test_the_plugin_method_trains_through_rlkit_train(tiny_model_dir, tmp_path):
    """The real CLI: the driver computes the plugin's advantages, the learner's Ray worker runs its
    loss (``actor/plugin_calls`` is reported from there)."""
    from test_train_e2e import _run_cli, tiny_overrides

    from rlkit.infra.tracking import read_metrics

    args = ["train", str(RECIPE), *tiny_overrides(tiny_model_dir, tmp_path, "plugin", steps=2), "eval.after=false"]
    res = _run_cli(args)
    assert res.returncode == 0, res.stderr[-3000:]
    m = read_metrics(tmp_path / "plugin")
    assert [x["step"] for x in m] == [1, 2]
    assert all(x["actor/plugin_calls"] == pytest.approx(1.0) for x in m if "actor/pg_loss" in x)
