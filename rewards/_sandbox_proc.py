"""Process and file helpers of the sandbox's parent side (:mod:`rewards.sandbox`): waiting for a
run, killing everything it left, reading its capped output, removing its directory."""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import subprocess
import time
from typing import Any

log = logging.getLogger("rewards.sandbox")


def wait_exit(proc: subprocess.Popen, timeout: float) -> bool:
    """Whether ``proc`` exited within ``timeout`` (it is not reaped). Sleeps on a pidfd, so the
    parent wakes as the child exits; ``Popen.wait(timeout)`` polls with sleeps of up to 50 ms,
    which would cost a ~30 ms run as much again."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
            if time.monotonic() >= deadline:
                return False
        return True
    finally:
        os.close(fd)


def kill_tree(pid: int, uid: int | None, thorough: bool) -> None:
    """SIGKILL the run's process group and, as root, every process whose real uid is the run's."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is None or not thorough:
        return
    for _ in range(100):
        pids = pids_of_uid(uid)
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.002)
    log.warning("sandbox: processes of uid %d survived SIGKILL", uid)


def pids_of_uid(uid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                text = f.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if fields.get("State", "").strip().startswith("Z"):
            continue  # zombies hold no resources; their parent (or init) reaps them
        uids = fields.get("Uid", "").split()
        if uids and int(uids[0]) == uid:
            found.append(int(name))
    return found


def read_capped(f: Any, cap: int) -> tuple[str, bool]:
    """Up to ``cap`` bytes of an open file, decoded, and whether it reached the cap."""
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    return f.read(cap).decode("utf-8", errors="replace"), size >= cap


def parse_json(line: str) -> dict[str, Any]:
    try:
        out = json.loads(line)
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


def rmtree(root: str) -> None:
    def _fix(func: Any, path: str, _exc: Any) -> None:
        try:  # code may have chmod-ed its files read-only; make parents writable and retry
            os.chmod(os.path.dirname(path), 0o700)
            if os.path.isdir(path) and not os.path.islink(path):
                os.chmod(path, 0o700)
            func(path)
        except OSError:
            pass

    for _ in range(3):  # a killed run's last processes may still be writing for a moment
        shutil.rmtree(root, onerror=_fix)
        if not os.path.exists(root):
            return
        time.sleep(0.01)
    log.warning("sandbox: could not remove %s", root)
