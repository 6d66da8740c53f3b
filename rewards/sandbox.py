"""Run untrusted Python (model-written code, verifiers marked ``sandbox: true``) in a subprocess.

Every run gets a fresh interpreter (``python -I -B``) started in its own session, a temporary
working directory that is deleted afterwards, and these limits, enforced by the kernel:

- wall clock (the parent kills the whole process group, and every process of the run's uid);
- CPU seconds (``RLIMIT_CPU``), address space (``RLIMIT_AS``), file size (``RLIMIT_FSIZE``, which
  also caps stdout/stderr: they are files, so output beyond the cap fails with ``EFBIG``),
  open files, no core dumps;
- processes (``RLIMIT_NPROC``) against fork bombs. The kernel exempts uid 0 from this limit, so as
  root each run gets its own unused uid (``SANDBOX_UID_BASE + n``): fully unprivileged when that
  uid can read what the run sees (always, with the mount namespace below, unless an installation
  itself is unreadable), otherwise only the *real* uid changes and every capability is dropped;
- no network: a new network namespace (``unshare(CLONE_NEWNET)``, with a user namespace when not
  root) holding only a loopback interface; a new PID namespace so that the run cannot signal
  outside processes and dies as a whole. Where these namespaces are unavailable the run still
  happens, and a one-time warning says what is missing;
- a confined filesystem: the run sees, read-only, only the interpreter's installation, the system
  libraries and what a verifier imports, and writes only its scratch directory
  (``rewards/_sandbox_view.py`` says what is in the view, ``rewards/_sandbox_fs.py`` enforces it
  with a mount namespace or Landlock). This one fails closed: where neither mechanism works, runs
  are refused (``status: "refused"``, :class:`SandboxUnavailable`) unless
  ``SandboxLimits.allow_unconfined``.

The child side is ``rewards/_sandbox_child.py``, run by path under ``-I`` (so ``rewards/math.py``
can never shadow the stdlib) and importing only cheap built-in modules: a run costs about 40 ms
of CPU on top of what the program itself imports (the filesystem view adds about 1 ms).
``python -m rewards.sandbox`` prints what isolation this machine provides.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import marshal
import math
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rewards import _sandbox_proc as _proc
from rewards import _sandbox_view as _view

log = logging.getLogger("rewards.sandbox")

SANDBOX_UID_BASE = 1_600_000_000
"""First uid handed to sandboxed runs when the parent is root (none of them is a real user)."""
_UID_SPAN = 100_000_000
_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
CONFINE_MODES = ("auto", "namespace", "landlock", "none")
_uid_counter = itertools.count()
_warned: set[str] = set()
_warn_lock = threading.Lock()


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run.

    Attributes:
        wall_s: wall-clock limit, interpreter start-up included.
        cpu_s: CPU-time limit per process (``RLIMIT_CPU``, whole seconds, rounded up); None = wall_s.
        memory_mb: address-space limit per process (``RLIMIT_AS``) in MiB.
        max_output_bytes: cap on stdout, on stderr and on any file the code writes (``RLIMIT_FSIZE``).
        max_procs: processes and threads the run may hold at once (``RLIMIT_NPROC``), its own
            interpreter included.
        max_open_files: ``RLIMIT_NOFILE``.
        network: allow network access (skips the network namespace).
        confine: filesystem confinement: ``auto`` (a mount namespace, else Landlock),
            ``namespace`` or ``landlock`` (only that mechanism), ``none`` (off: for benchmarks,
            and only with ``allow_unconfined``).
        allow_unconfined: run even where the filesystem cannot be confined (the code then sees
            and may write whatever the trainer's user can). Off: such runs are refused.
        shm_mb: size of the run's private ``/dev/shm`` (mount-namespace runs).
    """

    wall_s: float = 10.0
    cpu_s: float | None = None
    memory_mb: int = 1024
    max_output_bytes: int = 1 << 20
    max_procs: int = 32
    max_open_files: int = 128
    network: bool = False
    confine: str = "auto"
    allow_unconfined: bool = False
    shm_mb: int = 16

    def __post_init__(self) -> None:
        if self.confine not in CONFINE_MODES:
            raise ValueError(f"SandboxLimits.confine must be one of {CONFINE_MODES}, got {self.confine!r}")
        if not (self.wall_s > 0 and math.isfinite(self.wall_s)):
            raise ValueError(f"SandboxLimits.wall_s must be a positive number, got {self.wall_s}")
        if self.cpu_s is not None and not self.cpu_s > 0:
            raise ValueError(f"SandboxLimits.cpu_s must be > 0 or None, got {self.cpu_s}")
        for name, low in (("memory_mb", 32), ("max_output_bytes", 1024), ("max_procs", 2),
                          ("max_open_files", 16), ("shm_mb", 1)):  # fmt: skip
            if int(getattr(self, name)) < low:
                raise ValueError(f"SandboxLimits.{name} must be >= {low}, got {getattr(self, name)}")


@dataclass
class SandboxResult:
    """Outcome of :func:`run_python`.

    ``status``: ``ok`` (exit 0), ``error`` (non-zero exit, uncaught exception, killed by a signal),
    ``timeout`` (wall or CPU limit), ``output_limit`` (stdout/stderr reached the cap),
    ``start_failed``, or ``refused`` (the filesystem could not be confined and the limits do not
    allow unconfined runs: nothing ran). ``isolation`` says what the child got: ``net``/``pid``
    (namespaces), ``fs`` (``namespace``, ``landlock`` or false) and ``user`` (``unprivileged``,
    ``capless-root`` or ``same``).
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    isolation: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class SandboxError(RuntimeError):
    """A sandboxed verifier failed (raised, exited, hit a limit other than time, bad output)."""


class SandboxTimeout(TimeoutError):
    """A sandboxed run hit its wall-clock or CPU limit."""


class SandboxUnavailable(RuntimeError):
    """This machine cannot confine a sandboxed run's filesystem, and unconfined runs are not allowed."""


# ----------------------------------------------------------------------------- parent side


def run_python(
    source: str,
    *,
    stdin: str | bytes = b"",
    limits: SandboxLimits | None = None,
    files: Mapping[str, str] | None = None,
    python: str | None = None,
) -> SandboxResult:
    """Run ``source`` as ``__main__`` (file ``main.py``) in the sandbox and capture its output.

    Args:
        source: Python program text.
        stdin: bytes (or text, UTF-8 encoded) fed to the program's standard input.
        limits: defaults to ``SandboxLimits()``.
        files: extra files (relative name -> text) written to the working directory first.
        python: interpreter to run; defaults to ``sys.executable``.

    >>> r = run_python("print(sum(map(int, input().split())))", stdin="2 3")
    >>> r.status, r.stdout
    ('ok', '5\\n')
    """
    workfiles = {**(files or {}), "main.py": source}
    job = {"kind": "script", "main": "main.py", "site_paths": _site_paths(python)}
    result, _ = _execute(job, workfiles, stdin, limits or SandboxLimits(), python, view_extra=())
    return result


def call_verifier(
    spec: str,
    completions: Sequence[str],
    columns: Mapping[str, Any],
    *,
    params: Mapping[str, Any] | None = None,
    plugins: Sequence[str] = (),
    limits: SandboxLimits | None = None,
    python: str | None = None,
) -> list[Any]:
    """Resolve and call a verifier inside the sandbox; returns its raw list of rewards.

    Raises :class:`SandboxTimeout` past the limits' wall/CPU time and :class:`SandboxError` for any
    other failure. Inputs travel to the child pickled (parent -> child only); rewards come back as
    JSON, so nothing the child writes is unpickled here.
    """
    from rewards.registry import absolute_spec, entry_point_target, list_rewards

    limits = limits or SandboxLimits()
    spec = absolute_spec(spec)  # the child runs in its own temporary directory
    if ":" not in spec and spec not in list_rewards():  # an entry point: hand the child its module:attr,
        spec = entry_point_target(spec) or spec  # which the view can hold (not the whole sys.path)
    plugins = [os.path.abspath(p) if p.endswith(".py") or os.sep in p else p for p in plugins]
    # The child imports what this process can: its sys.path ('' is the cwd) and this package's root.
    paths = [os.path.abspath(p or os.curdir) for p in [*sys.path, os.path.dirname(os.path.dirname(_CHILD))]]
    job = {"kind": "verifier", "spec": spec, "params": dict(params or {}), "plugins": list(plugins),
           "sys_path": [p for p in dict.fromkeys(paths) if os.path.isdir(p)]}  # fmt: skip
    payload = pickle.dumps((list(completions), dict(columns)), protocol=pickle.HIGHEST_PROTOCOL)
    # The run sees only the packages it imports: its verifier's module, the plugins, and where a
    # registered name is defined; not the directories (a project checkout) that hold them.
    modules = [spec, *plugins, *_view.registered_module_names([spec])]
    job["roots"] = {"rewards": _view.REWARDS_DIR, **_view.module_roots(modules, job["sys_path"])}
    extra = list(job["roots"].values())
    result, line = _execute(job, {}, b"", limits, python, view_extra=extra, payload=payload)
    if result.status == "refused":
        raise SandboxUnavailable(refusal_message(result.isolation))
    if result.status == "timeout":
        raise SandboxTimeout(f"sandboxed verifier {spec!r} exceeded {limits.wall_s:g}s")
    if result.status != "ok" or line is None:
        tail = (result.stderr or "").strip()[-1500:]
        why = {"output_limit": "its output exceeded max_output_bytes"}.get(result.status, result.status)
        raise SandboxError(f"sandboxed verifier {spec!r} failed ({why}, exit {result.returncode}): {tail}")
    rewards = line["rewards"]
    if not isinstance(rewards, list):
        raise SandboxError(f"sandboxed verifier {spec!r} returned {rewards!r}, expected a list")
    return rewards


class SandboxedVerifier:
    """A verifier spec that runs in the sandbox on every call (what ``sandbox: true`` builds).

    Each call starts a fresh interpreter that imports ``rewards``, the plugins and the verifier
    (class ``setup()`` included), so budget start-up time into ``limits.wall_s``.
    """

    def __init__(
        self,
        spec: str,
        params: Mapping[str, Any] | None = None,
        plugins: Sequence[str] = (),
        limits: SandboxLimits | None = None,
        python: str | None = None,
    ) -> None:
        self.spec, self.params, self.plugins = spec, dict(params or {}), list(plugins)
        self.limits, self.python = limits or SandboxLimits(), python
        self.__name__ = spec.rpartition(":")[2] or spec

    def __call__(self, completions: list[str], **columns: Any) -> list[Any]:
        return call_verifier(self.spec, completions, columns, params=self.params, plugins=self.plugins,
                             limits=self.limits, python=self.python)  # fmt: skip


def isolation_report(python: str | None = None, confine: str = "auto") -> dict[str, Any]:
    """What a sandboxed run gets on this machine (namespaces, filesystem, uid), by running one."""
    job = {"kind": "script", "main": "main.py", "site_paths": []}
    limits = SandboxLimits(confine=confine, allow_unconfined=True)
    r, _ = _execute(job, {"main.py": "pass"}, b"", limits, python, view_extra=(), quiet=True)
    return {"status": r.status, **r.isolation, "euid": os.geteuid(), "python": python or sys.executable}


def confinement_problem(confine: str = "auto", python: str | None = None) -> str | None:
    """None when sandboxed runs get a confined filesystem on this machine, else why not (one line).
    Probed once per process and setting."""
    iso = _probe(confine, python)
    return None if iso.get("fs") else refusal_message(iso)


def check_confinement(limits: SandboxLimits, what: str) -> None:
    """Fail closed before any untrusted code runs: raise :class:`SandboxUnavailable` unless this
    machine confines the filesystem, or ``limits.allow_unconfined`` is set, which warns each call."""
    problem = confinement_problem(limits.confine)
    if problem is None:
        return
    if not limits.allow_unconfined:
        raise SandboxUnavailable(f"{what}: {problem}")
    log.warning("%s runs model-written code UNCONFINED (sandbox.allow_unconfined: true): it can read and "
                "write whatever this process's user can. %s", what, problem)  # fmt: skip


@functools.lru_cache(maxsize=8)
def _probe(confine: str, python: str | None) -> dict[str, Any]:
    return isolation_report(python, confine)


def refusal_message(iso: Mapping[str, Any]) -> str:
    """One line: why a run was refused (what the machine lacks) and how to opt out."""
    return (f"the sandbox cannot confine the filesystem here ({iso.get('fs_error') or 'no isolation report'}); "
            "it needs root, unprivileged user namespaces (sysctl user.max_user_namespaces > 0) or Landlock "
            "(Linux >= 5.13). Set sandbox.allow_unconfined: true only if you trust the code")


def _execute(
    job: dict[str, Any],
    workfiles: Mapping[str, str],
    stdin: str | bytes,
    limits: SandboxLimits,
    python: str | None,
    view_extra: Sequence[str],
    payload: bytes | None = None,
    quiet: bool = False,
) -> tuple[SandboxResult, dict[str, Any] | None]:
    view = _view.read_only_view(python, view_extra)
    python = python or sys.executable
    root = tempfile.mkdtemp(prefix="rlkit-sandbox-")
    try:
        os.chmod(root, 0o711)  # an unprivileged sandbox uid may traverse to work/, not read ctl/
        work, ctl = os.path.join(root, "work"), os.path.join(root, "ctl")
        os.mkdir(work, 0o700)
        os.mkdir(ctl, 0o700)
        os.mkdir(os.path.join(root, "fs"), 0o700)  # mount point of the run's new root (its own namespace)
        for name, text in workfiles.items():
            path = os.path.join(work, name)
            if os.path.dirname(os.path.relpath(path, work)).startswith(".."):
                raise ValueError(f"sandbox file name {name!r} escapes the working directory")
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        uid = _next_uid() if os.geteuid() == 0 else None
        if payload is not None:
            with open(os.path.join(ctl, "payload.pkl"), "wb") as f:
                f.write(payload)
        # Unnamed files (TemporaryFile): the run inherits them as fds but cannot reopen them by
        # path, e.g. to read a harness's nonce from its stdin or forge an exit status line.
        with tempfile.TemporaryFile(dir=ctl) as fin, tempfile.TemporaryFile(dir=ctl) as fout, \
                tempfile.TemporaryFile(dir=ctl) as ferr, tempfile.TemporaryFile(dir=ctl) as fres:  # fmt: skip
            fin.write(stdin.encode() if isinstance(stdin, str) else stdin)
            fin.flush()
            fin.seek(0)
            cfg = {
                "job": job, "work": work, "ctl": ctl, "limits": asdict(limits), "uid": uid,
                "privs": _view.privilege_plan(python, view, None) if uid is not None else "same",
                "privs_ns": _view.privilege_plan(python, view, view) if uid is not None else "same",
                "view": [("link", p, os.readlink(p)) if os.path.islink(p) and os.path.dirname(p) == os.sep
                         else ("ro", p, None) for p in view],
                "newroot": os.path.join(root, "fs"), "result_fd": fres.fileno(), "ppid": os.getpid(),
            }  # fmt: skip
            with open(os.path.join(ctl, "job.marshal"), "wb") as f:
                marshal.dump(cfg, f)
            t0 = time.monotonic()
            try:
                proc = subprocess.Popen(
                    [python, *_flags(python), _CHILD, os.path.join(ctl, "job.marshal")],
                    stdin=fin, stdout=fout, stderr=ferr, pass_fds=(fres.fileno(),), cwd=work,
                    env=_child_env(work), start_new_session=True,
                )  # fmt: skip
            except OSError as exc:
                return SandboxResult("start_failed", None, "", f"cannot start {python}: {exc}", 0.0), None
            finished = False
            try:
                finished = _proc.wait_exit(proc, limits.wall_s)
            finally:  # also on KeyboardInterrupt / a caller's deadline: never leave processes behind
                _proc.kill_tree(proc.pid, uid, thorough=not finished)
                returncode = proc.wait()
            wall = time.monotonic() - t0
            timed_out = not finished
            stdout, out_full = _proc.read_capped(fout, limits.max_output_bytes)
            stderr, err_full = _proc.read_capped(ferr, limits.max_output_bytes)
            lines = [_proc.parse_json(line) for line in _proc.read_capped(fres, 1 << 24)[0].splitlines()]
        isolation = lines[0] if lines else {}
        exits = [d["exit"] for d in lines[1:] if isinstance(d.get("exit"), int)]
        if exits:
            returncode = exits[-1]  # the program's own status, not its launcher's
        if not quiet:
            _warn_missing_isolation(isolation, limits)
        if finished and not isolation.get("pid"):
            _proc.kill_tree(proc.pid, uid, thorough=True)  # no PID namespace: sweep stray descendants
        if timed_out or (returncode in (-signal.SIGXCPU, -signal.SIGKILL) and _cpu_exhausted(wall, limits)):
            status = "timeout"
        elif out_full or err_full:
            status = "output_limit"
        elif returncode == 0:
            status = "ok"
        else:
            status = "error"
        if not isolation and status != "timeout":
            status = "start_failed" if returncode != 0 else status
        if isolation and not isolation.get("fs") and not limits.allow_unconfined:
            status = "refused"
        result = SandboxResult(status, returncode, stdout, stderr, wall, isolation)
        found = [d for d in lines[1:] if "rewards" in d]
        return result, (found[-1] if found else None)
    finally:
        _proc.rmtree(root)


def _flags(python: str) -> list[str]:
    # -I: no env vars, user site or script dir on sys.path (rewards/math.py must not shadow math).
    # -S for our own interpreter: skipping site's .pth processing saves ~40 ms of CPU per run; the
    # site-packages directories are added back by the child (see _site_paths).
    same = os.path.realpath(python) == os.path.realpath(sys.executable)
    return ["-I", "-B", "-S"] if same else ["-I", "-B"]


def _site_paths(python: str | None) -> list[str]:
    import site

    if python is not None and os.path.realpath(python) != os.path.realpath(sys.executable):
        return []
    return [p for p in site.getsitepackages() if os.path.isdir(p)]


def _cpu_exhausted(wall: float, limits: SandboxLimits) -> bool:
    # SIGXCPU/SIGKILL from RLIMIT_CPU; CPU time <= wall time per process, so a run that died
    # of its CPU limit lasted at least ~cpu_s (minus a little for start-up accounting).
    cpu = math.ceil(limits.cpu_s if limits.cpu_s is not None else limits.wall_s)
    return wall >= 0.5 * cpu


def _child_env(work: str) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    }  # fmt: skip
    return env


def _next_uid() -> int:
    return SANDBOX_UID_BASE + (os.getpid() * 65_537 + next(_uid_counter)) % _UID_SPAN


def _warn_missing_isolation(isolation: dict[str, Any], limits: SandboxLimits) -> None:
    missing = []
    if isolation.get("net") is False and not limits.network:
        missing.append(
            f"network namespace ({isolation.get('net_error')}): sandboxed code CAN reach the network"
        )
    if isolation.get("pid") is False:
        missing.append(f"PID namespace ({isolation.get('pid_error')}): stray processes are swept by "
                       "process group" + (" and uid" if os.geteuid() == 0 else " only"))  # fmt: skip
    for item in missing:
        with _warn_lock:
            if item in _warned:
                continue
            _warned.add(item)
        log.warning("rewards.sandbox: no %s. Namespaces need root (CAP_SYS_ADMIN) or unprivileged user "
                    "namespaces (sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces>0); "
                    "see docs/verifiers.md#sandbox.", item)  # fmt: skip


if __name__ == "__main__":
    report = isolation_report()
    report["mechanisms"] = {m: isolation_report(confine=m).get("fs") or confinement_problem(m)
                            for m in ("namespace", "landlock")}  # fmt: skip
    print(json.dumps(report, indent=2))
