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
    # absolute: workers find them too
    assert cfg.plugins == [str(ROOT / "recipes/examples/my_method.py"), str(ROOT / "recipes/examples/length_curriculum.py")]
    assert cfg.stages == [{"name": "length_curriculum", "params": {"start": 16, "warmup_steps": 8}}]


@pytest.mark.parametrize(("stages", "match"), [
    ("[length_curriculam]", r"stages: unknown stage 'length_curriculam'\. Did you mean 'length_curriculum'\?"),
    ("[{name: length_curriculum, params: {strat: 4}}]", r"unknown parameter 'strat' for stage 'length_curriculum'\. "
                                                        r"Did you mean 'start'\?"),
    ("[{name: length_curriculum, params: {start: 999}}]", r"length_curriculum needs 1 <= start <= "
                                                          r"engine.max_new_tokens=64"),
    ("[{nme: length_curriculum}]", r"stages: each entry is a name or"),
])  # fmt: skip
def test_a_plugin_stage_is_checked_at_config_time(monkeypatch, stages, match):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match=match):
        load_config(RECIPE, [f"stages={stages}"])


def test_two_stages_that_replace_the_collector_are_a_config_error(tmp_path):
    plugin = tmp_path / "collector.py"
    plugin.write_text("from rlkit.methods import Stage, register_stage\n\n"
                      "@register_stage('my_collector')\nclass C(Stage):\n    collects = True\n")
    with pytest.raises(ConfigError, match=r"stages \['segments', 'my_collector'\] each replace the rollout collector"):
        load_config(ROOT / "recipes/ulorl_segments.yaml", [f"plugins=[{plugin}]", "stages=[my_collector]"])


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

    args = ["train", str(RECIPE), *tiny_overrides(tiny_model_dir, tmp_path, "plugin", steps=3), "eval.after=false",
            "stages=[{name: length_curriculum, params: {start: 4, warmup_steps: 2}}]"]
    res = _run_cli(args)
    assert res.returncode == 0, res.stderr[-3000:]
    m = read_metrics(tmp_path / "plugin")
    assert [x["step"] for x in m] == [1, 2, 3]
    assert all(x["actor/plugin_calls"] == pytest.approx(1.0) for x in m if "actor/pg_loss" in x)
    # the stage's sampling hook capped the rollout: 4 -> 8 -> 12 (engine.max_new_tokens) tokens
    assert [x["length_curriculum/max_new_tokens"] for x in m] == [4.0, 8.0, 12.0]
    assert m[0]["response/len_max"] <= 4 < 12


@pytest.mark.slow
def test_a_failing_stage_releases_ray_so_the_next_run_in_the_process_starts(tiny_model_dir, tmp_path):
    """An exception mid-run (here from a user's stage) must not leave the local Ray and its actors up:
    the next Trainer in the same process would wait forever for their CPUs."""
    import ray
    from test_train_e2e import tiny_overrides

    from rlkit.trainer import Trainer

    plugin = tmp_path / "boom.py"
    plugin.write_text("from rlkit.methods import Stage, register_stage\n\n"
                      "@register_stage('boom')\nclass Boom(Stage):\n    def metrics(self):\n"
                      "        raise RuntimeError('boom from a stage')\n")
    base = tiny_overrides(tiny_model_dir, tmp_path, "boom", steps=1) + ["eval.after=false", f"plugins=[{plugin}]"]
    with pytest.raises(RuntimeError, match="boom from a stage"):
        Trainer(load_config(ROOT / "recipes/quickstart.yaml", [*base, "stages=[boom]"])).run()
    assert not ray.is_initialized()
    ok = Trainer(load_config(ROOT / "recipes/quickstart.yaml", [*base, "name=after"])).run()
    assert ok["resumed_from"] == 0 and (tmp_path / "after" / "summary.json").is_file()
