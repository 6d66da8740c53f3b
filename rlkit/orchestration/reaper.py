"""Leave nothing behind: when a driver exits, however it exits, kill the processes it started.

A local Ray (``ray.init`` without ``cluster.address``) runs its GCS, raylet, dashboard, log monitor
and workers as descendants of the driver; ``ray.shutdown()`` stops them on a normal exit, but when
the driver is killed (``kill -9``, the OOM killer, a lost terminal) they are re-parented and stay
alive, holding memory and ports. ``start_reaper()`` starts a tiny watcher in its own session::

    python -m rlkit.orchestration.reaper DRIVER_PID

It notes the driver's descendants every ``POLL_S`` seconds while the driver lives (pid and start
time, so a reused pid is never touched), waits on a pidfd for the driver to end, then SIGKILLs the
noted processes still alive and their own descendants, and exits. Standard library only, Linux
(``/proc``, ``pidfd_open``); elsewhere ``start_reaper`` does nothing.

A joined cluster (``cluster.address``) is not the run's to stop: Ray itself releases a dead
driver's actors there (see recipes/launch/README.md).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

POLL_S = 0.5
_started: set[int] = set()  # driver pids that already have a reaper


def _stat(pid: int) -> tuple[int, int] | None:
    """``(parent pid, start time in clock ticks)`` of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[1]), int(fields[19])


def _processes() -> dict[int, tuple[int, int]]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            out[int(name)] = st
    return out


def descendants(root: int, procs: dict[int, tuple[int, int]] | None = None) -> dict[int, int]:
    """``{pid: start time}`` of every live descendant of ``root``."""
    procs = _processes() if procs is None else procs
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out[c] = procs[c][1]
                todo.append(c)
    return out


def reap(noted: dict[int, int]) -> list[int]:
    """SIGKILL the noted processes that are still the same processes, and their descendants."""
    procs = _processes()
    victims = {p for p, t in noted.items() if procs.get(p, (0, None))[1] == t}
    for p in list(victims):
        victims |= set(descendants(p, procs))
    for p in victims:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return sorted(victims)


def watch(driver: int) -> list[int]:
    """Note the driver's descendants until it ends, then reap them. Returns the pids killed."""
    me = os.getpid()
    try:
        fd = os.pidfd_open(driver)
    except (OSError, AttributeError):
        return []
    noted: dict[int, int] = {}
    while not select.select([fd], [], [], POLL_S)[0]:
        noted.update((p, t) for p, t in descendants(driver).items() if p != me)
    os.close(fd)
    return reap(noted)


def start_reaper() -> None:
    """Start the watcher of this process (once per process; Linux only)."""
    pid = os.getpid()
    if pid in _started or not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"):
        return
    _started.add(pid)
    subprocess.Popen([sys.executable, "-m", "rlkit.orchestration.reaper", str(pid)], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
