"""CUDA paths of the Ray pipeline, for a machine with one GPU (skipped elsewhere): ``pytest -m gpu``.

The learner (DeepSpeed, one rank) and the HF rollout engine share the GPU (``cluster.placement=
colocated``) and the weights move by CUDA IPC: the engine opens the learner's buckets in place.
The CPU suite covers the same code paths over the object store and gloo; these tests are what a
lent GPU should run first (they have not run yet: no GPU was lent to the sessions that wrote them).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rlkit.config import load_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed"),
]

ONE_GPU = ["learner.name=deepspeed", "cluster.learner_gpus=1", "cluster.engine_gpus=1",
           "cluster.placement=colocated", "cluster.weight_sync=cuda_ipc", "model.dtype=float32"]
# float32 on one GPU: the learner and the engine score with different batch shapes, so different
# kernels; 1e-4 rather than the CPU tests' 1e-5
GPU_ATOL = 1e-4


@pytest.fixture(scope="module")
def ray_gpu():
    import ray

    from rlkit.orchestration.ray_actors import init_ray

    init_ray(load_config(None, ["cluster.num_cpus=4"]))
    yield
    ray.shutdown()


def test_cuda_ipc_sync_after_a_deepspeed_step_on_one_gpu(tiny_model_dir, ray_gpu):
    import ray
    from test_weight_sync import CONTS, PREFIXES
    from test_weight_sync import _assert_engines_match_learner as engines_match_learner

    from rlkit.loop.batch import build_batch
    from rlkit.orchestration.ray_actors import spawn_actors

    cfg = load_config(None, [f"model.name={tiny_model_dir}", *ONE_GPU, "learner.lr=5e-2",
                             "learner.micro_batch_size=2", "cluster.sync_bucket_mb=0.1"])
    learner, pool = spawn_actors(cfg, tiny_model_dir, {"seed": 0, "max_batch_size": 8, "dtype": "float32"})
    try:
        assert all(ray.get(a.device_uuid.remote()) for a in pool.actors)  # the engine is on the GPU
        before = ray.get(pool.actors[0].score.remote(PREFIXES, CONTS))
        batch = build_batch(PREFIXES, CONTS, pad_id=0)
        batch.advantages_BT = torch.randn(batch.response_mask_BT.shape,
                                          generator=torch.Generator().manual_seed(0)) * batch.response_mask_BT
        ray.get(learner.train_step.remote(batch))
        pool.sync(learner, 1)
        stats = pool.last_sync
        after = engines_match_learner(pool, learner, 1, atol=GPU_ATOL)
        assert max(abs(a - b) for ra, rb in zip(after, before) for a, b in zip(ra, rb)) > 1e-3  # weights moved
        assert stats["bytes"] > 0 and stats["buckets"] > 1 and pool._state is None  # nothing in the object store
        print(f"\n[cuda_ipc] {stats['bytes'] / 2**20:.2f} MiB in {stats['buckets']:.0f} buckets: "
              f"{stats['sync_s'] * 1e3:.1f} ms")
        # colocated: the engine gives its memory to the learner while it trains, and serves the same after
        pool.sleep()
        pool.wake()
        engines_match_learner(pool, learner, 1, atol=GPU_ATOL)
    finally:
        pool.shutdown()
        learner.shutdown()


def test_train_colocated_on_one_gpu(tiny_model_dir, ray_gpu, tmp_path):
    """Two steps of the quickstart through the Trainer with the learner and the engine on one GPU."""
    from test_train_e2e import ROOT, tiny_overrides

    from rlkit.infra.tracking import read_metrics
    from rlkit.trainer import Trainer

    cfg = load_config(ROOT / "recipes/quickstart.yaml", [
        *tiny_overrides(tiny_model_dir, tmp_path, "gpu", steps=2), "eval.before=false", "checkpoint.every=1", *ONE_GPU])
    summary = Trainer(cfg).run()
    m = read_metrics(tmp_path / "gpu")
    assert [x["step"] for x in m] == [1, 2]
    assert all(torch.isfinite(torch.tensor(x["actor/grad_norm"])) and x["time/sync_s"] > 0 for x in m)
    assert summary["eval_after"]["problems"] == 4.0
    assert (tmp_path / "gpu" / "final" / "config.json").is_file()
