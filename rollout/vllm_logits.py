"""HAPO adaptive temperature (docs/algorithms.md §3.2) as a vLLM logits processor, for ``engine.name=vllm``.

vLLM applies logits processors inside its sampler as classes registered at start-up
(``vllm.LLM(logits_processors=[...])``), fed per request through ``SamplingParams.extra_args``
(key ``rollout.vllm_utils.ADAPTIVE_TEMPERATURE_KEY``: ``{"stats", "tau", "eps"}``). vLLM cannot
change a row's temperature from a processor, but it divides the processed logits by the request
temperature ``T`` right after them, so scaling the logits by ``T / T'`` samples at
``T' = T (1 + tau * h_hat)``: ``z * (T / T') / T = z / T'``. ``T'`` is computed by
``rollout.adaptive_temperature.adapted_temperature`` (the HF engine's code) from the un-tempered
logits, so with ``logprobs_mode="processed_logprobs"`` vLLM records ``log softmax(z / T')`` exactly
as the HF engine does. Greedy rows (``T == 0``) and requests without the key are left alone.

vLLM 0.32/0.33 run either of two model runners with different processor interfaces (V1:
``update_state(BatchUpdate)`` + ``apply(logits)``; V2, the GPU default: ``add_request(slot,
params)`` + ``apply(logits, ctx)``); which one depends on the platform and on Triton, known only
after the engine starts. The class implements both (each loader checks ``issubclass`` against
its own base) and dispatches on how vLLM constructs it. Imported only by vLLM's processor loader
and ``rollout.vllm``: it needs vLLM.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, process_dict_updates
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor

from rollout.vllm_utils import AdaptiveArgs, adaptive_temperature_args, scale_to_adapted_temperature


class AdaptiveTemperatureProcessor(V1LogitsProcessor, V2LogitsProcessor):
    """Per-request HAPO adaptive temperature for vLLM's V1 and V2 model runners (see module doc).

    Not argmax-invariant as far as vLLM's V1 runner is concerned: declaring it so would move it
    after the temperature division; returning ``False`` keeps it on the raw logits in both runners.
    """

    def __init__(self, vllm_config: Any, *args: Any) -> None:
        # V1: (vllm_config, device, is_pin_memory); V2: (vllm_config, req_states)
        self._rows: dict[int, AdaptiveArgs] = {}  # V1: batch index -> args; V2: request slot -> args

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        adaptive_temperature_args(sampling_params)

    # ---------------------------------------------------------------- V1 model runner
    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self._rows, batch_update, lambda params, _prompt, _out: adaptive_temperature_args(params))

    # ---------------------------------------------------------------- V2 model runner
    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        args = adaptive_temperature_args(sampling_params)
        if args is None:
            self._rows.pop(req_idx, None)
            return False
        self._rows[req_idx] = args
        return True

    # ---------------------------------------------------------------- both
    def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        if not self._rows:
            return logits
        if ctx is None:  # V1: rows are batch indices
            rows = [i for i in self._rows if i < logits.shape[0]]
            return scale_to_adapted_temperature(logits, rows, [self._rows[i] for i in rows]) if rows else logits
        # V2: a row is a logits row; expanded_idx_mapping maps it to its request slot. Slots are
        # recycled, so only slots of requests in this batch count (a finished request's slot is
        # re-initialised by add_request before reuse).
        live = {int(s) for s in ctx.idx_mapping_np}
        if not live & self._rows.keys():
            return logits
        slots = ctx.expanded_idx_mapping.tolist()
        rows = [r for r, s in enumerate(slots) if s in self._rows and s in live]
        return scale_to_adapted_temperature(logits, rows, [self._rows[slots[r]] for r in rows]) if rows else logits
