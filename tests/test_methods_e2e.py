"""Token-level methods and length shaping end to end through Ray with a tiny random model.

Each method trains for two steps through the real Trainer, logs its own diagnostics, dumps
per-token credit for ``rlkit inspect``, and renders. Length shaping with a per-problem history
(HAPO-history) and per-prompt budgets survives ``kill -9`` + resume with identical metrics.
"""

from __future__ import annotations

import pytest
from test_train_e2e import DETERMINISTIC, KILL_STEP, ROOT, _run_cli, assert_same_metrics, tiny_overrides

from rlkit.config import load_config
from rlkit.infra.tracking import read_metrics

pytestmark = pytest.mark.slow

METHODS = {
    # recipe, extra overrides, a metric prefix that only this method logs
    "tempo": ("recipes/tempo.yaml", [], "tempo/"),
    "spae": ("recipes/spae.yaml", ["algorithm.step_probe={boundary_match: text, num_samples: 2, max_new_tokens: 4, "
                                    "step_suffixes: [a, e, i, o, u, n, s, t, r, ' ', '.', '0', '1', '2', '3']}"],
             "spae/"),
    "hapo": ("recipes/hapo.yaml", [], "actor/hapo/"),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_logs_and_inspects(tiny_model_dir, tmp_path, method):
    from rlkit.tools.inspector import render_inspect
    from rlkit.trainer import Trainer

    recipe, extra, prefix = METHODS[method]
    ov = tiny_overrides(tiny_model_dir, tmp_path, method, steps=2) + [
        "eval.after=false", "checkpoint.every=0", "checkpoint.export_final=false", "tracking.inspect_groups=1",
        "tracking.tensorboard=true", *extra,
    ]
    cfg = load_config(ROOT / recipe, ov)
    Trainer(cfg).run()
    m = read_metrics(tmp_path / method)
    assert [x["step"] for x in m] == [1, 2]
    assert any(k.startswith(prefix) for k in m[-1]), sorted(m[-1])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (tmp_path / method / "tb").glob("events.out.tfevents.*")
    tags = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert any(t.startswith(prefix) for t in tags) and "actor/entropy" in tags, tags  # the method's own metrics
    html = render_inspect(tmp_path / method).read_text()
    assert "advantage" in html and method in (tmp_path / method / "config.yaml").read_text()
    if method == "hapo":
        # step 2 sampled with the adaptive temperature built from step 1's learner entropies
        import torch

        from rlkit.infra.checkpoint import latest_checkpoint, load_checkpoint

        state = load_checkpoint(latest_checkpoint(tmp_path / method))
        stats = state["trainer_state"]["stages"]["adaptive_temperature"]
        assert stats is not None and len(stats) == 4 and all(torch.isfinite(torch.tensor(stats)))
        # and logged how far that moved the temperature (step 1 sampled plainly: nothing to log)
        assert "hapo/temperature_factor_mean" not in m[0]
        lo, mean, hi = (m[1][f"hapo/temperature_factor_{k}"] for k in ("min", "mean", "max"))
        assert 0.95 - 1e-6 <= lo <= mean <= hi <= 1.05 + 1e-6 and lo < hi  # tau = 0.05: T'/T in [0.95, 1.05]
        assert m[1]["hapo/temperature_heated_frac"] + m[1]["hapo/temperature_cooled_frac"] <= 1
    if method == "spae":
        assert m[-1]["spae/probe_engine_calls"] >= 1


def test_length_history_and_budgets_survive_kill9(tiny_model_dir, tmp_path):
    recipe = str(ROOT / "recipes/quickstart.yaml")
    extra = ["data.budget={prior: uniform, low: 4, high: 12}",
             "reward.length_shapers=[{name: hapo_history}, {name: budget_penalty}]", "eval.after=false",
             "checkpoint.export_final=false"]
    ref = _run_cli(["train", recipe, *tiny_overrides(tiny_model_dir, tmp_path, "ref"), *extra])
    assert ref.returncode == 0, ref.stderr[-3000:]
    args = ["train", recipe, *tiny_overrides(tiny_model_dir, tmp_path, "crash"), *extra]
    assert _run_cli(args, {"RLKIT_KILL_AT_STEP": str(KILL_STEP)}).returncode == -9
    resumed = _run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    m_ref, m_res = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "crash")
    assert [m["step"] for m in m_res] == [1, 2, 3, 4]
    shaped = [k for k in m_ref[-1] if k.startswith(("length/", "hapo_history/", "budget_penalty/"))]
    assert shaped, sorted(m_ref[-1])
    assert_same_metrics(m_ref, m_res, (*DETERMINISTIC, *shaped))
