"""HFEngine: decode loop vs transformers references (generate, full forward), sampling contracts."""

from __future__ import annotations

import math

import pytest
import torch

from rollout import hf
from rollout.engine import Completion, RolloutEngine, RolloutRequest, SamplingParams, get_engine_class
from rollout.hf import HFEngine

PROMPTS = [
    "What is 2+3?",
    "Tom has 5 apples and gets 7 more. How many apples does Tom have?",
    "Hi",
    "Ann has 12 pens.",
]
GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: str) -> HFEngine:
    return HFEngine(tiny_model_dir, max_batch_size=64, seed=0)


@pytest.fixture(scope="module")
def prompt_ids(engine: HFEngine) -> list[list[int]]:
    return [engine.tokenizer.encode(p) for p in PROMPTS]


def _reqs(prompts: list[list[int]], params: SamplingParams) -> list[RolloutRequest]:
    return [RolloutRequest(p, params, group_id=i) for i, p in enumerate(prompts)]


def _full_forward_logp(engine: HFEngine, c: Completion, temperature: float) -> torch.Tensor:
    """Unpadded, uncached forward over prompt + completion: (T, V) log-probs at ``temperature``."""
    ids = torch.tensor([c.prompt_ids + c.token_ids])
    with torch.no_grad():
        logits = engine.model(input_ids=ids).logits[0].float()
    P = len(c.prompt_ids)
    return torch.log_softmax(logits[P - 1 : P - 1 + len(c.token_ids)] / temperature, -1)


def test_registered_and_protocol(engine: HFEngine) -> None:
    assert get_engine_class("hf") is HFEngine
    assert isinstance(engine, RolloutEngine)


def test_generates_n_per_prompt_aligned(engine: HFEngine, prompt_ids: list[list[int]]) -> None:
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=3, return_entropy=True)
    comps = engine.generate(_reqs(prompt_ids[:2], params))
    assert len(comps) == 6
    assert [c.group_id for c in comps] == [0, 0, 0, 1, 1, 1]
    assert [c.meta["sample_index"] for c in comps] == [0, 1, 2, 0, 1, 2]
    for c in comps:
        assert 1 <= len(c.token_ids) <= 12
        assert len(c.token_ids) == len(c.logprobs) == len(c.entropies)
        assert all(lp <= 0 for lp in c.logprobs)
        assert c.finish_reason in ("stop", "length")
        assert c.prompt_ids in prompt_ids[:2]
    stats = engine.engine_stats()
    assert stats["rollout/tokens_generated"] == sum(len(c.token_ids) for c in comps)
    assert stats["rollout/tokens_per_s"] > 0


MAX_NEW = [16, 5, 9, 12]  # per request: rows finish at different steps, which triggers pruning


def _mixed_len_reqs(prompts: list[list[int]], **kw) -> list[RolloutRequest]:
    return [RolloutRequest(p, SamplingParams(max_new_tokens=m, temperature=0.0, **kw))
            for p, m in zip(prompts, MAX_NEW)]


@pytest.mark.parametrize("max_batch_size", [64, 3])
def test_greedy_equals_hf_generate(tiny_model_dir: str, prompt_ids: list[list[int]],
                                   max_batch_size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Left padding + position ids + KV cache + pruning reproduce transformers' greedy tokens."""
    monkeypatch.setattr(hf, "PRUNE_MIN_ROWS", 1)  # prune even these small batches
    engine = HFEngine(tiny_model_dir, max_batch_size=max_batch_size)
    comps = engine.generate(_mixed_len_reqs(prompt_ids))
    assert engine.engine_stats()["rollout/rows_pruned"] > 0
    tok = engine.tokenizer
    tok.padding_side = "left"
    enc = tok.pad({"input_ids": prompt_ids}, return_tensors="pt")
    with torch.no_grad():
        ref = engine.model.generate(**enc, do_sample=False, max_new_tokens=16,
                                    pad_token_id=tok.pad_token_id)
    for c, row, m in zip(comps, ref[:, enc["input_ids"].shape[1]:].tolist(), MAX_NEW):
        row = row[:m]
        if c.finish_reason == "stop":  # trim the reference at its first EOS (kept)
            row = row[: row.index(tok.eos_token_id) + 1]
        assert c.token_ids == row
    assert {c.finish_reason for c in comps} == {"stop", "length"}  # both paths exercised


def test_greedy_deterministic_and_prune_invariant(tiny_model_dir: str, prompt_ids: list[list[int]]) -> None:
    """20 rows (>= PRUNE_MIN_ROWS) finishing at different steps: pruning must not change any row."""
    reqs = _mixed_len_reqs(prompt_ids, n=5, return_entropy=True)
    pruned = HFEngine(tiny_model_dir)
    a = pruned.generate(reqs)
    assert pruned.engine_stats()["rollout/rows_pruned"] > 0
    b = HFEngine(tiny_model_dir, prune_finished=False).generate(reqs)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    for c, m in zip(a, [m for m in MAX_NEW for _ in range(5)]):
        assert len(c.token_ids) == m if c.finish_reason == "length" else len(c.token_ids) < m
    for x, y in zip(a, b):
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)
        assert x.entropies == pytest.approx(y.entropies, abs=1e-4)


def test_behaviour_logprobs_match_score_and_full_forward(engine: HFEngine,
                                                         prompt_ids: list[list[int]]) -> None:
    T = 0.7
    params = SamplingParams(max_new_tokens=12, temperature=T, top_k=20, top_p=0.9, n=2, seed=3)
    comps = engine.generate(_reqs(prompt_ids, params))
    scored = engine.score([c.prompt_ids for c in comps], [c.token_ids for c in comps], temperature=T)
    for c, s in zip(comps, scored):
        assert s == pytest.approx(c.logprobs, abs=1e-4)
        logp = _full_forward_logp(engine, c, T)
        ref = logp.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        assert ref.tolist() == pytest.approx(c.logprobs, abs=1e-4)


def test_score_edge_cases(engine: HFEngine, prompt_ids: list[list[int]]) -> None:
    out = engine.score([prompt_ids[0], prompt_ids[1]], [[], [5, 6, 7]])
    assert out[0] == [] and len(out[1]) == 3
    with pytest.raises(ValueError):
        engine.score([[]], [[1]])


def test_entropy_matches_manual(engine: HFEngine, prompt_ids: list[list[int]]) -> None:
    T = 1.3
    params = SamplingParams(max_new_tokens=8, temperature=T, return_entropy=True, seed=1)
    for c in engine.generate(_reqs(prompt_ids[:2], params)):
        logp = _full_forward_logp(engine, c, T)
        ent = -(logp.exp() * logp).sum(-1)
        assert ent.tolist() == pytest.approx(c.entropies, abs=1e-4)


def test_entropy_not_returned_unless_asked(engine: HFEngine, prompt_ids: list[list[int]]) -> None:
    comps = engine.generate(_reqs(prompt_ids[:1], SamplingParams(max_new_tokens=4)))
    assert comps[0].entropies is None


def test_stop_string_stops(engine: HFEngine, prompt_ids: list[list[int]]) -> None:
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    full = max(engine.generate(_reqs(prompt_ids, params)), key=lambda c: len(c.text))
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop and len(full.token_ids) > 4
    req = RolloutRequest(full.prompt_ids, SamplingParams(max_new_tokens=24, temperature=0.0,
                                                         stop=(stop,)))
    (c,) = engine.generate([req])
    assert c.finish_reason == "stop"
    assert c.text.endswith(stop) and c.text == text[: text.index(stop) + len(stop)]
    assert len(c.token_ids) < len(full.token_ids)
    assert c.token_ids == full.token_ids[: len(c.token_ids)]


def test_max_new_tokens_gives_length(engine: HFEngine, prompt_ids: list[list[int]]) -> None:
    """An EOS-banning logits processor (the per-step hook) forces every row to the limit."""
    seen_steps: list[int] = []

    def ban_eos(step: int, input_ids: torch.Tensor, logits: torch.Tensor, state) -> torch.Tensor:
        seen_steps.append(step)
        assert input_ids.shape[0] == logits.shape[0] == state.request_index_B.shape[0]
        logits = logits.clone()
        logits[:, engine.eos_ids] = float("-inf")
        return logits

    params = SamplingParams(max_new_tokens=7, temperature=1.0, n=2)
    reqs = [RolloutRequest(p, params, meta={"logits_processors": [ban_eos]}) for p in prompt_ids]
    comps = engine.generate(reqs)
    assert all(c.finish_reason == "length" and c.truncated and len(c.token_ids) == 7 for c in comps)
    assert seen_steps == list(range(7))
    assert engine.logits_processors == []  # request-level hook did not leak into the engine


def test_seeds_reproduce(tiny_model_dir: str, engine: HFEngine, prompt_ids: list[list[int]]) -> None:
    seeded = SamplingParams(max_new_tokens=10, temperature=1.0, n=4, seed=7)
    a = engine.generate(_reqs(prompt_ids, seeded))
    b = engine.generate(_reqs(prompt_ids, seeded))
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert len({tuple(c.token_ids) for c in a}) > len(prompt_ids)  # the n samples differ
    # a seeded request does not depend on its batch neighbours
    (alone,) = engine.generate([RolloutRequest(prompt_ids[2], SamplingParams(
        max_new_tokens=10, temperature=1.0, seed=7))])
    assert alone.token_ids == a[2 * 4].token_ids
    # unseeded: engine seed + call counter -> fresh engines agree, successive calls differ
    free = SamplingParams(max_new_tokens=10, temperature=1.0, n=2)
    e1, e2 = HFEngine(tiny_model_dir, seed=1), HFEngine(tiny_model_dir, seed=1)
    x1, x2 = e1.generate(_reqs(prompt_ids, free)), e2.generate(_reqs(prompt_ids, free))
    assert [c.token_ids for c in x1] == [c.token_ids for c in x2]
    assert [c.token_ids for c in e1.generate(_reqs(prompt_ids, free))] != [c.token_ids for c in x1]


def test_top_k_1_equals_greedy(engine: HFEngine, prompt_ids: list[list[int]]) -> None:
    greedy = engine.generate(_reqs(prompt_ids, GREEDY))
    topk = engine.generate(_reqs(prompt_ids, SamplingParams(max_new_tokens=16, temperature=1.0, top_k=1)))
    assert [c.token_ids for c in topk] == [c.token_ids for c in greedy]
    # greedy logprobs are under T = 1, like the top-k=1 sampler's
    for g, t in zip(greedy, topk):
        assert g.logprobs == pytest.approx(t.logprobs, abs=1e-5)


def test_mixed_params_in_one_call(engine: HFEngine, prompt_ids: list[list[int]]) -> None:
    greedy = engine.generate(_reqs(prompt_ids[:2], GREEDY))
    mixed = engine.generate([
        RolloutRequest(prompt_ids[0], GREEDY),
        RolloutRequest(prompt_ids[2], SamplingParams(max_new_tokens=30, temperature=1.0, n=2)),
        RolloutRequest(prompt_ids[1], GREEDY),
    ])
    assert mixed[0].token_ids == greedy[0].token_ids and mixed[3].token_ids == greedy[1].token_ids


def test_resume_ids_continue_a_prefix(engine: HFEngine, prompt_ids: list[list[int]]) -> None:
    (full,) = engine.generate([RolloutRequest(prompt_ids[1], GREEDY)])
    k = 5
    (rest,) = engine.generate([RolloutRequest(prompt_ids[1], SamplingParams(
        max_new_tokens=16 - k, temperature=0.0), resume_ids=full.token_ids[:k])])
    assert rest.prompt_ids == prompt_ids[1]
    assert full.token_ids[:k] + rest.token_ids == full.token_ids


def test_load_weights_changes_outputs_and_version(tiny_model_dir: str,
                                                  prompt_ids: list[list[int]]) -> None:
    eng = HFEngine(tiny_model_dir)
    before = eng.generate(_reqs(prompt_ids, GREEDY))
    assert all(c.policy_version == 0 for c in before)
    state = {k: v.clone() for k, v in eng.model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    new = {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in state.items() if "mlp" in k}
    eng.load_weights(new)
    after = eng.generate(_reqs(prompt_ids, GREEDY))
    assert eng.policy_version == 1 and all(c.policy_version == 1 for c in after)
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    # PEFT-prefixed names of the original weights restore the original outputs
    eng.load_weights({"base_model.model." + k: v for k, v in state.items()}, version=5)
    assert eng.policy_version == 5
    assert [c.token_ids for c in eng.generate(_reqs(prompt_ids, GREEDY))] == [c.token_ids for c in before]
    with pytest.raises(KeyError, match="no_such"):
        eng.load_weights({"model.no_such.weight": torch.zeros(1)})


def test_lora_engine_takes_adapter_tensors(tiny_model_dir: str, prompt_ids: list[list[int]]) -> None:
    from peft import get_peft_model, get_peft_model_state_dict

    from rlkit.infra.models import load_model, lora_config

    lora = {"rank": 4, "alpha": 8}
    eng = HFEngine(tiny_model_dir, lora=lora)
    base = HFEngine(tiny_model_dir).generate(_reqs(prompt_ids, GREEDY))
    assert [c.token_ids for c in eng.generate(_reqs(prompt_ids, GREEDY))] == [c.token_ids for c in base]
    learner = get_peft_model(load_model(tiny_model_dir), lora_config(lora))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in learner.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapter = get_peft_model_state_dict(learner)  # names without the ".default" adapter name
    assert adapter and all("lora_" in k for k in adapter)
    eng.load_weights(adapter, version=1)
    tuned = eng.generate(_reqs(prompt_ids, GREEDY))
    assert [c.token_ids for c in tuned] != [c.token_ids for c in base]
    ids = torch.tensor([prompt_ids[1]])
    with torch.no_grad():
        assert torch.allclose(eng.model(input_ids=ids).logits, learner(input_ids=ids).logits, atol=1e-5)


def test_qwen2_arch_and_sleep_wake(tiny_qwen_dir: str, prompt_ids: list[list[int]]) -> None:
    eng = HFEngine(tiny_qwen_dir, num_threads=torch.get_num_threads())
    eng.sleep()
    eng.wake()
    comps = eng.generate(_reqs(prompt_ids, SamplingParams(max_new_tokens=6, temperature=0.8, n=2)))
    assert len(comps) == 2 * len(prompt_ids)
    assert all(math.isfinite(lp) for c in comps for lp in c.logprobs)


@pytest.mark.slow
def test_smollm2_chat_greedy(smollm2_dir: str) -> None:
    from rlkit.infra.models import apply_chat_template, load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    eng = HFEngine(smollm2_dir, num_threads=2)
    ids = apply_chat_template(tok, [{"role": "user", "content": "What is 2+3?"}])
    (c,) = eng.generate([RolloutRequest(ids, SamplingParams(max_new_tokens=32, temperature=0.0))])
    assert c.text.strip()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_greedy_matches_cpu(tiny_model_dir: str, prompt_ids: list[list[int]]) -> None:
    cpu = HFEngine(tiny_model_dir).generate(_reqs(prompt_ids, GREEDY))
    eng = HFEngine(tiny_model_dir, device="cuda")
    gpu = eng.generate(_reqs(prompt_ids, GREEDY))
    assert [c.token_ids for c in gpu] == [c.token_ids for c in cpu]
    eng.sleep()
    assert next(eng.model.parameters()).device.type == "cpu"
    eng.wake()
    assert len(eng.generate(_reqs(prompt_ids, SamplingParams(max_new_tokens=4, n=2)))) == 8


def test_stop_string_across_a_resume_boundary(engine: HFEngine, prompt_ids: list[list[int]]) -> None:
    """A segment resumed from ``resume_ids`` stops on a stop string that began in the earlier segment."""
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    full = max(engine.generate(_reqs(prompt_ids, params)), key=lambda c: len(c.text))
    dec = engine.tokenizer.decode
    for k in range(2, len(full.token_ids) - 2):
        before, new = dec(full.token_ids[:k]), dec(full.token_ids[: k + 1])
        if len(before) < 2 or len(new) <= len(before) or not new.startswith(before):
            continue
        stop = before[-2:] + new[len(before)]  # two chars of segment 1, one of segment 2
        if stop not in before and stop not in new[len(before) - 1 :] and new.count(stop) == 1:
            break
    else:
        pytest.skip("no token boundary gives a stop string that only spans it")
    req = RolloutRequest(full.prompt_ids, SamplingParams(max_new_tokens=24, temperature=0.0, stop=(stop,)),
                         resume_ids=list(full.token_ids[:k]))
    (c,) = engine.generate([req])
    assert c.finish_reason == "stop" and c.token_ids == full.token_ids[k : k + 1]
    # a stop string entirely inside the resumed text is history, not a new stop
    old = before[:3]
    req = RolloutRequest(full.prompt_ids, SamplingParams(max_new_tokens=4, temperature=0.0, stop=(old,)),
                         resume_ids=list(full.token_ids[:k]))
    (c,) = engine.generate([req])
    assert c.token_ids == full.token_ids[k : k + len(c.token_ids)]
    assert c.finish_reason == "length" or old in dec(full.token_ids[: k + len(c.token_ids)])[len(before) - len(old) + 1 :]
