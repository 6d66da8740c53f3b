"""Tests for rlkit.infra.tracking: JSONL sinks, NaN handling, resume truncation, TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rlkit.infra.tracking import Tracker, read_metrics, to_float, truncate_metrics


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_log_writes_jsonl_and_read_back(tmp_path: Path) -> None:
    with Tracker(tmp_path, total_steps=3, tensorboard=False, console=False) as tr:
        for step in range(3):
            tr.log(step, {"reward/mean": 0.5 * step, "acc/mean": torch.tensor(0.25)})
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [0, 1, 2]
    assert recs[2] == {"step": 2, "reward/mean": 1.0, "acc/mean": 0.25}
    assert read_metrics(tmp_path / "metrics.jsonl") == recs
    assert read_metrics(tmp_path / "missing") == []


def test_nan_inf_and_numpy_become_json(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    with Tracker(tmp_path, total_steps=1, tensorboard=False, console=False) as tr:
        tr.log(0, {"a": float("nan"), "b": torch.tensor(float("inf")), "c": np.float32(1.5),
                   "d": True, "e": 3})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    rec = json.loads(text)  # strict JSON
    assert rec == {"step": 0, "a": None, "b": None, "c": 1.5, "d": 1.0, "e": 3.0}


def test_to_float_rejects_non_scalars() -> None:
    assert to_float(torch.tensor([2.0])) == 2.0
    assert to_float(None) is None
    assert math.isclose(to_float(torch.tensor(0.1, dtype=torch.bfloat16)), 0.1, rel_tol=1e-2)
    with pytest.raises(TypeError):
        to_float(torch.ones(3))
    with pytest.raises(TypeError):
        to_float("abc")


def test_log_samples(tmp_path: Path) -> None:
    with Tracker(tmp_path, total_steps=2, tensorboard=False, console=False) as tr:
        tr.log_samples(1, [{"prompt": "1+1=", "completion": "2", "reward": 1.0, "len": 1},
                           {"completion": "x", "prompt": "p", "reward": float("nan")}])
    recs = _lines(tmp_path / "samples.jsonl")
    assert recs[0] == {"step": 1, "prompt": "1+1=", "completion": "2", "reward": 1.0, "len": 1}
    assert list(recs[1]) == ["step", "prompt", "completion", "reward"]
    assert recs[1]["reward"] is None


def test_truncate_metrics_atomic(tmp_path: Path) -> None:
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in range(6)) + '{"step": 6, "x"')
    removed = truncate_metrics(p, 4)
    assert removed == 3  # steps 4, 5 and the torn line
    assert [r["step"] for r in _lines(p)] == [0, 1, 2, 3]
    assert not [f for f in tmp_path.iterdir() if f.name != "metrics.jsonl"]  # no temp left
    assert truncate_metrics(tmp_path / "nope.jsonl", 0) == 0


def test_resume_truncates_both_files(tmp_path: Path) -> None:
    with Tracker(tmp_path, total_steps=10, tensorboard=False, console=False) as tr:
        for step in range(8):  # "crash" after step 7; last checkpoint was at step 5
            tr.log(step, {"reward/mean": float(step)})
            tr.log_samples(step, [{"prompt": "p", "completion": "c", "reward": 0.0}])
    with Tracker(tmp_path, total_steps=10, start_step=5, tensorboard=False, console=False) as tr:
        for step in range(5, 10):
            tr.log(step, {"reward/mean": float(step)})
            tr.log_samples(step, [{"prompt": "p", "completion": "c", "reward": 0.0}])
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(10))
    assert [r["step"] for r in _lines(tmp_path / "samples.jsonl")] == list(range(10))


def test_tensorboard_event_file(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    with Tracker(tmp_path, total_steps=2, console=False) as tr:
        tr.log(0, {"reward/mean": 0.1, "actor/kl": float("nan")})
        tr.log(1, {"reward/mean": 0.2})
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("reward/mean")] == pytest.approx([0.1, 0.2])


def test_console_lines_when_not_tty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Tracker(tmp_path, total_steps=4, tensorboard=False) as tr:
        tr.log(0, {"reward/mean": 0.5, "response/len_mean": 123.456, "time/step_s": 7.25,
                   "other": 1.0})
        tr.print("hello from trainer")
    out = capsys.readouterr().out
    assert "step 0/4" in out and "reward 0.5" in out and "len_mean 123.5" in out
    assert "step_s 7.25" in out and "other" not in out
    assert "hello from trainer" in out


def test_progress_bar_tty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    with Tracker(tmp_path, total_steps=3, start_step=1, tensorboard=False) as tr:
        if tr._progress is not None:  # rich honoured the forced TTY
            tr.log(1, {"reward/mean": 1.0})
            tr.log(1, {"eval/acc": 0.5})  # same step: bar advances once
            task = tr._progress.tasks[0]
            assert task.completed == 1 and "reward 1" in task.fields["info"]
        tr.print("msg")


def test_wandb_missing_is_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name: str, *a, **k):  # type: ignore[no-untyped-def]
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install wandb"):
        Tracker(tmp_path, total_steps=1, tensorboard=False, console=False,
                wandb={"project": "x", "mode": "offline"})


def test_closed_tracker_raises(tmp_path: Path) -> None:
    tr = Tracker(tmp_path, total_steps=1, tensorboard=False, console=False)
    tr.close()
    tr.close()
    with pytest.raises(RuntimeError):
        tr.log(0, {"a": 1.0})


def test_print_takes_brackets_literally(tmp_path: Path, capsys) -> None:
    """Error text with brackets (gloo's "[.../pair.cc:537]") is printed as is, not parsed as markup."""
    msg = "rlkit: failed: [/__w/pytorch/third_party/gloo/tcp/pair.cc:537] Connection closed [bold]x[/bold]"
    with Tracker(tmp_path, total_steps=1, tensorboard=False, console=True) as tr:
        tr.print(msg)
    assert msg + "\n" in capsys.readouterr().out  # one line, not wrapped
