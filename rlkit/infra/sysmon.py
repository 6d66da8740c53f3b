"""Memory of the whole run: this process and every descendant (Ray's GCS, raylet and actor workers).

Summing RSS over processes counts shared pages (the torch/transformers libraries, the model mmap, Ray's
object store) once per process and overstates what the run needs. PSS splits every shared page among
the processes that map it, so the PSS sum over the tree is the memory the run really holds; both are
reported. A daemon thread samples every ``interval_s`` seconds and keeps the peaks, and the PSS of each
role (the driver, each kind of Ray actor, Ray's own daemons) at the moment of the peak, so a large peak
can be traced to the process that holds it.
"""

from __future__ import annotations

import os
import threading

_GIB = float(1 << 30)


def role_of(cmdline: list[str], name: str, is_root: bool) -> str:
    """A short label for a process of the tree: ``driver``, ``ray::LearnerWorker`` (Ray actors rename
    their process ``ray::Class.method``; the method is dropped), ``raylet``, ``gcs_server``, ``ray::IDLE``..."""
    if is_root:
        return "driver"
    first = cmdline[0] if cmdline else name
    if first.startswith("ray::"):
        return first.split(".", 1)[0].split(" ", 1)[0]
    base = os.path.basename(first.split(" ", 1)[0])
    if base.startswith("python") and len(cmdline) > 1:  # name it by what it runs
        args = cmdline[1:]
        for flag in ("-c", "-m"):
            if flag in args:
                what = args[args.index(flag) + 1] if args.index(flag) + 1 < len(args) else ""
                if flag == "-c":  # code: multiprocessing's spawned workers run "from multiprocessing.spawn ..."
                    return "python multiprocessing" if "multiprocessing" in what else "python -c"
                return f"python -m {what}"
        script = next((a for a in args if not a.startswith("-")), "")
        return f"python {os.path.basename(script)}" if script else base
    return base or name


def tree_memory(root_pid: int | None = None, roles: bool = False) -> dict:
    """Current ``{"pss_gib", "rss_gib", "procs"}`` summed over ``root_pid`` (default: this process) and its
    descendants; with ``roles``, also ``"roles": {label: pss_gib}`` (see :func:`role_of`)."""
    import psutil

    try:
        root = psutil.Process(root_pid or os.getpid())
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return {"pss_gib": 0.0, "rss_gib": 0.0, "procs": 0.0, **({"roles": {}} if roles else {})}
    pss = rss = 0
    n = 0
    by_role: dict[str, float] = {}
    for p in procs:
        try:
            info = p.memory_full_info()  # reads /proc/PID/smaps_rollup on Linux
            label = role_of(p.cmdline(), p.name(), p.pid == root.pid) if roles else ""
        except psutil.Error:  # exited between listing and reading, or not ours to read
            continue
        p_pss = getattr(info, "pss", info.rss)
        pss += p_pss
        rss += info.rss
        n += 1
        if roles:
            by_role[label] = by_role.get(label, 0.0) + p_pss / _GIB
    out: dict = {"pss_gib": pss / _GIB, "rss_gib": rss / _GIB, "procs": float(n)}
    if roles:
        out["roles"] = dict(sorted(by_role.items(), key=lambda kv: -kv[1]))
    return out


def format_roles(roles: dict[str, float], top: int = 6) -> str:
    """``"ray::LearnerWorker 3.10, driver 0.52, ..."`` (GiB), the largest first; the rest summed as ``other``."""
    items = sorted(roles.items(), key=lambda kv: -kv[1])
    shown = [f"{k} {v:.2f}" for k, v in items[:top]]
    if len(items) > top:
        shown.append(f"other {sum(v for _, v in items[top:]):.2f}")
    return ", ".join(shown)


class MemoryMonitor:
    """Background sampler of :func:`tree_memory`; ``metrics()`` gives the current values and the peaks."""

    def __init__(self, interval_s: float = 1.0, root_pid: int | None = None):
        self.interval_s = interval_s
        self.root_pid = root_pid or os.getpid()
        self.peak_pss_gib = 0.0
        self.peak_rss_gib = 0.0
        self.peak_roles: dict[str, float] = {}  # PSS per role when the PSS peak was sampled
        self.last: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def sample(self) -> dict[str, float]:
        m = tree_memory(self.root_pid, roles=True)
        roles = m.pop("roles")
        with self._lock:
            self.last = m
            if m["pss_gib"] >= self.peak_pss_gib:
                self.peak_roles = roles
            self.peak_pss_gib = max(self.peak_pss_gib, m["pss_gib"])
            self.peak_rss_gib = max(self.peak_rss_gib, m["rss_gib"])
        return m

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> MemoryMonitor:
        if self._thread is None:
            self.sample()
            self._thread = threading.Thread(target=self._loop, name="rlkit-memory", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval_s + 1)
            self._thread = None

    def metrics(self) -> dict[str, float]:
        """``sys/mem_*`` metrics: the current tree PSS/RSS and the peaks since :meth:`start`."""
        with self._lock:
            last = dict(self.last)
            return {"sys/mem_pss_gib": last.get("pss_gib", 0.0), "sys/mem_rss_gib": last.get("rss_gib", 0.0),
                    "sys/mem_pss_peak_gib": self.peak_pss_gib, "sys/mem_rss_peak_gib": self.peak_rss_gib,
                    "sys/procs": last.get("procs", 0.0)}

    def __enter__(self) -> MemoryMonitor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def report_peak(self, print_fn) -> dict[str, float]:
        """Print the run's peak memory; returns it rounded, for the run summary."""
        mem = self.metrics()
        with self._lock:
            roles = dict(self.peak_roles)
        print_fn(f"peak memory (this process + Ray workers): PSS {mem['sys/mem_pss_peak_gib']:.2f} GiB"
                 f" (summed RSS {mem['sys/mem_rss_peak_gib']:.2f} GiB); at the peak, GiB: {format_roles(roles)}")
        return {"pss": round(mem["sys/mem_pss_peak_gib"], 3), "rss_sum": round(mem["sys/mem_rss_peak_gib"], 3),
                "pss_by_role": {k: round(v, 3) for k, v in roles.items()}}
