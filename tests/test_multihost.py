"""Multi-node for real on one machine: Ray nodes in network namespaces (tests/netns.py).

Three hosts on a private bridge, each a Ray node started with ``recipes/launch/README.md``'s
commands: host 1 is the head and the learner's node, hosts 2 and 3 carry the rollout engines. The
real CLI runs the driver on host 1 with ``cluster.address``; the learner and the engines talk over
the bridge (Ray, the gloo weight-sync group, DeepSpeed's gloo group). Faults: a node lost, a link
cut during a weight sync, an unreachable rendezvous, a driver killed -9.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest
from netns import Hosts, RayCluster, unavailable

# their own time budget: each test at most 6 minutes (a fault that hangs fails the test, never CI)
pytestmark = [pytest.mark.slow, pytest.mark.multihost, pytest.mark.timeout(360)]

WHY = unavailable()
if WHY:
    pytestmark.append(pytest.mark.skip(reason=f"multi-host tests need network namespaces: {WHY}"))

ROOT = Path(__file__).resolve().parents[1]
RESOURCES = {1: {"learner": 1, "ds": 1}, 2: {"rollout": 2, "ds": 1}, 3: {"rollout": 2}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    work = tmp_path_factory.mktemp("multihost")
    hosts = Hosts(3, work)
    try:
        # the learner's node holds weight syncs on request (RLKIT_HOLD_SYNC: see _hold_point)
        hold = work / "hold"
        c = RayCluster(hosts, RESOURCES, cpus=4, node_env={1: {"RLKIT_HOLD_SYNC": str(hold)}})
        c.hold = hold
        yield c
    finally:
        hosts.close()


@pytest.fixture(autouse=True)
def _all_nodes_up(request):
    """Every test starts on a 3-node cluster (a fault test may have taken a node down)."""
    if "cluster" not in request.fixturenames:
        yield
        return
    c = request.getfixturevalue("cluster")
    for i in (1, 2, 3):
        c.hosts.link(i, True)
    alive = set(c.alive_nodes())
    for i in (2, 3):
        if c.hosts.ip(i) not in alive:
            c.hosts.kill_host(i)
            c.start(i)
    c.wait_nodes(3)
    yield
    # a run, however it ended, leaves no placement group or actor of its own on the cluster
    t0 = time.time()
    left = _wait_for(lambda: (lo := c.leftovers()) == {"placement_groups": 0, "actors": 0} or
                     (time.time() - t0 > 30 and lo), 40, "the run's leftovers checked", step=1.0)
    assert left is True, f"left on the cluster 30 s after the run: {left}"


def _overrides(model_dir: str, out: Path, name: str, steps: int = 4, *extra: str) -> list[str]:
    from test_train_e2e import tiny_overrides

    return [*tiny_overrides(model_dir, out, name, steps=steps), "eval.after=false", "cluster.placement=split",
            "cluster.weight_sync=collective", "engine.num_engines=2", *extra]


def _on_cluster(c: RayCluster, learner: str = "{learner: 1}", engine: str = "{rollout: 1}") -> list[str]:
    return [f"cluster.address={c.address}", f"cluster.learner_resources={learner}",
            f"cluster.engine_resources={engine}", "cluster.sync_timeout_s=20", "cluster.placement_timeout_s=60"]


def _train_on_host(c: RayCluster, args: list[str], log: Path, timeout: float = 400,
                   env: dict | None = None) -> tuple[int, str]:
    proc = c.hosts.popen(1, [sys.executable, "-m", "rlkit.cli", "train", "recipes/quickstart.yaml", *args], log,
                         env=env)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return rc, log.read_text()


def _local_run(args: list[str]) -> None:
    """The same recipe on one host: a private local Ray in this (the root) namespace."""
    from test_train_e2e import _run_cli

    r = _run_cli(["train", "recipes/quickstart.yaml", *args])
    assert r.returncode == 0, r.stderr[-3000:]


def _stable(run_dir: Path) -> list[dict]:
    """Per-step metrics without timings and machine state (as the golden runs compare them)."""
    from golden import stable

    from rlkit.infra.tracking import read_metrics

    return [stable(m) for m in read_metrics(run_dir)]


def _assert_same(got: list[dict], want: list[dict]) -> None:
    from golden import compare

    bad = compare("multi-host vs one host", got, want, tol=1e-6)
    assert not bad, "\n".join(bad)


def _placement(log: str) -> str:
    m = re.search(r"rlkit: placement: (.*)", log)
    assert m, log[-3000:]
    return m.group(1)


def _wait_for(pred, timeout: float, what: str, step: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise TimeoutError(f"{what} not within {timeout:g}s")


def _steps_logged(run_dir: Path) -> int:
    p = run_dir / "metrics.jsonl"
    return sum(1 for ln in p.read_text().splitlines() if ln.strip()) if p.exists() else 0


_BASE: dict[str, list[dict]] = {}


def _baseline(tiny_model_dir: str, tmp: Path, kind: str, *extra: str) -> list[dict]:
    """The single-host run of a configuration (made once per module)."""
    if kind not in _BASE:
        out = tmp / f"base-{kind}"
        _local_run([*_overrides(tiny_model_dir, out, "r", 4, *extra), "cluster.num_cpus=4"])
        _BASE[kind] = _stable(out / "r")
    return _BASE[kind]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_learner_and_engines_on_different_hosts_equal_one_host(cluster, tiny_model_dir, tmp_path, lora):
    """The learner on host 1, both engines on a rollout host, weights over a gloo group across the
    bridge: every step's metrics equal the same recipe run on one host."""
    extra = ("model.lora.rank=4",) if lora else ()
    rc, log = _train_on_host(cluster, [*_overrides(tiny_model_dir, tmp_path, "mh", 4, *extra), *_on_cluster(cluster)],
                             tmp_path / "log")
    assert rc == 0, log[-4000:]
    where = _placement(log)
    h = cluster.hosts
    assert where.startswith(f"learner rank on {h.ip(1)} | engines 0,1 on "), where
    assert where.endswith((h.ip(2), h.ip(3))), where
    _assert_same(_stable(tmp_path / "mh"), _baseline(tiny_model_dir, tmp_path.parent, "lora" if lora else "full",
                                                     *extra))


def test_deepspeed_ranks_on_two_hosts(cluster, tiny_model_dir, tmp_path):
    """Two DeepSpeed ranks, one on host 1 and one on host 2 (their gloo group across the bridge),
    rank 0 broadcasting to the engines: same metrics as the two ranks on one host."""
    ds = ("learner.name=deepspeed", "learner.num_ranks=2")
    rc, log = _train_on_host(cluster, [*_overrides(tiny_model_dir, tmp_path, "ds", 4, *ds), *_on_cluster(cluster, learner="{ds: 1}")], tmp_path / "log")
    assert rc == 0, log[-4000:]
    h = cluster.hosts
    assert _placement(log).startswith(f"learner ranks on {h.ip(1)}, {h.ip(2)} |") or \
        _placement(log).startswith(f"learner ranks on {h.ip(2)}, {h.ip(1)} |"), _placement(log)
    _assert_same(_stable(tmp_path / "ds"), _baseline(tiny_model_dir, tmp_path.parent, "ds", *ds))


def test_ray_job_submit_to_the_head(cluster, tiny_model_dir, tmp_path):
    """README's `ray job submit` from another host: the job joins the cluster through RAY_ADDRESS."""
    args = [*_overrides(tiny_model_dir, tmp_path, "job", 4), "cluster.learner_resources={learner: 1}",
            "cluster.engine_resources={rollout: 1}"]
    quoted = " ".join(f"'{a}'" for a in args)
    cmd = (f"ray job submit --address=http://{cluster.hosts.ip(1)}:8265 -- "
           f"bash -c \"cd {ROOT} && {sys.executable} -m rlkit.cli train recipes/quickstart.yaml {quoted}\"")
    r = cluster.hosts.run(2, cmd, timeout=400)
    assert r.returncode == 0 and "succeeded" in r.stdout, (r.stdout[-4000:], r.stderr[-2000:])
    _assert_same(_stable(tmp_path / "job"), _baseline(tiny_model_dir, tmp_path.parent, "full"))


def test_driver_kill9_then_resume_on_the_cluster_loses_nothing(cluster, tiny_model_dir, tmp_path):
    """The driver SIGKILLed mid-step 3: within 10 s no actor process of the run is left on any
    host (Ray releases a dead driver's actors); rerunning the command resumes from step 2 and
    ends with the metrics of an uninterrupted single-host run."""
    args = [*_overrides(tiny_model_dir, tmp_path, "k9", 4), *_on_cluster(cluster)]
    rc, log = _train_on_host(cluster, args, tmp_path / "log1", env=cluster.hosts.env(RLKIT_KILL_AT_STEP="3"))
    assert rc == -9, log[-3000:]
    t0 = time.time()
    h = cluster.hosts

    def workers_left() -> list[str]:
        left = []
        for i in (1, 2, 3):
            for p in h.pids(i):
                try:
                    cmd = Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                if "LearnerWorker" in cmd or "RolloutWorker" in cmd:
                    left.append(f"host {i}: {p} {cmd[:60]}")
        return left

    _wait_for(lambda: not workers_left(), 10, "the killed run's actors gone")
    gone_s = time.time() - t0
    rc, log = _train_on_host(cluster, args, tmp_path / "log2")
    assert rc == 0 and "resumed after step 2" in log, log[-4000:]
    _assert_same(_stable(tmp_path / "k9"), _baseline(tiny_model_dir, tmp_path.parent, "full"))
    print(f"driver kill -9: actors gone after {gone_s:.1f}s")


def test_unreachable_rendezvous_is_a_clear_error_within_the_timeout(cluster):
    """A rank on host 2 joining a weight-sync group whose rank-0 address does not answer (a live
    host with nothing listening; an address nobody has): an error naming the rank and the address
    within the timeout."""
    h = cluster.hosts
    for addr in (h.ip(1), f"10.213.{h.k}.77"):
        code = ("import time; from rollout.weight_transfer import SyncGroup, DistributedInitError\n"
                "t = time.time()\n"
                "try:\n"
                f"    SyncGroup.join('{addr}', 29999, 1, 2, 'gloo', 5.0)\n"
                "except DistributedInitError as e:\n"
                "    print('ERR', round(time.time() - t, 1), e)\n")
        r = h.run(2, f"{sys.executable} -c \"{code}\"", timeout=60)
        out = r.stdout.strip()
        assert out.startswith("ERR"), (out, r.stderr[-2000:])
        took = float(out.split()[1])
        assert "rank 1 of 2" in out and f"tcp://{addr}:29999" in out and "cluster.sync_timeout_s" in out, out
        assert took < 5.0 + 10, out
        print(f"unreachable rendezvous {addr}: error after {took:.1f}s: {out[:200]}")


def test_engine_node_lost_mid_run_engine_recreated_on_another_node(cluster, tiny_model_dir, tmp_path):
    """The Ray node holding the engines is killed (every process of its host) after step 2: Ray
    marks it dead, the engines are recreated on the other rollout host with the current weights,
    and the run finishes."""
    args = [*_overrides(tiny_model_dir, tmp_path, "lost", 6), *_on_cluster(cluster)]
    proc = cluster.hosts.popen(1, [sys.executable, "-m", "rlkit.cli", "train", "recipes/quickstart.yaml", *args],
                               tmp_path / "log")
    try:
        _wait_for(lambda: _steps_logged(tmp_path / "lost") >= 2 or proc.poll() is not None, 300, "step 2")
        log = (tmp_path / "log").read_text()
        where = _placement(log)
        victim = 2 if where.endswith(cluster.hosts.ip(2)) else 3
        t0 = time.time()
        cluster.hosts.kill_host(victim)
        rc = proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "log").read_text()
    assert rc == 0, log[-4000:]
    other = cluster.hosts.ip(5 - victim)
    assert f"recreated on node {other}" in log, log[-4000:]
    assert _steps_logged(tmp_path / "lost") == 6
    print(f"engine node lost: run finished {time.time() - t0:.1f}s after the kill")


def test_engine_node_lost_without_capacity_stops_naming_node_and_checkpoint(cluster, tiny_model_dir, tmp_path):
    """Each engine needs a whole rollout host: when one host is lost no node can take its engine,
    so the run stops within cluster.placement_timeout_s with one error naming the node and the
    checkpoint to resume from; with the host back, rerunning the command finishes the run."""
    args = [*_overrides(tiny_model_dir, tmp_path, "nocap", 6), *_on_cluster(cluster, engine="{rollout: 2}"),
            "cluster.placement_timeout_s=20"]
    proc = cluster.hosts.popen(1, [sys.executable, "-m", "rlkit.cli", "train", "recipes/quickstart.yaml", *args],
                               tmp_path / "log")
    try:
        _wait_for(lambda: _steps_logged(tmp_path / "nocap") >= 2 or proc.poll() is not None, 300, "step 2")
        t0 = time.time()
        cluster.hosts.kill_host(3)
        rc = proc.wait(timeout=400)
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "log").read_text()
    assert rc == 1, log[-4000:]
    err = [ln for ln in log.splitlines() if ln.startswith("rlkit: ")]
    assert any(f"on node {cluster.hosts.ip(3)}" in ln and "cluster.placement_timeout_s=20" in ln for ln in err), err
    assert any("resume from" in ln and "checkpoints" in ln for ln in err), err
    assert "Traceback" not in "\n".join(log.splitlines()[-5:]), log[-2000:]
    print(f"engine node lost, no capacity: stopped {took:.1f}s after the kill")
    cluster.start(3)
    cluster.wait_nodes(3)
    rc, log = _train_on_host(cluster, args, tmp_path / "log2")
    assert rc == 0 and "resumed after step" in log, log[-4000:]
    assert _steps_logged(tmp_path / "nocap") == 6


def test_link_down_during_a_weight_sync(cluster, tiny_model_dir, tmp_path):
    """The engines' host is cut off (its link set down) while rank 0 is broadcasting: the run
    ends within cluster.sync_timeout_s + 5 s with an error naming the ranks and the address (or,
    if Ray declares the node dead first, recovers); with the link back the command resumes and
    finishes."""
    hold = cluster.hold
    args = [*_overrides(tiny_model_dir, tmp_path, "link", 5), *_on_cluster(cluster)]
    proc = cluster.hosts.popen(1, [sys.executable, "-m", "rlkit.cli", "train", "recipes/quickstart.yaml", *args],
                               tmp_path / "log")
    try:
        _wait_for(lambda: _steps_logged(tmp_path / "link") >= 2 or proc.poll() is not None, 300, "step 2")
        hold.touch()
        _wait_for(lambda: Path(str(hold) + ".held").exists() or proc.poll() is not None, 120, "the held sync")
        victim = 2 if _placement((tmp_path / "log").read_text()).endswith(cluster.hosts.ip(2)) else 3
        cluster.hosts.link(victim, False)
        t0 = time.time()
        Path(str(hold) + ".go").touch()
        err_s = None
        while proc.poll() is None and time.time() - t0 < 300:
            if err_s is None and "rlkit: weight sync" in (tmp_path / "log").read_text():
                err_s = time.time() - t0
            time.sleep(0.2)
        rc = proc.wait(timeout=5)
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.hosts.link(victim, True)
        for suffix in ("", ".held", ".go"):
            Path(str(hold) + suffix).unlink(missing_ok=True)
    log = (tmp_path / "log").read_text()
    err = [ln for ln in log.splitlines() if ln.startswith("rlkit: ")]
    print(f"link down during sync: error printed {err_s}s and run ended (rc {rc}) {took:.1f}s after the cut: "
          f"{err[-2:]}")
    if rc != 0:
        assert any("weight sync" in ln and "cluster.sync_timeout_s=20" in ln and f"{cluster.hosts.ip(1)}:" in ln
                   for ln in err), log[-4000:]
        assert err_s is not None and err_s < 20 + 5 + 5, err_s  # cluster.sync_timeout_s + the 5 s grace
    # the link is back: the node rejoins (or is restarted, as an operator would) and the run resumes
    alive = set(cluster.alive_nodes())
    if cluster.hosts.ip(victim) not in alive:
        cluster.hosts.kill_host(victim)
        cluster.start(victim)
    cluster.wait_nodes(3)
    rc, log = _train_on_host(cluster, args, tmp_path / "log2")
    assert rc == 0, log[-4000:]
    assert _steps_logged(tmp_path / "link") == 5
