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
a layer. Pure torch: this module must not import rlkit (nor vLLM: the worker already has it).
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

    @torch.no_grad()
    def rlkit_weight_checksum(self) -> float:
        """Sum of every parameter (float64): a cheap check that a load changed the weights."""
        return float(sum(p.detach().double().sum().item() for p in self._rlkit_model().parameters()))
