"""One Ray actor class per role: ``RolloutWorker`` (an engine) and ``LearnerWorker`` (a learner).

The embedded default runs both on one CPU box under a local Ray that listens on loopback only.
Generation and training alternate, so each actor may use every core (torch threads are set
explicitly: Ray would otherwise pin OMP threads to the actor's 1-CPU reservation).
Weights travel learner -> object store -> engines (``sync_weights``), or through a private process
group / CUDA IPC (``cluster.weight_sync``; the ``sync_*`` / ``ipc_*`` methods, driven by
:mod:`rlkit.orchestration.weight_sync`).
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

from rlkit.orchestration.workers import LearnerWorker, RolloutWorker, _threads  # noqa: F401  (re-exported)
from rlkit.schema import Config


def init_ray(cfg: Config) -> None:
    """Start a local loopback Ray, or join ``cluster.address`` (else ``$RAY_ADDRESS``, which
    ``ray job submit`` sets for its entrypoint). Idempotent."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    c = cfg.cluster
    address = c.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        host = address.split("://")[-1].rsplit(":", 1)[0]
        if host in ("127.0.0.1", "localhost"):  # a loopback-only cluster (`ray start --head` on 127.0.0.1)
            _single_machine_mode()
        ray.init(address=address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local, loopback-only cluster
    _single_machine_mode()
    ray.init(
        address="local",  # never join a cluster some `ray start` left on this machine
        num_cpus=c.num_cpus or max(2, os.cpu_count() or 2),
        include_dashboard=c.dashboard,
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
        configure_logging=False,
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
    )
    from rlkit.orchestration.reaper import start_reaper

    start_reaper()  # a killed driver leaves no Ray process of its own behind


def _single_machine_mode() -> None:
    """Keep Ray's addresses on loopback.

    ``_node_ip_address="127.0.0.1"`` alone is re-resolved to the eth0 address by Ray on Linux (and
    so is a 127.0.0.1 cluster address); Ray's single-machine mode (its default on macOS/Windows)
    keeps every address on loopback.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # read at call time; ray may be imported already


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

    METHODS = ("train_step", "entropy_stats", "temperature_stats", "state_for_sync", "checkpoint_state", "load_checkpoint_state",
               "save_checkpoint_files", "restore_checkpoint_files", "export", "info", "compute_logprobs", "gradients", "node", "free_port",
               "sync_group_join", "sync_send", "sync_group_leave", "sync_plan")

    # about rank 0 itself (its node; a port on its address for the weight-sync group): ranks on
    # other nodes could not even bind that address
    RANK0_ONLY = ("node", "free_port")

    def __init__(self, ranks: list, placement: Any = None):
        # placement: the Placement this group owns (removed by shutdown); None when shared with engines
        self.ranks, self.placement, self._pending = list(ranks), placement, []

    def __getattr__(self, name: str) -> _GroupMethod:
        if name in DeepSpeedLearnerGroup.METHODS:
            return _GroupMethod(self, name)
        raise AttributeError(f"{type(self).__name__} has no method {name!r} (has {', '.join(self.METHODS)})")

    def _call(self, name: str, args: tuple, kwargs: dict):
        import ray

        self.check()
        args = tuple(a if isinstance(a, (str, int, float, bool, type(None), ray.ObjectRef)) else ray.put(a)
                     for a in args)
        ranks = self.ranks[:1] if name in self.RANK0_ONLY else self.ranks
        refs = [getattr(r, name).remote(*args, **kwargs) for r in ranks]
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

        for r in self.ranks:
            ray.kill(r)
        if self.placement is not None:
            self.placement.remove()


def _get_fail_fast(refs: list) -> list:
    """``ray.get(refs)``, raising the first error as soon as any reference fails."""
    import ray

    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
    return ray.get(refs)


def spawn_deepspeed_learner(cfg: Config, model_path: str, threads: int | None,
                            placement: Any = None) -> DeepSpeedLearnerGroup:
    """``learner.num_ranks`` DeepSpeed rank actors, one per learner slot of ``placement``, rendezvoused and built.

    ``placement`` (:class:`rlkit.orchestration.placement.Placement`) is shared with the engines;
    without it the ranks get a placement of their own (``cluster.placement`` for the learner alone),
    which the returned group owns. One GPU per rank with ``cluster.learner_gpus`` (NCCL), else CPU
    ranks (gloo). All ranks on one node rendezvous on 127.0.0.1, otherwise on rank 0's node address.
    """
    import ray

    from rlkit.orchestration.placement import Placement

    own = placement is None
    if own:
        placement = Placement.create(cfg, roles=("learner",))
    n = cfg.learner.num_ranks
    threads = threads or max(1, (os.cpu_count() or 1) // n)
    ranks = [ray.remote(LearnerWorker).options(**placement.options(slot)).remote(model_path, cfg, threads, r)
             for r, slot in enumerate(placement.plan.learner)]
    group = DeepSpeedLearnerGroup(ranks, placement if own else None)
    try:
        nodes = _get_fail_fast([r.node.remote() for r in ranks])
        addr = "127.0.0.1" if len({node_id for node_id, _ in nodes}) == 1 else nodes[0][1]
        port = ray.get(ranks[0].free_port.remote(addr))
        _get_fail_fast([r.setup_rank.remote(addr, port) for r in ranks])
    except BaseException:
        group.shutdown()
        raise
    return group


def engine_kwargs(cfg: Config, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Constructor keyword arguments of the configured engine (+ ``extra``: the stages' own)."""
    kw: dict[str, Any] = {"dtype": cfg.model.dtype, "max_batch_size": cfg.engine.max_batch_size, "seed": cfg.seed}
    if cfg.model.lora.rank > 0:
        kw["lora"] = cfg.model.lora.model_dump()
    if cfg.engine.name == "vllm":  # rollout.vllm.VLLMEngine keyword arguments
        kw.update(cfg.engine.vllm.model_dump())
    kw.update(extra or {})
    return kw


def engine_specs(cfg: Config, model_path: str, engine_kwargs: dict[str, Any], placement: Any) -> list:
    """One :class:`EngineSpec` per engine slot of ``placement`` (GPU engines: ``device=cuda`` / TP size)."""
    from rlkit.orchestration.engine_pool import EngineSpec

    kwargs = dict(engine_kwargs)
    if cfg.cluster.engine_gpus and cfg.engine.name == "hf":
        kwargs.setdefault("device", "cuda")
    if cfg.engine.tensor_parallel_size > 1:
        kwargs["tensor_parallel_size"] = cfg.engine.tensor_parallel_size
        if cfg.engine.name == "vllm":  # TP workers as Ray actors on the engine's bundles (see placement.py)
            kwargs["llm_kwargs"] = {"distributed_executor_backend": "ray", **dict(kwargs.get("llm_kwargs") or {})}
    args = (cfg.engine.name, model_path, kwargs, cfg.learner.num_threads, tuple(cfg.plugins))
    return [EngineSpec(args, placement.options(slot)) for slot in placement.plan.engines]


def spawn_actors(cfg: Config, model_path: str, engine_kwargs: dict[str, Any]):
    """Place the roles (``cluster.placement``), create the learner and the engine pool, wait until ready.

    Returns ``(learner, pool)``: a :class:`LearnerWorker` handle (or :class:`DeepSpeedLearnerGroup`)
    and an :class:`~rlkit.orchestration.engine_pool.EnginePool` that owns the placement groups.
    """
    import ray

    from rlkit.orchestration.engine_pool import EnginePool
    from rlkit.orchestration.placement import Placement

    placement = Placement.create(cfg)
    if not cfg.cluster.learner_gpus and not cfg.cluster.engine_gpus and ray.cluster_resources().get("GPU"):
        warnings.warn("the Ray cluster has GPUs but cluster.learner_gpus = cluster.engine_gpus = 0: "
                      "the learner and the engines run on CPU", stacklevel=2)
    pool = learner = None
    try:
        from rlkit.orchestration.weight_sync import make_weight_sync

        pool = EnginePool(engine_specs(cfg, model_path, engine_kwargs, placement),
                          max_restarts=cfg.cluster.max_actor_restarts, owned=[placement],
                          weight_sync=make_weight_sync(cfg.cluster),
                          restart_timeout_s=cfg.cluster.placement_timeout_s)
        if cfg.learner.name == "deepspeed":  # engines load while the ranks rendezvous
            learner = spawn_deepspeed_learner(cfg, model_path, cfg.learner.num_threads, placement)
        else:
            learner = ray.remote(LearnerWorker).options(**placement.options(placement.plan.learner[0])).remote(
                model_path, cfg, cfg.learner.num_threads)
        _get_fail_fast([learner.info.remote()] + pool.ready_refs())
        pool.note_nodes()
    except BaseException:
        if pool is not None:
            pool.shutdown()  # kills the engines, removes the placement groups (and the learner in them)
        else:
            placement.remove()
        raise
    return learner, pool


def learner_nodes(learner: Any) -> list[tuple[str, str]]:
    """``(Ray node id, IP)`` of every learner rank, in rank order."""
    import ray

    ranks = getattr(learner, "ranks", None) or [learner]
    return [tuple(x) for x in ray.get([r.node.remote() for r in ranks])]


def describe_placement(nodes: list[tuple[str, str]], pool: Any) -> str:
    """Where the roles run (``nodes``: :func:`learner_nodes`), e.g. ``learner rank on 10.0.0.1 | engines 0,1
    on 10.0.0.2``."""
    ips = [ip for _, ip in nodes]
    parts = [f"learner rank{'s' if len(ips) > 1 else ''} on {', '.join(ips)}"]
    by_ip: dict[str, list[int]] = {}
    for i, ip in enumerate(getattr(pool, "nodes", [])):
        by_ip.setdefault(ip, []).append(i)
    parts += [f"engine{'s' if len(ix) > 1 else ''} {','.join(map(str, ix))} on {ip}" for ip, ix in by_ip.items()]
    return " | ".join(parts)


def on_this_node(nodes: list[tuple[str, str]]) -> bool:
    """Whether every learner rank (``nodes``: :func:`learner_nodes`) runs on this process's Ray node (then
    it can write the run dir's checkpoints itself: the run dir is on this machine)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return all(node == here for node, _ in nodes)


def sync_weights(learner, engines, version: int) -> float:
    """Learner state -> object store -> every engine. Returns seconds spent.

    ``engines``: an :class:`~rlkit.orchestration.engine_pool.EnginePool` (keeps the state so a
    recreated engine gets it too) or a list of ``RolloutWorker`` handles.
    """
    import ray

    from rlkit.orchestration.engine_pool import EnginePool

    if isinstance(engines, EnginePool):
        return engines.sync(learner, version)
    t0 = time.perf_counter()
    ref = learner.state_for_sync.remote()
    ray.get([e.load_weights.remote(ref, version) for e in engines])
    return time.perf_counter() - t0


def release(cfg: Config, learner: Any, engines: Any) -> None:
    """The end of a run: stop the local Ray, or (a joined cluster, ``cluster.address``) release this
    run's actors and placement groups and leave the cluster up."""
    import ray

    if ray.is_initialized() and not cfg.cluster.address:
        ray.shutdown()
    elif ray.is_initialized() and engines is not None:
        if hasattr(learner, "shutdown"):
            learner.shutdown()
        else:
            ray.kill(learner)
        engines.shutdown()
