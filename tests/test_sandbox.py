"""rewards.sandbox: each limit is enforced, nothing outlives a run, and verifiers run inside it."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import tempfile

import psutil
import pytest

from rewards import _sandbox_view as _view
from rewards import sandbox
from rewards.sandbox import (
    SandboxError,
    SandboxLimits,
    SandboxTimeout,
    call_verifier,
    isolation_report,
    run_python,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "rewards_fixtures.py")
ISO = isolation_report()
needs_netns = pytest.mark.skipif(
    not ISO.get("net"), reason=f"no network namespace here: {ISO.get('net_error')}"
)
needs_pidns = pytest.mark.skipif(not ISO.get("pid"), reason=f"no PID namespace here: {ISO.get('pid_error')}")
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="uid switching is for root parents")


def _leftovers() -> list[psutil.Process]:
    """Processes still running from any sandboxed run (their command line names the run's dir)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "rlkit-sandbox-" in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


def test_stdin_stdout_exit_codes_and_tracebacks():
    r = run_python("import sys\nprint(sum(map(int, sys.stdin.read().split())))", stdin="2 3 4")
    assert (r.status, r.returncode, r.stdout) == ("ok", 0, "9\n")
    r = run_python("import sys; print('partial'); sys.exit(3)")
    assert (r.status, r.returncode, r.stdout) == ("error", 3, "partial\n")
    r = run_python("def f():\n    raise ValueError('boom')\nf()")
    assert r.status == "error" and r.returncode == 1 and "ValueError: boom" in r.stderr
    r = run_python("import os, signal; os.kill(os.getpid(), signal.SIGTERM)")  # not PID 1: dies
    assert r.status == "error" and r.returncode == -signal.SIGTERM


def test_program_is_main_with_files_and_isolated_sys_path():
    code = "import helper, sys\nprint(__name__, helper.X, 'rewards' in sys.modules)"
    r = run_python(code, files={"helper.py": "X = 42\n"})
    assert r.stdout.split() == ["__main__", "42", "False"]
    # The repo's rewards/math.py must never shadow the stdlib module inside the sandbox.
    assert run_python("import math; print(math.sqrt(16))").stdout == "4.0\n"


def test_wall_timeout_kills_a_sleeper():
    r = run_python("import time; time.sleep(60)", limits=SandboxLimits(wall_s=1.0))
    assert r.status == "timeout" and r.wall_s < 5.0


def test_cpu_limit_stops_a_busy_loop_before_the_wall_limit():
    r = run_python("while True: pass", limits=SandboxLimits(wall_s=30.0, cpu_s=1.0))
    assert r.status == "timeout" and r.returncode == -signal.SIGXCPU
    assert r.wall_s < 25.0


def test_memory_limit():
    r = run_python("blob = b'x' * (4 << 30)\nprint('allocated')", limits=SandboxLimits(memory_mb=512))
    assert r.status == "error" and "MemoryError" in r.stderr and "allocated" not in r.stdout
    ok = run_python("blob = b'x' * (64 << 20)\nprint(len(blob))", limits=SandboxLimits(memory_mb=512))
    assert ok.status == "ok" and ok.stdout == f"{64 << 20}\n"


def test_output_and_file_size_caps():
    cap = 64 << 10
    r = run_python("print('x' * (100 << 20))", limits=SandboxLimits(max_output_bytes=cap))
    assert r.status == "output_limit" and len(r.stdout) == cap
    r = run_python("open('big', 'wb').write(b'0' * (1 << 20))", limits=SandboxLimits(max_output_bytes=cap))
    assert r.status == "error" and "File too large" in r.stderr


def test_working_directory_is_private_and_removed():
    r = run_python("import os\nopen('out.txt', 'w').write('hi')\nprint(os.getcwd())")
    workdir = r.stdout.strip()
    assert r.ok and os.path.basename(workdir) == "work" and "rlkit-sandbox-" in workdir
    assert not os.path.exists(os.path.dirname(workdir))


@needs_netns
def test_no_network_but_private_loopback():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).close()\nprint('connected')"
        blocked = run_python(code)
        assert blocked.status == "error" and "connected" not in blocked.stdout
        assert "ConnectionRefused" in blocked.stderr or "unreachable" in blocked.stderr
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing arrived from the sandbox
        # Control: with network allowed the very same program reaches the listener.
        allowed = run_python(code, limits=SandboxLimits(network=True))
        assert allowed.ok and allowed.stdout == "connected\n"
    interfaces = run_python("import socket; print(sorted(name for _, name in socket.if_nameindex()))")
    assert interfaces.stdout == "['lo']\n"  # no route out exists at all
    own_loopback = run_python(
        "import socket\ns = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
        "socket.create_connection(s.getsockname()).close(); print('lo ok')"
    )
    assert own_loopback.stdout == "lo ok\n"


def test_fork_bomb_is_bounded_and_fully_killed():
    bomb = (
        "import os, sys, time\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os.write(1, b'F')\n"
        "    except OSError:\n"
        "        time.sleep(0.01)\n"
    )
    r = run_python(bomb, limits=SandboxLimits(wall_s=2.0, max_procs=16))
    assert r.status == "timeout"
    assert 0 < r.stdout.count("F") < 16  # the launcher and the namespace's PID 1 count too
    assert _leftovers() == []


@needs_pidns
def test_escaped_session_dies_with_the_run():
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()  # leaves the process group the parent kills\n"
        "    time.sleep(60)\n"
        "print('parent done')\n"
    )
    r = run_python(code)
    assert r.ok and r.stdout == "parent done\n"
    assert _leftovers() == []


@root_only
def test_root_parent_gets_its_own_uid_and_no_capabilities():
    code = (
        "import os\n"
        "caps = [l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')][0]\n"
        "print(os.getuid(), os.geteuid(), caps)\n"
    )
    r = run_python(code, limits=SandboxLimits(confine="none", allow_unconfined=True))  # /proc to read caps
    uid, euid, caps = r.stdout.split()
    assert int(uid) >= sandbox.SANDBOX_UID_BASE and int(caps, 16) == 0
    assert (r.isolation["user"], int(euid)) in (("capless-root", 0), ("unprivileged", int(uid)))


@root_only
@pytest.mark.skipif(not os.path.exists("/usr/bin/python3") or not _view._world_readable("/usr/bin/python3", None),
                    reason="needs a world-readable system python")  # fmt: skip
def test_root_parent_fully_unprivileged_with_a_readable_interpreter():
    protected = tempfile.mkdtemp()  # 0700, owned by root
    try:
        code = f"import os\nprint(os.getuid(), os.geteuid())\nopen({protected!r} + '/x', 'w')"
        r = run_python(code, python="/usr/bin/python3")
        uid, euid = map(int, r.stdout.split())
        assert r.isolation["user"] == "unprivileged" and uid == euid >= sandbox.SANDBOX_UID_BASE
        assert r.status == "error" and ("PermissionError" in r.stderr or "FileNotFoundError" in r.stderr)
        assert os.listdir(protected) == []
    finally:
        os.rmdir(protected)


def test_call_verifier_round_trip_and_failures():
    assert call_verifier(f"{FIXTURES}:LengthVerifier", ["ab", "x"], {}) == pytest.approx([0.2, 0.1])
    assert call_verifier(f"{FIXTURES}:exact", ["1", "2"], {"answer": ["1", "1"]}) == [1.0, 0.0]
    # Non-numbers come back as strings and NaN as NaN; RewardManager turns both into failures.
    out = call_verifier(f"{FIXTURES}:returns_string", ["ok", "BAD"], {})
    assert out == [1.0, "<str>"]
    with pytest.raises(SandboxError, match="verifier exploded"):
        call_verifier(f"{FIXTURES}:raises", ["BAD"], {})
    with pytest.raises(SandboxTimeout):
        call_verifier(f"{FIXTURES}:sleeps", ["BAD"], {}, limits=SandboxLimits(wall_s=1.5))
    with pytest.raises(SandboxError, match="expected a list"):
        call_verifier(f"{FIXTURES}:not_a_list", ["x"], {})


def test_missing_isolation_is_warned_once(caplog):
    iso = {"net": False, "net_error": "Operation not permitted", "pid": True}
    with caplog.at_level(logging.WARNING, logger="rewards.sandbox"):
        sandbox._warn_missing_isolation(iso, SandboxLimits())
        sandbox._warn_missing_isolation(iso, SandboxLimits())
        sandbox._warn_missing_isolation(iso, SandboxLimits(network=True))
    warnings = [r for r in caplog.records if "CAN reach the network" in r.getMessage()]
    assert len(warnings) == 1 and "docs/verifiers.md" in warnings[0].getMessage()


def test_limits_validation_and_bad_file_names():
    with pytest.raises(ValueError, match="wall_s"):
        SandboxLimits(wall_s=0)
    with pytest.raises(ValueError, match="max_procs"):
        SandboxLimits(max_procs=1)
    with pytest.raises(ValueError, match="escapes"):
        run_python("pass", files={"../evil.py": ""})


def test_module_cli_prints_the_isolation_report():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "rewards.sandbox"], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(FIXTURES)))  # fmt: skip
    report = json.loads(out.stdout)
    assert report["status"] == "ok" and {"net", "pid", "fs", "fs_error", "mechanisms"} <= set(report)
    assert report["fs"] in ("namespace", "landlock")


@pytest.mark.parametrize("confine", ["namespace", "landlock"])
def test_verifier_by_module_name_imports_without_seeing_its_directory(confine):
    """A ``module:function`` verifier found on sys.path (here tests/, the way pytest puts it there)
    is importable in the sandbox although its directory is not part of the view."""
    limits = SandboxLimits(confine=confine)
    assert call_verifier("rewards_fixtures:exact", ["1", "2"], {"answer": ["1", "1"]}, limits=limits) == [1.0, 0.0]
    code = f"import os\nprint(sorted(os.listdir({os.path.dirname(FIXTURES)!r})))"
    assert run_python(code, limits=limits).status == "error"  # and scripts do not see tests/ at all
