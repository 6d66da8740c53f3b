"""The sandbox's escape suite: model-written code and sandboxed verifiers try to read the trainer's
secrets, list its private directories, write into the project checkout, the run directory and
rlkit's own source, read the trainer's environment, reach a host loopback listener, and signal or
kill the trainer's processes. Each must fail and honest code must still pass: as root, and as an
unprivileged user (a uid with no other rights, created for the test), with each filesystem
mechanism. A control run with confinement off shows the same attempts do get through, so the
suite can fail. The attempts themselves are in ``tests/sandbox_escape_probe.py``.
"""

from __future__ import annotations

import ctypes
import json
import os
import site
import stat
import subprocess
import sys

import pytest

from rewards.sandbox import SandboxLimits, SandboxUnavailable, run_python

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_escape_probe.py")
REPO = os.path.dirname(os.path.dirname(PROBE))
TEST_UID = 45_678  # no passwd entry, no files, no groups: a fresh unprivileged user
TRAINERS = ["root", "user"] if os.geteuid() == 0 else ["self"]
FS_FILES = ("read_private_file", "list_private_dir", "write_project", "write_run_dir")


def _blocked_ancestors(paths: list[str]) -> dict[str, list[str]]:
    """{first ancestor another user cannot traverse: [needed paths under it]}."""
    plan: dict[str, list[str]] = {}
    for path in paths:
        parts = os.path.realpath(path).split(os.sep)
        for i in range(2, len(parts) + 1):
            ancestor = os.sep.join(parts[:i])
            if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                plan.setdefault(ancestor, []).append(os.path.realpath(path))
                break
    return plan


def _become_test_user(plan: dict[str, list[str]]) -> None:
    """preexec: in a private mount namespace, make the interpreter and the checkout reachable for
    the test user (e.g. a pyenv Python under a 0700 /root: a tmpfs over /root holding binds of
    just those paths), then drop to the test uid for good."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x00020000) != 0:  # CLONE_NEWNS
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    libc.mount(None, b"/", None, ctypes.c_ulong(16384 | (1 << 18)), None)  # MS_REC | MS_PRIVATE
    for blocker, needed in plan.items():
        fd = os.open(blocker, os.O_PATH)
        if libc.mount(b"tmpfs", blocker.encode(), b"tmpfs", ctypes.c_ulong(0), b"mode=0755") != 0:
            raise OSError(ctypes.get_errno(), f"tmpfs on {blocker}")
        for path in needed:
            rel = os.path.relpath(path, blocker)
            os.makedirs(os.path.join(blocker, rel), exist_ok=True)
            src = f"/proc/self/fd/{fd}/{rel}".encode()
            if libc.mount(src, os.path.join(blocker, rel).encode(), None, ctypes.c_ulong(4096 | 16384), None):
                raise OSError(ctypes.get_errno(), f"bind {path}")
        os.close(fd)
    os.setgroups([])
    os.setresgid(TEST_UID, TEST_UID, TEST_UID)
    os.setresuid(TEST_UID, TEST_UID, TEST_UID)


def run_probe(trainer: str, confine: str) -> dict:
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp"}
    preexec = None
    if trainer == "user":
        needed = [sys.base_prefix, sys.prefix, REPO, *site.getsitepackages()]
        plan = _blocked_ancestors(needed)
        preexec = lambda: _become_test_user(plan)  # noqa: E731
    out = subprocess.run([sys.executable, PROBE, confine], capture_output=True, text=True, timeout=300, env=env,
                         preexec_fn=preexec, cwd="/tmp")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["uid"] == (TEST_UID if trainer == "user" else os.getuid())
    return result


@pytest.mark.parametrize("confine", ["auto", "namespace", "landlock"])
@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_escape_fails_and_honest_code_passes(trainer, confine):
    out = run_probe(trainer, confine)
    if "unavailable" in out:
        pytest.skip(f"{trainer}: no {confine} filesystem confinement here: {out['unavailable']}")
    # auto prefers the mount namespace; Landlock only where the trainer cannot make one
    expected = confine if confine != "auto" else "namespace" if out["namespace_ok"] else "landlock"
    assert out["isolation"]["fs"] == expected
    escaped = sorted(name for name, did in out["escaped"].items() if did)
    assert escaped == [], {name: out["attempts"].get(name) for name in escaped} | {"verifier": out["verifier"]}
    assert out["verifier"] == [0.0, 0.0, 0.0, 0.0]
    assert out["honest"] == {"assert_tests": True, "stdin_stdout": True, "files_and_subprocess": True}


@pytest.mark.parametrize("trainer", TRAINERS)
def test_control_without_confinement_the_same_attempts_get_through(trainer):
    out = run_probe(trainer, "none")
    assert out["isolation"]["fs"] is False
    assert {name: out["escaped"][name] for name in FS_FILES} == dict.fromkeys(FS_FILES, True)
    assert out["escaped"]["verifier_escape"] and out["honest"]["assert_tests"]


def test_unconfined_runs_are_refused_unless_allowed():
    r = run_python("print('ran')", limits=SandboxLimits(confine="none"))
    assert r.status == "refused" and r.stdout == "" and "confine: none" in r.isolation["fs_error"]
    r = run_python("print('ran')", limits=SandboxLimits(confine="none", allow_unconfined=True))
    assert r.ok and r.stdout == "ran\n"
    from rewards.code import CodeTests

    with pytest.raises(SandboxUnavailable, match=r"code_tests: the sandbox cannot confine the filesystem"):
        CodeTests(confine="none")(["```python\nx = 1\n```"], tests=[["assert x == 1"]])


def _deny_namespaces_and_landlock() -> None:
    """preexec: a seccomp filter like a locked-down container's (x86-64): ``unshare`` fails with
    EPERM and ``landlock_create_ruleset`` with ENOSYS, so no confinement mechanism is left."""
    import struct

    def op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("HBBI", code, jt, jf, k)  # struct sock_filter

    ld, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_RET|K
    allow, errno = 0x7FFF0000, 0x00050000
    prog = [op(ld, 4), op(jeq, 0xC000003E, 1, 0), op(ret, allow),  # other arch: allow (test skips)
            op(ld, 0), op(jeq, 272, 0, 1), op(ret, errno | 1),  # unshare -> EPERM
            op(jeq, 444, 0, 1), op(ret, errno | 38), op(ret, allow)]  # landlock -> ENOSYS  # fmt: skip
    buf = ctypes.create_string_buffer(b"".join(prog))

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    if libc.prctl(22, 2, ctypes.byref(Fprog(len(prog), ctypes.addressof(buf))), 0, 0) != 0:  # SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "seccomp")


LOCKED_DOWN = f"""
import io, json, logging, sys
sys.path.insert(0, {REPO!r})
from rewards import RewardManager, VerifierSpec
from rewards.sandbox import SandboxUnavailable, isolation_report, run_python
logs = io.StringIO()
logging.basicConfig(stream=logs, level=logging.WARNING)
out = {{"report": isolation_report()}}
r = run_python("print('ran')")
out["run"] = [r.status, r.stdout]
try:
    RewardManager([VerifierSpec("code_tests")], mode="inline")
    out["manager"] = "started"
except SandboxUnavailable as e:
    out["manager"] = str(e)
add = ["```python\\ndef add(a, b):\\n    return a + b\\n```"]
for _ in range(2):  # two starts: a warning at each
    with RewardManager([VerifierSpec("code_tests")], mode="inline", sandbox_limits={{"allow_unconfined": True}}) as rm:
        out["allowed_rewards"] = rm.score(add, {{"tests": [["assert add(1, 2) == 3"]]}})[0]
out["warnings"] = logs.getvalue().count("UNCONFINED")
print(json.dumps(out))
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the seccomp filter is written for x86-64")
def test_fail_closed_where_nothing_can_confine(tmp_path):
    run = lambda argv: subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO,  # noqa: E731
                                      preexec_fn=_deny_namespaces_and_landlock)  # fmt: skip
    res = run([sys.executable, "-c", LOCKED_DOWN])
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["report"]["fs"] is False and out["report"]["net"] is False
    assert "Operation not permitted" in out["report"]["fs_error"] and "landlock" in out["report"]["fs_error"]
    assert out["run"] == ["refused", ""]  # nothing ran
    assert out["manager"].startswith("verifier 'code_tests': the sandbox cannot confine the filesystem here")
    assert out["allowed_rewards"] == [1.0] and out["warnings"] == 2
    # The CLI: a one-line error before anything loads, no traceback.
    recipe = tmp_path / "code.yaml"
    recipe.write_text(f"extends: {REPO}/recipes/quickstart.yaml\nreward:\n  verifiers: [{{name: code_tests}}]\n")
    cli = run([sys.executable, "-m", "rlkit.cli", "config", str(recipe)])
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert cli.stderr.startswith("rlkit: reward.verifiers: code_tests run model-written code in the sandbox, but "
                                 "the sandbox cannot confine the filesystem here")  # fmt: skip
    assert len(cli.stderr.strip().splitlines()) == 1
    ok = run([sys.executable, "-m", "rlkit.cli", "config", str(recipe), "reward.sandbox.allow_unconfined=true"])
    assert ok.returncode == 0, ok.stderr[-2000:]
