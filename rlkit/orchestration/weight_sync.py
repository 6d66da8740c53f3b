"""Weight sync strategies (``cluster.weight_sync``): how new weights reach every rollout engine.

- ``object_store`` (default): learner -> Ray object store -> every engine
  (:meth:`~rlkit.orchestration.engine_pool.EnginePool.load_state`); the stored copy also serves
  engines recreated after a death.
- ``collective``: learner rank 0 and every engine (every tensor-parallel worker of a vLLM engine)
  form a private process group (:class:`rollout.weight_transfer.SyncGroup`: gloo on CPU, NCCL when
  both the learner and the engines have GPUs) and rank 0 broadcasts the weights bucket by bucket:
  a small header (names, shapes, dtypes, offsets), then the bucket packed into one flat buffer that
  the engines unpack into views and load in place. OpenRLHF and verl broadcast one tensor at a time
  over a group made with torch's private ``_new_process_group_helper`` or vLLM's
  ``StatelessProcessGroup``; here the group is a gloo/NCCL backend built directly on its own TCP
  store (no private torch API, no vLLM dependency on the learner), buckets hold whole layers (vLLM
  reloads a layer's fused parameters together) and the DeepSpeed learner gathers, sends and frees
  one bucket at a time (ZeRO-3 never holds the whole model gathered).
- ``cuda_ipc`` (colocated GPUs): for each bucket every learner rank copies its (gathered) weights into
  one flat buffer on its GPU and returns a CUDA IPC handle; the engine on that GPU (matched by device
  UUID) opens it, loads the tensors and acknowledges; only then does the learner free the buffer and
  move to the next bucket.

Under LoRA only adapter tensors travel, whatever the mode (the learners' ``state_for_sync`` /
``sync_bucket`` return just the adapter).

Recreated engines (``EnginePool._restart``): the group is not repaired in place. A recreated engine
is loaded through the object store (the learner's current state, which is the synced one: engines
die in rollout calls, between a sync and the next update), and the group is formed again, with the
new engine, at the next sync. An engine that dies *during* a collective/IPC sync makes that sync
fail over to the object store for every engine (logged); a member that sees its group broken closes
it, so the survivors fail fast instead of waiting for ``cluster.sync_timeout_s``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlkit.schema import ClusterConfig
from rollout.weight_transfer import (
    SyncGroup,
    device_uuid,
    ipc_handle,
    open_ipc_handle,
    pack_bucket,
    plan_buckets,
    unpack_bucket,
)

MODES = ("object_store", "collective", "cuda_ipc")


class SyncMemberDied(RuntimeError):
    """An engine actor died during a collective / IPC sync (``engines``: their indices)."""

    def __init__(self, engines: list[int], cause: BaseException):
        super().__init__(f"engine(s) {engines} died during the weight sync: {cause}")
        self.engines = engines


def collective_backend(cluster: ClusterConfig) -> str:
    """NCCL when the learner and the engines both have GPUs, else gloo (CPU tensors; GPU engines copy in)."""
    return "nccl" if cluster.learner_gpus > 0 and cluster.engine_gpus > 0 else "gloo"


def _mib(x: float) -> int:
    return max(1, int(x * 2**20))


# ----------------------------------------------------------------------------- inside the learner actor
class LearnerSyncEndpoint:
    """The learner's side (torch learner, or one DeepSpeed rank: every rank runs the gathers, rank 0 sends)."""

    def __init__(self, learner: Any, rank: int | None):
        self.learner, self.rank = learner, rank or 0
        self.group: SyncGroup | None = None
        self._ipc_keep: list[torch.Tensor] = []

    def _whole_state(self) -> dict[str, torch.Tensor] | None:
        """The torch learner's sync tensors (views, whole in memory); ``None`` for a learner that
        gathers bucket by bucket (DeepSpeed: ``sync_plan`` / ``sync_bucket``)."""
        return None if hasattr(self.learner, "sync_bucket") else self.learner.state_for_sync()

    def plan(self, bucket_bytes: int, state: dict[str, torch.Tensor] | None = None) -> list[list[str]]:
        state = self._whole_state() if state is None else state
        if state is None:  # DeepSpeed: from metadata, nothing gathered
            return self.learner.sync_plan(bucket_bytes)
        return plan_buckets({k: v.numel() * v.element_size() for k, v in state.items()}, bucket_bytes)

    def _bucket(self, names: list[str], device: torch.device | str, every_rank: bool,
                state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        if state is not None:
            return {k: state[k].to(device) for k in names}
        return self.learner.sync_bucket(names, device=device, every_rank=every_rank)  # collective (DeepSpeed)

    def join(self, host: str, port: int, world_size: int, backend: str, timeout_s: float) -> None:
        if self.rank != 0:
            return
        self.leave()
        if backend == "nccl":
            torch.cuda.set_device(0)  # Ray shows each rank actor one GPU
        self.group = SyncGroup.join(host, port, 0, world_size, backend, timeout_s)

    def send(self, bucket_bytes: int) -> dict[str, float] | None:
        """Broadcast every bucket (rank 0); DeepSpeed ranks > 0 only take part in the gathers."""
        t0 = time.perf_counter()
        if self.rank == 0 and self.group is None:
            raise RuntimeError("the weight-sync group is not formed (call sync_group_join first)")
        if self.rank == 0:
            _hold_point()
        state = self._whole_state()
        plan = self.plan(bucket_bytes, state)
        device = self.group.device if self.group is not None else torch.device("cpu")
        sent = 0
        try:
            for i, names in enumerate(plan or [[]]):
                part = self._bucket(names, device, False, state)
                if self.rank == 0:
                    sent += self.group.send_bucket(part or {}, last=i == max(len(plan), 1) - 1)
        except BaseException:
            self.leave()  # receivers see the group close and fail now, not after the timeout
            raise
        if self.rank != 0:
            return None
        return {"bytes": float(sent), "buckets": float(len(plan)), "send_s": time.perf_counter() - t0}

    def leave(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None

    def ipc_bucket(self, names: list[str]) -> dict[str, Any]:
        """Pack one bucket on this rank's GPU and return its IPC handle; the previous bucket (which the
        engines have acknowledged, since the driver asks for the next one only then) is freed."""
        if not torch.cuda.is_available():
            raise RuntimeError("cluster.weight_sync=cuda_ipc: the learner has no CUDA device (it needs "
                               "cluster.learner_gpus>0 with learner.name=deepspeed)")
        self._ipc_keep.clear()
        dev = torch.device("cuda", torch.cuda.current_device())
        part = self._bucket(names, dev, True, self._whole_state())
        buf, entries = pack_bucket(part or {}, dev)
        del part
        torch.cuda.synchronize()
        self._ipc_keep.append(buf)
        return {"uuid": device_uuid(), "handle": ipc_handle(buf), "entries": entries, "nbytes": int(buf.numel())}

    def ipc_release(self) -> None:
        self._ipc_keep.clear()
        if torch.cuda.is_available():
            torch.cuda.ipc_collect()
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- inside an engine actor
class EngineSyncEndpoint:
    """An engine's side. Engines with their own group members (vLLM: one per tensor-parallel worker)
    implement ``sync_group_size/join_sync_group/receive_sync/leave_sync_group``; others (HF) receive here."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.group: SyncGroup | None = None

    def _own(self, name: str) -> Any:
        return getattr(self.engine, name, None)

    def group_size(self) -> int:
        f = self._own("sync_group_size")
        return int(f()) if f else 1

    def join(self, host: str, port: int, first_rank: int, world_size: int, backend: str, timeout_s: float) -> None:
        self.leave()
        f = self._own("join_sync_group")
        if f:
            f(host, port, first_rank, world_size, backend, timeout_s)
            return
        if backend == "nccl":
            torch.cuda.set_device(0)
        self.group = SyncGroup.join(host, port, first_rank, world_size, backend, timeout_s)

    def receive(self, version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        f = self._own("receive_sync")
        if f:
            f(version)
            return {"recv_s": time.perf_counter() - t0}
        if self.group is None:
            raise RuntimeError("this engine is not in a weight-sync group (call sync_group_join first)")
        n = 0
        try:
            for part in self.group.receive():
                if part:
                    self.engine.load_weights(part, version=version)  # copies in place; the buffer is dropped
                    n += len(part)
        except BaseException:
            self.leave()
            raise
        return {"recv_s": time.perf_counter() - t0, "tensors": float(n)}

    def leave(self) -> None:
        f = self._own("leave_sync_group")
        if f:
            f()
        if self.group is not None:
            self.group.close()
            self.group = None

    def load_ipc(self, handle: Any, entries: list, version: int) -> float:
        """Open the learner's bucket on this GPU, load it, wait for the copies; returns seconds."""
        t0 = time.perf_counter()
        buf = open_ipc_handle(handle)
        state = unpack_bucket(buf, entries)
        if getattr(self.engine, "lora", None):  # adapters are small: the engine may write them to disk
            state = {k: v.cpu() for k, v in state.items()}
        self.engine.load_weights(state, version=version)
        torch.cuda.synchronize()
        del state, buf
        return time.perf_counter() - t0


# ----------------------------------------------------------------------------- driver side
def _hold_point() -> None:
    """Test hook (network-fault tests): with ``RLKIT_HOLD_SYNC=PATH`` set in the learner's
    environment and the file PATH present when a broadcast starts, rank 0 removes PATH, creates
    PATH.held and waits (at most 300 s) for PATH.go before it sends: a test can cut a link in the
    middle of a sync, deterministically."""
    hold = os.environ.get("RLKIT_HOLD_SYNC")
    if not hold or not os.path.exists(hold):
        return
    os.remove(hold)
    Path(hold + ".held").touch()
    deadline = time.time() + 300
    while not os.path.exists(hold + ".go") and time.time() < deadline:
        time.sleep(0.05)


SYNC_GRACE_S = 5.0  # how long members' own errors may take to arrive (past the timeout, or after rank 0 failed)


class SyncTimeout(RuntimeError):
    """Members of a collective sync did not answer in time (the message names ranks and addresses)."""


def _results(refs: list, engine_of: dict[int, int], timeout_s: float | None = None,
             describe: Callable[[list[int]], str] | None = None) -> list:
    """Results of all ``refs`` (waiting for every one, at most ``timeout_s``); an engine death raises
    :class:`SyncMemberDied` (``engine_of``: position in ``refs`` -> engine index), refs still pending
    at the timeout :class:`SyncTimeout` (``describe(pending positions)`` words it), else the first
    error is raised."""
    import ray

    if timeout_s is None:
        ray.wait(refs, num_returns=len(refs))
        pending = []
    else:  # once rank 0 (refs[0]) has failed, the others get a short grace, not the whole timeout
        deadline, pending = time.monotonic() + timeout_s, list(refs)
        while pending and time.monotonic() < deadline:
            ready, pending = ray.wait(pending, num_returns=1, timeout=deadline - time.monotonic())
            if refs[0] in ready and pending:
                try:
                    ray.get(refs[0], timeout=0)
                except ray.exceptions.RayError:
                    deadline = min(deadline, time.monotonic() + SYNC_GRACE_S)
    if pending:
        late = [i for i, r in enumerate(refs) if r in pending]
        raise SyncTimeout(describe(late) if describe else f"{len(late)} sync calls did not answer in {timeout_s:g}s")
    out, dead, first = [], [], None
    for i, r in enumerate(refs):
        try:
            out.append(ray.get(r))
        except ray.exceptions.RayActorError as e:  # the actor that ran this call died
            if i in engine_of:
                dead.append(engine_of[i])
            first = first or e
            out.append(None)
        except ray.exceptions.RayError as e:
            first = first or e
            out.append(None)
    if dead:
        raise SyncMemberDied(dead, first)
    if first is not None:
        raise first
    return out


class CollectiveSync:
    """Driver side of ``collective``: forms the group when the engine set changed, then runs one
    broadcast (learner ``sync_send`` and every engine's ``sync_receive`` at once)."""

    mode = "collective"

    def __init__(self, backend: str, bucket_mb: float, timeout_s: float):
        self.backend, self.bucket_bytes, self.timeout_s = backend, _mib(bucket_mb), timeout_s
        self._where: dict[str, Any] = {}
        self._members: tuple[str, ...] | None = None  # engine actor ids of the current group
        self._handles: list = []
        self.groups_formed = 0

    def _form(self, actors: list, learner: Any) -> None:
        import ray

        self.close()
        engines = {i: i for i in range(len(actors))}
        sizes = _results([a.sync_group_size.remote() for a in actors], engines)
        infos = _results([a.info.remote() for a in actors], engines)
        node_id, ip = ray.get(learner.node.remote())
        addr = "127.0.0.1" if all(i["node_id"] == node_id for i in infos) else ip
        port = ray.get(learner.free_port.remote(addr))
        world = 1 + sum(sizes)
        firsts = [1 + sum(sizes[:k]) for k in range(len(actors))]
        self._where = {"address": f"{addr}:{port}", "world": world, "learner": ip,
                       "engines": [(f, f + n - 1, i.get("ip", "?")) for f, n, i in zip(firsts, sizes, infos)]}
        refs = [learner.sync_group_join.remote(addr, port, world, self.backend, self.timeout_s)]
        refs += [a.sync_group_join.remote(addr, port, f, world, self.backend, self.timeout_s)
                 for a, f in zip(actors, firsts)]
        self._handles = [learner, *actors]
        _results(refs, {i + 1: i for i in range(len(actors))}, self.timeout_s + SYNC_GRACE_S,
                 lambda late: self._late("forming", late))
        self._members = tuple(a._actor_id.hex() for a in actors)
        self.groups_formed += 1

    def sync(self, actors: list, learner: Any, version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        if self._members != tuple(a._actor_id.hex() for a in actors):
            self._form(actors, learner)
        t1 = time.perf_counter()
        refs = [learner.sync_send.remote(self.bucket_bytes)] + [a.sync_receive.remote(version) for a in actors]
        try:
            out = _results(refs, {i + 1: i for i in range(len(actors))}, self.timeout_s + SYNC_GRACE_S,
                           lambda late: self._late(f"the broadcast of version {version}", late, refs[0]))
        except SyncTimeout:
            self._members, self._handles = None, []  # members that do not answer cannot be asked to leave
            raise
        except BaseException:
            self._members = None  # formed again (and left by every member) at the next sync
            raise
        return {**out[0], "recv_s": max(o["recv_s"] for o in out[1:]), "form_s": t1 - t0,
                "sync_s": time.perf_counter() - t0}

    def _late(self, what: str, late: list[int], learner_ref: Any = None) -> str:
        """The error of a sync whose members ``late`` (0 = learner, k = engine k-1) did not answer."""
        import ray

        w = self._where
        def member(i: int) -> str:
            if i == 0:
                return f"rank 0 (learner on {w['learner']})"
            first, last, ip = w["engines"][i - 1]
            ranks = f"rank {first}" if first == last else f"ranks {first}-{last}"
            return f"{ranks} (engine {i - 1} on {ip})"

        who = [member(i) for i in late]
        cause = ""
        if learner_ref is not None and 0 not in late:
            try:
                ray.get(learner_ref, timeout=0)
            except Exception as e:  # noqa: BLE001  (the learner's own error: gloo timeout, closed peer)
                cause = f"; rank 0 (learner on {w['learner']}) failed: {str(e).strip().splitlines()[-1][:300]}"
        return (f"weight sync ({what}, {self.backend} group at tcp://{w['address']}, {w['world']} ranks): no answer "
                f"from {', '.join(who)} (cluster.sync_timeout_s={self.timeout_s:g}s)"
                f"{cause}. Check the network between those nodes (and that the ranks can reach that address), "
                "then rerun the same command to resume from the last checkpoint")

    def close(self) -> None:
        """Every member leaves the group (best effort: dead members are skipped)."""
        import ray

        if self._handles:
            refs = []
            for h in self._handles:
                try:
                    refs.append(h.sync_group_leave.remote())
                except Exception:  # noqa: BLE001
                    pass
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=30)
            for r in done:
                try:
                    ray.get(r)
                except ray.exceptions.RayError:
                    pass
        self._handles, self._members = [], None


class CudaIpcSync:
    """Driver side of ``cuda_ipc``: per bucket, every learner rank packs it on its GPU, each engine opens
    the handle of the rank on its GPU and loads it; the next bucket is asked for only after all acks."""

    mode = "cuda_ipc"

    def __init__(self, bucket_mb: float):
        self.bucket_bytes = _mib(bucket_mb)
        self._uuids: dict[str, str] = {}  # engine actor id -> device uuid

    def sync(self, actors: list, learner: Any, version: int) -> dict[str, float]:
        import ray

        t0 = time.perf_counter()
        engines = {i: i for i in range(len(actors))}
        ids = [a._actor_id.hex() for a in actors]
        if any(i not in self._uuids for i in ids):
            self._uuids = dict(zip(ids, _results([a.device_uuid.remote() for a in actors], engines)))
        ranks = list(getattr(learner, "ranks", [learner]))
        plan = ray.get(ranks[0].sync_plan.remote(self.bucket_bytes))
        sent = 0
        try:
            for names in plan:
                outs = ray.get([r.ipc_bucket.remote(names) for r in ranks])  # a collective under ZeRO-3
                by_uuid = {o["uuid"]: o for o in outs}
                lost = [k for k, i in enumerate(ids) if self._uuids[i] not in by_uuid]
                if lost:
                    raise RuntimeError(f"cluster.weight_sync=cuda_ipc: engine(s) {lost} share no GPU with a learner "
                                       "rank (needs cluster.placement=colocated, one engine per learner GPU)")
                _results([a.load_ipc.remote(by_uuid[self._uuids[i]]["handle"], by_uuid[self._uuids[i]]["entries"],
                                            version) for a, i in zip(actors, ids)], engines)
                sent += outs[0]["nbytes"]
        finally:
            ray.get([r.ipc_release.remote() for r in ranks])
        return {"bytes": float(sent), "buckets": float(len(plan)), "sync_s": time.perf_counter() - t0}

    def close(self) -> None:
        self._uuids = {}


def make_weight_sync(cluster: ClusterConfig) -> CollectiveSync | CudaIpcSync | None:
    """The strategy ``cluster.weight_sync`` names; ``None`` = the object store (the pool's own path)."""
    if cluster.weight_sync == "collective":
        return CollectiveSync(collective_backend(cluster), cluster.sync_bucket_mb, cluster.sync_timeout_s)
    if cluster.weight_sync == "cuda_ipc":
        return CudaIpcSync(cluster.sync_bucket_mb)
    return None
