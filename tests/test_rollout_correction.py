"""Rollout-training mismatch correction: worked example, config checks, and through the real Trainer."""

from __future__ import annotations

import math

import pytest
import torch

from rlkit.algorithms import RolloutCorrectionParams, rollout_correction
from rlkit.config import ConfigError, load_config

F64 = torch.float64
# token ratios w = pi_old / pi_rollout: row 0 [1, 3, 1/4], row 1 [1.5, 0.6, (pad)]
LOG_W = torch.tensor([[0.0, math.log(3), -math.log(4)], [math.log(1.5), math.log(0.6), 5.0]], dtype=F64)
ROLLOUT = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.5, -3.0]], dtype=F64)
OLD = ROLLOUT + LOG_W
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=F64)


def _run(mode: str, level: str = "token", clip: float = 2.0):
    return rollout_correction(OLD, ROLLOUT, MASK, RolloutCorrectionParams(mode, level, clip))


def test_worked_example_token_level() -> None:
    w, m = _run("tis")
    torch.testing.assert_close(w * MASK, torch.tensor([[1.0, 2.0, 0.25], [1.5, 0.6, 0.0]], dtype=F64))
    assert m["corrected_frac"].item() == pytest.approx(1 / 5)  # only w = 3 was truncated
    w, m = _run("mis")
    torch.testing.assert_close(w * MASK, torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]], dtype=F64))
    assert m["corrected_frac"].item() == pytest.approx(2 / 5)  # 3 and 1/4 are outside [1/2, 2]
    w, m = _run("none")
    assert torch.equal(w, torch.ones_like(w)) and m["corrected_frac"].item() == 0.0
    # diagnostics, whatever the mode: k3 = mean(w - 1 - log w) over the 5 valid tokens
    k3 = (0 + (3 - 1 - math.log(3)) + (0.25 - 1 + math.log(4)) + (0.5 - math.log(1.5)) + (-0.4 - math.log(0.6))) / 5
    assert m["kl"].item() == pytest.approx(k3, abs=1e-12)  # 0.348609
    assert m["ratio_mean"].item() == pytest.approx(6.35 / 5) and m["ratio_max"].item() == pytest.approx(3.0)


def test_worked_example_sequence_level() -> None:
    # sequence weights: row 0 1 * 3 * 1/4 = 0.75, row 1 1.5 * 0.6 = 0.9; with C = 1.2 the band is [0.833, 1.2]
    w, m = _run("tis", "sequence", 1.2)
    torch.testing.assert_close(w * MASK, torch.tensor([[0.75] * 3, [0.9, 0.9, 0.0]], dtype=F64))
    assert m["corrected_frac"].item() == 0.0  # both below C: truncation leaves them
    w, m = _run("mis", "sequence", 1.2)
    torch.testing.assert_close(w * MASK, torch.tensor([[0.0] * 3, [1.0, 1.0, 0.0]], dtype=F64))
    assert m["corrected_frac"].item() == pytest.approx(3 / 5)


def test_params_and_config_checks() -> None:
    with pytest.raises(ValueError, match="clip must be > 1"):
        RolloutCorrectionParams("tis", "token", 1.0)
    with pytest.raises(ConfigError, match="rollout_correction.mode"):
        load_config(None, ["algorithm.rollout_correction={mode: tsi}"])
    with pytest.raises(ConfigError, match="already taken against the engine's log-probs"):
        load_config(None, ["algorithm.rollout_correction={mode: tis}", "algorithm.old_logprobs=rollout"])
    with pytest.raises(ConfigError, match="renormalised"):
        load_config(None, ["engine.name=vllm", "engine.top_p=0.9", "algorithm.rollout_correction={mode: mis}"])
    with pytest.raises(ConfigError, match="renormalised"):
        load_config(None, ["engine.name=vllm", "engine.top_k=20", "algorithm.old_logprobs=rollout"])
    load_config(None, ["engine.name=vllm", "engine.top_p=0.9"])  # no correction, ratio on the learner: fine


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["tis", "mis"])
def test_trainer_logs_mismatch_and_trains_with_the_correction(tiny_model_dir, tmp_path, mode) -> None:
    """Through the real Trainer (Ray, the HF engine, the torch learner, 2 updates per step so the
    old log-probs are recomputed): the HF engine samples from the learner's own policy, so the
    measured mismatch is ~0 and nothing needs correcting."""
    from test_train_e2e import tiny_overrides

    from rlkit.infra.tracking import read_metrics
    from rlkit.trainer import Trainer

    ov = tiny_overrides(tiny_model_dir, tmp_path, mode, steps=2) + [
        "eval.after=false", "train.mini_batches=2", f"algorithm.rollout_correction={{mode: {mode}, clip: 2.0}}"]
    Trainer(load_config(None, ov)).run()
    m = read_metrics(tmp_path / mode)
    assert [x["step"] for x in m] == [1, 2]
    for x in m:
        assert {"mismatch/kl", "mismatch/ratio_max", "mismatch/ratio_mean", "mismatch/corrected_frac"} <= set(x)
        assert 0.0 <= x["mismatch/kl"] < 1e-4 and abs(x["mismatch/ratio_mean"] - 1) < 1e-2
        assert x["mismatch/corrected_frac"] == 0.0 and "actor/pg_loss" in x
