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
