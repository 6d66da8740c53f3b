"""One Ray actor class per role: ``RolloutWorker`` (an engine) and ``LearnerWorker`` (a learner).

The embedded default runs both on one CPU box under a local Ray that listens on loopback only.
Generation and training alternate, so each actor may use every core (torch threads are set
explicitly: Ray would otherwise pin OMP threads to the actor's 1-CPU reservation).
Weights travel learner -> object store -> engines (``sync_weights``).
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

from rlkit.config import Config


def init_ray(cfg: Config) -> None:
    """Start a local loopback Ray (or join ``cluster.address``). Idempotent."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    c = cfg.cluster
    if c.address:
        ray.init(address=c.address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local, loopback-only cluster
    # `_node_ip_address="127.0.0.1"` alone is re-resolved to the eth0 address by Ray on Linux;
    # Ray's single-machine mode (its default on macOS/Windows) keeps every address on loopback.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # read at call time; ray may be imported already
    ray.init(
        num_cpus=c.num_cpus or max(2, os.cpu_count() or 2),
        include_dashboard=c.dashboard,
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
        configure_logging=False,
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
    )


def _threads(n: int | None) -> None:
    import torch

    torch.set_num_threads(n or os.cpu_count() or 1)


class RolloutWorker:
    """Owns one rollout engine (any registered engine class)."""

    def __init__(self, engine_name: str, model_path: str, engine_kwargs: dict[str, Any], threads: int | None):
        _threads(threads)
        from rollout.engine import get_engine_class

        self.engine = get_engine_class(engine_name)(model_path, **engine_kwargs)

    def generate(self, requests):
        t0 = time.perf_counter()
        out = self.engine.generate(requests)
        return out, time.perf_counter() - t0

    def score(self, prefixes, continuations):
        return self.engine.score(prefixes, continuations)

    def load_weights(self, state, version: int | None = None) -> float:
        import numpy as np
        import torch

        t0 = time.perf_counter()
        # numpy arrays arrive zero-copy from the object store (read-only): wrap, engine copies in place
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "array is not writable": we only read it
            state = {k: torch.from_numpy(np.asarray(v)) if not isinstance(v, torch.Tensor) else v
                     for k, v in state.items()}
        self.engine.load_weights(state, version=version)
        return time.perf_counter() - t0

    def ready(self) -> bool:
        return True


class LearnerWorker:
    """Owns the learner (torch for now; DeepSpeed ranks plug in behind the same methods)."""

    def __init__(self, model_path: str, cfg: Config, threads: int | None):
        _threads(threads)
        from rlkit.learner.torch_learner import TorchLearner

        self.learner = TorchLearner(
            model_path,
            model_cfg=cfg.model,
            learner_cfg=cfg.learner,
            algo_cfg=cfg.algorithm,
            train_cfg=cfg.train,
            seed=cfg.seed,
        )

    def train_step(self, batch):
        return self.learner.train_step(batch)

    def entropy_stats(self, pivot: float, replicate_release_sign: bool = False):
        return self.learner.entropy_stats(pivot, replicate_release_sign)

    def state_for_sync(self):
        """Weights as numpy arrays: Ray stores them as out-of-band buffers and engines on the same
        node read them without a pickle copy (measured: see the foundation issue note)."""
        import torch

        return {k: v.numpy() if v.dtype != torch.bfloat16 else v  # numpy has no bfloat16
                for k, v in self.learner.state_for_sync().items()}

    def checkpoint_state(self):
        return self.learner.checkpoint_state()

    def load_checkpoint_state(self, state) -> None:
        self.learner.load_checkpoint_state(state)

    def export(self, out_dir: str, tokenizer_path: str) -> str:
        return self.learner.export(out_dir, tokenizer_path)

    def info(self):
        return self.learner.info()


def spawn_actors(cfg: Config, model_path: str, engine_kwargs: dict[str, Any]):
    """Create the learner and engine actors and wait until they are ready."""
    import ray

    threads = cfg.learner.num_threads
    learner = ray.remote(num_cpus=1)(LearnerWorker).remote(model_path, cfg, threads)
    engines = [
        ray.remote(num_cpus=1.0 / cfg.engine.num_engines)(RolloutWorker).remote(cfg.engine.name, model_path, engine_kwargs, threads)
        for _ in range(cfg.engine.num_engines)
    ]
    ray.get([learner.info.remote()] + [e.ready.remote() for e in engines])
    return learner, engines


def sync_weights(learner, engines, version: int) -> float:
    """Learner state -> object store -> every engine. Returns seconds spent."""
    import ray

    t0 = time.perf_counter()
    ref = learner.state_for_sync.remote()
    ray.get([e.load_weights.remote(ref, version) for e in engines])
    return time.perf_counter() - t0
