"""Placement (``cluster.placement``, GPU counts, tensor parallelism) and joining a running Ray cluster."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rlkit.config import ConfigError, load_config
from rlkit.orchestration.placement import check_fits, plan_placement

ROOT = Path(__file__).resolve().parent.parent
GPU4 = ["learner.name=deepspeed", "learner.num_ranks=4", "cluster.learner_gpus=4", "engine.name=vllm"]


# ----------------------------------------------------------------------------- config-level checks
@pytest.mark.parametrize("overrides, match", [
    (["cluster.engine_gpus=2"], r"cluster\.learner_gpus \(0\) must equal cluster\.engine_gpus \(2\)"),
    (["cluster.placement=split", "engine.name=vllm", "cluster.engine_gpus=3", "engine.tensor_parallel_size=2"],
     r"engine\.tensor_parallel_size=2 must divide cluster\.engine_gpus=3"),
    (["cluster.placement=split", "engine.name=vllm", "cluster.engine_gpus=4", "engine.tensor_parallel_size=2"],
     r"engine\.num_engines \(1\) x engine\.tensor_parallel_size \(2\) must equal cluster\.engine_gpus \(4\): "
     r"set engine\.num_engines=2"),
    (["engine.tensor_parallel_size=2"], r"the hf engine has no tensor parallelism"),
    (["engine.name=vllm", "engine.tensor_parallel_size=2"], r"tensor_parallel_size=2 needs GPUs: set cluster\.engine_gpus"),
    (["cluster.placement=split", "cluster.learner_gpus=1"], r"the torch learner runs on CPU; use learner\.name=deepspeed"),
    (["cluster.placement=split", "learner.name=deepspeed", "learner.num_ranks=2", "cluster.learner_gpus=4"],
     r"learner\.num_ranks \(2\) must equal cluster\.learner_gpus \(4\)"),
    (["cluster.placement=disaggregated"], r"cluster\.placement"),
])
def test_impossible_combinations_fail_at_load(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_new_keys_are_in_the_reference():
    from rlkit.config import describe

    keys = {k for k, _, _ in describe()}
    assert {"cluster.placement", "cluster.learner_gpus", "cluster.engine_gpus", "cluster.max_actor_restarts",
            "cluster.placement_timeout_s", "engine.tensor_parallel_size"} <= keys


# ----------------------------------------------------------------------------- plans (pure)
def test_cpu_plans():
    col = plan_placement(load_config(None, ["learner.name=deepspeed", "learner.num_ranks=2"]))
    assert col.bundles == {"shared": [{"CPU": 1.0}]}  # 2 ranks + 1 engine share one CPU
    assert [s.num_cpus for s in col.engines + col.learner] == pytest.approx([1 / 3] * 3)
    split = plan_placement(load_config(None, ["cluster.placement=split", "engine.num_engines=2"]))
    assert split.bundles == {"engines": [{"CPU": 1.0}] * 2, "learner": [{"CPU": 1.0}]}
    assert [(s.group, s.bundle, s.num_cpus) for s in split.engines] == [("engines", 0, 1.0), ("engines", 1, 1.0)]
    learner_only = plan_placement(load_config(None, ["learner.name=deepspeed", "learner.num_ranks=2"]), ("learner",))
    assert learner_only.engines == [] and [s.num_cpus for s in learner_only.learner] == [0.5, 0.5]


def test_gpu_colocated_plan_shares_each_gpu():
    cfg = load_config(None, GPU4 + ["cluster.engine_gpus=4", "engine.num_engines=2", "engine.tensor_parallel_size=2"])
    p = plan_placement(cfg)
    assert [b["GPU"] for b in p.bundles["shared"]] == [1.0] * 4 and p.total("GPU") == 4
    assert [(s.bundle, s.num_gpus) for s in p.learner] == [(0, 0.5), (1, 0.5), (2, 0.5), (3, 0.5)]
    # TP engines: the actor holds no GPU; its 2 workers take half a GPU on each of its bundles
    assert [(s.bundle, s.num_gpus, s.tp_bundles, s.worker_gpus) for s in p.engines] == [
        (0, 0.0, (0, 1), 0.5), (2, 0.0, (2, 3), 0.5)]


def test_gpu_split_plan_and_cluster_fit():
    cfg = load_config(None, GPU4 + ["cluster.placement=split", "cluster.engine_gpus=2", "engine.num_engines=2"])
    p = plan_placement(cfg)
    assert p.total("GPU") == 6 and p.bundles["engines"] == [{"CPU": 1.0, "GPU": 1.0}] * 2
    assert [(s.group, s.num_gpus) for s in p.engines + p.learner] == [("engines", 1.0)] * 2 + [("learner", 1.0)] * 4
    check_fits(p, {"GPU": 8.0, "CPU": 64.0}, cfg)
    with pytest.raises(RuntimeError, match=r"cluster\.learner_gpus \+ cluster\.engine_gpus = 4 \+ 2 = 6 GPUs, "
                                           r"but the Ray cluster has 4"):
        check_fits(p, {"GPU": 4.0, "CPU": 64.0}, cfg)
    cpu = load_config(None, ["cluster.placement=split", "engine.num_engines=3"])
    with pytest.raises(RuntimeError, match=r"reserves 4 CPUs .* has 2; raise cluster\.num_cpus or use "
                                           r"cluster\.placement=colocated"):
        check_fits(plan_placement(cpu), {"CPU": 2.0}, cpu)


# ----------------------------------------------------------------------------- multi-node recipes
LAUNCH = sorted((ROOT / "recipes/launch").glob("*.yaml"))


def test_there_are_gpu_launch_recipes():
    assert len(LAUNCH) >= 3 and (ROOT / "recipes/launch/README.md").is_file()


@pytest.mark.parametrize("recipe", LAUNCH, ids=lambda p: p.name)
def test_launch_recipe_validates_and_fits_its_documented_hardware(recipe, capsys):
    """`rlkit config` accepts the recipe without the model (a Hub id, never fetched), and its
    placement fits the hardware its header documents ("Hardware: N node(s) x M GPUs")."""
    import re

    from rlkit.cli import main

    assert main(["config", str(recipe)]) == 0
    assert "placement:" in capsys.readouterr().out
    cfg = load_config(recipe)
    assert cfg.engine.name == "vllm" and cfg.learner.name == "deepspeed"
    assert not Path(cfg.model.name).exists() and cfg.model.name.count("/") == 1  # a Hub id
    hw = re.search(r"^# Hardware: (\d+) nodes? x (\d+) GPUs", recipe.read_text(), re.M)
    assert hw, f"{recipe.name}: header must document 'Hardware: N node(s) x M GPUs'"
    nodes, per_node = int(hw[1]), int(hw[2])
    plan = plan_placement(cfg)
    check_fits(plan, {"GPU": float(nodes * per_node), "CPU": 32.0 * nodes}, cfg)
    assert plan.total("GPU") == nodes * per_node  # the recipe uses the GPUs it asks for
    # each placement group must fit on one node (Ray packs a group; the recipe says how they spread)
    assert all(sum(b.get("GPU", 0) for b in bundles) <= per_node for bundles in plan.bundles.values())


def test_hub_model_ids_resolve_through_the_hub_cache(monkeypatch):
    """A Hub id is fetched with huggingface_hub (here: offline, nothing cached -> a clear error)."""
    import huggingface_hub.constants as hub_constants

    from rlkit.infra.models import resolve_model_path

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # read at call time (is_offline_mode)
    with pytest.raises(FileNotFoundError, match=r"model\.name='no-such-org/no-such-model': not a local directory, "
                                                r"and the Hugging Face Hub snapshot failed"):
        resolve_model_path("no-such-org/no-such-model")


def test_slurm_script_is_valid_bash():
    script = ROOT / "recipes/launch/slurm_ray.sbatch"
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = script.read_text()
    assert "ray start --head" in text and "ray start --address" in text and "rlkit train" in text


# ----------------------------------------------------------------------------- on a real local Ray
@pytest.fixture(scope="module")
def ray_session():
    import ray

    from rlkit.orchestration.ray_actors import init_ray

    init_ray(load_config(None, ["cluster.num_cpus=2"]))
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("placement, reserved", [("colocated", 1.0), ("split", 2.0)])
def test_both_placements_spawn_generate_sync(tiny_model_dir, ray_session, placement, reserved):
    import ray

    from rlkit.orchestration.ray_actors import spawn_actors
    from rollout.engine import RolloutRequest, SamplingParams

    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"cluster.placement={placement}",
                             "learner.num_threads=1"])
    learner, pool = spawn_actors(cfg, tiny_model_dir, {"seed": 0})
    try:
        table = ray.util.placement_group_table()
        live = [t for t in table.values() if t["state"] == "CREATED"]
        assert sorted(len(t["bundles"]) for t in live) == ([1] if placement == "colocated" else [1, 1])
        assert ray.available_resources().get("CPU", 0.0) == pytest.approx(2.0 - reserved)
        comps, _ = pool.generate([RolloutRequest([3, 4, 5], SamplingParams(max_new_tokens=4, n=2, seed=1))])
        assert len(comps) == 2 and all(len(c.token_ids) == 4 for c in comps)
        assert pool.sync(learner, 3) > 0
        assert ray.get(pool.actors[0].info.remote())["policy_version"] == 3
    finally:
        pool.shutdown()
    assert not [t for t in ray.util.placement_group_table().values() if t["state"] == "CREATED"]


@pytest.mark.slow
def test_too_few_gpus_fails_before_any_model_loads(ray_session):
    from rlkit.orchestration.ray_actors import spawn_actors

    cfg = load_config(None, ["cluster.placement=split", "learner.name=deepspeed", "learner.num_ranks=1",
                             "cluster.learner_gpus=1", "cluster.engine_gpus=1"])
    with pytest.raises(RuntimeError, match=r"needs cluster\.learner_gpus \+ cluster\.engine_gpus = 1 \+ 1 = 2 GPUs"):
        spawn_actors(cfg, "/nonexistent/model", {})  # never reaches the model


# ----------------------------------------------------------------------------- an existing Ray cluster
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_session(proc: subprocess.Popen) -> None:
    """Stop every process of the head's session (its own process group): SIGTERM, then SIGKILL.
    Never `ray stop`, which would kill every Ray on the machine."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
    proc.wait(timeout=10)


@pytest.mark.slow
def test_train_on_an_existing_ray_cluster(tiny_model_dir, tmp_path):
    """`ray start --head` (loopback, 2 CPUs) in a subprocess; `rlkit train ... cluster.address=` joins it."""
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rlkray", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    # loopback single-machine mode and no auth: a throwaway local cluster (see init_ray)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(port), "--ray-client-server-port", str(_free_port()), "--num-cpus", "2",
         "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp_dir],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        overrides = [f"model.name={tiny_model_dir}", f"output_dir={tmp_path}", "name=joined", "train.steps=1",
                     "train.prompts_per_step=2", "train.samples_per_prompt=2", "engine.max_new_tokens=6",
                     "data.generator={n: 20, max_value: 9}", "data.eval_size=2", "tracking.tensorboard=false",
                     "reward.mode=inline", "model.lora.rank=0", "eval.before=false", "eval.after=false",
                     "checkpoint.export_final=false", "learner.num_threads=1", f"cluster.address=127.0.0.1:{port}"]
        train = subprocess.run([sys.executable, "-m", "rlkit.cli", "train", str(ROOT / "recipes/quickstart.yaml"),
                                *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert train.returncode == 0, train.stderr[-3000:]
        assert f"Connecting to existing Ray cluster at address: 127.0.0.1:{port}" in train.stderr
        from rlkit.infra.tracking import read_metrics

        assert [m["step"] for m in read_metrics(tmp_path / "joined")] == [1]
        assert head.poll() is None, "the cluster must outlive the job"
    finally:
        _stop_session(head)
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)


def test_role_resources_pin_the_split_bundles_and_must_exist_on_the_cluster():
    """cluster.learner_resources / engine_resources: added to each bundle of the role (split only);
    a cluster without them is refused naming the keys and how to start such nodes."""
    from rlkit.orchestration.placement import PlacementError

    cfg = load_config(None, ["cluster.placement=split", "engine.num_engines=2", "cluster.learner_resources={learner: 1}",
                             "cluster.engine_resources={rollout: 0.5}"])
    plan = plan_placement(cfg)
    assert plan.bundles == {"engines": [{"CPU": 1.0, "rollout": 0.5}] * 2, "learner": [{"CPU": 1.0, "learner": 1.0}]}
    check_fits(plan, {"CPU": 3.0, "rollout": 1.0, "learner": 1.0}, cfg)
    with pytest.raises(PlacementError, match=r"cluster\.engine_resources reserve 1 of the custom resource 'rollout', "
                       r"but the Ray cluster has 0.5; .*ray start --resources='\{\"rollout\": N\}'"):
        check_fits(plan, {"CPU": 3.0, "rollout": 0.5, "learner": 1.0}, cfg)
    with pytest.raises(ConfigError, match=r"cluster\.learner_resources pins a role to nodes: it needs "
                       r"cluster\.placement=split"):
        load_config(None, ["cluster.learner_resources={learner: 1}"])
    with pytest.raises(ConfigError, match=r"cluster\.engine_resources: 'GPU' must be a custom resource"):
        load_config(None, ["cluster.placement=split", "cluster.engine_resources={GPU: 1}"])
