"""The run's memory monitor counts child processes, and PSS does not double-count shared pages."""

import subprocess
import sys
import time

from rlkit.infra.sysmon import MemoryMonitor, tree_memory

_CHILD = "import sys,time; b=bytearray(256<<20); b[::4096]=b'x'*len(b[::4096]); print('ok',flush=True); time.sleep(60)"


def _spawn():
    p = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ok"
    return p


def test_tree_memory_includes_children_and_peak_is_kept():
    before = tree_memory()
    mon = MemoryMonitor(interval_s=0.05).start()
    p = _spawn()
    try:
        time.sleep(0.3)
        during = tree_memory()
        assert during["procs"] == before["procs"] + 1
        assert during["pss_gib"] - before["pss_gib"] > 0.2  # the child's 256 MiB of private pages
    finally:
        p.kill()
        p.wait()
    time.sleep(0.3)
    mon.stop()
    m = mon.metrics()
    assert m["sys/mem_pss_peak_gib"] >= during["pss_gib"] - 0.05
    assert m["sys/mem_pss_gib"] < m["sys/mem_pss_peak_gib"] - 0.2  # the child is gone, the peak stays


def test_pss_splits_shared_pages_between_processes():
    # two forks of one parent share its pages copy-on-write: RSS counts them 3x, PSS once
    code = ("import os,time; b=bytearray(200<<20); b[::4096]=b'x'*len(b[::4096]);"
            "[os.fork() or (time.sleep(60), os._exit(0)) for _ in range(2)]; print('ok',flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ok"
        time.sleep(0.3)
        m = tree_memory(p.pid)
        assert m["procs"] == 3
        assert m["rss_gib"] > 0.55  # ~3 x 200 MiB
        assert m["pss_gib"] < 0.35  # ~200 MiB + interpreter
    finally:
        import psutil

        for c in psutil.Process(p.pid).children(recursive=True):
            c.kill()
        p.kill()
        p.wait()


def test_peak_is_broken_down_by_role():
    from rlkit.infra.sysmon import format_roles, role_of

    assert role_of(["ray::LearnerWorker.update"], "python", False) == "ray::LearnerWorker"
    assert role_of(["ray::IDLE"], "python", False) == "ray::IDLE"
    assert role_of(["/x/bin/raylet", "--flag"], "raylet", False) == "raylet"
    assert role_of(["/usr/bin/python3", "-u", "/a/b/worker.py"], "python3", False) == "python worker.py"
    assert role_of(["python3", "-c", "from multiprocessing.spawn import spawn_main; spawn_main()"], "p", False) \
        == "python multiprocessing"
    assert role_of(["python3", "-c", "print(1)"], "p", False) == "python -c"
    assert role_of(["python3", "-m", "pytest", "-q"], "p", False) == "python -m pytest"
    assert role_of(["anything"], "x", True) == "driver"
    assert format_roles({"a": 1.0, "b": 3.0, "c": 0.5}, top=2) == "b 3.00, a 1.00, other 0.50"
    mon = MemoryMonitor(interval_s=0.05).start()
    p = _spawn()
    try:
        time.sleep(0.3)
    finally:
        p.kill()
        p.wait()
    time.sleep(0.3)
    mon.stop()
    roles = mon.peak_roles  # taken at the peak, when the child was alive
    assert roles["driver"] > 0.01
    assert roles["python -c"] > 0.2  # the child's 256 MiB under its own label
    assert abs(sum(roles.values()) - mon.peak_pss_gib) < 1e-6
    lines = []
    peak = mon.report_peak(lines.append)
    assert "at the peak, GiB: " in lines[0] and set(peak["pss_by_role"]) == set(roles)
