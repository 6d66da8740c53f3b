"""The Ray actors of a run: ``RolloutWorker`` (one rollout engine) and ``LearnerWorker`` (the
single-process learner). Created by :mod:`rlkit.orchestration.ray_actors` (placement, spawning)
and recreated by :class:`rlkit.orchestration.engine_pool.EnginePool` when an engine dies.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

from rlkit.schema import Config


def _threads(n: int | None) -> None:
    import torch

    torch.set_num_threads(n or os.cpu_count() or 1)


class RolloutWorker:
    """Owns one rollout engine (any registered engine class)."""

    def __init__(self, engine_name: str, model_path: str, engine_kwargs: dict[str, Any], threads: int | None,
                 plugins: tuple[str, ...] = ()):
        if plugins:  # the config's plugins (engines, logits processors a user registered)
            from rewards.registry import load_plugins

            load_plugins(plugins)
        if engine_name != "vllm":  # vLLM binds its own threads; all-core torch threads made it ~20x slower on CPU
            _threads(threads)
        from rollout.engine import get_engine_class

        # budget guidance (model.budget_guidance): not an engine argument; its processor goes last
        # in the engine's chain and acts only on requests that carry a budget (data.budget)
        engine_kwargs = dict(engine_kwargs)
        guidance = engine_kwargs.pop("budget_guidance", None)
        guidance_params = engine_kwargs.pop("budget_guidance_params", None)
        self.engine = get_engine_class(engine_name)(model_path, **engine_kwargs)
        self._guidance = None
        if guidance:
            from rlkit.methods.budget_guidance import attach_budget_guidance

            self._guidance = attach_budget_guidance(self.engine, guidance, guidance_params)
        from rlkit.orchestration.weight_sync import EngineSyncEndpoint

        self._sync = EngineSyncEndpoint(self.engine)

    def generate(self, requests):
        t0 = time.perf_counter()
        out = self.engine.generate(requests)
        return out, time.perf_counter() - t0

    def score(self, prefixes, continuations):
        return self.engine.score(prefixes, continuations)

    def guidance_counts(self) -> dict[str, int]:
        """Budget guidance's running counters (rows x decode steps) since this actor started; {} = none."""
        return {} if self._guidance is None else self._guidance.counts()

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

    # cluster.weight_sync=collective|cuda_ipc (rlkit.orchestration.weight_sync)
    def sync_group_size(self) -> int:
        return self._sync.group_size()

    def sync_group_join(self, host: str, port: int, first_rank: int, world_size: int, backend: str,
                        timeout_s: float) -> None:
        self._sync.join(host, port, first_rank, world_size, backend, timeout_s)

    def sync_receive(self, version: int) -> dict[str, float]:
        return self._sync.receive(version)

    def sync_group_leave(self) -> None:
        self._sync.leave()

    def device_uuid(self) -> str | None:
        from rollout.weight_transfer import device_uuid

        return device_uuid()

    def load_ipc(self, handle, entries, version: int) -> float:
        return self._sync.load_ipc(handle, entries, version)

    def sleep(self) -> None:
        """Free accelerator memory for a colocated learner (vLLM sleep level 1; HF: weights to host)."""
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

    def ready(self) -> bool:
        return True

    def info(self) -> dict[str, Any]:
        """Process id, Ray node id and the policy version the engine holds (monitoring, fault tests)."""
        import ray

        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "ip": ray.util.get_node_ip_address(), "policy_version": getattr(self.engine, "policy_version", None)}


class LearnerWorker:
    """Owns the learner: the torch learner, or (``rank`` given) one rank of the DeepSpeed learner,
    built by :meth:`setup_rank` once rank 0's rendezvous address is known (see
    :class:`DeepSpeedLearnerGroup`). Same methods either way."""

    def __init__(self, model_path: str, cfg: Config, threads: int | None, rank: int | None = None):
        _threads(threads)
        from rlkit.compose import load_plugins

        load_plugins(cfg)  # the config's plugins: a user's policy loss or loss mask runs here
        self._model_path, self._cfg, self.rank = model_path, cfg, rank
        self._sync: Any = None  # LearnerSyncEndpoint, made on first use
        if rank is not None:
            return
        from rlkit.learner.torch_learner import TorchLearner

        self.learner = TorchLearner(model_path, cfg)

    def node(self) -> tuple[str, str]:
        """(Ray node id, node IP address) of this actor."""
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def free_port(self, host: str) -> int:
        from rlkit.learner.deepspeed import free_port

        return free_port(host)

    def setup_rank(self, master_addr: str, master_port: int) -> dict[str, int]:
        """Join the process group at ``master_addr:master_port`` and build this DeepSpeed rank."""
        from rlkit.learner.deepspeed import DeepSpeedLearner

        cfg = self._cfg
        self.learner = DeepSpeedLearner(self._model_path, cfg, rank=self.rank, world_size=cfg.learner.num_ranks,
                                        master_addr=master_addr, master_port=master_port)
        return self.learner.info()

    def gradients(self, batch):
        return self.learner.gradients(batch)

    def compute_logprobs(self, batch, reference: bool = False):
        return self.learner.compute_logprobs(batch, reference=reference)

    def train_step(self, batch):
        return self.learner.train_step(batch)

    def entropy_stats(self, pivot: float, replicate_release_sign: bool = False):
        return self.learner.entropy_stats(pivot, replicate_release_sign)

    def temperature_stats(self, applied: list[float], tau: float):
        return self.learner.temperature_stats(applied, tau)

    def state_for_sync(self):
        """Weights as numpy arrays: Ray stores them as out-of-band buffers and engines on the same
        node read them without a pickle copy."""
        import torch

        state = self.learner.state_for_sync()  # None on DeepSpeed ranks other than 0
        return None if state is None else {k: v.numpy() if v.dtype != torch.bfloat16 else v  # numpy has no bfloat16
                                           for k, v in state.items()}

    # cluster.weight_sync=collective|cuda_ipc (rlkit.orchestration.weight_sync); DeepSpeed: on every rank
    def _endpoint(self):
        if self._sync is None:
            from rlkit.orchestration.weight_sync import LearnerSyncEndpoint

            self._sync = LearnerSyncEndpoint(self.learner, self.rank)
        return self._sync

    def sync_group_join(self, host: str, port: int, world_size: int, backend: str, timeout_s: float) -> None:
        self._endpoint().join(host, port, world_size, backend, timeout_s)

    def sync_send(self, bucket_bytes: int):
        return self._endpoint().send(bucket_bytes)

    def sync_group_leave(self) -> None:
        self._endpoint().leave()

    def sync_plan(self, bucket_bytes: int) -> list[list[str]]:
        return self._endpoint().plan(bucket_bytes)

    def ipc_bucket(self, names: list[str]):
        return self._endpoint().ipc_bucket(names)

    def ipc_release(self) -> None:
        self._endpoint().ipc_release()

    def checkpoint_state(self):
        return self.learner.checkpoint_state()

    def load_checkpoint_state(self, state) -> None:
        self.learner.load_checkpoint_state(state)

    def save_checkpoint_files(self, out_dir: str) -> list[str]:
        """Write the weights, optimizer and scheduler into ``out_dir`` from here (DeepSpeed: every rank
        takes part in the gather, rank 0 writes); the file names, ``[]`` on other ranks."""
        from rlkit.infra.checkpoint import write_state_files

        st = self.learner.checkpoint_state()
        if st is None:
            return []
        return write_state_files(out_dir, st["model_state"], st.get("optimizer_state"), st.get("scheduler_state"))

    def restore_checkpoint_files(self, path: str) -> None:
        """Load the weights, optimizer and scheduler of the checkpoint directory ``path`` from here."""
        from rlkit.infra.checkpoint import load_checkpoint

        self.learner.load_checkpoint_state(load_checkpoint(path))

    def export(self, out_dir: str, tokenizer_path: str) -> str:
        return self.learner.export(out_dir, tokenizer_path)

    def info(self):
        return self.learner.info()
