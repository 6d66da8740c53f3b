"""Golden runs: every method recipe reproduces its recorded per-step metrics to 1e-6.

The fixtures in tests/golden/ were recorded by ``python tests/golden.py`` (see that module); a
refactor of the loop, the stages, the engine pool or the learners must leave every number as it
was. Each run is two steps of the tiny random model through the real Trainer and Ray, one torch
thread per actor.
"""

from __future__ import annotations

import json

import pytest
from golden import GOLDEN_DIR, RUNS, canary, compare, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def same_kernels(tiny_model_dir):
    """Skip (with the reason) where this machine's float kernels differ from the recording machine's."""
    want = json.loads((GOLDEN_DIR / "canary.json").read_text())["canary"]
    got = canary(tiny_model_dir)
    if got != want:
        pytest.skip(f"float kernels differ from the machine that recorded tests/golden (canary {got!r} != "
                    f"{want!r}); re-record with `python tests/golden.py` to compare here")
    return tiny_model_dir


@pytest.mark.parametrize("name", list(RUNS))
def test_golden_run(same_kernels, tmp_path, name):
    want = json.loads((GOLDEN_DIR / f"{name}.json").read_text())
    got = run(name, same_kernels, tmp_path)
    bad = compare(name, got, want)
    assert not bad, "\n".join(bad[:20])


def test_compare_reports_a_changed_metric():
    want = [{"step": 1, "reward/mean": 0.5, "actor/grad_norm": 1.0}]
    assert compare("x", [dict(want[0])], want) == []
    assert compare("x", [{**want[0], "actor/grad_norm": 1.0 + 2e-6}], want) == [
        "x step 1: actor/grad_norm = 1.000002, golden 1.0"]
    assert "only in the new run" in compare("x", [{**want[0], "new/key": 1.0}], want)[0]
