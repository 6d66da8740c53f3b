"""Execution back-ends for :class:`rewards.RewardManager`: worker processes and inline calls.

Workers are ``spawn``-ed (no inherited locks/threads/CUDA state), import ``rewards`` and the plugins,
build every verifier once (class ``setup()`` included; a ``sandbox`` target becomes a
:class:`rewards.sandbox.SandboxedVerifier`, which starts a sandboxed interpreter per call) and
then answer ``("call", key, texts, columns)`` messages over a pipe. The parent enforces
deadlines: a worker that misses one, or dies, is terminated and replaced, which is the only
reliable way to stop a hung verifier (a thread cannot be killed, and ``signal.alarm`` works only
in a main thread). Verifier exceptions are caught inside the worker, so those do not cost a
restart.
"""

from __future__ import annotations

import logging
import math
import numbers
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing import connection, get_context
from typing import Any

from rewards.registry import load_plugins, resolve
from rewards.sandbox import SandboxedVerifier, SandboxLimits, SandboxTimeout

log = logging.getLogger("rewards")
_JOIN_S = 1.0


Target = Mapping[str, Any]
"""What to build in a worker: ``{"spec": str, "params": dict, "sandbox": SandboxLimits fields | None}``."""


@dataclass
class Task:
    """One verifier call on a subset of the batch (``indices``), with its own deadline.

    ``spec`` is the key of the verifier's target (see :func:`build_verifier`)."""

    spec: str
    indices: list[int]
    timeout_s: float
    owner: Any  # the manager's per-verifier state; ``owner.tripped`` cancels pending tasks


Payload = Callable[[Task], tuple[list[str], dict[str, Any]]]
OnResult = Callable[[Task, str, Any], list[Task]]
"""``on_result(task, kind, payload) -> follow-up tasks``; kind: ok|error|fatal|timeout|skipped|deadline
(the batch deadline passed before the task could finish; it must not return follow-ups then)."""


class BadOutput(ValueError):
    """A verifier returned something that is not a list with one entry per completion."""


class _Deadline(BaseException):
    """Raised by the inline SIGALRM handler; BaseException so ``except Exception`` can't eat it."""


def normalize_output(out: Any, n: int) -> list[float | None]:
    """Check a verifier's output: ``n`` entries, each a finite real or None; bad entries -> NaN.

    >>> normalize_output([1, None, "x", float("inf")], 4)
    [1.0, None, nan, nan]
    """
    if not isinstance(out, (list, tuple)) and hasattr(out, "tolist"):
        out = out.tolist()  # numpy arrays / tensors
    if isinstance(out, (str, bytes)) or not isinstance(out, Sequence):
        raise BadOutput(f"expected a list of {n} rewards, got {type(out).__name__}")
    if len(out) != n:
        raise BadOutput(f"expected {n} rewards (one per completion), got {len(out)}")
    return [_as_reward(v) for v in out]


def _as_reward(value: Any) -> float | None:
    if value is None:
        return None
    if not isinstance(value, numbers.Real) and hasattr(value, "item"):
        try:
            value = value.item()  # 0-d arrays / tensors
        except Exception:
            return math.nan
    if isinstance(value, numbers.Real):
        f = float(value)
        return f if math.isfinite(f) else math.nan
    return math.nan


def build_verifier(target: Target, plugins: Sequence[str] = ()) -> Callable[..., Any]:
    """The callable for a target: ``resolve(spec, params)``, or a sandboxed stand-in for it."""
    if target.get("sandbox") is not None:
        limits = SandboxLimits(**target["sandbox"])
        return SandboxedVerifier(target["spec"], target.get("params"), plugins, limits)
    return resolve(target["spec"], target.get("params"))


def call_verifier(fn: Callable[..., Any], texts: list[str], columns: dict[str, Any]) -> tuple[str, Any]:
    """Call ``fn`` and classify: ``("ok", rewards)``, ``("timeout", None)`` (a sandboxed run hit
    its time limit) or ``("error", message)``; never raises."""
    try:
        return "ok", normalize_output(fn(texts, **columns), len(texts))
    except (_Deadline, KeyboardInterrupt):
        raise
    except SandboxTimeout:
        return "timeout", None
    except BaseException as exc:  # SystemExit from a verifier is a verifier failure too
        tb = traceback.format_exception_only(type(exc), exc)
        return "error", "".join(tb).strip()[-2000:]


def call_with_deadline(
    fn: Callable[..., Any], texts: list[str], columns: dict[str, Any], timeout_s: float
) -> tuple[str, Any]:
    """Inline call. In the main thread a ``setitimer`` deadline interrupts hangs that return to the
    interpreter (sleeps, Python loops; not a blocking C call); elsewhere no deadline is enforced.
    An outer ``ITIMER_REAL`` (e.g. pytest-timeout) is suspended and re-armed with its remaining time."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        return call_verifier(fn, texts, columns)
    outer_left, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    if outer_left and outer_left <= timeout_s:
        return call_verifier(fn, texts, columns)  # the outer alarm fires first anyway

    def _on_alarm(signum: int, frame: Any) -> None:
        raise _Deadline()

    previous = signal.signal(signal.SIGALRM, _on_alarm)
    start = time.monotonic()
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        return call_verifier(fn, texts, columns)
    except _Deadline:
        return "timeout", None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)
        if outer_left:
            left = outer_left - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), outer_interval)


def worker_main(conn: Any, plugins: Sequence[str], targets: Mapping[str, Target]) -> None:
    """Entry point of a worker process (module-level so ``spawn`` can import it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the parent, which stops us
    errors: dict[str, str] = {}
    verifiers: dict[str, Callable[..., Any]] = {}
    try:
        load_plugins(plugins)
    except BaseException as exc:
        errors["*plugins*"] = f"loading plugins {list(plugins)} failed: {exc!r}"
    for key, target in targets.items():
        try:
            verifiers[key] = build_verifier(target, plugins)
        except BaseException as exc:
            errors[key] = f"resolving {target['spec']!r} failed: {exc!r}"
    conn.send(("ready", errors))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # parent went away
        if msg[0] == "stop":
            return
        _, spec, texts, columns = msg
        fn = verifiers.get(spec)
        if fn is None:
            conn.send(("fatal", errors.get(spec, f"verifier {spec!r} is not loaded in this worker")))
            continue
        kind, payload = call_verifier(fn, texts, columns)
        try:
            conn.send((kind, payload))
        except Exception as exc:
            conn.send(("error", f"could not send the result back: {exc!r}"))


class _Worker:
    def __init__(self, ctx: Any, plugins: Sequence[str], targets: Mapping[str, Target]) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=worker_main, args=(child, list(plugins), dict(targets)), name="rewards-worker", daemon=True
        )
        self.proc.start()
        child.close()
        self.started = time.monotonic()
        self.ready = False

    def stop(self, graceful: bool) -> None:
        try:
            if graceful and self.proc.is_alive():
                self.conn.send(("stop",))
                self.proc.join(_JOIN_S)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(_JOIN_S)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(_JOIN_S)
        except Exception:  # already gone / interpreter shutting down
            pass
        try:
            self.conn.close()
        except Exception:
            pass


class WorkerPool:
    """A fixed number of persistent verifier processes with per-task deadlines."""

    def __init__(
        self,
        num_workers: int,
        plugins: Sequence[str],
        targets: Mapping[str, Target],
        startup_timeout_s: float = 60.0,
    ) -> None:
        self._ctx = get_context("spawn")
        self._plugins, self._targets = list(plugins), dict(targets)
        self.startup_timeout_s = startup_timeout_s
        self.restarts = 0
        self.init_errors: dict[str, str] = {}
        self._startup_crashes = 0
        self._last_exitcode: int | None = None
        self._workers = [self._spawn() for _ in range(num_workers)]

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self._plugins, self._targets)

    def _restart(self, idx: int) -> None:
        self._workers[idx].stop(graceful=False)
        self._workers[idx] = self._spawn()
        self.restarts += 1

    def run(
        self, tasks: list[Task], payload: Payload, on_result: OnResult, deadline: float | None = None
    ) -> None:
        """Run tasks (and the follow-ups ``on_result`` returns) to completion; never raises for
        verifier faults. Past ``deadline`` (``time.monotonic()``) running tasks are killed and every
        unfinished task is reported as ``"deadline"``."""
        pending = deque(tasks)
        inflight: dict[int, tuple[Task, float]] = {}
        while pending or inflight:
            if deadline is not None and time.monotonic() >= deadline:
                for idx, (task, _) in list(inflight.items()):
                    del inflight[idx]
                    self._restart(idx)
                    on_result(task, "deadline", None)
                while pending:
                    on_result(pending.popleft(), "deadline", None)
                return
            self._dispatch(pending, inflight, payload, on_result, deadline)
            if not pending and not inflight:
                break
            # read "ready" messages that arrived while no call was running (e.g. a worker spawned
            # long before the first batch) before judging start-up as failed
            waiting = {w.conn: i for i, w in enumerate(self._workers) if not w.ready}
            for conn in connection.wait(list(waiting), 0) if waiting else []:
                self._receive(waiting[conn], pending, inflight, on_result)
            starting = [i for i, w in enumerate(self._workers) if not w.ready]
            now = time.monotonic()
            if not inflight and self._startup_failed(now):
                # Infrastructure, not a verifier fault: fail loudly rather than train on zeros.
                raise RuntimeError(
                    f"reward worker processes failed to start (last exit code {self._last_exitcode}). "
                    "Workers are spawned, which re-imports your main script: guard its entry point "
                    "with `if __name__ == '__main__':`, or use RewardManager(mode='inline')."
                )
            deadlines = [dl for _, dl in inflight.values()] or [now + 0.5]
            if deadline is not None:
                deadlines.append(deadline)
            wait_s = max(0.0, min(deadlines) - now)
            watched = {self._workers[i].conn: i for i in set(inflight) | set(starting)}
            for conn in connection.wait(list(watched), wait_s):
                self._receive(watched[conn], pending, inflight, on_result)
            now = time.monotonic()
            for idx, (task, task_deadline) in list(inflight.items()):
                if now >= task_deadline and (deadline is None or task_deadline < deadline):
                    del inflight[idx]
                    self._restart(idx)
                    pending.extend(on_result(task, "timeout", None))

    def _dispatch(
        self, pending: deque, inflight: dict, payload: Payload, on_result: OnResult, deadline: float | None
    ) -> None:
        for idx, worker in enumerate(self._workers):
            while pending and idx not in inflight and worker.ready:
                task = pending.popleft()
                if task.owner.tripped:
                    pending.extend(on_result(task, "skipped", None))
                    continue
                try:
                    worker.conn.send(("call", task.spec, *payload(task)))
                except (OSError, EOFError):  # worker died while idle: replace it, retry the task
                    self._restart(idx)
                    pending.appendleft(task)
                    break
                except Exception as exc:  # inputs that cannot be pickled
                    pending.extend(on_result(task, "fatal", f"could not send inputs to worker: {exc!r}"))
                    continue
                task_deadline = time.monotonic() + task.timeout_s
                inflight[idx] = (task, task_deadline if deadline is None else min(task_deadline, deadline))

    def _receive(self, idx: int, pending: deque, inflight: dict, on_result: OnResult) -> None:
        worker = self._workers[idx]
        try:
            kind, body = worker.conn.recv()
        except (EOFError, OSError):
            worker.proc.join(_JOIN_S)
            code = self._last_exitcode = worker.proc.exitcode
            if not worker.ready:
                self._startup_crashes += 1
            self._restart(idx)
            if idx in inflight:
                task, _ = inflight.pop(idx)
                pending.extend(on_result(task, "error", f"worker process died (exit code {code})"))
            return
        if kind == "ready":
            worker.ready = True
            self._startup_crashes = 0
            for key, err in body.items():
                if key not in self.init_errors:
                    log.error("reward worker: %s", err)
                self.init_errors[key] = err
            return
        task, _ = inflight.pop(idx)
        pending.extend(on_result(task, kind, body))

    def _startup_failed(self, now: float) -> bool:
        if any(w.ready for w in self._workers):
            return False
        if self._startup_crashes >= 3:
            return True
        return all(now - w.started > self.startup_timeout_s for w in self._workers)

    def close(self) -> None:
        """Stop all workers (asks politely, then terminates)."""
        workers, self._workers = self._workers, []
        for worker in workers:
            try:
                if worker.proc.is_alive():
                    worker.conn.send(("stop",))
            except Exception:
                pass
        for worker in workers:
            try:
                worker.proc.join(_JOIN_S)
            except Exception:
                pass
            worker.stop(graceful=False)
