"""cluster.weight_sync: packed buckets, the private gloo group, config checks, and the collective sync
through a real Ray session (learner -> 2 HF engines over gloo, full weights and LoRA, engine restart).

NCCL and CUDA IPC need GPUs: only their config checks run here.
"""

from __future__ import annotations

import statistics
import threading
import time

import pytest
import torch

from rlkit.config import ConfigError, load_config
from rlkit.learner.deepspeed import free_port
from rollout.weight_transfer import DistributedInitError, SyncGroup, pack_bucket, plan_buckets, unpack_bucket


# ----------------------------------------------------------------------------- pure
def test_pack_unpack_round_trip_mixed_dtypes():
    g = torch.Generator().manual_seed(0)
    ts = {"u8": torch.arange(3, dtype=torch.uint8), "w": torch.randn(2, 3, generator=g),
          "bf": torch.randn(5, generator=g).to(torch.bfloat16), "empty": torch.zeros(0, 4),
          "step": torch.tensor(7, dtype=torch.int64), "t": torch.randn(4, 2, generator=g).t()}  # non-contiguous
    buf, entries = pack_bucket(ts)
    assert buf.dtype == torch.uint8 and buf.dim() == 1
    assert all(e.offset % getattr(torch, e.dtype).itemsize == 0 for e in entries)  # view(dtype) needs it
    out = unpack_bucket(buf, entries)
    assert list(out) == list(ts)
    for k, v in ts.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape and torch.equal(out[k], v), k
    # one dtype: no padding, the buffer is exactly the tensors' bytes (3*4 + 2*2*4 = 28)
    one, _ = pack_bucket({"a": torch.ones(3), "b": torch.ones(2, 2)})
    assert one.numel() == 28


def test_plan_buckets_keeps_decoder_layers_whole():
    sizes = {"model.embed_tokens.weight": 100, "model.layers.0.q.weight": 30, "model.layers.0.k.weight": 30,
             "model.layers.1.q.weight": 30, "model.layers.1.k.weight": 30, "lm_head.weight": 100}
    L0, L1 = ["model.layers.0.q.weight", "model.layers.0.k.weight"], ["model.layers.1.q.weight", "model.layers.1.k.weight"]
    assert plan_buckets(sizes, 70) == [["model.embed_tokens.weight"], L0, L1, ["lm_head.weight"]]
    assert plan_buckets(sizes, 130) == [["model.embed_tokens.weight"], L0 + L1, ["lm_head.weight"]]
    assert plan_buckets(sizes, 10) == [["model.embed_tokens.weight"], L0, L1, ["lm_head.weight"]]  # never split
    assert plan_buckets({}, 10) == []


def test_sync_group_broadcasts_buckets_over_gloo():
    """Rank 0 and rank 1 in two threads of this process: the private group never touches the default group."""
    import torch.distributed as dist

    g = torch.Generator().manual_seed(1)
    b1 = {"model.layers.0.w": torch.randn(3, 4, generator=g), "model.layers.0.b": torch.randn(4, generator=g)}
    b2 = {"lm_head.weight": torch.randn(5, 2, generator=g).to(torch.bfloat16)}
    port = free_port()
    got: list[dict] = []
    errors: list[BaseException] = []

    def receiver() -> None:
        try:
            grp = SyncGroup.join("127.0.0.1", port, 1, 2, "gloo", 30.0)
            got.extend(dict(p) for p in grp.receive())
            grp.close()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=receiver)
    t.start()
    sender = SyncGroup.join("127.0.0.1", port, 0, 2, "gloo", 30.0)
    sent = sender.send_bucket(b1, last=False) + sender.send_bucket(b2, last=True)
    t.join(60)
    sender.close()
    assert not t.is_alive() and not errors, errors
    assert sent == (12 + 4) * 4 + 10 * 2
    assert [list(p) for p in got] == [list(b1), list(b2)]
    for want, have in zip((b1, b2), got):
        for k in want:
            assert have[k].dtype == want[k].dtype and torch.equal(have[k], want[k])
    assert not dist.is_initialized()


def test_sync_group_rendezvous_timeout_names_ranks_address_and_key():
    port = free_port()
    with pytest.raises(DistributedInitError,
                       match=rf"ranks \[1, 2\] did not join the rendezvous at tcp://127\.0\.0\.1:{port} within 1s "
                             r"\(cluster\.sync_timeout_s\)"):
        SyncGroup.join("127.0.0.1", port, 0, 3, "gloo", 1.0)


# ----------------------------------------------------------------------------- config
GPU1 = ["learner.name=deepspeed", "cluster.learner_gpus=1", "cluster.engine_gpus=1"]


@pytest.mark.parametrize("overrides, match", [
    (["cluster.weight_sync=cuda_ipc"],
     r"cluster\.weight_sync=cuda_ipc needs .* cluster\.placement=colocated and cluster\.engine_gpus>0 "
     r"\(got cluster\.placement=colocated, cluster\.learner_gpus=0, cluster\.engine_gpus=0\)"),
    (["cluster.weight_sync=cuda_ipc", "cluster.placement=split", *GPU1],
     r"cluster\.weight_sync=cuda_ipc needs .*\(got cluster\.placement=split"),
    (["cluster.weight_sync=cuda_ipc", "engine.name=vllm", "learner.name=deepspeed", "learner.num_ranks=2",
      "cluster.learner_gpus=2", "cluster.engine_gpus=2", "engine.tensor_parallel_size=2"],
     r"cluster\.weight_sync=cuda_ipc supports engine\.tensor_parallel_size=1 only"),
    (["cluster.weight_sync=cuda_ipc", "engine.name=vllm", "engine.vllm.in_process=false", *GPU1],
     r"cuda_ipc .* needs engine\.vllm\.in_process=true"),
    (["cluster.weight_sync=collective", *GPU1],
     r"cluster\.weight_sync=collective with cluster\.placement=colocated and GPUs .* use cluster\.weight_sync=cuda_ipc"),
    (["cluster.weight_sync=nccl"], r"cluster\.weight_sync"),
])
def test_impossible_weight_sync_combinations_fail_at_load(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_weight_sync_modes_and_backends():
    from rlkit.config import describe
    from rlkit.orchestration.weight_sync import (
        CollectiveSync,
        CudaIpcSync,
        collective_backend,
        make_weight_sync,
    )

    assert {"cluster.weight_sync", "cluster.sync_bucket_mb", "cluster.sync_timeout_s"} <= {k for k, _, _ in describe()}
    assert make_weight_sync(load_config(None, []).cluster) is None  # object store: the pool's own path
    cpu = load_config(None, ["cluster.weight_sync=collective"]).cluster
    assert isinstance(make_weight_sync(cpu), CollectiveSync) and collective_backend(cpu) == "gloo"
    split = load_config(None, ["cluster.weight_sync=collective", "cluster.placement=split", *GPU1]).cluster
    assert collective_backend(split) == "nccl"
    cpu_learner = load_config(None, ["cluster.weight_sync=collective", "cluster.placement=split",
                                     "cluster.engine_gpus=1"]).cluster
    assert collective_backend(cpu_learner) == "gloo"  # the torch learner has no GPU: gloo, engines copy in
    ipc = load_config(None, ["cluster.weight_sync=cuda_ipc", *GPU1]).cluster
    assert isinstance(make_weight_sync(ipc), CudaIpcSync)


def test_cuda_ipc_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    from rlkit.orchestration.weight_sync import EngineSyncEndpoint, LearnerSyncEndpoint

    with pytest.raises(RuntimeError, match=r"cuda_ipc: the learner has no CUDA device"):
        LearnerSyncEndpoint(object(), 0).ipc_bucket(["x"])
    with pytest.raises(RuntimeError, match=r"cuda_ipc: this engine has no CUDA device"):
        EngineSyncEndpoint(object()).load_ipc((None, ()), [], 1)


# ----------------------------------------------------------------------------- through Ray (gloo)
@pytest.fixture(scope="module")
def ray_session():
    import ray

    from rlkit.orchestration.ray_actors import init_ray

    init_ray(load_config(None, ["cluster.num_cpus=2"]))
    yield
    ray.shutdown()


PREFIXES = [[3, 4, 5, 6], [7, 8, 9], [10, 11]]
CONTS = [[12, 13, 14, 15], [16, 17, 18], [19, 20, 21, 22, 23]]


def _perturb(learner, seed: int) -> None:
    """New learner weights through its own checkpoint API (torch learner: the model state is loaded)."""
    import ray

    st = ray.get(learner.checkpoint_state.remote())
    g = torch.Generator().manual_seed(seed)
    st["model_state"] = {k: torch.as_tensor(v) + 0.05 * torch.randn(v.shape, generator=g)
                         for k, v in st["model_state"].items()}
    ray.get(learner.load_checkpoint_state.remote(st))


def _assert_engines_match_learner(pool, learner, version: int, atol: float = 1e-5) -> list[list[float]]:
    """Each engine holds ``version`` and scores the fixed continuations like the learner."""
    import ray

    from rlkit.loop.batch import build_batch

    lp = torch.as_tensor(ray.get(learner.compute_logprobs.remote(build_batch(PREFIXES, CONTS, pad_id=0)))).cpu()
    for a in pool.actors:
        assert ray.get(a.info.remote())["policy_version"] == version
        rows = ray.get(a.score.remote(PREFIXES, CONTS))
        for i, row in enumerate(rows):
            torch.testing.assert_close(torch.tensor(row), lp[i, : len(row)], atol=atol, rtol=0)
    return [lp[i, : len(c)].tolist() for i, c in enumerate(CONTS)]


def _timings(pool, learner, first_version: int, repeats: int = 3) -> tuple[float, float]:
    """Median seconds of the collective sync (group already formed) and of the object-store sync."""
    from rlkit.orchestration.ray_actors import sync_weights

    coll, store = [], []
    for i in range(repeats):
        coll.append(pool.sync(learner, first_version + 2 * i))
        store.append(sync_weights(learner, list(pool.actors), first_version + 2 * i + 1))  # object store
        print(f"  collective {coll[-1] * 1e3:.1f} ms (learner send {pool.last_sync['send_s'] * 1e3:.1f} ms, "
              f"slowest engine receive+load {pool.last_sync['recv_s'] * 1e3:.1f} ms); object store {store[-1] * 1e3:.1f} ms")
    return statistics.median(coll), statistics.median(store)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_collective_sync_over_gloo_matches_the_learner(tiny_model_dir, ray_session, lora):
    import ray

    from rlkit.orchestration.ray_actors import spawn_actors

    over = [f"model.name={tiny_model_dir}", "engine.num_engines=2", "learner.num_threads=1",
            "cluster.weight_sync=collective", "cluster.sync_bucket_mb=0.1", "cluster.sync_timeout_s=60"]
    if lora:
        over += ["model.lora.rank=4", "model.lora.alpha=8"]
    cfg = load_config(None, over)
    kwargs = {"seed": 0, "max_batch_size": 8, **({"lora": cfg.model.lora.model_dump()} if lora else {})}
    learner, pool = spawn_actors(cfg, tiny_model_dir, kwargs)
    try:
        before = ray.get(pool.actors[0].score.remote(PREFIXES, CONTS))
        _perturb(learner, 0)
        pool.sync(learner, 1)
        stats = pool.last_sync
        after = _assert_engines_match_learner(pool, learner, 1)
        assert max(abs(a - b) for ra, rb in zip(after, before) for a, b in zip(ra, rb)) > 1e-3  # weights moved
        assert pool._state is None  # nothing kept in the object store

        state = ray.get(learner.state_for_sync.remote())
        payload = sum(v.nbytes for v in state.values())  # numpy arrays or tensors
        assert stats["bytes"] == payload  # exactly the tensors (one dtype: no padding), nothing more
        if lora:
            assert all("lora_" in k for k in state)  # only adapter tensors travel
            from transformers import AutoModelForCausalLM

            full = sum(p.numel() * p.element_size() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir)
                       .parameters())
            assert stats["bytes"] < full / 5
        else:
            assert stats["buckets"] > 1  # 0.1 MiB buckets: several broadcasts
        print(f"\n[{'lora' if lora else 'full'}] collective sync: {stats['bytes'] / 2**20:.3f} MiB in "
              f"{stats['buckets']:.0f} bucket(s); group formed in {stats['form_s']:.3f}s, first sync {stats['sync_s']:.3f}s")

        coll, store = _timings(pool, learner, 2)
        print(f"[{'lora' if lora else 'full'}] median sync on the tiny model, 2 engines: collective (gloo) "
              f"{coll * 1e3:.1f} ms vs object store {store * 1e3:.1f} ms")
        _assert_engines_match_learner(pool, learner, 7)  # the last (object-store) load agrees too

        if not lora:
            # an engine dead at the next sync: the sync falls back to the object store (engine recreated),
            # the one after forms the group again with the new engine
            ray.kill(pool.actors[0], no_restart=True)
            _perturb(learner, 1)
            t0 = time.perf_counter()
            pool.sync(learner, 10)
            print(f"[full] sync with a dead engine (fallback + restart): {time.perf_counter() - t0:.2f}s")
            assert pool.restarts == [1, 0] and pool._state is not None
            _assert_engines_match_learner(pool, learner, 10)
            _perturb(learner, 2)
            pool.sync(learner, 11)
            assert pool.weight_sync.groups_formed == 2 and pool._state is None
            _assert_engines_match_learner(pool, learner, 11)
    finally:
        pool.shutdown()
        ray.kill(learner)


@pytest.mark.slow
def test_collective_sync_from_two_zero3_ranks(tiny_model_dir, ray_session):
    """DeepSpeed ZeRO-3 (every parameter partitioned): both ranks gather each bucket, rank 0 broadcasts."""
    import ray

    from rlkit.loop.batch import build_batch
    from rlkit.orchestration.ray_actors import spawn_actors

    cfg = load_config(None, [f"model.name={tiny_model_dir}", "learner.name=deepspeed", "learner.num_ranks=2",
                             "learner.num_threads=1", "learner.lr=5e-2", "learner.micro_batch_size=2",
                             "learner.deepspeed.overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}",
                             "cluster.weight_sync=collective", "cluster.sync_bucket_mb=0.1", "cluster.sync_timeout_s=60"])
    learner, pool = spawn_actors(cfg, tiny_model_dir, {"seed": 0, "max_batch_size": 8})
    try:
        batch = build_batch(PREFIXES, CONTS, pad_id=0)
        batch.advantages_BT = torch.randn(batch.response_mask_BT.shape,
                                          generator=torch.Generator().manual_seed(0)) * batch.response_mask_BT
        before = ray.get(pool.actors[0].score.remote(PREFIXES, CONTS))
        ray.get(learner.train_step.remote(batch))
        pool.sync(learner, 1)
        after = _assert_engines_match_learner(pool, learner, 1)
        assert max(abs(a - b) for ra, rb in zip(after, before) for a, b in zip(ra, rb)) > 1e-3
        assert pool.last_sync["buckets"] > 1
        print(f"\n[zero3 x2] collective sync {pool.last_sync['bytes'] / 2**20:.3f} MiB in "
              f"{pool.last_sync['buckets']:.0f} buckets: {pool.last_sync['sync_s']:.3f}s (incl. forming the group)")
    finally:
        pool.shutdown()
        learner.shutdown()


@pytest.mark.slow
def test_sync_verification_catches_a_corrupted_tensor(tiny_model_dir, ray_session):
    """cluster.verify_sync_every: after a correct sync every engine matches the learner on the fixed
    probe; one engine given a state with a single tensor corrupted is named in a clear error."""
    import ray

    from rlkit.orchestration.ray_actors import spawn_actors
    from rlkit.orchestration.sync_check import SyncVerificationError, verify_sync

    cfg = load_config(None, [f"model.name={tiny_model_dir}", "engine.num_engines=2", "learner.num_threads=1"])
    learner, pool = spawn_actors(cfg, tiny_model_dir, {"seed": 0, "max_batch_size": 8})
    try:
        _perturb(learner, 3)
        pool.sync(learner, 1)
        m = verify_sync(pool, learner, 1, tol=0.1)
        assert 0.0 <= m["sync/logprob_max_abs_diff"] < 1e-5  # the HF engine in fp32: the learner's numbers
        state = {k: torch.as_tensor(v).clone() for k, v in ray.get(learner.state_for_sync.remote()).items()}
        name = next(k for k in state if "layers.1.mlp.down_proj" in k)
        state[name] = state[name] * 0.0  # one tensor lost in transit
        ray.get(pool.actors[1].load_weights.remote(state, 2))
        with pytest.raises(SyncVerificationError, match=r"after step 2: engine 1 scores a fixed probe .* nats away"):
            verify_sync(pool, learner, 2, tol=0.1)
    finally:
        pool.shutdown()
        ray.kill(learner)


@pytest.mark.slow
def test_trainer_verifies_syncs_and_logs_the_difference(tiny_model_dir, tmp_path):
    from test_train_e2e import tiny_overrides

    from rlkit.infra.tracking import read_metrics
    from rlkit.trainer import Trainer

    ov = tiny_overrides(tiny_model_dir, tmp_path, "verify", steps=2) + ["eval.after=false", "cluster.verify_sync_every=1"]
    Trainer(load_config(None, ov)).run()
    m = read_metrics(tmp_path / "verify")
    synced = [x for x in m if "time/sync_s" in x]
    assert synced and all(0.0 <= x["sync/logprob_max_abs_diff"] < 1e-5 for x in synced)
