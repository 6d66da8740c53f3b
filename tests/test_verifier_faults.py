"""Issue-7 fault matrix: sandboxed verifiers that raise, hang, return junk, allocate 4 GiB, print
100 MB, open a socket or fork-bomb. Each costs only its bad sample the configured failure value, is
counted, scoring goes on, no process is left behind, and the scoring process's memory stays flat.
Plus the per-batch deadline, in both execution modes."""

from __future__ import annotations

import gc
import socket
import textwrap
import time

import psutil
import pytest

from rewards import RewardManager, VerifierSpec
from rewards.sandbox import isolation_report

FAIL = -1.0
TIMEOUT_S = 1.5
BATCH = ["fine", "BAD"]
FAULTS = {  # name -> (failures, timeouts) for BATCH
    "raises": (1, 0),
    "sleeps": (1, 1),
    "returns_nan": (1, 0),
    "returns_none": (0, 0),  # "not applicable": failure value, counted under none
    "returns_string": (1, 0),
    "alloc_4gib": (1, 0),
    "print_100mb": (1, 0),
    "opens_socket": (1, 0),
    "fork_bomb": (1, 1),
}
SOURCE = textwrap.dedent("""
    import os, socket, time

    def _ok(completions):
        return [1.0] * len(completions)

    def _bad(completions):
        return any("BAD" in c for c in completions)

    def raises(completions, **kw):
        if _bad(completions):
            raise RuntimeError("verifier exploded")
        return _ok(completions)

    def sleeps(completions, **kw):
        if _bad(completions):
            time.sleep(120)
        return _ok(completions)

    def returns_nan(completions, **kw):
        return [float("nan") if "BAD" in c else 1.0 for c in completions]

    def returns_none(completions, **kw):
        return [None if "BAD" in c else 1.0 for c in completions]

    def returns_string(completions, **kw):
        return ["high" if "BAD" in c else 1.0 for c in completions]

    def alloc_4gib(completions, **kw):
        if _bad(completions):
            blob = b"x" * (4 << 30)  # written, not just reserved: 4 GiB of real memory
            return [float(len(blob))] * len(completions)
        return _ok(completions)

    def print_100mb(completions, **kw):
        if _bad(completions):
            print("x" * (100 << 20), flush=True)
        return _ok(completions)

    def opens_socket(completions, port=0, **kw):
        if _bad(completions):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return _ok(completions)

    def fork_bomb(completions, **kw):
        if _bad(completions):
            while True:
                try:
                    os.fork()
                except OSError:
                    time.sleep(0.01)
        return _ok(completions)
""")


@pytest.fixture(scope="module")
def fault_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "faulty_verifiers.py"
    path.write_text(SOURCE)
    return str(path)


@pytest.fixture(scope="module")
def listener():
    """A loopback server the socket verifier aims at; outside the sandbox nothing stops it."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.setblocking(False)
        yield server


def _specs(fault_file, port, names=tuple(FAULTS)):
    specs = [VerifierSpec("format", weight=2.0)]
    for name in names:
        params = {"port": port} if name == "opens_socket" else {}
        specs.append(VerifierSpec(f"{fault_file}:{name}", timeout_s=TIMEOUT_S, failure_value=FAIL,
                                  sandbox=True, params=params))  # fmt: skip
    return specs


def _sandbox_leftovers():
    return [p for p in psutil.process_iter(["cmdline", "status"])
            if "rlkit-sandbox-" in " ".join(p.info["cmdline"] or []) and p.info["status"] != "zombie"]  # fmt: skip


def _check_faults(metrics, per, total):
    for name, (failures, timeouts) in FAULTS.items():
        assert per[name] == [1.0, FAIL], name
        assert metrics[f"reward/{name}/failures"] == failures, name
        assert metrics[f"reward/{name}/timeouts"] == timeouts, name
        assert metrics[f"reward/{name}/none"] == (1 if name == "returns_none" else 0), name
        assert metrics[f"reward/{name}/latency_s"] > 0
    assert per["format"] == [0.0, 0.0] and metrics["reward/format/failures"] == 0
    assert total == pytest.approx([len(FAULTS), FAIL * len(FAULTS)])


@pytest.mark.skipif(
    not isolation_report().get("net"), reason="no network namespace: the socket fault cannot fail"
)
def test_fault_matrix_inline_keeps_memory_flat_and_leaves_nothing(fault_file, listener):
    """Inline mode: the sandboxes are children of this very process, so its RSS is the trainer's."""
    port = listener.getsockname()[1]
    with RewardManager(_specs(fault_file, port, ["returns_nan"]), mode="inline") as warm:
        warm.score(["warm-up"], {})  # first-call imports and allocator pools are not a leak
    with RewardManager(_specs(fault_file, port), mode="inline") as rm:
        gc.collect()
        rss_before = psutil.Process().memory_info().rss
        total, metrics, per = rm.score(BATCH, {})
        gc.collect()
        rss_after = psutil.Process().memory_info().rss
        _check_faults(metrics, per, total)
        # Scoring goes on: the next batch is clean and every counter kept its history.
        _, _, per2 = rm.score(["next batch"], {})
        assert all(per2[name] == [1.0] for name in FAULTS)
        assert rm.totals["reward/fork_bomb/timeouts"] == 1 and rm.totals["reward/alloc_4gib/failures"] == 1
    assert rss_after - rss_before < 32 << 20, f"RSS grew by {(rss_after - rss_before) >> 20} MiB"
    with pytest.raises(BlockingIOError):
        listener.accept()  # the socket verifier never got out of its network namespace
    assert _sandbox_leftovers() == []


@pytest.mark.slow
def test_fault_matrix_in_worker_processes(fault_file, listener):
    port = listener.getsockname()[1]
    with RewardManager(_specs(fault_file, port), num_workers=2) as rm:
        total, metrics, per = rm.score(BATCH, {})
        _check_faults(metrics, per, total)
        assert metrics["reward/worker_restarts"] == 0  # sandbox timeouts never cost a worker
        assert rm.score(["a"], {})[2]["fork_bomb"] == [1.0]
    assert _sandbox_leftovers() == []


def test_socket_fault_is_real_without_the_sandbox(fault_file, listener):
    """Control for the matrix: unsandboxed, the same verifier does reach the loopback listener."""
    spec = VerifierSpec(
        f"{fault_file}:opens_socket", failure_value=FAIL, params={"port": listener.getsockname()[1]}
    )
    with RewardManager([spec], mode="inline") as rm:
        assert rm.score(["BAD"], {})[2]["opens_socket"] == [1.0]
    time.sleep(0.05)
    conn, _ = listener.accept()
    conn.close()


@pytest.mark.parametrize("mode", ["inline", "process"])
def test_batch_deadline_bounds_a_whole_score_call(fault_file, mode):
    specs = [VerifierSpec("format"), VerifierSpec(f"{fault_file}:sleeps", timeout_s=30.0, failure_value=FAIL)]
    with RewardManager(specs, mode=mode, batch_deadline_s=1.0) as rm:
        rm.score(["warm"], {})  # workers up before the clock starts
        t0 = time.monotonic()
        total, metrics, per = rm.score(["\\boxed{1}", "BAD", "BAD"], {})
        assert time.monotonic() - t0 < 5.0
        assert per["sleeps"] == [FAIL, FAIL, FAIL] and metrics["reward/sleeps/timeouts"] == 3
        assert per["format"] == [1.0, 0.0, 0.0] and metrics["reward/deadline_exceeded"] == 1.0
        _, metrics, per = rm.score(["fine"], {})  # the next step starts with a fresh deadline
        assert per["sleeps"] == [1.0] and metrics["reward/deadline_exceeded"] == 0.0
        assert rm.totals["reward/deadline_exceeded"] == 1.0


def test_sandboxed_specs_are_checked_without_importing_them(tmp_path):
    bomb = tmp_path / "imports_badly.py"
    bomb.write_text(
        "raise SystemExit('imported in the trainer!')\n\ndef f(completions, **kw):\n    return [1.0]\n"
    )
    with RewardManager([VerifierSpec(f"{bomb}:f", sandbox=True)], mode="inline") as rm:
        assert rm.specs[0].sandbox  # built fine: the module was not executed here
    with pytest.raises(FileNotFoundError):
        RewardManager([VerifierSpec(f"{tmp_path}/missing.py:f", sandbox=True)], mode="inline")
    with pytest.raises(ValueError, match="JSON"):
        VerifierSpec("format", params={"x": object()})
