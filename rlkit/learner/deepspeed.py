"""DeepSpeed ZeRO-2/3 learner: one instance per data-parallel rank (each rank a Ray actor).

Same public methods and the same loss code as :class:`~rlkit.learner.torch_learner.TorchLearner`
(:func:`~rlkit.learner.torch_learner.micro_batch_loss`), so a step's loss and gradients equal the
single-process learner's on the same batch (tested). Every rank receives the whole batch and takes
its share of the micro-batch plan; losses are aggregated with the GLOBAL token/sequence counts of
the mini-batch and multiplied by the world size, because ZeRO averages gradients over ranks.

Departures from the torch learner, and why:

- Collectives must match across ranks. ZeRO-3 all-gathers weights inside every forward call and
  ZeRO-2/3 reduce gradients in every backward, so all ranks run the same number of micro-batches; a
  rank with fewer real ones runs a zero-weight copy of a real row. The shared-prompt forward makes
  one or two model calls depending on the data, so it is off under ZeRO-3 (on under ZeRO-2).
- Methods that gather (``state_for_sync``, ``checkpoint_state``, ``export``, ``entropy_stats``,
  ``compute_logprobs``) are collectives: call them on every rank. Rank 0 returns the full result,
  other ranks return ``None`` where noted. ZeRO-3 gathers full weights for sync a bucket of
  parameters at a time (``learner.deepspeed.sync_bucket_mb``), never the whole model at once;
  the collective / CUDA IPC syncs (``rlkit.orchestration.weight_sync``) go further and gather, send
  and free one ``sync_bucket`` at a time.
- Checkpoints hold the full (or adapter) weights plus every rank's ZeRO optimizer shard; resuming
  needs the same ``num_ranks`` and ZeRO stage.
- The optimizer is torch AdamW as a DeepSpeed client optimizer (no JIT-built DeepSpeed ops); a
  reference model exists only under LoRA (adapter disabled), as the config validates.
"""

from __future__ import annotations

import math
import os
import socket
from contextlib import nullcontext
from dataclasses import fields, replace
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor

from rlkit.learner.torch_learner import (
    aggregation_counts,
    batch_mean_entropy,
    eval_mode,
    learner_schedule,
    learner_sections,
    merge_metric,
    micro_batch_loss,
    plan_micro_batches,
    prepare_logprobs,
    response_logprobs,
    run_train_step,
)
from rlkit.loop.batch import TrainBatch, pad_to
from rlkit.schema import Config, DeepSpeedConfig, LearnerConfig, ModelConfig
from rollout.engine import bucket_indices  # noqa: F401  (re-exported: weight-sync buckets)
from rollout.weight_transfer import DistributedInitError, interface_of, local_address, rendezvous_store

CKPT_FORMAT = "rlkit-deepspeed-zero"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (for the rank-0 rendezvous store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def init_process_group(
    *, backend: str, master_addr: str, master_port: int, rank: int, world_size: int, timeout_s: float
) -> None:
    """Join the default process group through a TCP store on ``master_addr:master_port``.

    Each rank announces itself in the store and waits for the others for ``timeout_s``; a timeout
    raises :class:`DistributedInitError` naming the address and the ranks that did not join.
    Idempotent when this process already belongs to a group of the same rank and size.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise DistributedInitError(
                f"this process is already rank {dist.get_rank()} of {dist.get_world_size()}; "
                f"cannot become rank {rank} of {world_size}"
            )
        return
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK="0")  # one device per rank actor
    if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ:
        # bind gloo to the interface on the route to rank 0, not to what the hostname resolves to
        # (see rollout.weight_transfer.local_address)
        iface = interface_of(local_address(master_addr))
        if iface:
            os.environ["GLOO_SOCKET_IFNAME"] = iface
    timeout = timedelta(seconds=timeout_s)
    store = rendezvous_store(master_addr, master_port, rank, world_size, timeout_s, what=backend,
                             timeout_key="learner.deepspeed.timeout_s")
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def build_ds_config(lc: LearnerConfig, model_cfg: ModelConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for this learner (``lc.deepspeed.overrides`` deep-merged last).

    Gradient accumulation is caller-owned (``managed_gradient_accumulation: false``): every
    ``engine.step()`` applies the gradients of all backward calls since the last step, however many
    micro-batches a mini-batch had. Clipping uses the same rule as ``clip_grad_norm_``.
    """
    from rlkit.compose import deep_merge

    ds: DeepSpeedConfig = lc.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg = {
        "train_micro_batch_size_per_gpu": lc.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": lc.micro_batch_size * world_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": lc.grad_clip,
        "bf16": {"enabled": ds.bf16 or model_cfg.dtype == "bfloat16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW as the client optimizer
        "zero_force_ds_cpu_optimizer": False,  # ... also with offload (DeepSpeedCPUAdam needs a JIT build)
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return deep_merge(cfg, ds.overrides)


def _to_device(mb: TrainBatch, device: torch.device) -> TrainBatch:
    if device.type == "cpu":
        return mb
    return replace(mb, **{f.name: getattr(mb, f.name).to(device) for f in fields(mb)
                          if isinstance(getattr(mb, f.name), Tensor)})


class DeepSpeedLearner:
    """One data-parallel rank of a ZeRO-2/3 learner; ``N`` of them train together.

    Build one per process (rank ``rank`` of ``world_size``) with the same arguments on every rank;
    rank 0 listens on ``master_addr:master_port``. ``world_size=1`` works in-process.
    """

    def __init__(self, model_path: str, cfg: Config, *, rank: int = 0, world_size: int = 1,
                 master_addr: str = "127.0.0.1", master_port: int | None = None) -> None:
        model_cfg, learner_cfg, algo_cfg, train_cfg, seed = learner_sections(cfg)

        if algo_cfg.kl.beta > 0 and model_cfg.lora.rank == 0:
            raise ValueError("algorithm.kl.beta > 0 with the deepspeed learner needs model.lora.rank > 0")
        self.cfg, self.algo, self.train_cfg = learner_cfg, algo_cfg, train_cfg
        self.rank, self.world_size = rank, world_size
        self.stage = learner_cfg.deepspeed.zero_stage
        if learner_cfg.num_threads:
            torch.set_num_threads(learner_cfg.num_threads)
        self._join(master_addr, master_port or free_port())
        self.ds_config = build_ds_config(learner_cfg, model_cfg, world_size)
        self.lora = model_cfg.lora.rank > 0
        self.engine = self._build_engine(model_path, model_cfg, seed)
        self.module = self.engine.module
        self.optimizer = self.engine.optimizer.optimizer  # the client AdamW: its param groups carry the lr
        learner_schedule(self, self.optimizer, learner_cfg, algo_cfg, train_cfg)
        self.device = torch.device(self.engine.device)
        # a prompt KV cache cannot be built under gradient checkpointing (HF drops use_cache), and under
        # ZeRO-3 every rank must make the same model calls (the shared path makes one or two)
        self.share_prompt = learner_cfg.share_prompt and not model_cfg.gradient_checkpointing and self.stage < 3

        def numel(p: Tensor) -> int:
            return int(getattr(p, "ds_numel", p.numel()))

        self.num_params = sum(numel(p) for p in self.module.parameters())
        self.num_trainable = sum(numel(p) for p in self.module.parameters() if p.requires_grad)

    def _join(self, master_addr: str, master_port: int) -> None:
        """Join the process group (NCCL on GPU, gloo on CPU) and DeepSpeed's comm layer."""
        import deepspeed
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(0)  # Ray gives each rank actor one visible GPU
        timeout_s = self.cfg.deepspeed.timeout_s
        init_process_group(backend=backend, master_addr=master_addr, master_port=master_port, rank=self.rank,
                           world_size=self.world_size, timeout_s=timeout_s)
        if backend == "gloo":
            # its shared-memory op serves only inference all-reduce; skip the ~40 s JIT C++ build
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
        # CPU-side collectives (metrics, entropies, optimizer shards) go over gloo even with NCCL
        self._cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else None

    def _build_engine(self, model_path: str, model_cfg: ModelConfig, seed: int) -> Any:
        """Load the model (+ LoRA), wrap it with a torch AdamW in a DeepSpeed engine."""
        import deepspeed

        from rlkit.infra.models import load_model

        hf_ds = None
        if self.stage == 3:  # from_pretrained then builds the weights already partitioned
            from transformers.integrations import HfDeepSpeedConfig

            hf_ds = HfDeepSpeedConfig(self.ds_config)  # active while referenced (transformers keeps a weakref)
        torch.manual_seed(seed)  # identical LoRA init on every rank
        model = load_model(model_path, dtype="float32", lora=model_cfg.lora.model_dump() if self.lora else None,
                           gradient_checkpointing=model_cfg.gradient_checkpointing)
        model.train()
        lc = self.cfg
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lc.lr, betas=lc.betas,
                                weight_decay=lc.weight_decay)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=self.ds_config, dist_init_required=False)
        del hf_ds  # deactivate it: models built later in this process must load whole
        return engine

    # ------------------------------------------------------------------ collectives helpers
    def _gather_objects(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (all ranks must call)."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._cpu_group)
        return out

    def _slots(self, batch: TrainBatch, rows) -> list[list[int] | None]:
        """This rank's micro-batches of ``rows``: the plan's micro-batches (at most
        ``min(micro_batch_size, ceil(len(rows) / N))`` rows each, or within the token budget
        ``max_tokens_per_micro_batch`` and ``ceil(len(rows) / N)`` rows, so all ranks get work) dealt out
        round-robin; ``None`` = a zero-weight filler, so that every rank runs the same number of
        forward/backward passes (their collectives must match)."""
        rows = list(rows)
        fair = math.ceil(len(rows) / self.world_size)  # at most this many rows each, so all ranks get work
        budget = self.cfg.max_tokens_per_micro_batch
        size = max(1, fair if budget else min(self.cfg.micro_batch_size, fair))
        plan = plan_micro_batches(batch, rows, size, self.share_prompt, max_tokens=budget)
        mine: list[list[int] | None] = list(plan[self.rank :: self.world_size])
        n = math.ceil(len(plan) / self.world_size)
        return mine + [None] * (n - len(mine))

    # ------------------------------------------------------------------ forward-only passes
    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch, *, reference: bool = False,
                         entropy_out: Tensor | None = None) -> Tensor:
        """Log-probs of the responses under the current (or reference = adapter disabled) policy:
        float [B, T], the same on every rank (collective); so is ``entropy_out`` [B, T], if given."""
        if reference and not self.lora:
            raise ValueError("the deepspeed learner has a reference policy only under LoRA (adapter disabled)")
        T = batch.response_mask_BT.shape[1]
        out = torch.zeros_like(batch.response_mask_BT)
        parts = [out] if entropy_out is None or reference else [out, entropy_out]
        with eval_mode(self.engine):  # no dropout in a forward-only pass
            for idx in self._slots(batch, range(len(batch))):
                mb = _to_device(batch.select(idx if idx is not None else [0]), self.device)
                with self.module.disable_adapter() if reference else nullcontext():
                    lp, ent = response_logprobs(self.engine, mb, with_entropy=len(parts) > 1,
                                                share_prompt=self.share_prompt)  # fmt: skip
                for part, value in zip(parts, (lp, None if ent is None else ent * mb.response_mask_BT)):
                    if idx is not None:
                        part[idx] = pad_to(value.float().cpu(), T)
        self._release_gathered()
        if self.world_size > 1:  # rows are disjoint across ranks: a sum assembles the batch
            import torch.distributed as dist

            for part in parts:
                dist.all_reduce(part, group=self._cpu_group)
        return out * batch.response_mask_BT

    def _release_gathered(self) -> None:
        """ZeRO-3 keeps the weights gathered after a forward without backward (up to
        ``stage3_max_live_parameters``); re-partition them, freeing memory and stale copies."""
        if self.stage == 3:
            self.engine.empty_partition_cache()

    # ------------------------------------------------------------------ update
    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """PPO epochs over mini-batches on every rank; returns the global metrics (``actor/``)."""
        self.engine.train()
        return run_train_step(self, batch, keep_entropies=self.rank == 0)  # every rank holds the whole pass

    def _backward(self, batch: TrainBatch, rows: list[int], norm_length: float, on_policy: bool,
                  collect_entropy: bool = False) -> dict[str, float]:
        """Forward/backward of this rank's share of mini-batch ``rows``; returns the GLOBAL metric
        sums (all ranks). Gradients are left reduced/partitioned in the engine, not applied."""
        agg = aggregation_counts(batch, rows, norm_length)
        mean_entropy = batch_mean_entropy(batch, rows)
        acc: dict[str, float] = {}
        for idx in self._slots(batch, rows):
            weight = 0.0 if idx is None else 1.0
            mb = _to_device(batch.select(idx if idx is not None else rows[:1]), self.device)
            out = micro_batch_loss(self.engine, mb, self.loss_entry.fn, self.loss_params, self.algo, agg,
                                   on_policy=on_policy, share_prompt=self.share_prompt,
                                   batch_mean_entropy=mean_entropy)  # fmt: skip
            # ZeRO averages gradients over ranks; the loss is already a share of the global mean
            self.engine.backward(out.loss * (self.world_size * weight), scale_wrt_gas=False)
            if idx is not None:
                for k, v in out.metrics.items():
                    merge_metric(acc, k, v)
                if collect_entropy:
                    self._entropies.append(out.entropy_tokens.float().cpu())
        total: dict[str, float] = {}
        for part in self._gather_objects(acc):
            for k, v in part.items():
                merge_metric(total, k, v)
        return total

    def _update(self, batch: TrainBatch, rows: list[int], norm_length: float, on_policy: bool,
                collect_entropy: bool = False) -> dict[str, float]:
        acc = self._backward(batch, rows, norm_length, on_policy, collect_entropy)
        self.engine.step()  # clip + AdamW on this rank's partition; skipped if the grad norm is not finite
        gn = self.engine.get_global_grad_norm()
        gn = float(gn) if gn is not None else float("nan")
        if not math.isfinite(gn):
            acc["actor/skipped_nonfinite"] = 1.0
        acc["actor/grad_norm"] = gn
        return acc

    def gradients(self, batch: TrainBatch) -> dict[str, Tensor] | None:
        """Full gradient of one update's loss on ``batch`` (all rows, one mini-batch), by parameter
        name, without stepping; rank 0 returns it, other ranks ``None``. For verification."""
        from deepspeed.utils import safe_get_full_grad

        self.engine.train()
        on_policy = prepare_logprobs(batch, self.algo, self.train_cfg, self.compute_logprobs)
        norm_length = float(self.algo.norm_length or batch.response_mask_BT.shape[1])
        self._backward(batch, list(range(len(batch))), norm_length, on_policy)
        # ZeRO-2 reduces the last bucket at the boundary; unmanaged mode finalises it in step()
        if self.stage < 3 and hasattr(self.engine.optimizer, "finalize_gradient_accumulation_boundary"):
            self.engine.optimizer.finalize_gradient_accumulation_boundary()
        out = {}
        for name, p in self.module.named_parameters():
            if p.requires_grad:
                g = safe_get_full_grad(p)  # collective under ZeRO-3
                if g is not None and self.rank == 0:
                    out[name] = g.detach().float().cpu().clone()
        self.engine.optimizer.zero_grad(set_to_none=True)
        return out if self.rank == 0 else None

    def entropy_stats(self, pivot: float, replicate_release_sign: bool = False) -> list[float] | None:
        """HAPO sampling statistics (docs/algorithms.md §3.1) of the last step's entropies on all ranks (collective)."""
        from rlkit.algorithms.hapo import hapo_sampling_stats

        ents = self._all_entropies()
        if ents.numel() == 0:
            return None
        stats = hapo_sampling_stats(ents, pivot=pivot, replicate_release_sign=replicate_release_sign)
        return None if stats is None else [float(x) for x in stats]

    def temperature_stats(self, applied: list[float], tau: float) -> dict[str, float]:
        """HAPO's ``T'/T`` over the last step's tokens on all ranks (collective; see the torch learner)."""
        from rollout.adaptive_temperature import temperature_factor_summary

        return temperature_factor_summary(self._all_entropies(), applied, tau)

    def _all_entropies(self) -> torch.Tensor:
        """The last step's kept entropies of every rank, concatenated (collective)."""
        local = torch.cat(self._entropies) if self._entropies else torch.zeros(0)
        return torch.cat(self._gather_objects(local))

    # ------------------------------------------------------------------ sync / checkpoint
    def _gathered(self, names: set[str] | None = None, *, device: torch.device | str = "cpu",
                  every_rank: bool = False) -> dict[str, Tensor] | None:
        """Copies on ``device`` of the module's state-dict entries (all, or ``names``) on rank 0 (on
        every rank with ``every_rank``); ``None`` elsewhere. Under ZeRO-3 the partitioned weights are
        gathered one bucket at a time."""
        import deepspeed

        entries = [(k, v) for k, v in self.module.state_dict(keep_vars=True).items() if names is None or k in names]
        by_id: dict[int, list[str]] = {}
        unique: list[Tensor] = []
        for k, v in entries:  # tied weights appear under several names: gather once
            if id(v) not in by_id:
                by_id[id(v)] = []
                unique.append(v)
            by_id[id(v)].append(k)
        out: dict[str, Tensor] = {}

        keep = self.rank == 0 or every_rank

        def take(ts: list[Tensor]) -> None:
            if keep:
                for t in ts:
                    c = t.detach().to(device, copy=True)
                    for k in by_id[id(t)]:
                        out[k] = c

        zero = [t for t in unique if hasattr(t, "ds_id")]
        take([t for t in unique if not hasattr(t, "ds_id")])
        limit = int(self.cfg.deepspeed.sync_bucket_mb * 2**20)
        for bucket in bucket_indices([t.ds_numel * t.element_size() for t in zero], limit):
            params = [zero[i] for i in bucket]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                take(params)
        return out if keep else None

    def _trainable_names(self) -> set[str]:
        ids = {id(p) for p in self.module.parameters() if p.requires_grad}
        return {k for k, v in self.module.state_dict(keep_vars=True).items() if id(v) in ids}

    def state_for_sync(self) -> dict[str, Tensor] | None:
        """Tensors the engines need (collective): the adapter only under LoRA, else all weights.
        Rank 0 returns them (CPU), other ranks ``None``."""
        if not self.lora:
            return self._gathered()
        from peft import get_peft_model_state_dict

        sd = self._gathered(self._trainable_names())
        return None if sd is None else dict(get_peft_model_state_dict(self.module, state_dict=sd))

    def sync_plan(self, bucket_bytes: int) -> list[list[str]]:
        """Names of each weight-sync bucket (whole layers, at most ``bucket_bytes``), for
        :meth:`sync_bucket`; from parameter metadata, nothing is gathered. The same on every rank."""
        from rollout.weight_transfer import plan_buckets

        names = self._trainable_names() if self.lora else None
        sizes = {k: int(getattr(v, "ds_numel", v.numel())) * v.element_size()
                 for k, v in self.module.state_dict(keep_vars=True).items() if names is None or k in names}
        return plan_buckets(sizes, bucket_bytes)

    def sync_bucket(self, names: list[str], device: torch.device | str = "cpu",
                    every_rank: bool = False) -> dict[str, Tensor] | None:
        """One bucket of :meth:`state_for_sync` (collective: ZeRO-3 gathers just these weights), as
        copies on ``device``; rank 0 gets it (every rank with ``every_rank``), the others ``None``."""
        sd = self._gathered(set(names), device=device, every_rank=every_rank)
        if sd is None or not self.lora:
            return sd
        from peft import get_peft_model_state_dict

        return dict(get_peft_model_state_dict(self.module, state_dict=sd))

    def checkpoint_state(self) -> dict[str, Any] | None:
        """Weights (as :meth:`state_for_sync`), every rank's ZeRO optimizer shard and the LR
        scheduler; rank 0 returns it, other ranks ``None`` (collective)."""
        model_state = self.state_for_sync()
        shard = _to_cpu(self.engine.optimizer.state_dict())
        shards = self._gather_objects(shard)
        if self.rank != 0:
            return None
        return {
            "model_state": model_state,
            "optimizer_state": {"format": CKPT_FORMAT, "zero_stage": self.stage, "world_size": self.world_size,
                                "shards": shards},
            "scheduler_state": self.scheduler.state_dict(),
        }

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`checkpoint_state` (same ``num_ranks`` and ZeRO stage)."""
        opt = state.get("optimizer_state") or {}
        if not isinstance(opt, dict) or opt.get("format") != CKPT_FORMAT:
            raise ValueError("this checkpoint was not written by the deepspeed learner (its optimizer state is "
                             "not a set of ZeRO shards); resume it with learner.name=torch")
        if (opt["world_size"], opt["zero_stage"]) != (self.world_size, self.stage):
            raise ValueError(
                f"checkpoint has {opt['world_size']} ranks at ZeRO-{opt['zero_stage']}; this learner has "
                f"{self.world_size} at ZeRO-{self.stage}: resume with learner.num_ranks={opt['world_size']} "
                f"learner.deepspeed.zero_stage={opt['zero_stage']}"
            )
        self._release_gathered()
        if self.stage < 3:  # ZeRO-2 keeps full weights on every rank: load them, then the fp32 masters
            if self.lora:
                from peft import set_peft_model_state_dict

                set_peft_model_state_dict(self.module, state["model_state"])
            else:
                self.module.load_state_dict(state["model_state"], strict=False)
        # ZeRO-3 restores its weight partitions from the fp32 masters in the shards
        self.engine.optimizer.load_state_dict(opt["shards"], load_optimizer_states=True, load_from_fp32_weights=True)
        self.scheduler.load_state_dict(state["scheduler_state"])

    def export(self, out_dir: str, tokenizer_path: str) -> str:
        """Rank 0 writes a plain HF model dir (full FT) or a PEFT adapter dir (LoRA) with the
        tokenizer (collective: ZeRO-3 gathers the weights)."""
        sd = self._gathered(self._trainable_names() if self.lora else None)
        if self.rank == 0:
            from rlkit.infra.models import load_tokenizer

            os.makedirs(out_dir, exist_ok=True)
            self.module.save_pretrained(out_dir, state_dict=sd)
            load_tokenizer(tokenizer_path).save_pretrained(out_dir)
        return out_dir

    def info(self) -> dict[str, int]:
        return {"params": self.num_params, "trainable": self.num_trainable, "ranks": self.world_size,
                "zero_stage": self.stage}


def _to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor copied to the CPU (dicts and lists walked): a snapshot that
    later optimizer steps do not change."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
