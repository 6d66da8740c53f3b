"""The KV-cache argument helper: incremental decoding through it equals a full forward, with no
deprecation warning, for a plain model, a PEFT-wrapped one and a ``.module`` wrapper."""

from __future__ import annotations

import warnings

import pytest
import torch

from rollout.hf_cache import cache_kwargs, cache_name, output_cache


class _Wrapper(torch.nn.Module):  # what DeepSpeed's engine looks like from outside: forward -> .module
    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _models(tiny_model_dir: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).eval()
    return {"plain": plain, "peft": lora, "wrapped": _Wrapper(plain)}


@pytest.mark.parametrize("kind", ["plain", "peft", "wrapped"])
def test_incremental_forward_through_the_helper_equals_a_full_forward(tiny_model_dir, kind):
    import inspect

    from transformers import AutoModelForCausalLM

    model = _models(tiny_model_dir)[kind]
    want = "cache" if "cache" in inspect.signature(AutoModelForCausalLM.from_pretrained(tiny_model_dir)
                                                     .__class__.forward).parameters else "past_key_values"
    assert cache_name(model) == want
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        full = model(input_ids=ids).logits[0, -1]
        head = model(input_ids=ids[:, :4], use_cache=True)
        mid = model(input_ids=ids[:, 4:5], use_cache=True, **cache_kwargs(model, output_cache(model, head)))
        last = model(input_ids=ids[:, 5:], use_cache=True, **cache_kwargs(model, output_cache(model, mid)))
    torch.testing.assert_close(last.logits[0, -1], full, atol=1e-5, rtol=0)
