"""The KV-cache argument of a transformers causal LM, whatever the installed version.

transformers 5.x renamed ``past_key_values`` to ``cache`` (input keyword and output field) and warns
on every call that uses the old name; 4.x knows only ``past_key_values``. The name is read once per
model class from ``forward``'s signature, through PEFT and DeepSpeed wrappers.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch


@functools.cache
def _name_for(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def _innermost(model: Any) -> Any:
    while True:
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):  # deepspeed / DDP engines
            model = model.module
        else:
            return model


def cache_name(model: Any) -> str:
    """``"cache"`` or ``"past_key_values"``: what ``model``'s forward takes and returns."""
    return _name_for(type(_innermost(model)))


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` to pass to ``model(...)``."""
    return {cache_name(model): cache}


def output_cache(model: Any, out: Any) -> Any:
    """The KV cache in ``model``'s forward output."""
    return getattr(out, cache_name(model))
