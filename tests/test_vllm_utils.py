"""The vLLM engine's pure helpers, its missing-vLLM error and its config checks: no vLLM needed.

vLLM's outputs are rebuilt here as plain dataclasses with vLLM's attribute names
(``CompletionOutput.token_ids/logprobs/finish_reason/text``, ``Logprob.logprob``,
``RequestOutput.prompt_logprobs``): the tests exercise our conversion code, not an engine.
The same conversions against real vLLM are in ``test_vllm_engine.py``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from rlkit.config import ConfigError, load_config
from rollout.adaptive_temperature import AdaptiveTemperature
from rollout.engine import RolloutRequest, SamplingParams, get_engine_class
from rollout.sampling import DecodeState, logprobs_and_entropy
from rollout.vllm_utils import (
    ADAPTIVE_TEMPERATURE_KEY,
    INSTALL_HINT,
    adaptive_temperature_args,
    continuation_logprobs,
    finish_reason,
    layer_key,
    max_lora_rank,
    peft_adapter_state,
    sampling_kwargs,
    scale_to_adapted_temperature,
    split_buckets,
    to_completion,
    vllm_extra_args,
    write_peft_adapter,
)

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Logprob:  # vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:  # vllm.outputs.CompletionOutput (the fields we read)
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    stop_reason: int | str | None = None


@dataclass
class VSamplingParams:  # the two vllm.SamplingParams fields the adaptive-temperature processor reads
    temperature: float
    extra_args: dict | None = None


# ------------------------------------------------------------------------------ sampling


def test_sampling_kwargs_one_seeded_sample_with_sampled_token_logprob():
    p = SamplingParams(max_new_tokens=7, temperature=0.6, top_p=0.9, top_k=20, n=4, stop=("\n\n",), seed=3)
    kw = sampling_kwargs(p, seed=12345, extra_args={"k": 1})
    assert kw == {"n": 1, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_tokens": 7, "stop": ["\n\n"],
                  "include_stop_str_in_output": True, "seed": 12345, "logprobs": 0, "skip_special_tokens": True,
                  "extra_args": {"k": 1}}
    kw = sampling_kwargs(SamplingParams(temperature=0.0), seed=0)
    assert kw["stop"] is None and kw["extra_args"] is None and kw["temperature"] == 0.0


def test_sampling_kwargs_build_real_vllm_sampling_params():
    vllm = pytest.importorskip("vllm")
    sp = vllm.SamplingParams(**sampling_kwargs(SamplingParams(max_new_tokens=5, stop=("x",)), seed=1))
    assert (sp.max_tokens, sp.logprobs, sp.include_stop_str_in_output, sp.seed) == (5, 0, True, 1)


def test_extra_args_translate_adaptive_temperature_and_refuse_the_rest():
    proc = AdaptiveTemperature((0.1, 0.5, 1.0, 2.0), tau=0.2)
    assert vllm_extra_args([proc]) == {ADAPTIVE_TEMPERATURE_KEY: {"stats": [0.1, 0.5, 1.0, 2.0], "tau": 0.2,
                                                                  "eps": proc.eps}}
    assert vllm_extra_args([AdaptiveTemperature(None)]) == {}  # first HAPO step: no stats yet, a no-op
    with pytest.raises(ValueError, match="two AdaptiveTemperature"):
        vllm_extra_args([proc, proc])

    class Guided:  # what rollout.budget.BudgetGuidance advertises
        needs_hidden_states = True

    with pytest.raises(ValueError, match="model.budget_guidance"):
        vllm_extra_args([Guided()])
    with pytest.raises(TypeError, match="engine.name=vllm"):
        vllm_extra_args([lambda step, ids, logits, state: logits])


def test_adaptive_temperature_args_validation():
    spec = {"stats": [0.0, 1.0, 1.0, 1.0], "tau": 0.1}
    assert adaptive_temperature_args(VSamplingParams(0.7, {ADAPTIVE_TEMPERATURE_KEY: spec}))[:3] == (
        0.7, (0.0, 1.0, 1.0, 1.0), 0.1)
    assert adaptive_temperature_args(VSamplingParams(0.0, {ADAPTIVE_TEMPERATURE_KEY: spec})) is None  # greedy
    assert adaptive_temperature_args(VSamplingParams(1.0, None)) is None
    with pytest.raises(ValueError, match="4 stats"):
        adaptive_temperature_args(VSamplingParams(1.0, {ADAPTIVE_TEMPERATURE_KEY: {"stats": [1.0]}}))
    with pytest.raises(ValueError, match="must be"):
        adaptive_temperature_args(VSamplingParams(1.0, {ADAPTIVE_TEMPERATURE_KEY: {"tau": 0.1}}))


def test_scaled_logits_over_T_give_the_hf_engines_adaptive_temperature_logprobs():
    # vLLM divides the processed logits by the request T; scaling by T/T' must give log softmax(z/T')
    # exactly as the HF engine's AdaptiveTemperature + logprobs_and_entropy do.
    g = torch.Generator().manual_seed(0)
    logits_BV = 3.0 * torch.randn(5, 50, generator=g)
    temps = [0.7, 1.0, 0.0, 1.3, 0.9]
    stats, tau = (0.2, 0.8, 1.5, 0.7), 0.3
    proc = AdaptiveTemperature(stats, tau=tau)
    reqs = [RolloutRequest([1], SamplingParams(temperature=t)) for t in temps]
    state = DecodeState(requests=reqs, request_index_B=torch.arange(5), sample_index_B=torch.zeros(5, dtype=torch.long),
                        num_generated_B=torch.zeros(5, dtype=torch.long), temperature_B=torch.tensor(temps),
                        budget_B=torch.full((5,), -1))
    proc(0, torch.zeros(5, 1, dtype=torch.long), logits_BV, state)
    ref_BV, _ = logprobs_and_entropy(logits_BV, state.temperature_B, False)

    args = [adaptive_temperature_args(VSamplingParams(t, {ADAPTIVE_TEMPERATURE_KEY: {"stats": stats, "tau": tau}}))
            for t in temps]
    rows = [i for i, a in enumerate(args) if a is not None]
    assert rows == [0, 1, 3, 4]
    scaled = scale_to_adapted_temperature(logits_BV.clone(), rows, [args[i] for i in rows])
    t_B = torch.tensor([t if t > 0 else 1.0 for t in temps])
    got_BV = torch.log_softmax(scaled / t_B[:, None], -1)
    torch.testing.assert_close(got_BV, ref_BV, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got_BV[0], torch.log_softmax(logits_BV[0] / 0.7, -1), atol=1e-3)  # it did adapt
    torch.testing.assert_close(scaled[2], logits_BV[2])  # greedy row untouched


# ------------------------------------------------------------------------------ outputs


def _out(tokens, lps, reason="stop", text="t"):
    return CompletionOutput(0, text, tokens, [{t: Logprob(lp, 1)} for t, lp in zip(tokens, lps)], reason)


def test_to_completion_fills_the_fields_hf_fills():
    req = RolloutRequest([5, 6], SamplingParams(n=2), group_id=9, resume_ids=[7])
    c = to_completion(_out([3, 4, 2], [-0.5, -1.25, -0.125], "stop", "ab"), req, sample_index=1, policy_version=4)
    assert (c.prompt_ids, c.token_ids, c.logprobs) == ([5, 6], [3, 4, 2], [-0.5, -1.25, -0.125])
    assert (c.finish_reason, c.group_id, c.text, c.policy_version, c.meta) == ("stop", 9, "ab", 4, {"sample_index": 1})
    assert c.entropies is None and not c.truncated
    assert to_completion(_out([3], [-1.0], "length"), req, 0, 0).truncated


def test_to_completion_rejects_aborted_and_inconsistent_outputs():
    req = RolloutRequest([1])
    with pytest.raises(RuntimeError, match="abort"):
        to_completion(_out([3], [-1.0], "abort"), req, 0, 0)
    with pytest.raises(RuntimeError, match="logprobs=0"):
        to_completion(CompletionOutput(0, "", [3], None, "stop"), req, 0, 0)
    bad = _out([3, 4], [-1.0, -2.0])
    bad.logprobs = bad.logprobs[:1]
    with pytest.raises(RuntimeError, match="1 logprob positions for 2 tokens"):
        to_completion(bad, req, 0, 0)
    with pytest.raises(KeyError):  # a position that lacks the sampled token
        to_completion(CompletionOutput(0, "", [3], [{8: Logprob(-1.0)}], "stop"), req, 0, 0)
    assert finish_reason("length") == "length"


def test_continuation_logprobs_read_prompt_positions_after_the_prefix():
    prefix, cont = [10, 11, 12], [13, 14]
    prompt_lps = [None] + [{t: Logprob(-0.1 * t)} for t in prefix[1:] + cont]  # position i scores token i
    assert continuation_logprobs(prompt_lps, len(prefix), cont) == pytest.approx([-1.3, -1.4])
    with pytest.raises(RuntimeError, match="prompt logprob positions"):
        continuation_logprobs(prompt_lps[:-1], len(prefix), cont)
    with pytest.raises(RuntimeError, match="prompt_logprobs=0"):
        continuation_logprobs(None, 3, cont)


# ------------------------------------------------------------------------------ weights


def test_layer_key_groups_a_decoder_block():
    assert layer_key("model.layers.3.self_attn.q_proj.weight") == "model.layers.3"
    assert layer_key("model.layers.3.mlp.up_proj.weight") == "model.layers.3"
    assert layer_key("model.layers.31.input_layernorm.weight") == "model.layers.31"
    assert layer_key("model.embed_tokens.weight") == "model.embed_tokens"
    assert layer_key("lm_head.weight") == "lm_head"


def test_split_buckets_bounded_ordered_and_never_split_a_layer():
    t = lambda n: torch.zeros(n, dtype=torch.float32)  # noqa: E731  (4n bytes)
    items = [("model.embed_tokens.weight", t(100))]
    for i in range(3):
        items += [(f"model.layers.{i}.self_attn.q_proj.weight", t(30)),
                  (f"model.layers.{i}.self_attn.k_proj.weight", t(30)),
                  (f"model.layers.{i}.mlp.up_proj.weight", t(40))]
    items += [("model.norm.weight", t(10)), ("lm_head.weight", t(100))]
    buckets = split_buckets(items, max_bytes=4 * 220)
    assert [n for b in buckets for n, _ in b] == [n for n, _ in items]  # nothing lost, order kept
    for b in buckets:
        assert sum(x.numel() * 4 for _, x in b) <= 4 * 220
    keys = [{layer_key(n) for n, _ in b} for b in buckets]
    for i in range(3):  # each block sits in exactly one bucket
        assert sum(f"model.layers.{i}" in k for k in keys) == 1
    assert len(split_buckets(items, max_bytes=1)) == 6  # one group per bucket when nothing fits
    assert len(split_buckets(items, max_bytes=10**9)) == 1
    with pytest.raises(ValueError):
        split_buckets(items, 0)


def test_peft_adapter_state_names():
    w = torch.ones(2, 2)
    state = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": w,
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight": w,
             "model.layers.1.mlp.up_proj.lora_A.weight": w}
    assert sorted(peft_adapter_state(state)) == [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
        "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"]
    with pytest.raises(KeyError, match="model.lora.rank"):
        peft_adapter_state({"model.layers.0.self_attn.q_proj.weight": w})


def test_max_lora_rank_rounds_up_to_a_rank_vllm_accepts():
    assert [max_lora_rank(r) for r in (1, 2, 8, 9, 64, 300)] == [1, 8, 8, 16, 64, 320]
    with pytest.raises(ValueError, match="model.lora.rank"):
        max_lora_rank(1000)


def test_written_adapter_dir_loads_in_peft_with_the_trained_adapters_outputs(tiny_model_dir, tmp_path):
    """The directory vLLM's LoRARequest reads is a standard PEFT adapter: PEFT itself loads it back to
    the same logits as the in-memory adapter it was taken from."""
    from peft import PeftModel, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from rollout.hf import lora_config

    lora = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all-linear"}
    torch.manual_seed(0)
    trained = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_config(lora))
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.5)
    path = write_peft_adapter(tmp_path / "adapter", get_peft_model_state_dict(trained), lora)
    assert json.loads((path / "adapter_config.json").read_text())["r"] == 4
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(path))
    ids = torch.tensor([[3, 17, 42, 9, 5]])
    with torch.no_grad():
        want, got = trained(ids).logits, loaded(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
    torch.testing.assert_close(got, want)
    assert (want - base).abs().max() > 1e-2  # the adapter matters


# ------------------------------------------------------------------------------ missing vLLM, config


def test_vllm_engine_without_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError from here on
    cls = get_engine_class("vllm")  # registering the engine needs no vLLM
    with pytest.raises(ImportError) as e:
        cls("/no/model")
    assert "pip install 'rlkit[gpu]'" in str(e.value) and INSTALL_HINT in str(e.value)


def test_config_engine_checks():
    quick = ROOT / "recipes/quickstart.yaml"
    cfg = load_config(quick, ["engine.name=vllm", "engine.vllm.gpu_memory_utilization=0.4"])
    assert cfg.engine.vllm.gpu_memory_utilization == pytest.approx(0.4)
    with pytest.raises(ConfigError, match="engine.name: unknown engine 'vlm'"):
        load_config(quick, ["engine.name=vlm"])
    with pytest.raises(ConfigError, match="model.budget_guidance needs engine.name=hf"):
        load_config(quick, ["engine.name=vllm", "model.budget_guidance=/some/predictor"])
    with pytest.raises(ConfigError, match="engine.vllm.enforce_eager"):
        load_config(quick, ["engine.vllm.enforce_eagr=true"])
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        load_config(quick, ["engine.vllm.gpu_memory_utilization=1.5"])
    spae = ROOT / "recipes/spae.yaml"
    if spae.is_file():
        with pytest.raises(ConfigError, match="per-token entropies"):
            load_config(spae, ["engine.name=vllm"])
    assert math.isfinite(load_config(quick).engine.vllm.weight_bucket_mb)


def test_eval_guidance_with_vllm_is_a_clear_error(capsys):
    from rlkit.cli import main

    rc = main(["eval", str(ROOT / "recipes/quickstart.yaml"), "engine.name=vllm", "--budgets", "64",
               "--guidance", "/nonexistent/predictor"])
    assert rc == 2
    assert "--guidance needs engine.name=hf (got 'vllm')" in capsys.readouterr().err
