"""Methods rlkit adds to every vLLM worker (``vllm.LLM(worker_extension_cls=...)``).

vLLM mixes this class into its worker class, in the worker's process; the engine calls the
methods by name with ``LLM.collective_rpc("rlkit_load_weights", args=(bucket,))``, so every
tensor-parallel worker loads the same bucket. Loading goes through the worker's
``reload_weights(weights_iterator=..., is_checkpoint_format=True)``, vLLM's in-place reload: the
model's own ``load_weights`` shards and fuses checkpoint names into vLLM's stacked parameters
(``q/k/v_proj`` -> ``qkv_proj``) on layers restored to their checkpoint format, then each layer is
re-processed and copied back into the original storage (CUDA graphs stay valid). Calling the
model's ``load_weights`` directly fails once vLLM has processed the weights (on CPU the processed
parameters lose their ``weight_loader``). A layer missing from a bucket keeps its weights, a layer
split across buckets would be half-loaded, hence ``rollout.vllm_utils.split_buckets`` never splits
a layer. The ``rlkit_*_sync_group`` / ``rlkit_receive_weights`` methods make each worker a member
of a weight-sync group (``rollout.weight_transfer.SyncGroup``, rank = first rank + the worker's TP
rank) that receives the learner's broadcast buckets of whole layers and reloads them the same way.
Pure torch: this module must not import rlkit (nor vLLM: the worker already has it).
"""

from __future__ import annotations

from typing import Any

import torch


class RlkitWorkerExtension:
    """Worker mix-in: in-place weight loading by checkpoint (Hugging Face) parameter name."""

    model_runner: Any  # provided by the vLLM worker this class is mixed into

    def _rlkit_model(self) -> torch.nn.Module:
        runner = self.model_runner
        return runner.get_model() if hasattr(runner, "get_model") else runner.model

    def rlkit_load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        """Load ``(name, tensor)`` pairs (checkpoint names, any dtype/device) into the live model in
        place; returns how many tensors were given. Unknown names raise in the model's ``load_weights``."""
        self.reload_weights(weights_iterator=iter(named_tensors), is_checkpoint_format=True)  # type: ignore[attr-defined]
        return len(named_tensors)

    def rlkit_join_sync_group(self, host: str, port: int, first_rank: int, world_size: int, backend: str,
                              timeout_s: float) -> None:
        from rollout.weight_transfer import SyncGroup

        self.rlkit_leave_sync_group()
        rank = first_rank + int(getattr(self, "rank", 0))  # the worker's rank within its engine (TP)
        self._rlkit_sync = SyncGroup.join(host, port, rank, world_size, backend, timeout_s)

    def rlkit_receive_weights(self, return_tensors: bool) -> dict[str, torch.Tensor] | int:
        """Receive one broadcast (all buckets). Full weights: reloaded bucket by bucket, returns the
        tensor count; ``return_tensors`` (LoRA adapters): TP rank 0 returns them on the CPU."""
        group = getattr(self, "_rlkit_sync", None)
        if group is None:
            raise RuntimeError("this vLLM worker is not in a weight-sync group (rlkit_join_sync_group first)")
        out: dict[str, torch.Tensor] = {}
        n = 0
        try:
            for part in group.receive():
                if return_tensors:
                    out.update({k: v.clone().cpu() for k, v in part.items()})
                elif part:
                    self.rlkit_load_weights(list(part.items()))
                n += len(part)
        except BaseException:
            self.rlkit_leave_sync_group()
            raise
        return out if return_tensors and int(getattr(self, "rank", 0)) == 0 else n

    def rlkit_leave_sync_group(self) -> None:
        group = getattr(self, "_rlkit_sync", None)
        if group is not None:
            group.close()
        self._rlkit_sync = None

    @torch.no_grad()
    def rlkit_weight_checksum(self) -> float:
        """Sum of every parameter (float64): a cheap check that a load changed the weights."""
        return float(sum(p.detach().double().sum().item() for p in self._rlkit_model().parameters()))
