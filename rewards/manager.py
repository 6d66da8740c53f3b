"""RewardManager: run several verifiers on a batch, weight them, and survive their faults.

Each verifier is called on the whole batch (split into ``num_workers`` chunks when workers
outnumber verifiers) with a deadline of ``timeout_s``. When a batch call fails (raises, returns a
non-list or a wrong-length list, times out, or kills its worker) it is retried one sample at a time,
each with its own deadline, so only the bad samples get ``failure_value``. Per-sample NaN/inf/
non-number entries become ``failure_value`` directly; ``None`` ("not applicable") does too but is
counted under ``none`` rather than ``failures``. ``score`` never raises for verifier faults.

Modes:

- ``"process"`` (default): a persistent pool of ``spawn``-ed workers; hung verifiers are killed and
  their worker restarted. The only mode that reliably stops hangs (including C code).
- ``"inline"``: verifiers run in the calling thread. From the main thread a ``signal.setitimer``
  deadline interrupts hangs that return to the interpreter (``time.sleep``, Python loops, not a
  blocking C call); from any other thread no deadline is enforced at all.

To bound the damage of a verifier that hangs on every sample, after ``max_timeouts_per_call``
per-sample timeouts in one ``score`` call its remaining samples get ``failure_value`` without
being run (counted as failures). ``batch_deadline_s`` bounds a whole ``score`` call: at the
deadline running calls are killed and every unfinished sample gets ``failure_value`` (counted as a
timeout; ``reward/deadline_exceeded`` is 1 for that step).

A verifier with ``sandbox=True`` runs each call in :mod:`rewards.sandbox` (a fresh interpreter per
call, with memory/CPU/process/output limits and no network), in either mode: its ``timeout_s``
becomes the sandbox's wall-clock limit. Its module is not imported by the calling process (unless
it is also listed in ``plugins``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from rewards import _pool
from rewards.registry import absolute_spec, check_exists, completion_text, load_plugins, lookup
from rewards.sandbox import SandboxLimits, check_confinement

log = logging.getLogger("rewards")
SANDBOX_GRACE_S = 5.0
"""Extra time the pool gives a sandboxed call beyond its own wall limit (start-up, clean-up)."""


@dataclass(frozen=True)
class VerifierSpec:
    """One verifier in a reward mix.

    Attributes:
        name: registered name, ``"pkg.module:function"`` or ``"path/file.py:function"``.
        weight: multiplier in the total reward (``total = sum(weight * reward)``).
        timeout_s: deadline for one call (whole batch, or one sample on retry).
        failure_value: reward given to a sample whose verification failed or returned None.
        label: metric name (``reward/{label}/mean``); defaults to ``name``, or the function name
            after ``:`` for module/file specs.
        sandbox: run every call in :mod:`rewards.sandbox` (for untrusted verifier code).
        params: keyword arguments for the verifier: a class's constructor arguments, or extra
            keyword arguments of a function on every call. Must be JSON-serialisable.
    """

    name: str
    weight: float = 1.0
    timeout_s: float = 10.0
    failure_value: float = 0.0
    label: str | None = None
    sandbox: bool = False
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"VerifierSpec.name must be a non-empty string, got {self.name!r}")
        if not math.isfinite(self.weight):
            raise ValueError(f"VerifierSpec({self.name!r}).weight must be finite, got {self.weight}")
        if not self.timeout_s > 0:
            raise ValueError(f"VerifierSpec({self.name!r}).timeout_s must be > 0, got {self.timeout_s}")
        if not math.isfinite(self.failure_value):
            raise ValueError(f"VerifierSpec({self.name!r}).failure_value must be finite")
        try:
            json.dumps(dict(self.params), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"VerifierSpec({self.name!r}).params must be JSON-serialisable: {exc}") from None

    @property
    def key(self) -> str:
        """Name used in metric keys and in ``score``'s per-verifier dict."""
        if self.label:
            return self.label
        return self.name.rpartition(":")[2] if ":" in self.name else self.name


@dataclass
class _State:
    """Per-verifier bookkeeping for one ``score`` call."""

    spec: VerifierSpec
    target: str
    n: int
    values: list[float] = field(default_factory=list)
    status: list[str] = field(default_factory=list)  # pending|ok|none|fail|timeout
    remaining: int = 0
    sample_timeouts: int = 0
    tripped: bool = False
    deadline_hit: bool = False
    first_error: str | None = None
    t_end: float | None = None

    def __post_init__(self) -> None:
        self.values = [self.spec.failure_value] * self.n
        self.status = ["pending"] * self.n
        self.remaining = self.n

    def settle(self, i: int, status: str, value: float | None = None) -> None:
        if self.status[i] != "pending":
            return
        self.status[i] = status
        if status == "ok" and value is not None:
            self.values[i] = value
        self.remaining -= 1
        if self.remaining == 0:
            self.t_end = time.monotonic()

    def error(self, message: str) -> None:
        if self.first_error is None:
            self.first_error = message


ScoreResult = tuple[list[float], dict[str, float], dict[str, list[float]]]


class RewardManager:
    """Weighted, fault-tolerant combination of verifiers.

    >>> with RewardManager([VerifierSpec("math"), VerifierSpec("format", weight=0.5)],
    ...                    mode="inline") as rm:
    ...     total, metrics, per = rm.score(["so \\\\boxed{4}", "5"], {"answer": ["4", "4"]})
    >>> total, per["math"], metrics["reward/format/mean"]
    ([1.5, 0.0], [1.0, 0.0], 0.5)
    """

    def __init__(
        self,
        specs: Sequence[VerifierSpec | str | Mapping[str, Any]],
        plugins: Sequence[str] = (),
        num_workers: int = 1,
        mode: Literal["process", "inline"] = "process",
        startup_timeout_s: float = 60.0,
        max_timeouts_per_call: int | None = 8,
        batch_deadline_s: float | None = None,
        sandbox_limits: SandboxLimits | Mapping[str, Any] | None = None,
    ) -> None:
        """Args beyond the module docstring: ``sandbox_limits`` are the limits of sandboxed
        verifiers (their ``wall_s`` is replaced by each verifier's ``timeout_s``)."""
        self.specs = [_coerce_spec(s) for s in specs]
        if not self.specs:
            raise ValueError("RewardManager needs at least one verifier")
        keys = [s.key for s in self.specs]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"duplicate verifier labels {dupes}; set VerifierSpec.label to tell them apart")
        if mode not in ("process", "inline"):
            raise ValueError(f"mode must be 'process' or 'inline', got {mode!r}")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if batch_deadline_s is not None and not batch_deadline_s > 0:
            raise ValueError(f"batch_deadline_s must be > 0 or None, got {batch_deadline_s}")
        if isinstance(sandbox_limits, Mapping):
            sandbox_limits = SandboxLimits(**sandbox_limits)
        self.sandbox_limits = sandbox_limits or SandboxLimits()
        self.batch_deadline_s = batch_deadline_s
        self.mode = mode
        self.num_workers = num_workers
        self.max_timeouts_per_call = max_timeouts_per_call
        # Absolute plugin paths: workers (and later calls) must not depend on the cwd.
        self.plugins = [os.path.abspath(p) if p.endswith(".py") or "/" in p else p for p in plugins]
        load_plugins(self.plugins)
        targets = [self._target(s) for s in self.specs]
        for spec, target in zip(self.specs, targets):  # fail fast, before any worker starts
            if spec.sandbox:
                check_exists(target["spec"])  # untrusted: do not import it here
                check_confinement(self.sandbox_limits, f"verifier {spec.key!r} (sandbox: true)")
            elif getattr(lookup(target["spec"]), "uses_sandbox", False):  # runs model-written code
                p = target["params"]
                check_confinement(SandboxLimits(confine=p.get("confine", "auto"),
                                                allow_unconfined=p.get("allow_unconfined", False)),
                                  f"verifier {spec.key!r}")  # fmt: skip
        self._targets = [json.dumps(t, sort_keys=True) for t in targets]
        unique = {key: t for key, t in zip(self._targets, targets)}
        self.totals: dict[str, float] = {"reward/worker_restarts": 0.0, "reward/deadline_exceeded": 0.0}
        for key in keys:
            for counter in ("calls", "samples", "failures", "timeouts", "none"):
                self.totals[f"reward/{key}/{counter}"] = 0.0
        self._lock = threading.Lock()
        self._pool: _pool.WorkerPool | None = None
        self._fns: dict[str, Any] = {}
        self._closed = False
        if mode == "inline":
            self._fns = {key: _pool.build_verifier(t, self.plugins) for key, t in unique.items()}
        else:
            self._pool = _pool.WorkerPool(num_workers, self.plugins, unique, startup_timeout_s)

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> RewardManager:
        """Build from an ``rlkit.config.RewardConfig`` (read by attribute; no rlkit import)."""
        specs = [
            VerifierSpec(v.name, v.weight, v.timeout_s, v.failure_value, label=getattr(v, "label", None),
                         sandbox=getattr(v, "sandbox", False), params=dict(getattr(v, "params", {}) or {}))
            for v in cfg.verifiers
        ]  # fmt: skip
        kwargs: dict[str, Any] = {"plugins": list(cfg.plugins), "num_workers": cfg.num_workers, "mode": cfg.mode,
                                  "batch_deadline_s": getattr(cfg, "batch_deadline_s", None)}  # fmt: skip
        sb = getattr(cfg, "sandbox", None)
        if sb is not None:
            kwargs["sandbox_limits"] = SandboxLimits(
                memory_mb=sb.memory_mb,
                max_output_bytes=sb.max_output_kb * 1024,
                max_procs=sb.max_procs,
                network=sb.network,
                confine=getattr(sb, "confine", "auto"),
                allow_unconfined=getattr(sb, "allow_unconfined", False),
            )
        return cls(specs, **{**kwargs, **overrides})

    def _target(self, spec: VerifierSpec) -> dict[str, Any]:
        limits, params = None, dict(spec.params)
        if spec.sandbox:
            limits = dataclasses.asdict(dataclasses.replace(self.sandbox_limits, wall_s=spec.timeout_s))
        elif getattr(lookup(absolute_spec(spec.name)), "uses_sandbox", False):
            # a verifier that sandboxes code itself (code_tests) follows the mix's confinement setting
            params.setdefault("confine", self.sandbox_limits.confine)
            params.setdefault("allow_unconfined", self.sandbox_limits.allow_unconfined)
        return {"spec": absolute_spec(spec.name), "params": params, "sandbox": limits}

    def score(self, completions: Sequence[Any], columns: Mapping[str, Any] | None = None) -> ScoreResult:
        """Score a batch.

        Args:
            completions: ``B`` completions (strings or TRL conversational message lists).
            columns: dataset columns, each a length-``B`` list (others are passed unchanged).

        Returns:
            ``(total_B, metrics, per_verifier)``: weighted totals, metrics
            (``reward/{key}/{mean,failures,timeouts,none,latency_s}``, ``reward/total/mean``,
            ``reward/worker_restarts``) and each verifier's ``B`` rewards after failure handling.
        """
        texts = [completion_text(c) for c in completions]
        n = len(texts)
        const, aligned = _split_columns(columns or {}, n)
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardManager is closed")
            t0 = time.monotonic()
            deadline = t0 + self.batch_deadline_s if self.batch_deadline_s is not None else None
            states = [_State(spec, target, n) for spec, target in zip(self.specs, self._targets)]
            tasks = [
                _pool.Task(
                    st.target, idx, st.spec.timeout_s + (SANDBOX_GRACE_S if st.spec.sandbox else 0.0), st
                )
                for st in states
                for idx in self._chunks(n)
            ]

            def payload(task: _pool.Task) -> tuple[list[str], dict[str, Any]]:
                cols = {k: [v[i] for i in task.indices] for k, v in aligned.items()}
                return [texts[i] for i in task.indices], {**const, **cols}

            restarts_before = self._pool.restarts if self._pool else 0
            if self._pool is not None:
                self._pool.run(tasks, payload, self._on_result, deadline)
            else:
                self._run_inline(tasks, payload, deadline)
            restarts = (self._pool.restarts if self._pool else 0) - restarts_before
            return self._summarize(states, t0, restarts)

    def _chunks(self, n: int) -> list[list[int]]:
        if n == 0:
            return []
        parts = max(1, min(n, self.num_workers // len(self.specs))) if self._pool else 1
        size = -(-n // parts)
        return [list(range(s, min(n, s + size))) for s in range(0, n, size)]

    def _on_result(self, task: _pool.Task, kind: str, body: Any) -> list[_pool.Task]:
        st: _State = task.owner
        if kind == "deadline":
            st.deadline_hit = True
            st.error(f"batch deadline of {self.batch_deadline_s:g}s passed")
            for i in task.indices:
                st.settle(i, "timeout")
            return []
        if kind == "ok":
            for i, value in zip(task.indices, body):
                if value is None:
                    st.settle(i, "none")
                elif math.isnan(value):
                    st.error("returned NaN/inf or a non-number")
                    st.settle(i, "fail")
                else:
                    st.settle(i, "ok", value)
            return []
        message = body if isinstance(body, str) else kind
        st.error(message if kind != "timeout" else f"timed out after {task.timeout_s:g}s")
        if kind in ("error", "timeout") and len(task.indices) > 1 and not st.tripped:
            return [_pool.Task(task.spec, [i], task.timeout_s, st) for i in task.indices]
        for i in task.indices:
            st.settle(i, "timeout" if kind == "timeout" else "fail")
        if kind == "timeout":
            st.sample_timeouts += 1
            limit = self.max_timeouts_per_call
            if limit is not None and st.sample_timeouts >= limit and not st.tripped:
                st.tripped = True
                log.warning("reward %s: %d timeouts, skipping its remaining samples", st.spec.key, limit)
        return []

    def _run_inline(self, tasks: list[_pool.Task], payload: _pool.Payload, deadline: float | None) -> None:
        pending = list(reversed(tasks))
        while pending:
            task = pending.pop()
            left = deadline - time.monotonic() if deadline is not None else math.inf
            if left <= 0:
                follow = self._on_result(task, "deadline", None)
            elif task.owner.tripped:
                follow = self._on_result(task, "skipped", None)
            else:
                texts, cols = payload(task)
                timeout = min(task.timeout_s, left)
                kind, body = _pool.call_with_deadline(self._fns[task.spec], texts, cols, timeout)
                if kind == "timeout" and timeout < task.timeout_s:
                    kind = "deadline"
                follow = self._on_result(task, kind, body)
            pending.extend(reversed(follow))

    def _summarize(self, states: list[_State], t0: float, restarts: int) -> ScoreResult:
        n = states[0].n
        total = [0.0] * n
        metrics: dict[str, float] = {}
        per: dict[str, list[float]] = {}
        for st in states:
            key, spec = st.spec.key, st.spec
            failures = sum(s in ("fail", "timeout") for s in st.status)
            timeouts = st.status.count("timeout")
            nones = st.status.count("none")
            for i, v in enumerate(st.values):
                total[i] += spec.weight * v
            per[key] = list(st.values)
            metrics[f"reward/{key}/mean"] = sum(st.values) / n if n else 0.0
            metrics[f"reward/{key}/failures"] = float(failures)
            metrics[f"reward/{key}/timeouts"] = float(timeouts)
            metrics[f"reward/{key}/none"] = float(nones)
            metrics[f"reward/{key}/latency_s"] = (st.t_end or time.monotonic()) - t0
            for counter, value in (("calls", 1), ("samples", n), ("failures", failures),
                                   ("timeouts", timeouts), ("none", nones)):  # fmt: skip
                self.totals[f"reward/{key}/{counter}"] += value
            if failures:
                log.warning("reward %s: %d/%d samples failed (%d timeouts): %s",
                            key, failures, n, timeouts, st.first_error)  # fmt: skip
        metrics["reward/total/mean"] = sum(total) / n if n else 0.0
        metrics["reward/worker_restarts"] = float(restarts)
        metrics["reward/deadline_exceeded"] = float(any(st.deadline_hit for st in states))
        self.totals["reward/worker_restarts"] += restarts
        self.totals["reward/deadline_exceeded"] += metrics["reward/deadline_exceeded"]
        return total, metrics, per

    def close(self) -> None:
        """Stop worker processes. Idempotent; also called by ``__exit__`` and ``__del__``."""
        self._closed = True
        pool, self._pool = getattr(self, "_pool", None), None
        if pool is not None:
            pool.close()

    def __enter__(self) -> RewardManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _coerce_spec(spec: VerifierSpec | str | Mapping[str, Any]) -> VerifierSpec:
    if isinstance(spec, VerifierSpec):
        return spec
    if isinstance(spec, str):
        return VerifierSpec(spec)
    if isinstance(spec, Mapping):
        return VerifierSpec(**spec)
    raise TypeError(f"expected VerifierSpec, str or mapping, got {type(spec).__name__}")


def _split_columns(columns: Mapping[str, Any], n: int) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Split into constant columns (passed as-is) and per-sample columns of length ``n``."""
    const: dict[str, Any] = {}
    aligned: dict[str, list[Any]] = {}
    for key, value in columns.items():
        if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__"):
            const[key] = value
        elif len(value) == n:
            aligned[key] = list(value)
        else:
            raise ValueError(f"column {key!r} has {len(value)} entries for {n} completions")
    return const, aligned
