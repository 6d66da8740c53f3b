"""Rollout engine fault handling through a real local Ray: an engine actor killed in the middle of a
call is recreated, loaded with the weights its peers hold, and its shard retried (same outputs)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from rlkit.config import load_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session():
    import ray

    from rlkit.orchestration.ray_actors import init_ray

    init_ray(load_config(None, ["cluster.num_cpus=2"]))
    yield
    ray.shutdown()


def _hold_processor(marker_dir: str):
    """An identity logits processor that records "I am inside generate" (a file named after the
    engine's pid) and then blocks while ``marker_dir/hold`` exists: the test kills the engine while
    it is provably mid-call. Defined in a function so Ray pickles the class by value."""

    class HoldInsideGenerate:
        def __call__(self, step, input_ids, logits_BV, state):
            d = Path(marker_dir)
            (d / f"inside-{os.getpid()}").touch()
            deadline = time.time() + 120
            while (d / "hold").exists() and time.time() < deadline:
                time.sleep(0.02)
            return logits_BV

    return HoldInsideGenerate()


def _perturbed(model_dir: str, seed: int) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(seed)
    sd = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in sd.items()}


def test_killed_engine_is_restarted_resynced_and_retried(tiny_model_dir, ray_session, tmp_path):
    import ray

    from rlkit.orchestration.engine_pool import EngineFailure
    from rlkit.orchestration.ray_actors import spawn_actors
    from rollout.engine import RolloutRequest, SamplingParams

    cfg = load_config(None, [f"model.name={tiny_model_dir}", "engine.num_engines=2", "learner.num_threads=1",
                             "cluster.max_actor_restarts=3"])
    learner, pool = spawn_actors(cfg, tiny_model_dir, {"seed": 0, "max_batch_size": 8})
    try:
        params = SamplingParams(max_new_tokens=10, temperature=1.0, n=2, seed=11)
        reqs = [RolloutRequest([3, 4, 5 + i, 6], params, group_id=i) for i in range(4)]
        prefixes = [[3, 4, 5 + i] for i in range(4)]
        conts = [[7, 8, 9, 10 + i] for i in range(4)]
        init_scores = pool.score(prefixes, conts)

        # the policy the engines hold: version 7 (what the trainer's sync step would have pushed)
        pool.load_state(_perturbed(tiny_model_dir, 0), version=7)
        ref_scores = pool.score(prefixes, conts)
        assert not torch.allclose(torch.tensor(ref_scores), torch.tensor(init_scores), atol=1e-3)
        ref_comps, _ = pool.generate(reqs)

        # 1) SIGKILL engine 1 while it is inside generate (held there by the processor)
        marks = tmp_path / "marks"
        marks.mkdir()
        (marks / "hold").touch()
        proc = _hold_processor(str(marks))
        held = [RolloutRequest(r.prompt_ids, r.params, r.group_id, meta={"logits_processors": [proc]}) for r in reqs]
        pid1 = ray.get(pool.actors[1].info.remote())["pid"]
        out: dict = {}
        worker = threading.Thread(target=lambda: out.update(res=pool.generate(held)))
        worker.start()
        deadline = time.time() + 120
        while not (marks / f"inside-{pid1}").exists():
            assert time.time() < deadline and worker.is_alive(), "engine 1 never entered generate"
            time.sleep(0.02)
        t_kill = time.time()
        os.kill(pid1, signal.SIGKILL)
        (marks / "hold").unlink()
        worker.join(timeout=300)
        assert "res" in out, "the step did not complete after the engine was killed"
        comps, _ = out["res"]
        assert pool.restarts == [0, 1]
        ev = pool.events[0]
        assert ev.engine == 1 and ev.version == 7
        print(f"\nengine death detected {ev.detected_at - t_kill:.2f}s after SIGKILL; recreated in {ev.restart_s:.2f}s; "
              f"re-synced in {ev.sync_s:.3f}s")
        # the retried shard was sampled by the recreated engine with the synced weights: same samples
        assert [c.token_ids for c in comps] == [c.token_ids for c in ref_comps]
        for c, r in zip(comps, ref_comps):
            torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(r.logprobs), atol=1e-5, rtol=0)
        new = ray.get(pool.actors[1].info.remote())
        assert new["pid"] != pid1 and new["policy_version"] == 7
        mine = ray.get(pool.actors[1].score.remote(prefixes, conts))
        torch.testing.assert_close(torch.tensor(mine), torch.tensor(ref_scores), atol=1e-5, rtol=0)
        assert pool.metrics()["cluster/actor_restarts"] == 1.0

        # 2) an engine killed between calls dies during the next weight sync (from the learner, which holds
        # the initial weights): it is recreated with the NEW weights, and scores like its peer
        ray.kill(pool.actors[0], no_restart=True)
        pool.sync(learner, 8)
        assert pool.restarts == [1, 1]
        assert [ray.get(a.info.remote())["policy_version"] for a in pool.actors] == [8, 8]
        s0, s1 = (ray.get(a.score.remote(prefixes, conts)) for a in pool.actors)
        torch.testing.assert_close(torch.tensor(s0), torch.tensor(init_scores), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(s1), torch.tensor(init_scores), atol=1e-5, rtol=0)
        # colocated placement puts the engines to sleep while the learner trains; they serve the same after
        pool.sleep()
        pool.wake()
        torch.testing.assert_close(torch.tensor(pool.score(prefixes, conts)), torch.tensor(init_scores), atol=1e-5,
                                   rtol=0)

        # a dead learner fails the sync with its own error: no engine is recreated for it, and the
        # pool keeps the last good weights for later restarts
        kept = pool._state
        ray.kill(learner, no_restart=True)
        with pytest.raises(ray.exceptions.RayError, match="LearnerWorker"):
            pool.sync(learner, 9)
        assert pool.restarts == [1, 1] and pool.version == 8 and pool._state is kept

        # 3) the restart budget is per engine: one death too many is a clear error naming the key
        pool.max_restarts = 1
        ray.kill(pool.actors[1], no_restart=True)
        with pytest.raises(EngineFailure, match=r"rollout engine 1 died .*cluster\.max_actor_restarts=1 reached"):
            pool.score(prefixes, conts)
    finally:
        pool.shutdown()



def test_trainer_survives_an_engine_killed_during_a_step(tiny_model_dir, ray_session, tmp_path):
    """2 steps through the Trainer (placement=split): engine 0 is SIGKILLed as soon as step 1 is
    logged, i.e. during step 2; the run finishes and logs one restart."""
    import ray

    from rlkit.infra.tracking import read_metrics
    from rlkit.trainer import Trainer

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "recipes/quickstart.yaml", [
        f"model.name={tiny_model_dir}", f"output_dir={tmp_path}", "name=kill", "train.steps=2",
        "train.prompts_per_step=2", "train.samples_per_prompt=4", "engine.max_new_tokens=12",
        "data.generator={n: 40, max_value: 9}", "data.eval_size=4", "learner.lr=1e-3", "learner.micro_batch_size=4",
        "tracking.tensorboard=false", "reward.mode=inline", "model.lora.rank=0", "eval.before=false",
        "eval.after=false", "checkpoint.every=0", "cluster.placement=split", "learner.num_threads=1",
    ])
    trainer = Trainer(cfg)
    killed: dict = {}

    def kill_during_step_2() -> None:
        deadline = time.time() + 600
        while time.time() < deadline and not read_metrics(tmp_path / "kill"):
            time.sleep(0.02)
        actor = trainer.engines.actors[0]
        killed["pid"] = ray.get(actor.info.remote())["pid"]
        os.kill(killed["pid"], signal.SIGKILL)

    watcher = threading.Thread(target=kill_during_step_2, daemon=True)
    watcher.start()
    trainer.run()
    watcher.join(timeout=60)
    m = read_metrics(tmp_path / "kill")
    assert [x["step"] for x in m] == [1, 2] and "pid" in killed
    assert m[0]["cluster/actor_restarts"] == 0.0 and m[1]["cluster/actor_restarts"] == 1.0
    assert m[1]["cluster/restart_s"] > 0
