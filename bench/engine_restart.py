"""Cost of a rollout engine death: detection, recreation (model load) and re-sync of the weights.

    python bench/engine_restart.py [--model smollm2-135m-instruct] [--engines 2] [--placement colocated]

Starts the learner and the engine pool like ``rlkit train`` does, syncs the learner's weights once,
SIGKILLs engine 0 in the middle of a generate call and prints how long the pool took to notice, to
recreate the engine and to load the synced weights into it, and the whole call against an undisturbed one.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--placement", default="colocated", choices=["colocated", "split"])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    a = ap.parse_args()

    from rlkit.config import load_config
    from rlkit.infra.models import resolve_model_path
    from rlkit.orchestration.ray_actors import init_ray, spawn_actors
    from rollout.engine import RolloutRequest, SamplingParams

    path = resolve_model_path(a.model)
    cfg = load_config(None, [f"model.name={path}", f"engine.num_engines={a.engines}",
                             f"cluster.placement={a.placement}", "model.lora.rank=0"])
    init_ray(cfg)
    import ray

    t = time.perf_counter()
    learner, pool = spawn_actors(cfg, path, {"seed": 0, "max_batch_size": 64})
    print(f"spawn (learner + {a.engines} engines): {time.perf_counter() - t:.1f}s")
    print(f"sync: {pool.sync(learner, 1):.3f}s")
    params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=1.0, seed=1)
    reqs = [RolloutRequest([1, 2, 3, 4 + i], params, group_id=i) for i in range(a.requests)]
    t = time.perf_counter()
    ref, _ = pool.generate(reqs)
    clean = time.perf_counter() - t
    pid = ray.get(pool.actors[0].info.remote())["pid"]
    killed: dict[str, float] = {}

    def kill() -> None:
        time.sleep(min(0.5, clean / 3))
        killed["at"] = time.time()
        os.kill(pid, signal.SIGKILL)

    threading.Thread(target=kill).start()
    t = time.perf_counter()
    out, _ = pool.generate(reqs)
    total = time.perf_counter() - t
    assert [c.token_ids for c in out] == [c.token_ids for c in ref], "retried shard differs"
    ev = pool.events[-1]
    print(f"generate {a.requests} x {a.max_new_tokens} tokens: {clean:.2f}s undisturbed, {total:.2f}s with engine 0 "
          f"killed mid-call (same completions)")
    print(f"detect {ev.detected_at - killed['at']:.3f}s | recreate (process + model load) {ev.restart_s:.2f}s | "
          f"re-sync v{ev.version} {ev.sync_s:.3f}s | restarts {pool.metrics()['cluster/actor_restarts']:.0f}")
    pool.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
