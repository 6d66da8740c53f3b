"""Where the learner ranks and the rollout engines run: ``cluster.placement`` as Ray placement groups.

``colocated`` (default): the roles share bundles. With GPUs there is one bundle ``{GPU: 1, CPU: 1}``
per GPU (``cluster.learner_gpus == cluster.engine_gpus``); learner rank r and the engine (or
tensor-parallel worker) on GPU r each hold half of bundle r, so training and generation alternate on
the same devices (vLLM sleeps while the learner trains). On CPU every actor shares one bundle of one
CPU (generation and training alternate; each actor still uses every core, see ``ray_actors``).

``split``: engines and learner ranks get bundles of their own, in two placement groups: one GPU (or,
on CPU, one CPU) per learner rank and per engine GPU, so rollout and training may sit on different
GPUs or nodes (the disaggregated mode).

An engine with ``engine.tensor_parallel_size = T > 1`` spans T consecutive bundles: its actor sits
on the first (holding no GPU itself) and captures its child tasks, so vLLM's Ray executor places its
T workers on those bundles (``VLLM_RAY_BUNDLE_INDICES`` / ``VLLM_RAY_PER_WORKER_GPUS``, the
mechanism OpenRLHF and verl use).

Config-level impossibilities are caught by :func:`check_cluster_config` during config validation,
before anything starts; those that depend on the cluster (too few GPUs/CPUs) by
:func:`check_fits` / :meth:`Placement.create`, before any model loads. Every message names the keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlkit.schema import Config

ROLES = ("engines", "learner")


class PlacementError(RuntimeError):
    """The Ray cluster cannot hold the configured placement (the message names the keys)."""


@dataclass(frozen=True)
class Slot:
    """Where one actor runs: bundle ``bundle`` of placement group ``group``, reserving this much.

    ``tp_bundles``/``worker_gpus``: an engine with tensor parallelism; its workers (children of the
    actor) take ``worker_gpus`` GPU on each of those bundles.
    """

    group: str
    bundle: int
    num_cpus: float
    num_gpus: float
    tp_bundles: tuple[int, ...] = ()
    worker_gpus: float = 0.0


@dataclass(frozen=True)
class PlacementPlan:
    """Bundles per placement group and one :class:`Slot` per engine / learner rank (pure data)."""

    placement: str
    bundles: dict[str, list[dict[str, float]]]
    engines: list[Slot] = field(default_factory=list)
    learner: list[Slot] = field(default_factory=list)

    def total(self, resource: str) -> float:
        return sum(b.get(resource, 0.0) for bs in self.bundles.values() for b in bs)


def check_cluster_config(c: Config) -> None:
    """Placement checks that need no cluster (run during config validation). Raises ``ValueError``."""
    cl, e, lr = c.cluster, c.engine, c.learner
    tp = e.tensor_parallel_size
    if cl.placement == "colocated" and cl.learner_gpus != cl.engine_gpus:
        raise ValueError(
            f"cluster.placement=colocated shares GPUs between the learner and the engines: cluster.learner_gpus "
            f"({cl.learner_gpus}) must equal cluster.engine_gpus ({cl.engine_gpus}); use cluster.placement=split "
            "to give each role its own GPUs")
    if tp > 1 and e.name == "hf":
        raise ValueError(f"engine.tensor_parallel_size={tp}: the hf engine has no tensor parallelism; "
                         "use engine.name=vllm or engine.tensor_parallel_size=1")
    if cl.engine_gpus == 0 and tp > 1:
        raise ValueError(f"engine.tensor_parallel_size={tp} needs GPUs: set cluster.engine_gpus "
                         f"(= engine.num_engines x engine.tensor_parallel_size = {e.num_engines * tp})")
    if cl.engine_gpus:
        if cl.engine_gpus % tp:
            raise ValueError(f"engine.tensor_parallel_size={tp} must divide cluster.engine_gpus={cl.engine_gpus}")
        if cl.engine_gpus != e.num_engines * tp:
            raise ValueError(
                f"engine.num_engines ({e.num_engines}) x engine.tensor_parallel_size ({tp}) must equal "
                f"cluster.engine_gpus ({cl.engine_gpus}): set engine.num_engines={cl.engine_gpus // tp}")
    pinned = [k for k in ("learner_resources", "engine_resources") if getattr(cl, k)]
    if pinned and cl.placement != "split":
        raise ValueError(f"cluster.{pinned[0]} pins a role to nodes: it needs cluster.placement=split "
                         "(colocated roles share their bundles)")
    for k in pinned:
        bad = [r for r, v in getattr(cl, k).items() if r in ("CPU", "GPU", "memory", "object_store_memory") or v <= 0]
        if bad:
            raise ValueError(f"cluster.{k}: {bad[0]!r} must be a custom resource name with a positive amount "
                             "(CPU/GPU come from cluster.learner_gpus / cluster.engine_gpus)")
    if cl.learner_gpus:
        if lr.name != "deepspeed":
            raise ValueError(f"cluster.learner_gpus={cl.learner_gpus}: the {lr.name} learner runs on CPU; "
                             "use learner.name=deepspeed (one GPU per rank) or cluster.learner_gpus=0")
        if cl.learner_gpus != lr.num_ranks:
            raise ValueError(f"learner.num_ranks ({lr.num_ranks}) must equal cluster.learner_gpus "
                             f"({cl.learner_gpus}): one GPU per DeepSpeed rank")


def _engine_slot(group: str, first: int, tp: int, cpus: float, gpus: float) -> Slot:
    if tp == 1:
        return Slot(group, first, cpus, gpus)
    return Slot(group, first, cpus, 0.0, tuple(range(first, first + tp)), gpus)


def _bundles_from(slots: list[Slot], n: int) -> list[dict[str, float]]:
    """Per-bundle sums of what the slots (and their TP workers) reserve."""
    out = [{"CPU": 0.0} for _ in range(n)]
    for s in slots:
        out[s.bundle]["CPU"] += s.num_cpus
        for b, g in [(s.bundle, s.num_gpus)] + [(b, s.worker_gpus) for b in s.tp_bundles]:
            if g:
                out[b]["GPU"] = out[b].get("GPU", 0.0) + g
    return out


def plan_placement(c: Config, roles: tuple[str, ...] = ROLES) -> PlacementPlan:
    """Bundles and slots for ``roles`` (``engines``, ``learner``) under ``cluster.placement``. Pure."""
    cl = c.cluster
    E, tp = c.engine.num_engines, c.engine.tensor_parallel_size
    R = c.learner.num_ranks
    want_e, want_l = "engines" in roles, "learner" in roles
    if cl.placement == "colocated":
        G = cl.learner_gpus  # == engine_gpus (check_cluster_config)
        if G == 0:  # CPU: every actor shares one CPU
            n = (E if want_e else 0) + (R if want_l else 0)
            share = 1.0 / max(n, 1)
            engines = [Slot("shared", 0, share, 0.0) for _ in range(E)] if want_e else []
            learner = [Slot("shared", 0, share, 0.0) for _ in range(R)] if want_l else []
            return PlacementPlan("colocated", {"shared": [{"CPU": 1.0}]}, engines, learner)
        share = 0.5 if want_e and want_l else 1.0
        engines = [_engine_slot("shared", i * tp, tp, share, share) for i in range(E)] if want_e else []
        learner = [Slot("shared", r, share, share) for r in range(R)] if want_l else []
        return PlacementPlan("colocated", {"shared": _bundles_from(engines + learner, G)}, engines, learner)
    eg, lg = (1.0 if cl.engine_gpus else 0.0), (1.0 if cl.learner_gpus else 0.0)
    bundles: dict[str, list[dict[str, float]]] = {}
    engines, learner = [], []
    if want_e:
        engines = [_engine_slot("engines", i * tp, tp, 1.0, eg) for i in range(E)]
        bundles["engines"] = [{"CPU": 1.0, **({"GPU": 1.0} if eg else {}), **cl.engine_resources}
                              for _ in range(E * tp)]
    if want_l:
        learner = [Slot("learner", r, 1.0, lg) for r in range(R)]
        bundles["learner"] = [{**b, **cl.learner_resources} for b in _bundles_from(learner, R)]
    return PlacementPlan("split", bundles, engines, learner)


def check_fits(plan: PlacementPlan, resources: dict[str, float], c: Config) -> None:
    """Raise a clear error when the cluster's totals cannot hold the plan (before anything starts)."""
    cl = c.cluster
    gpus, cpus = plan.total("GPU"), plan.total("CPU")
    have_g, have_c = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    if gpus > have_g:
        need = (f"cluster.learner_gpus + cluster.engine_gpus = {cl.learner_gpus} + {cl.engine_gpus}"
                if plan.placement == "split" else f"cluster.learner_gpus = cluster.engine_gpus = {cl.learner_gpus}")
        raise PlacementError(f"cluster.placement={plan.placement} needs {need} = {gpus:g} GPUs, but the Ray cluster has "
                           f"{have_g:g}; lower the GPU counts or join a bigger cluster (cluster.address)")
    for res in sorted({r for bs in plan.bundles.values() for b in bs for r in b} - {"CPU", "GPU"}):
        if plan.total(res) > resources.get(res, 0.0):
            keys = " / ".join(f"cluster.{k}" for k in ("learner_resources", "engine_resources")
                              if res in getattr(cl, k))
            raise PlacementError(f"{keys} reserve {plan.total(res):g} of the custom resource {res!r}, but the Ray "
                               f"cluster has {resources.get(res, 0.0):g}; start the nodes meant for that role with "
                               f"`ray start --resources='{{\"{res}\": N}}'`")
    if cpus > have_c:
        raise PlacementError(
            f"cluster.placement={plan.placement} reserves {cpus:g} CPUs (one per engine GPU/engine and per learner "
            f"rank: engine.num_engines={c.engine.num_engines}, learner.num_ranks={c.learner.num_ranks}), but the Ray "
            f"cluster has {have_c:g}; raise cluster.num_cpus or use cluster.placement=colocated")


class Placement:
    """The live placement groups of a :class:`PlacementPlan`; hands out actor options per slot."""

    def __init__(self, plan: PlacementPlan, groups: dict[str, Any]):
        self.plan, self.groups = plan, groups

    @classmethod
    def create(cls, c: Config, roles: tuple[str, ...] = ROLES) -> Placement:
        """Plan, check against the cluster, create the placement groups and wait until they are placed."""
        import ray
        from ray.util.placement_group import placement_group

        plan = plan_placement(c, roles)
        resources = ray.cluster_resources()
        check_fits(plan, resources, c)
        groups = {name: placement_group([dict(b) for b in bundles], strategy="PACK")
                  for name, bundles in plan.bundles.items()}
        placement = cls(plan, groups)
        timeout = c.cluster.placement_timeout_s
        try:
            ray.get([pg.ready() for pg in groups.values()], timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            placement.remove()
            raise PlacementError(
                f"could not place the {plan.placement} bundles {plan.bundles} within cluster.placement_timeout_s="
                f"{timeout:g}s (cluster resources: {resources}; available: {ray.available_resources()}); a single "
                "node may lack the GPUs one placement group packs together") from None
        return placement

    def options(self, slot: Slot) -> dict[str, Any]:
        """``ray.remote(...).options(**this)`` for an actor in ``slot``."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        opts: dict[str, Any] = {
            "num_cpus": slot.num_cpus, "num_gpus": slot.num_gpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                self.groups[slot.group], placement_group_bundle_index=slot.bundle,
                placement_group_capture_child_tasks=bool(slot.tp_bundles)),
        }
        if slot.tp_bundles:  # read by vLLM's Ray executor when it places the TP workers
            opts["runtime_env"] = {"env_vars": {"VLLM_RAY_BUNDLE_INDICES": ",".join(map(str, slot.tp_bundles)),
                                                "VLLM_RAY_PER_WORKER_GPUS": str(slot.worker_gpus)}}
        return opts

    def remove(self) -> None:
        """Remove the placement groups (actors still in them are killed by Ray)."""
        from ray.util.placement_group import remove_placement_group

        for pg in self.groups.values():
            try:
                remove_placement_group(pg)
            except Exception:  # already removed, or Ray is shutting down
                pass
        self.groups = {}
