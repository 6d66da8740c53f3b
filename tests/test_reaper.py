"""A driver killed with -9 leaves no process of its run behind (local Ray, reward workers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from rlkit.orchestration.reaper import descendants, reap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _alive(noted: dict[int, int]) -> list[int]:
    from rlkit.orchestration.reaper import _stat

    return [p for p, t in noted.items() if (st := _stat(p)) is not None and st[1] == t]


def test_reap_kills_noted_processes_and_their_children_not_reused_pids():
    # a parent with a child, detached from us like orphans of a dead driver
    proc = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"])
    try:
        deadline = time.time() + 10
        while not descendants(proc.pid) and time.time() < deadline:
            time.sleep(0.05)
        child = descendants(proc.pid)
        assert len(child) == 1
        noted = {p: t for p, t in descendants(os.getpid()).items() if p == proc.pid}  # only the parent is noted
        assert reap({**noted, 999_999_999: 1}) and proc.wait(timeout=5) == -signal.SIGKILL
        deadline = time.time() + 5
        while _alive(child) and time.time() < deadline:  # the orphan is killed too (init reaps it)
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_kill9_of_the_driver_leaves_no_process_behind(tiny_model_dir, tmp_path):
    """``rlkit train`` SIGKILLed in the middle of step 1: within 10 s every process it had started
    (Ray's GCS, raylet, dashboard, workers, the reward workers) is gone."""
    from test_train_e2e import tiny_overrides

    args = [sys.executable, "-m", "rlkit.cli", "train", str(os.path.join(ROOT, "recipes/quickstart.yaml")),
            *tiny_overrides(tiny_model_dir, tmp_path, "k9", steps=2), "reward.mode=process"]
    proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "RLKIT_KILL_AT_STEP": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    noted: dict[int, int] = {}
    while proc.poll() is None:  # note the run's processes while the driver lives, as a user's `ps` would
        noted.update(descendants(proc.pid))
        time.sleep(0.1)
    assert proc.returncode == -9
    assert len(noted) >= 5, noted  # Ray's GCS, raylet, workers, ... really ran
    t0 = time.time()
    while _alive(noted) and time.time() - t0 < 10:
        time.sleep(0.2)
    left = _alive(noted)
    try:
        assert not left, f"{len(left)} processes of the killed run still alive after 10 s: {left}"
    finally:
        for p in left:
            os.kill(p, signal.SIGKILL)
