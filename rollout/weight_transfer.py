"""Weight transport between processes: a private torch.distributed group, packed buckets, CUDA IPC.

The pieces both ends of a weight sync need, on the learner and inside engines (including vLLM
workers, so this module must not import ``rlkit``; it imports only torch):

- :func:`rendezvous_store`: a TCP store on the rank-0 host plus a join barrier whose timeout names
  the ranks that never arrived and the address (:class:`DistributedInitError`).
- :class:`SyncGroup`: a gloo or NCCL group built directly on such a store, *outside* torch's global
  state. The learner may already own the default group (DeepSpeed) and vLLM creates its own, so the
  weight-sync group is never the default group and is never registered with ``torch.distributed``;
  its collectives are called on the backend object, with ranks numbered within the group (vLLM's
  ``stateless_init_torch_distributed_process_group`` does the same and notes that the global
  ``dist.broadcast`` cannot be used with such a group).
- :func:`pack_bucket` / :func:`unpack_bucket`: a bucket of named tensors as one flat uint8 buffer and
  a small header (name, shape, dtype, byte offset), so one broadcast or one IPC handle moves a bucket.
  Offsets are aligned to each tensor's element size only, so a bucket of one dtype has no padding and
  its buffer holds exactly the tensors' bytes.
- :func:`plan_buckets`: names grouped into buckets of whole decoder layers (vLLM reloads a layer's
  fused parameters together; see ``rollout.vllm_utils.split_buckets``).

Protocol of one sync over a :class:`SyncGroup` (rank 0 sends, every other rank receives): per bucket,
the header is broadcast as a pickled uint8 tensor (a length, then the bytes), then the bucket's
buffer; the last header carries ``last=True``.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

SYNC_TIMEOUT_KEY = "cluster.sync_timeout_s"


class DistributedInitError(RuntimeError):
    """torch.distributed rendezvous failed; the message names the ranks and the address."""


def local_address(host: str) -> str:
    """This host's address on the route to ``host`` (no packet is sent).

    Gloo's default device binds to the address the machine's hostname resolves to, which on many
    hosts is a loopback one (``127.0.1.1``, or ``127.0.0.1`` in containers): peers on other hosts
    would then be told to connect to their own loopback and the group hangs. Binding to this address
    instead works wherever the rendezvous address is reachable.
    """
    if host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))  # UDP: sets the route's source address, sends nothing
            return str(s.getsockname()[0])
        except OSError as e:
            raise DistributedInitError(f"no route from this host to the rendezvous address {host}: {e}") from e


def interface_of(address: str) -> str | None:
    """The network interface that holds ``address`` (None when none does)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == address for a in addrs):
            return name
    return None


def gloo_options(host: str, timeout: timedelta) -> Any:
    """``ProcessGroupGloo`` options whose device is bound to :func:`local_address` toward ``host``."""
    import torch.distributed as dist

    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_address(host))]
    return opts


def rendezvous_store(host: str, port: int, rank: int, world_size: int, timeout_s: float, *,
                     what: str, timeout_key: str) -> Any:
    """A ``TCPStore`` served by rank 0 on ``host:port`` once all ``world_size`` ranks have joined.

    Each rank announces itself in the store and waits ``timeout_s`` for the others; a rank that
    cannot reach the store, or ranks that never join, raise :class:`DistributedInitError` naming
    the address, the missing ranks, ``what`` (e.g. the backend) and the config key of the timeout.
    """
    import torch.distributed as dist

    addr = f"tcp://{host}:{port}"
    timeout = timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    except Exception as e:  # noqa: BLE001  (DistNetworkError, DistStoreError, RuntimeError ...)
        who = "could not listen on" if rank == 0 else "could not reach the rank-0 store at"
        raise DistributedInitError(
            f"rank {rank} of {world_size} ({what}) {who} {addr} within {timeout_s:g}s ({timeout_key}): {e}. "
            "Check that rank 0 started and that this address is reachable from every rank."
        ) from e
    keys = [f"rlkit/joined/{r}" for r in range(world_size)]
    store.set(keys[rank], "1")
    try:
        store.wait(keys, timeout)
    except Exception as e:  # noqa: BLE001
        missing = [r for r, k in enumerate(keys) if not store.check([k])]
        raise DistributedInitError(
            f"rank {rank} of {world_size} ({what}): ranks {missing} did not join the rendezvous at {addr} "
            f"within {timeout_s:g}s ({timeout_key}). Check that those actors started and can reach that address."
        ) from e
    return store


# ----------------------------------------------------------------------------- buckets
def plan_buckets(sizes: Mapping[str, int], limit: int) -> list[list[str]]:
    """Names in buckets of at most ``limit`` bytes made of whole decoder layers (a larger layer gets
    a bucket of its own), in the order of ``sizes``. ``sizes``: name -> bytes."""
    from rollout.engine import bucket_indices
    from rollout.vllm_utils import layer_key  # pure helpers, no vLLM import

    groups: dict[str, list[str]] = {}
    for name in sizes:
        groups.setdefault(layer_key(name), []).append(name)
    units = list(groups.values())
    return [[n for i in idx for n in units[i]]
            for idx in bucket_indices([sum(sizes[n] for n in u) for u in units], limit)]


@dataclass(frozen=True)
class Entry:
    """Where one tensor lives in a packed bucket."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without "torch.", e.g. "float32"
    offset: int  # byte offset in the buffer


def pack_bucket(tensors: Mapping[str, torch.Tensor], device: torch.device | str = "cpu"
                ) -> tuple[torch.Tensor, list[Entry]]:
    """Copy ``tensors`` into one flat uint8 buffer ``[N]`` on ``device``; returns ``(buffer, entries)``.

    Each tensor starts at a multiple of its element size (what ``view(dtype)`` needs), so a bucket of
    a single dtype is packed without padding: ``N == sum(t.numel() * t.element_size())``.
    """
    entries: list[Entry] = []
    off = 0
    for name, t in tensors.items():
        off = -(-off // t.element_size()) * t.element_size()
        entries.append(Entry(name, tuple(t.shape), str(t.dtype).removeprefix("torch."), off))
        off += t.numel() * t.element_size()
    buf = torch.empty(off, dtype=torch.uint8, device=device)
    for e, t in zip(entries, tensors.values()):
        n = t.numel() * t.element_size()
        if n:
            buf[e.offset:e.offset + n].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8), non_blocking=True)
    return buf, entries


def unpack_bucket(buf: torch.Tensor, entries: list[Entry]) -> dict[str, torch.Tensor]:
    """Views into ``buf`` (uint8 ``[N]``), one per entry, with the packed shapes and dtypes (no copy)."""
    out: dict[str, torch.Tensor] = {}
    for e in entries:
        dtype = getattr(torch, e.dtype)
        n = dtype.itemsize
        for s in e.shape:
            n *= s
        out[e.name] = buf[e.offset:e.offset + n].view(dtype).view(e.shape)
    return out


# ----------------------------------------------------------------------------- the group
class SyncGroup:
    """Rank ``rank`` of a private ``world_size``-member gloo/NCCL group; rank 0 sends weights.

    Build every member with :meth:`join` at the same time (each call blocks until all joined).
    NCCL buffers live on the current CUDA device, gloo buffers on the CPU.
    """

    def __init__(self, backend_pg: Any, store: Any, rank: int, world_size: int, backend: str, address: str):
        self.pg, self.store, self.rank, self.world_size = backend_pg, store, rank, world_size
        self.backend, self.address = backend, address
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    @classmethod
    def join(cls, host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float,
             timeout_key: str = SYNC_TIMEOUT_KEY) -> SyncGroup:
        import torch.distributed as dist

        if backend not in ("gloo", "nccl"):
            raise ValueError(f"weight-sync backend must be gloo or nccl, got {backend!r}")
        if backend == "nccl" and not torch.cuda.is_available():
            raise RuntimeError(f"rank {rank} of the weight-sync group has no CUDA device, which NCCL needs "
                               "(cluster.learner_gpus and cluster.engine_gpus select NCCL)")
        store = rendezvous_store(host, port, rank, world_size, timeout_s,
                                 what=f"weight-sync group, {backend}", timeout_key=timeout_key)
        prefixed = dist.PrefixStore("rlkit-weight-sync/", store)
        timeout = timedelta(seconds=timeout_s)
        try:
            if backend == "gloo":
                pg = dist.ProcessGroupGloo(prefixed, rank, world_size, gloo_options(host, timeout))
            else:
                opts = dist.ProcessGroupNCCL.Options()
                opts._timeout = timeout
                pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
        except Exception as e:  # noqa: BLE001
            raise DistributedInitError(f"rank {rank} of {world_size}: could not build the {backend} weight-sync "
                                       f"group at tcp://{host}:{port}: {e}") from e
        return cls(pg, store, rank, world_size, backend, f"{host}:{port}")

    def _broadcast(self, t: torch.Tensor) -> None:
        self.pg.broadcast(t, 0).wait()

    def _broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled into a uint8 tensor)."""
        n = torch.zeros(1, dtype=torch.int64, device=self.device)
        data = b""
        if self.rank == 0:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            n[0] = len(data)
        self._broadcast(n)
        size = int(n.item())
        buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device) if self.rank == 0
               else torch.empty(size, dtype=torch.uint8, device=self.device))
        self._broadcast(buf)
        return obj if self.rank == 0 else pickle.loads(buf.cpu().numpy().tobytes())

    def send_bucket(self, tensors: Mapping[str, torch.Tensor], last: bool) -> int:
        """Rank 0: broadcast one bucket (header, then the packed buffer). Returns the buffer's bytes."""
        buf, entries = pack_bucket(tensors, self.device)
        self._broadcast_object({"entries": entries, "nbytes": int(buf.numel()), "last": last})
        if buf.numel():
            self._broadcast(buf)
        return int(buf.numel())

    def receive(self) -> Iterator[dict[str, torch.Tensor]]:
        """Ranks > 0: the buckets rank 0 sends, as name -> tensor views of a fresh buffer, until the last."""
        while True:
            head = self._broadcast_object(None)
            buf = torch.empty(head["nbytes"], dtype=torch.uint8, device=self.device)
            if buf.numel():
                self._broadcast(buf)
            yield unpack_bucket(buf, head["entries"])
            if head["last"]:
                return

    def close(self) -> None:
        """Leave the group (NCCL communicators are shut down; gloo sockets close with the object)."""
        pg, self.pg, self.store = self.pg, None, None
        if pg is not None and self.backend == "nccl" and hasattr(pg, "shutdown"):
            try:
                pg.shutdown()
            except Exception:  # noqa: BLE001  (peers may be gone)
                pass


# ----------------------------------------------------------------------------- CUDA IPC
def ipc_handle(buf: torch.Tensor) -> tuple[Any, tuple]:
    """A picklable handle to a CUDA tensor that another process on the same GPU can open.

    The producer must keep ``buf`` alive until every consumer has finished with it."""
    from torch.multiprocessing.reductions import reduce_tensor

    if buf.device.type != "cuda":
        raise RuntimeError("CUDA IPC needs a CUDA tensor (cluster.weight_sync=cuda_ipc runs on GPUs only)")
    return reduce_tensor(buf)


def open_ipc_handle(handle: tuple[Any, tuple]) -> torch.Tensor:
    """The tensor behind an :func:`ipc_handle`, opened on this process's current CUDA device (the
    device index in the handle is the producer's numbering, which differs under per-actor
    ``CUDA_VISIBLE_DEVICES``)."""
    if not torch.cuda.is_available():
        raise RuntimeError("cluster.weight_sync=cuda_ipc: this engine has no CUDA device; CUDA IPC needs the "
                           "learner and the engine on the same GPU (cluster.placement=colocated, cluster.engine_gpus>0)")
    fn, args = handle
    args = list(args)
    args[6] = torch.cuda.current_device()  # rebuild_cuda_tensor's storage_device
    return fn(*args)


def device_uuid() -> str | None:
    """UUID of the current CUDA device (the same physical GPU has the same UUID in every process)."""
    if not torch.cuda.is_available():
        return None
    return str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
