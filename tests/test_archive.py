"""``rlkit archive``: a run's record without its weights, enough for ``rlkit compare`` to give the same table."""

import json

from test_compare import _seed_run

from rlkit.cli import main


def _with_heavy_state(d):
    (d / "checkpoints" / "step_3").mkdir(parents=True)
    (d / "checkpoints" / "step_3" / "model.safetensors").write_bytes(b"\0" * 4096)
    (d / "tb").mkdir()
    (d / "tb" / "events.out").write_bytes(b"\0" * 64)
    (d / "summary.json").write_text(json.dumps({"steps": 3}))
    (d / "notes.txt").write_text("not a record suffix")
    return d


def test_archive_keeps_the_record_and_compare_reads_it_the_same(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    runs = [_with_heavy_state(_seed_run(tmp_path / "runs", f"q_s{s}", s, acc))
            for s, acc in zip((0, 1, 2), (0.5, 0.6, 0.7))]
    dest = tmp_path / "archive"
    assert main(["archive", *map(str, runs), "--to", str(dest)]) == 0
    assert capsys.readouterr().out.count("files,") == 3
    kept = sorted(p.name for p in (dest / "q_s1").iterdir())
    assert kept == ["config.yaml", "eval_after.json", "eval_before.json", "metrics.jsonl", "summary.json"]
    assert main(["compare", *map(str, runs), "--json", str(tmp_path / "orig.json")]) == 0
    orig_out = capsys.readouterr().out
    archived = [dest / f"q_s{s}" for s in (0, 1, 2)]
    assert main(["compare", *map(str, archived), "--json", str(tmp_path / "arch.json")]) == 0
    assert capsys.readouterr().out == orig_out
    assert json.loads((tmp_path / "arch.json").read_text()) == json.loads((tmp_path / "orig.json").read_text())
    # archiving again refreshes a file that changed in the run dir (e.g. a later rlkit eval)
    (runs[0] / "eval_after.json").write_text(json.dumps({"accuracy": 0.9}))
    assert main(["archive", str(runs[0]), "--to", str(dest)]) == 0
    assert json.loads((dest / "q_s0" / "eval_after.json").read_text()) == {"accuracy": 0.9}


def test_archive_refuses_bad_input_before_copying(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    good = _seed_run(tmp_path / "a", "r", 0, 0.5)
    (tmp_path / "b").mkdir()
    same_name = _seed_run(tmp_path / "b", "r", 1, 0.6)
    dest = tmp_path / "archive"
    assert main(["archive", str(good), str(tmp_path / "nope"), "--to", str(dest)]) == 2
    assert "is not an rlkit run dir" in capsys.readouterr().err and not dest.exists()
    assert main(["archive", str(good), str(same_name), "--to", str(dest)]) == 2
    assert "two run dirs are named 'r'" in capsys.readouterr().err and not dest.exists()
    assert main(["archive", str(good), "--to", str(tmp_path / "a")]) == 2
    assert "the run dir itself" in capsys.readouterr().err
