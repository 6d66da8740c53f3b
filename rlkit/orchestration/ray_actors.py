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

        # budget guidance (model.budget_guidance): not an engine argument; its processor goes last
        # in the engine's chain and acts only on requests that carry a budget (data.budget)
        engine_kwargs = dict(engine_kwargs)
        guidance = engine_kwargs.pop("budget_guidance", None)
        guidance_params = engine_kwargs.pop("budget_guidance_params", None)
        self.engine = get_engine_class(engine_name)(model_path, **engine_kwargs)
        if guidance:
            from rlkit.budget_eval import attach_budget_guidance

            attach_budget_guidance(self.engine, guidance, guidance_params)

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
    """Owns the learner: the torch learner, or (``rank`` given) one rank of the DeepSpeed learner,
    built by :meth:`setup_rank` once rank 0's rendezvous address is known (see
    :class:`DeepSpeedLearnerGroup`). Same methods either way."""

    def __init__(self, model_path: str, cfg: Config, threads: int | None, rank: int | None = None):
        _threads(threads)
        self._model_path, self._cfg, self.rank = model_path, cfg, rank
        if rank is not None:
            return
        from rlkit.learner.torch_learner import TorchLearner

        self.learner = TorchLearner(
            model_path,
            model_cfg=cfg.model,
            learner_cfg=cfg.learner,
            algo_cfg=cfg.algorithm,
            train_cfg=cfg.train,
            seed=cfg.seed,
        )

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
        self.learner = DeepSpeedLearner(
            self._model_path, model_cfg=cfg.model, learner_cfg=cfg.learner, algo_cfg=cfg.algorithm,
            train_cfg=cfg.train, seed=cfg.seed, rank=self.rank, world_size=cfg.learner.num_ranks,
            master_addr=master_addr, master_port=master_port,
        )
        return self.learner.info()

    def gradients(self, batch):
        return self.learner.gradients(batch)

    def compute_logprobs(self, batch, reference: bool = False):
        return self.learner.compute_logprobs(batch, reference=reference)

    def train_step(self, batch):
        return self.learner.train_step(batch)

    def entropy_stats(self, pivot: float, replicate_release_sign: bool = False):
        return self.learner.entropy_stats(pivot, replicate_release_sign)

    def state_for_sync(self):
        """Weights as numpy arrays: Ray stores them as out-of-band buffers and engines on the same
        node read them without a pickle copy (measured: see the foundation issue note)."""
        import torch

        state = self.learner.state_for_sync()  # None on DeepSpeed ranks other than 0
        return None if state is None else {k: v.numpy() if v.dtype != torch.bfloat16 else v  # numpy has no bfloat16
                                           for k, v in state.items()}

    def checkpoint_state(self):
        return self.learner.checkpoint_state()

    def load_checkpoint_state(self, state) -> None:
        self.learner.load_checkpoint_state(state)

    def export(self, out_dir: str, tokenizer_path: str) -> str:
        return self.learner.export(out_dir, tokenizer_path)

    def info(self):
        return self.learner.info()


class _GroupMethod:
    def __init__(self, group: DeepSpeedLearnerGroup, name: str):
        self._group, self._name = group, name

    def remote(self, *args, **kwargs):
        return self._group._call(self._name, args, kwargs)


class DeepSpeedLearnerGroup:
    """The DeepSpeed ranks behind the one-learner surface: ``group.train_step.remote(batch)``.

    A call puts its arguments in the object store once, runs the method on every rank (together
    they run it as one collective) and returns rank 0's result reference, which holds the whole
    answer: metrics are all-reduced, weights and checkpoints gathered on rank 0. The other ranks'
    references are checked (without waiting) at the next call, so their errors surface too.
    """

    METHODS = ("train_step", "entropy_stats", "state_for_sync", "checkpoint_state", "load_checkpoint_state",
               "export", "info", "compute_logprobs", "gradients")

    def __init__(self, ranks: list, placement_group: Any = None):
        self.ranks, self.placement_group, self._pending = list(ranks), placement_group, []

    def __getattr__(self, name: str) -> _GroupMethod:
        if name in DeepSpeedLearnerGroup.METHODS:
            return _GroupMethod(self, name)
        raise AttributeError(f"{type(self).__name__} has no method {name!r} (has {', '.join(self.METHODS)})")

    def _call(self, name: str, args: tuple, kwargs: dict):
        import ray

        self.check()
        args = tuple(a if isinstance(a, (str, int, float, bool, type(None), ray.ObjectRef)) else ray.put(a)
                     for a in args)
        refs = [getattr(r, name).remote(*args, **kwargs) for r in self.ranks]
        self._pending = refs[1:]
        return refs[0]

    def check(self) -> None:
        """Raise the error of any finished earlier call on ranks 1..N-1."""
        import ray

        if self._pending:
            done, self._pending = ray.wait(self._pending, num_returns=len(self._pending), timeout=0)
            ray.get(done)

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for r in self.ranks:
            ray.kill(r)
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)


def _get_fail_fast(refs: list) -> list:
    """``ray.get(refs)``, raising the first error as soon as any reference fails."""
    import ray

    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
    return ray.get(refs)


def spawn_deepspeed_learner(cfg: Config, model_path: str, threads: int | None) -> DeepSpeedLearnerGroup:
    """``learner.num_ranks`` DeepSpeed rank actors in one placement group, rendezvoused and built.

    One GPU per rank when the cluster has enough GPUs (NCCL), else CPU ranks sharing one CPU of
    reservation (gloo; training and generation alternate). All ranks on one node rendezvous on
    127.0.0.1, otherwise on rank 0's node address.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    n, timeout = cfg.learner.num_ranks, cfg.learner.deepspeed.timeout_s
    bundle = {"CPU": 1.0, "GPU": 1.0} if ray.cluster_resources().get("GPU", 0) >= n else {"CPU": 1.0 / n}
    pg = placement_group([dict(bundle) for _ in range(n)], strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise RuntimeError(f"could not place {n} learner ranks of {bundle} within {timeout:g}s "
                           f"(cluster resources: {ray.cluster_resources()})") from None
    threads = threads or max(1, (os.cpu_count() or 1) // n)
    ranks = [
        ray.remote(LearnerWorker).options(
            num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
        ).remote(model_path, cfg, threads, r)
        for r in range(n)
    ]
    group = DeepSpeedLearnerGroup(ranks, pg)
    try:
        nodes = _get_fail_fast([r.node.remote() for r in ranks])
        addr = "127.0.0.1" if len({node_id for node_id, _ in nodes}) == 1 else nodes[0][1]
        port = ray.get(ranks[0].free_port.remote(addr))
        _get_fail_fast([r.setup_rank.remote(addr, port) for r in ranks])
    except BaseException:
        group.shutdown()
        raise
    return group


def spawn_actors(cfg: Config, model_path: str, engine_kwargs: dict[str, Any]):
    """Create the learner and engine actors and wait until they are ready."""
    import ray

    threads = cfg.learner.num_threads
    engines = [
        ray.remote(num_cpus=1.0 / cfg.engine.num_engines)(RolloutWorker).remote(cfg.engine.name, model_path, engine_kwargs, threads)
        for _ in range(cfg.engine.num_engines)
    ]
    if cfg.learner.name == "deepspeed":  # engines load while the ranks rendezvous
        learner = spawn_deepspeed_learner(cfg, model_path, threads)
    else:
        learner = ray.remote(num_cpus=1)(LearnerWorker).remote(model_path, cfg, threads)
    ray.get([learner.info.remote()] + [e.ready.remote() for e in engines])
    return learner, engines


def sync_weights(learner, engines, version: int) -> float:
    """Learner state -> object store -> every engine. Returns seconds spent."""
    import ray

    t0 = time.perf_counter()
    ref = learner.state_for_sync.remote()
    ray.get([e.load_weights.remote(ref, version) for e in engines])
    return time.perf_counter() - t0
