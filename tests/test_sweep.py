"""``rlkit sweep``: seed parsing, the done / resume / start plan, config checks; one slow real sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rlkit.cli import main
from rlkit.tools.sweep import config_conflicts, parse_seeds, plan_sweep, seed_overrides

ROOT = Path(__file__).resolve().parent.parent


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds(" 7 , 3") == [7, 3]
    assert parse_seeds("42") == [42]


@pytest.mark.parametrize("text, msg", [
    ("", "an empty item"), ("0,,1", "an empty item"), ("0,1,", "an empty item"),
    ("a", "'a' is not a non-negative integer"), ("-1", "'-1' is not a non-negative integer"),
    ("1.5", "'1.5' is not a non-negative integer"), ("+1", "'+1' is not a non-negative integer"),
    ("0 1", "'0 1' is not a non-negative integer"), ("0,1,0", "seed 0 is listed twice"),
])
def test_parse_seeds_errors(text, msg):
    with pytest.raises(ValueError, match="--seeds") as e:
        parse_seeds(text)
    assert msg in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("seeds", ["0,0", "x", "-2", ""])
def test_sweep_cli_rejects_bad_seeds_in_one_line(seeds, capsys):
    assert main(["sweep", str(ROOT / "recipes/quickstart.yaml"), f"--seeds={seeds}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlkit: --seeds") and err.count("\n") == 1 and "Traceback" not in err


def test_seed_overrides():
    assert seed_overrides(["train.steps=2"], 3, "quick") == ["train.steps=2", "seed=3", "name=quick_s3"]
    with pytest.raises(ValueError, match="sets seed itself"):
        seed_overrides(["seed=1"], 3, "quick")


def _fake_run(d: Path, *, summary=False, checkpoint=None, torn_checkpoint=False) -> Path:
    """A run dir in the state a trainer leaves: a finished run has summary.json; checkpoints are
    ``checkpoints/step_N/COMPLETE`` (a save in progress has no COMPLETE marker)."""
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"seed": 0}))
    if checkpoint is not None:
        c = d / "checkpoints" / f"step_{checkpoint:08d}"
        c.mkdir(parents=True)
        (c / "COMPLETE").write_text("")
    if torn_checkpoint:
        (d / "checkpoints" / "step_00000009").mkdir(parents=True)
    if summary:
        (d / "summary.json").write_text(json.dumps({"run_dir": str(d)}))
    return d


def test_plan_sweep(tmp_path):
    dirs = [
        _fake_run(tmp_path / "r_s0", summary=True, checkpoint=4),  # finished
        _fake_run(tmp_path / "r_s1", checkpoint=2),                 # interrupted after a checkpoint
        _fake_run(tmp_path / "r_s2"),                               # interrupted before any checkpoint
        tmp_path / "r_s3",                                          # never started
        _fake_run(tmp_path / "r_s4", torn_checkpoint=True),         # only an incomplete save
        _fake_run(tmp_path / "r_s5", summary=True),                 # finished without checkpoints
    ]
    assert plan_sweep([0, 1, 2, 3, 4, 5], dirs) == [
        (0, "done"), (1, "resume"), (2, "start"), (3, "start"), (4, "start"), (5, "done")]
    with pytest.raises(ValueError):
        plan_sweep([0, 1], dirs[:1])


def test_config_conflicts(tmp_path):
    cfg = {"name": "r_s0", "seed": 0, "output_dir": "runs", "algorithm": {"advantage": "grpo"}}
    dirs = [tmp_path / f"r_s{s}" for s in range(3)]
    for d, adv in zip(dirs, ("grpo", "tempo", "tempo")):
        d.mkdir()
        saved = {**cfg, "output_dir": str(tmp_path), "name": d.name, "algorithm": {"advantage": adv}}
        (d / "config.yaml").write_text(yaml.safe_dump(saved))
    plan = [(0, "done"), (1, "resume"), (2, "start")]
    msgs = config_conflicts(plan, dirs, [{**cfg, "seed": s} for s in range(3)])
    assert len(msgs) == 1 and "r_s1 (seed 1, resume)" in msgs[0] and "algorithm.advantage differs" in msgs[0]


def test_saved_config_round_trips_to_no_conflict(tmp_path):
    """The trainer's config.yaml of a seed equals that seed's resolved config, so a finished seed of
    an unchanged sweep is never reported as a conflict."""
    from rlkit.config import config_dict, load_config, save_config

    ov = [f"output_dir={tmp_path}", "train.steps=3", "seed=1", "name=quickstart_s1"]
    cfg = load_config(ROOT / "recipes/quickstart.yaml", ov)
    save_config(cfg, cfg.run_dir / "config.yaml")
    assert config_conflicts([(1, "done")], [cfg.run_dir], [config_dict(cfg)]) == []
    other = config_dict(load_config(ROOT / "recipes/quickstart.yaml", [*ov, "train.steps=4"]))
    assert "train.steps differs" in config_conflicts([(1, "done")], [cfg.run_dir], [other])[0]


def test_a_run_saved_before_a_key_existed_is_no_conflict(tmp_path):
    """A run saved by an older rlkit lacks the keys added since; left at their defaults they do not count
    as a difference (for the sweep and for rlkit compare's seed groups), a value that is set does."""
    import yaml

    from rlkit.config import config_dict, load_config, save_config
    from rlkit.tools.compare import group_runs

    ov = [f"output_dir={tmp_path}", "train.steps=3"]
    cfgs = [load_config(ROOT / "recipes/quickstart.yaml", [*ov, f"seed={s}", f"name=q_s{s}"]) for s in (1, 2)]
    for c in cfgs:
        save_config(c, c.run_dir / "config.yaml")
    old = yaml.safe_load((cfgs[0].run_dir / "config.yaml").read_text())
    del old["eval"]["splits"]  # as saved before eval.splits existed
    (cfgs[0].run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    assert config_conflicts([(1, "done")], [cfgs[0].run_dir], [config_dict(cfgs[0])]) == []
    assert group_runs([c.run_dir for c in cfgs]) == [[c.run_dir for c in cfgs]]
    split = config_dict(load_config(ROOT / "recipes/quickstart.yaml",
                                    [*ov, "seed=1", "name=q_s1", "eval.splits={ood: {generator: {n_terms: 3}}}"]))
    assert "eval.splits.ood differs" in config_conflicts([(1, "done")], [cfgs[0].run_dir], [split])[0]


def test_sweep_of_done_seeds_trains_nothing_and_reports(tmp_path, capsys, monkeypatch):
    """All seeds done: no trainer starts; the grouped table is printed and written."""
    import rlkit.cli as cli
    from rlkit.config import load_config, save_config

    monkeypatch.setattr(cli, "_cmd_train", lambda ns: pytest.fail("a done seed was trained again"))
    recipe = str(ROOT / "recipes/quickstart.yaml")
    for s, acc in ((0, 0.5), (1, 0.7)):
        cfg = load_config(recipe, [f"output_dir={tmp_path}", "seed=" + str(s), f"name=quickstart_s{s}"])
        save_config(cfg, cfg.run_dir / "config.yaml")
        (cfg.run_dir / "summary.json").write_text("{}")
        (cfg.run_dir / "eval_after.json").write_text(json.dumps({"accuracy": acc, "tokens_mean": 30.0}))
    assert main(["sweep", recipe, "--seeds", "0,1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "seed 0: done" in out and "seed 1: done" in out and "(n=2)" in out
    md = (tmp_path / "quickstart_sweep.md").read_text()
    assert "60.0% ± 127.1% (n=2)" in md
    rep = json.loads((tmp_path / "quickstart_sweep.json").read_text())
    assert rep["seeds"] == [0, 1] and rep["rows"][0]["n"] == 2
    # a changed override would mix configs: refused before any training
    assert main(["sweep", recipe, "train.steps=99", "--seeds", "0,1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "train.steps differs" in err and err.count("\n") == 1


@pytest.mark.slow
def test_sweep_two_seeds_end_to_end(tiny_model_dir, tmp_path):
    from test_train_e2e import _run_cli, tiny_overrides

    ov = [o for o in tiny_overrides(tiny_model_dir, tmp_path, "tiny", steps=1) if not o.startswith("output_dir=")]
    args = ["sweep", str(ROOT / "recipes/quickstart.yaml"), *ov, "--seeds", "0,1", "--out", str(tmp_path)]
    first = _run_cli(args)
    assert first.returncode == 0, first.stderr[-3000:]
    for s in (0, 1):
        d = tmp_path / f"tiny_s{s}"
        assert (d / "summary.json").is_file(), first.stdout[-3000:]
        assert yaml.safe_load((d / "config.yaml").read_text())["seed"] == s
    assert "(n=2)" in (tmp_path / "tiny_sweep.md").read_text()
    assert json.loads((tmp_path / "tiny_sweep.json").read_text())["rows"][0]["n"] == 2
    again = _run_cli(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "seed 0: done" in again.stdout and "seed 1: done" in again.stdout
    assert "training seed" not in again.stdout


def test_overrides_may_follow_the_options():
    """README's order, ``rlkit sweep RECIPE --seeds 0,1 key=value``, keeps the overrides."""
    from rlkit.cli import parse

    args = parse(["sweep", "recipes/quickstart.yaml", "--seeds", "1,2", "train.steps=3", "seed=4"])
    assert args.recipe == "recipes/quickstart.yaml" and args.overrides == ["train.steps=3", "seed=4"]
    args = parse(["train", "recipes/quickstart.yaml", "train.steps=3", "--no-resume", "learner.lr=1e-3"])
    assert args.overrides == ["train.steps=3", "learner.lr=1e-3"] and args.no_resume
    with pytest.raises(SystemExit):
        parse(["sweep", "recipes/quickstart.yaml", "--seeds", "1", "--bogus"])
