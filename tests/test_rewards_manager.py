"""RewardManager: weighting, both execution modes, and fault isolation (the contract: a faulty
verifier costs only its bad samples `failure_value`, is counted, and never raises)."""

from __future__ import annotations

import gc
import math
import os
import textwrap
import time

import pytest

from rewards import RewardManager, VerifierSpec

FIXTURES = os.path.join(os.path.dirname(__file__), "rewards_fixtures.py")
FAIL = -1.0  # distinguishable from a real 0.0
BATCH = ["1", "BAD 1", "1", "0"]
ANSWERS = {"answer": ["1", "1", "1", "1"]}
# fault fixture -> (per-sample rewards, failures, timeouts, none) for BATCH
FAULTS = {
    "raises": ([1.0, FAIL, 1.0, 1.0], 1, 0, 0),
    "sleeps": ([1.0, FAIL, 1.0, 1.0], 1, 1, 0),
    "returns_nan": ([1.0, FAIL, 1.0, 1.0], 1, 0, 0),
    "returns_none": ([1.0, FAIL, 1.0, 1.0], 0, 0, 1),
    "returns_string": ([1.0, FAIL, 1.0, 1.0], 1, 0, 0),
    "wrong_length": ([1.0, FAIL, 1.0, 1.0], 1, 0, 0),
    "not_a_list": ([FAIL] * 4, 4, 0, 0),
    "crashes": ([1.0, FAIL, 1.0, 1.0], 1, 0, 0),  # os._exit in the worker; process mode only
}


def _specs(names):
    specs = [VerifierSpec(f"{FIXTURES}:exact", weight=2.0)]
    specs += [VerifierSpec(f"{FIXTURES}:{n}", timeout_s=0.5, failure_value=FAIL) for n in names]
    return specs


@pytest.fixture(scope="module", params=["process", "inline"])
def faulty_run(request):
    names = [n for n in FAULTS if request.param == "process" or n != "crashes"]
    rm = RewardManager(_specs(names), num_workers=2, mode=request.param)
    t0 = time.monotonic()
    result = rm.score(BATCH, ANSWERS)
    elapsed = time.monotonic() - t0
    yield request.param, rm, result, elapsed, names
    rm.close()


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_gives_failure_value_only_to_bad_samples(faulty_run, fault):
    mode, rm, (total, metrics, per), _, names = faulty_run
    if fault not in names:
        pytest.skip("os._exit would kill the test process in inline mode")
    expected, failures, timeouts, nones = FAULTS[fault]
    assert per[fault] == expected
    assert metrics[f"reward/{fault}/failures"] == failures
    assert metrics[f"reward/{fault}/timeouts"] == timeouts
    assert metrics[f"reward/{fault}/none"] == nones
    assert metrics[f"reward/{fault}/mean"] == pytest.approx(sum(expected) / 4)
    assert rm.totals[f"reward/{fault}/failures"] >= failures
    assert metrics[f"reward/{fault}/latency_s"] >= 0


def test_good_verifier_and_total_unaffected(faulty_run):
    _, _, (total, metrics, per), elapsed, names = faulty_run
    assert per["exact"] == [1.0, 0.0, 1.0, 0.0]
    assert metrics["reward/exact/failures"] == 0
    expected_total = [2.0 * per["exact"][i] + sum(per[n][i] for n in names) for i in range(4)]
    assert total == pytest.approx(expected_total)
    assert elapsed < 10.0, "a 30 s sleep must be cut at its 0.5 s deadline"


def test_pool_keeps_working_after_faults(faulty_run):
    mode, rm, _, _, names = faulty_run
    before = dict(rm.totals)
    t0 = time.monotonic()
    total, metrics, per = rm.score(["1", "2"], {"answer": ["1", "1"]})
    assert time.monotonic() - t0 < 5.0
    assert per["exact"] == [1.0, 0.0]
    assert per["sleeps"] == [1.0, 1.0] and per["raises"] == [1.0, 1.0]
    assert rm.totals["reward/sleeps/calls"] == before["reward/sleeps/calls"] + 1
    assert rm.totals["reward/sleeps/timeouts"] == before["reward/sleeps/timeouts"]
    assert rm.totals["reward/not_a_list/failures"] == before["reward/not_a_list/failures"] + 2
    if mode == "process":
        assert before["reward/worker_restarts"] >= 2  # the sleeper (batch + sample) and the crasher
        assert metrics["reward/worker_restarts"] == 0


@pytest.mark.parametrize("mode", ["process", "inline"])
def test_weighted_math_and_format(mode):
    specs = [VerifierSpec("math"), VerifierSpec("format", weight=0.5)]
    completions = ["so \\boxed{4}", "4", "\\boxed{5}", [{"role": "assistant", "content": "\\boxed{4}"}]]
    with RewardManager(specs, mode=mode) as rm:
        total, metrics, per = rm.score(completions, {"answer": ["4"] * 4, "question": ["2+2?"] * 4})
    assert per["math"] == [1.0, 1.0, 0.0, 1.0]
    assert per["format"] == [1.0, 0.0, 1.0, 1.0]
    assert total == pytest.approx([1.5, 1.0, 0.5, 1.5])
    assert metrics["reward/total/mean"] == pytest.approx(1.125)
    assert metrics["reward/math/failures"] == 0 and metrics["reward/format/failures"] == 0


def test_class_async_and_plugin_verifiers_in_workers(tmp_path):
    plugin = tmp_path / "mgr_plugin.py"
    plugin.write_text(
        textwrap.dedent("""
        from rewards import reward

        @reward("test_mgr_plugin")
        def plugin_len(completions, **kw):
            return [float(len(c)) for c in completions]
    """)
    )
    specs = [
        VerifierSpec(f"{FIXTURES}:LengthVerifier"),
        VerifierSpec(f"{FIXTURES}:async_exact"),
        VerifierSpec("test_mgr_plugin", label="plen"),
    ]
    with RewardManager(specs, plugins=[str(plugin)], num_workers=2) as rm:
        total, metrics, per = rm.score(["ab", "1"], {"answer": ["1", "1"]})
    assert per["LengthVerifier"] == pytest.approx([0.2, 0.1])
    assert per["async_exact"] == [0.0, 1.0]
    assert per["plen"] == [2.0, 1.0]


def test_hanging_everywhere_is_bounded():
    # Every sample hangs: after max_timeouts_per_call sample timeouts the rest are skipped.
    spec = VerifierSpec(f"{FIXTURES}:sleeps", timeout_s=0.2)
    with RewardManager([spec], mode="inline", max_timeouts_per_call=2) as rm:
        t0 = time.monotonic()
        total, metrics, _ = rm.score(["BAD"] * 6)
        assert time.monotonic() - t0 < 3.0
    assert total == [0.0] * 6
    assert metrics["reward/sleeps/failures"] == 6 and metrics["reward/sleeps/timeouts"] == 2


def test_validation_and_lifecycle():
    with pytest.raises(KeyError, match="(?i)did you mean 'math'"):
        RewardManager(["maht"], mode="inline")
    with pytest.raises(ValueError, match="duplicate"):
        RewardManager(["math", "math"], mode="inline")
    with pytest.raises(ValueError, match="timeout_s"):
        VerifierSpec("math", timeout_s=0)
    rm = RewardManager([{"name": "format", "weight": 2.0}], mode="inline")
    with pytest.raises(ValueError, match="column 'answer'"):
        rm.score(["a", "b"], {"answer": ["1"]})
    total, metrics, per = rm.score([], {})
    assert total == [] and per == {"format": []} and metrics["reward/format/failures"] == 0
    rm.close()
    rm.close()
    with pytest.raises(RuntimeError, match="closed"):
        rm.score(["x"])
    rm2 = RewardManager(["format"], mode="process")
    assert rm2.score(["\\boxed{1}"])[0] == [1.0]
    del rm2
    gc.collect()  # __del__ closes the pool without raising


def test_constant_columns_and_nan_free_metrics():
    with RewardManager(["math"], mode="inline") as rm:
        total, metrics, _ = rm.score(["\\boxed{3}"], {"answer": ["3"], "trainer_state": {"step": 1}})
    assert total == [1.0]
    assert all(math.isfinite(v) for v in metrics.values())


def test_first_call_long_after_start_up_does_not_fail():
    """Workers spawned long before the first batch (e.g. during a pre-training eval) are ready."""
    import time

    from rewards import RewardManager, VerifierSpec

    with RewardManager([VerifierSpec("format")], mode="process", startup_timeout_s=0.5) as m:
        time.sleep(1.5)
        totals, _, _ = m.score(["\\boxed{1}", "no"], {"answer": ["1", "2"]})
    assert totals == [1.0, 0.0]
