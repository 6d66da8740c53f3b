"""Escape attempts against ``rewards.sandbox``, run as "the trainer" by tests/test_sandbox_escape.py.

    python tests/sandbox_escape_probe.py CONFINE     # auto | namespace | landlock | none (control)

The trainer here owns what a real one would: a private directory with a 0600 token (its home's
secrets), a project checkout with a run directory, a token in its environment, a TCP listener on
the host's loopback, itself and a helper process. Each attempt is model-written code run the way
``code_tests`` runs it (``run_python``), or a verifier run with ``sandbox: true`` (``call_verifier``);
an attempt counts as escaped when its effect is seen from outside: a secret in the output, a file
created, a connection accepted, a signal received, a process killed. Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from rewards.code import CodeTests  # noqa: E402
from rewards.sandbox import SandboxError, SandboxLimits, call_verifier, confinement_problem, run_python  # noqa: E402

SECRET, ENV_SECRET = "file-secret-7f3a9c", "env-secret-51be02"
_received: list[int] = []

VERIFIER = '''
import os

def escape(completions, **columns):
    """A sandboxed verifier that tries to get out: 1.0 per completion if it did."""
    out = []
    for path in completions:
        try:
            if path.endswith("/"):  # seeing more than this file of the project is an escape
                if not set(os.listdir(path)) - {"my_verifier.py"}:
                    raise PermissionError(path)
            elif "pwned" in path:
                open(path, "w").write("x")
            else:
                open(path).read()
            out.append(1.0)
        except OSError:
            out.append(0.0)
    return out
'''


def attempts(p: dict[str, str], trainer_pid: int, victim_pid: int, port: int) -> dict[str, str]:
    """Programs: each prints ESCAPED only if it got through (the caller checks the effect too)."""
    guard = "import os, signal, socket\ntry:\n    {}\nexcept Exception as e:\n    print('BLOCKED', type(e).__name__, e)\n"
    body = {
        "read_private_file": f"print('ESCAPED', open({p['secret']!r}).read())",
        "list_private_dir": f"print('ESCAPED', os.listdir({p['private']!r}))",
        "write_project": f"open({p['project']!r} + '/pwned', 'w').write('x'); print('ESCAPED')",
        "write_run_dir": f"open({p['run']!r} + '/metrics.jsonl', 'a').write('x'); print('ESCAPED')",
        "write_rlkit_source": f"open({REPO!r} + '/rewards/pwned.py', 'w').write('x'); print('ESCAPED')",
        "read_trainer_env": f"print('ESCAPED' if {ENV_SECRET!r} in str(os.environ) + "
                            f"open('/proc/{trainer_pid}/environ').read() else 'BLOCKED')",
        "connect_host_loopback": f"socket.create_connection(('127.0.0.1', {port}), timeout=2); print('ESCAPED')",
        "signal_trainer": f"os.kill({trainer_pid}, signal.SIGUSR1); print('ESCAPED')",
        "kill_trainer_process": f"os.kill({victim_pid}, signal.SIGKILL); print('ESCAPED')",
    }
    return {name: guard.format(code) for name, code in body.items()}


def honest(limits: SandboxLimits) -> dict[str, bool]:
    """Ordinary programs must still work: tests, stdin/stdout, scratch files, a subprocess."""
    ct = CodeTests(timeout_s=20.0, confine=limits.confine, allow_unconfined=limits.allow_unconfined)
    add = "```python\ndef add(a, b):\n    return a + b\n```"
    echo = "```python\nprint(int(input()) * 2)\n```"
    scratch = ("import json, os, subprocess, sys, tempfile\n"
               "open('notes.txt', 'w').write('ok')\n"
               "with tempfile.NamedTemporaryFile('w', delete=False) as f:\n    f.write('t')\n"
               "out = subprocess.run([sys.executable, '-c', 'print(6 * 7)'], capture_output=True, text=True)\n"
               "print(open('notes.txt').read(), out.stdout.strip(), json.dumps([1]))\n")  # fmt: skip
    r = run_python(scratch, limits=limits)
    return {
        "assert_tests": ct([add], tests=[["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]]) == [1.0],
        "stdin_stdout": ct([echo], inputs=[["21"]], outputs=[["42"]]) == [1.0],
        "files_and_subprocess": r.ok and r.stdout.split() == ["ok", "42", "[1]"],
    }


def main(confine: str) -> dict:
    problem = confinement_problem(confine) if confine != "none" else None
    if problem:  # e.g. an unprivileged user where user namespaces are disabled
        return {"confine": confine, "uid": os.getuid(), "unavailable": problem}
    namespace_ok = confinement_problem("namespace") is None
    limits = SandboxLimits(wall_s=20.0, confine=confine, allow_unconfined=confine == "none")
    base = tempfile.mkdtemp(prefix="escape-")
    p = {"private": f"{base}/home/.secrets", "project": f"{base}/project", "run": f"{base}/project/runs/exp1"}
    p["secret"] = p["private"] + "/token"
    for d in (p["private"], p["run"]):
        os.makedirs(d, mode=0o700)
    os.chmod(f"{base}/home", 0o700)
    with open(os.open(p["secret"], os.O_CREAT | os.O_WRONLY, 0o600), "w") as f:
        f.write(SECRET)
    with open(p["run"] + "/metrics.jsonl", "w") as f:
        f.write('{"step": 1}\n')
    os.environ["HF_TOKEN"] = ENV_SECRET  # what a trainer gets from its launcher
    signal.signal(signal.SIGUSR1, lambda *_: _received.append(1))
    victim = subprocess.Popen(["sleep", "60"])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    out: dict = {"confine": confine, "uid": os.getuid(), "attempts": {}, "namespace_ok": namespace_ok}
    try:
        for name, code in attempts(p, os.getpid(), victim.pid, listener.getsockname()[1]).items():
            r = run_python(code, limits=limits)
            out["attempts"][name] = {"stdout": r.stdout.strip()[:300], "status": r.status}
            out["isolation"] = r.isolation
        time.sleep(0.2)  # let a stray signal arrive
        try:
            listener.accept()
            accepted = True
        except BlockingIOError:
            accepted = False
        effects = {
            "read_private_file": SECRET in out["attempts"]["read_private_file"]["stdout"],
            "list_private_dir": "token" in out["attempts"]["list_private_dir"]["stdout"],
            "write_project": os.path.exists(p["project"] + "/pwned"),
            "write_run_dir": open(p["run"] + "/metrics.jsonl").read() != '{"step": 1}\n',
            "write_rlkit_source": os.path.exists(f"{REPO}/rewards/pwned.py"),
            "read_trainer_env": "ESCAPED" in out["attempts"]["read_trainer_env"]["stdout"],
            "connect_host_loopback": accepted,
            "signal_trainer": bool(_received),
            "kill_trainer_process": victim.poll() is not None,
        }
        # A verifier with sandbox: true, written in the user's project, trying the same from inside.
        with open(p["project"] + "/my_verifier.py", "w") as f:
            f.write(VERIFIER)
        targets = [p["secret"], p["private"] + "/", p["project"] + "/", f"{REPO}/rewards/pwned_by_verifier.py"]
        try:
            got = call_verifier(p["project"] + "/my_verifier.py:escape", targets, {}, limits=limits)
        except SandboxError as e:
            got = [str(e)[-300:]]
        out["verifier"] = got
        effects["verifier_escape"] = got != [0.0] * len(targets) or os.path.exists(targets[-1])
        out["escaped"] = effects
        out["honest"] = honest(limits)
    finally:
        victim.kill()
        for stray in (f"{REPO}/rewards/pwned.py", f"{REPO}/rewards/pwned_by_verifier.py"):
            if os.path.exists(stray):
                os.remove(stray)
        subprocess.run(["rm", "-rf", base], check=False)
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1] if len(sys.argv) > 1 else "auto")))
