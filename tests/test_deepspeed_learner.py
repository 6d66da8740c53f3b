"""DeepSpeed ZeRO-2/3 learner on CPU (gloo): 2 ranks through Ray equal the torch learner.

Each DeepSpeed rank lives in its own Ray actor (never in the pytest process: ZeRO-3 installs a
process-global hook into transformers' ``from_pretrained``).
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlkit.config import load_config
from rlkit.learner.deepspeed import (
    DistributedInitError,
    bucket_indices,
    build_ds_config,
    free_port,
    init_process_group,
)
from rlkit.loop.batch import build_batch

ROOT = Path(__file__).resolve().parent.parent
LR = 1e-3
# tiny parameters stay whole under ZeRO-3 by default; partition everything to test the gathers
PARTITION_ALL = "learner.deepspeed.overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}"


# ----------------------------------------------------------------------------- fast, no Ray
def test_ds_config_follows_the_learner_config():
    cfg = load_config(None, ["learner.deepspeed.zero_stage=2", "learner.deepspeed.offload_optimizer=true",
                             "model.dtype=bfloat16", "learner.grad_clip=0.5", "learner.micro_batch_size=3",
                             "learner.deepspeed.overrides={zero_optimization: {reduce_bucket_size: 1000}}"])
    ds = build_ds_config(cfg.learner, cfg.model, world_size=2)
    z = ds["zero_optimization"]
    assert (z["stage"], z["offload_optimizer"]["device"], z["reduce_bucket_size"]) == (2, "cpu", 1000)
    assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.5
    assert ds["train_batch_size"] == 6 and ds["managed_gradient_accumulation"] is False
    assert build_ds_config(load_config(None, []).learner, cfg.model.model_copy(update={"dtype": "float32"}),
                           1)["bf16"]["enabled"] is False


def test_bucket_indices():
    assert bucket_indices([3, 3, 5, 1], 6) == [[0, 1], [2, 3]]
    assert bucket_indices([10, 1, 1], 4) == [[0], [1, 2]]  # oversized item alone
    assert bucket_indices([], 4) == []


def test_rendezvous_timeout_names_missing_ranks_and_address():
    port = free_port()
    with pytest.raises(DistributedInitError, match=rf"ranks \[1, 2\] did not join .*127\.0\.0\.1:{port}"):
        init_process_group(backend="gloo", master_addr="127.0.0.1", master_port=port, rank=0, world_size=3,
                           timeout_s=1.0)
    port = free_port()  # nobody listens there
    with pytest.raises(DistributedInitError, match=rf"rank 1 of 2 .*reach the rank-0 store at tcp://127\.0\.0\.1:{port}"):
        init_process_group(backend="gloo", master_addr="127.0.0.1", master_port=port, rank=1, world_size=2,
                           timeout_s=1.0)
    import torch.distributed as dist

    assert not dist.is_initialized()


# ----------------------------------------------------------------------------- through Ray
@pytest.fixture(scope="module")
def ray_session():
    import ray

    from rlkit.orchestration.ray_actors import init_ray

    init_ray(load_config(None, ["cluster.num_cpus=2"]))
    yield
    ray.shutdown()


def _cfg(model_dir: str, *overrides: str):
    return load_config(None, [f"model.name={model_dir}", "learner.name=deepspeed", "learner.num_ranks=2",
                              f"learner.lr={LR}", "learner.micro_batch_size=2", "algorithm.old_logprobs=rollout",
                              "learner.num_threads=1", PARTITION_ALL, *overrides])


def _torch_learner(model_dir: str, cfg):
    from rlkit.learner.torch_learner import TorchLearner

    return TorchLearner(model_dir, cfg)


def _batch(model_dir: str, lora: dict | None = None):
    """3 prompts x 2 samples from the tiny model; random advantages. Returns (engine, comps, batch)."""
    from rollout.engine import RolloutRequest, SamplingParams
    from rollout.hf import HFEngine

    eng = HFEngine(model_dir, seed=0, lora=lora)
    reqs = [RolloutRequest(prompt_ids=p, params=SamplingParams(max_new_tokens=7, n=2, seed=3))
            for p in ([5, 6, 7], [8, 9], [10, 11, 12, 13, 14])]
    comps = eng.generate(reqs)
    batch = build_batch([c.prompt_ids for c in comps], [c.token_ids for c in comps], pad_id=0,
                        rollout_logprobs=[c.logprobs for c in comps])
    g = torch.Generator().manual_seed(0)
    batch.advantages_BT = torch.randn(batch.response_mask_BT.shape, generator=g) * batch.response_mask_BT
    return eng, comps, batch


def _get(ref):
    import ray

    return ray.get(ref)


def _assert_weights_match(w_torch: dict, w_ds: dict) -> None:
    """One AdamW step from equal weights and gradients. Adam moves each weight by ~lr*sign(g), so
    gradients at the 1e-8 level (~eps) may round differently: allow a few such entries."""
    assert set(w_torch) == set(w_ds)
    diff = torch.cat([(w_torch[k] - torch.as_tensor(w_ds[k])).abs().flatten() for k in w_torch])
    assert float(diff.max()) <= 2 * LR + 1e-6
    assert float((diff > 1e-6).float().mean()) < 1e-3, int((diff > 1e-6).sum())


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_equal_the_torch_learner(tiny_model_dir, ray_session, tmp_path, stage):
    from rlkit.orchestration.ray_actors import spawn_deepspeed_learner

    _, _, batch = _batch(tiny_model_dir)
    cfg = _cfg(tiny_model_dir, f"learner.deepspeed.zero_stage={stage}")
    group = spawn_deepspeed_learner(cfg, tiny_model_dir, threads=1)
    try:
        assert _get(group.info.remote())["ranks"] == 2
        # the torch learner clips its .grad in place: compare unclipped gradients
        ref = _torch_learner(tiny_model_dir, cfg.model_copy(update={"learner": cfg.learner.model_copy(
            update={"grad_clip": 1e9})}))
        ref.optimizer.step = lambda: None  # keep the gradients, skip the update
        ref.train_step(copy.deepcopy(batch))
        g_torch = {n: p.grad for n, p in ref.model.named_parameters() if p.grad is not None}
        g_ds = _get(group.gradients.remote(copy.deepcopy(batch)))
        assert set(g_ds) == set(g_torch) and max(float(g.abs().max()) for g in g_ds.values()) > 1e-2
        for n, g in g_torch.items():
            torch.testing.assert_close(g_ds[n], g, atol=2e-6, rtol=1e-4, msg=n)

        # one real step (grad_clip=1 clips: norm ~6): same metrics, same weights
        ref = _torch_learner(tiny_model_dir, cfg)
        m_torch = ref.train_step(copy.deepcopy(batch))
        ckpt = _get(group.checkpoint_state.remote())  # before the step: for the resume check below
        m_ds = _get(group.train_step.remote(copy.deepcopy(batch)))
        for k in ("actor/pg_loss", "actor/entropy", "actor/grad_norm", "actor/clip_frac", "actor/lr"):
            assert m_ds[k] == pytest.approx(m_torch[k], rel=1e-4, abs=1e-6), k  # as the gradients above
        w_ds = _get(group.state_for_sync.remote())
        _assert_weights_match(ref.state_for_sync(), w_ds)
        lp = _get(group.compute_logprobs.remote(batch))
        torch.testing.assert_close(lp, ref.compute_logprobs(batch), atol=1e-4, rtol=0)
        assert _get(group.entropy_stats.remote(0.8)) == pytest.approx(ref.entropy_stats(0.8), rel=1e-5)
        applied = [0.0, 1.0, 1.0, 1.0]
        assert _get(group.temperature_stats.remote(applied, 0.05)) == pytest.approx(
            ref.temperature_stats(applied, 0.05), rel=1e-5)

        # resume: the pre-step checkpoint through disk, restored, the step redone -> the same weights
        from rlkit.infra.checkpoint import load_checkpoint, save_checkpoint

        save_checkpoint(tmp_path, 1, **ckpt)
        _get(group.load_checkpoint_state.remote(load_checkpoint(tmp_path)))
        _get(group.train_step.remote(copy.deepcopy(batch)))
        again = _get(group.state_for_sync.remote())
        assert all(torch.equal(torch.as_tensor(again[k]), torch.as_tensor(w_ds[k])) for k in w_ds)

        out = _get(group.export.remote(str(tmp_path / "final"), tiny_model_dir))
        from transformers import AutoModelForCausalLM

        exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
        assert all(torch.equal(exported[k], torch.as_tensor(again[k])) for k in again)
    finally:
        group.shutdown()


@pytest.mark.slow
def test_batch_entropy_gate_and_pre_update_statistics_on_two_ranks(tiny_model_dir, ray_session):
    """DMMPT ``entropy_scope: batch`` and HAPO's statistics read the pre-update pass, which each rank
    runs on its own rows and all-reduces: two ranks must gate and report like one torch learner.
    sigma sits below the batch mean, so the gate is closed; a rank that saw only its own rows'
    entropies (the others' zero: about half the mean) would open the gate and mask tokens."""
    from rlkit.learner.torch_learner import response_logprobs
    from rlkit.orchestration.ray_actors import spawn_deepspeed_learner

    _, _, batch = _batch(tiny_model_dir)
    mask = batch.response_mask_BT
    probe = _torch_learner(tiny_model_dir, _cfg(tiny_model_dir))
    with torch.no_grad():
        _, ent = response_logprobs(probe.model, batch, with_entropy=True)
    sigma = 0.9 * float((ent * mask).sum() / mask.sum())
    cfg = _cfg(tiny_model_dir, "train.mini_batches=2", "train.prompts_per_step=3", "train.samples_per_prompt=2",
               f"algorithm.loss_mask={{dmmpt: {{tau: 1.0e-9, sigma: {sigma}, entropy_scope: batch}}}}")
    group = spawn_deepspeed_learner(cfg, tiny_model_dir, threads=1)
    try:
        ref = _torch_learner(tiny_model_dir, cfg)
        m_torch = ref.train_step(copy.deepcopy(batch))
        m_ds = _get(group.train_step.remote(copy.deepcopy(batch)))
        assert m_torch["actor/dmmpt/masked_frac"] == 0.0 and m_ds["actor/dmmpt/masked_frac"] == 0.0
        assert m_ds["actor/pg_loss"] == pytest.approx(m_torch["actor/pg_loss"], rel=1e-4, abs=1e-6)
        assert _get(group.entropy_stats.remote(0.8)) == pytest.approx(ref.entropy_stats(0.8), rel=1e-5)
    finally:
        group.shutdown()


@pytest.mark.slow
def test_lora_zero3_syncs_only_the_adapter(tiny_model_dir, ray_session, tmp_path):
    from rlkit.orchestration.ray_actors import spawn_deepspeed_learner, sync_weights

    lora = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all-linear"}
    eng, comps, batch = _batch(tiny_model_dir, lora=lora)
    cfg = _cfg(tiny_model_dir, "learner.deepspeed.zero_stage=3", "model.lora.rank=4", "model.lora.alpha=8",
               "learner.lr=5e-2", "algorithm.kl.beta=0.05")  # KL: the reference is the adapter disabled
    group = spawn_deepspeed_learner(cfg, tiny_model_dir, threads=1)
    try:
        ref = _torch_learner(tiny_model_dir, cfg)
        assert _get(group.info.remote())["trainable"] == ref.info()["trainable"]
        m_torch, m_ds = ref.train_step(copy.deepcopy(batch)), _get(group.train_step.remote(copy.deepcopy(batch)))
        for k in ("actor/pg_loss", "actor/kl", "actor/grad_norm"):
            assert m_ds[k] == pytest.approx(m_torch[k], rel=1e-4, abs=1e-6), k
        state = _get(group.state_for_sync.remote())
        assert state and all("lora_" in k for k in state)
        assert set(state) == set(ref.state_for_sync())

        # through the object store into a Ray engine: it now scores like the learner
        import ray

        from rlkit.orchestration.ray_actors import RolloutWorker

        worker = ray.remote(num_cpus=0)(RolloutWorker).remote("hf", tiny_model_dir, {"seed": 0, "lora": lora}, 1)
        sync_weights(group, [worker], version=1)
        new = ray.get(worker.score.remote([c.prompt_ids for c in comps], [c.token_ids for c in comps]))
        lp = _get(group.compute_logprobs.remote(batch))
        assert not torch.allclose(lp, batch.rollout_logprobs_BT, atol=1e-3)  # the update changed the policy
        for i, row in enumerate(new):
            torch.testing.assert_close(torch.tensor(row), lp[i, : len(row)], atol=1e-4, rtol=0)
        ray.kill(worker)

        out = Path(_get(group.export.remote(str(tmp_path / "adapter"), tiny_model_dir)))
        from safetensors.torch import load_file

        saved = load_file(str(out / "adapter_model.safetensors"))
        assert (out / "adapter_config.json").is_file() and len(saved) == len(state)
        assert all(torch.equal(saved[k], torch.as_tensor(state[k])) for k in state)
    finally:
        group.shutdown()


def _run_cli(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "rlkit.cli", *args], cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # Ray processes orphaned by a crashed driver
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["train.async.mode=one_step_off", "train.steps=3"]], ids=["sync", "one_step_off"])
def test_rlkit_train_with_two_zero3_ranks(tiny_model_dir, tmp_path, extra):
    from rlkit.infra.tracking import read_metrics

    args = [
        "train", str(ROOT / "recipes/quickstart.yaml"), f"model.name={tiny_model_dir}", f"output_dir={tmp_path}",
        "name=ds", "train.steps=2", "train.prompts_per_step=2", "train.samples_per_prompt=4",
        "engine.max_new_tokens=12", "data.generator={n: 40, max_value: 9}", "data.eval_size=4",
        "checkpoint.every=1", "learner.lr=1e-3", "learner.micro_batch_size=3", "tracking.tensorboard=false",
        "reward.mode=inline", "model.lora.rank=0", "cluster.num_cpus=2", "learner.name=deepspeed",
        "reward.verifiers=[{name: math}, {name: tests/e2e_rewards.py:digit_fraction}]",  # reward variance
        "learner.num_ranks=2", "learner.deepspeed.zero_stage=3", PARTITION_ALL, "eval.before=false", "eval.after=false",
        *extra,  # the overlapped mode: the producer thread calls the engines while both ranks train
    ]
    res = _run_cli(args)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "ds"
    m = read_metrics(run)
    assert [x["step"] for x in m] == ([1, 2, 3] if extra else [1, 2])
    assert all(x["actor/grad_norm"] > 0 and "time/sync_s" in x for x in m)
    if extra:
        assert [x["async/staleness_max"] for x in m] == [0, 1, 1]
    assert (run / "final" / "config.json").is_file()
    if not extra:  # one more step, resumed: both ranks restore the checkpoint rank 0 wrote
        names = {p.name for p in sorted((run / "checkpoints").glob("step_*"))[-1].iterdir()}
        assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.pt"} <= names
        res = _run_cli([a if a != "train.steps=2" else "train.steps=3" for a in args])
        assert res.returncode == 0, res.stderr[-3000:]
        assert "resumed after step 2" in res.stdout + res.stderr
        m3 = read_metrics(run)
        assert [x["step"] for x in m3] == [1, 2, 3] and m3[:2] == m and m3[2]["actor/grad_norm"] > 0
