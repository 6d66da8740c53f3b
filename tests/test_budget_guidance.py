"""Budget guidance (docs/algorithms.md §4): Gamma maths, worked example §4.6, guided sampling through the real
HFEngine (only after newlines, only budgeted rows, batched == one by one), predictor training
and save/load."""

from __future__ import annotations

import math

import pytest
import torch

from rlkit.tools.budget_train import (
    build_traces,
    concise_text,
    load_completions,
    think_region,
    train_budget_predictor,
)
from rollout import hf
from rollout.budget import (
    HIDDEN_STATES_KEY,
    BudgetGuidance,
    GammaPredictor,
    GuidanceParams,
    PredictorConfig,
    gamma_mode_length,
    gamma_nll,
    guidance_weights,
    guided_probs,
    load_predictor,
    save_predictor,
    token_string_mask,
)
from rollout.budget_fit import FitParams, evaluate_predictor, extract_features, fit_predictor
from rollout.engine import Completion, RolloutRequest, SamplingParams
from rollout.hf import HFEngine

PERMISSIVE = GuidanceParams(min_lambda=0.0, min_alpha=0.0, min_mode=-1.0)  # mask keeps every token

# ------------------------------------------------------------------------------ worked example §4.6


def test_worked_example_guided_step() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    alpha = torch.tensor([[40.0, 60.0, 20.0, 1.5]])
    lam = torch.tensor([[10.0, 12.0, 15.0, 0.5]])
    b = torch.tensor([100])
    # p_LM = softmax(logits)
    assert torch.softmax(logits, -1)[0].tolist() == pytest.approx([0.6095, 0.2242, 0.1360, 0.0303], abs=1e-4)
    # CDF = P(alpha, lam * log 101), x = 4.615121
    cdf = torch.special.gammainc(alpha, lam * math.log(101))[0]
    assert cdf.tolist() == pytest.approx([0.836178, 0.284697, 1.000000, 0.797751], abs=1e-5)
    # mode_L = exp((alpha-1)/lam) - 1; token 3 fails lam >= 10
    assert gamma_mode_length(alpha, lam)[0].tolist() == pytest.approx([48.40, 135.55, 2.55, 1.72], abs=5e-3)
    w = guidance_weights(alpha, lam, b, logits)[0]
    assert w.tolist() == pytest.approx([0.394261, 0.134235, 0.471503, 0.0], abs=1e-5)
    p = guided_probs(logits, alpha, lam, b)[0]
    assert p.tolist() == pytest.approx([0.718340, 0.089974, 0.191686, 0.0], abs=1e-5)


def test_worked_example_nll() -> None:
    # L = 50 -> z = log 51 = 3.931826; alpha 40, lam 10 -> log-likelihood -0.451562
    nll = gamma_nll(torch.tensor(40.0), torch.tensor(10.0), torch.log1p(torch.tensor(50.0)))
    assert float(nll) == pytest.approx(0.451562, abs=1e-5)


def test_all_masked_falls_back_to_argmax_and_rows_are_independent() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [0.0, 3.0, 1.0]])
    alpha = torch.tensor([[40.0, 40.0, 40.0], [40.0, 60.0, 20.0]])
    lam = torch.tensor([[1.0, 1.0, 1.0], [10.0, 12.0, 15.0]])  # row 0: lam < 10 everywhere
    p = guided_probs(logits, alpha, lam, torch.tensor([100, 100]))
    assert p[0].tolist() == [0.0, 1.0, 0.0]
    w = guidance_weights(alpha[1:], lam[1:], torch.tensor([100]), logits[1:])
    expected = torch.softmax(logits[1], -1) * w[0]
    assert p[1].tolist() == pytest.approx((expected / expected.sum()).tolist(), abs=1e-6)
    # thresholds are parameters: a looser lambda threshold keeps row 0's tokens
    loose = guidance_weights(alpha[:1], lam[:1], torch.tensor([100]), logits[:1], GuidanceParams(min_lambda=0.5))
    assert bool((loose > 0).all())


def test_neutral_unreliable_candidates_get_the_reliable_mean_weight() -> None:
    # §4.6's step with unreliable="neutral": token 3 (lam 0.5 < 10) is no longer excluded; it gets
    # the p-weighted mean of the reliable tokens' CDFs, computed here by hand
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    alpha, lam = torch.tensor([[40.0, 60.0, 20.0, 1.5]]), torch.tensor([[10.0, 12.0, 15.0, 0.5]])
    p = [math.exp(x) for x in (2.0, 1.0, 0.5, -1.0)]
    p = [x / sum(p) for x in p]
    cdf = [0.836178, 0.284697, 1.000000]
    mean = sum(pi * ci for pi, ci in zip(p, cdf)) / sum(p[:3])  # 0.754...
    raw = cdf + [mean]
    expected_w = [x / sum(raw) for x in raw]
    params = GuidanceParams(unreliable="neutral")
    w = guidance_weights(alpha, lam, torch.tensor([100]), logits, params)[0]
    assert w.tolist() == pytest.approx(expected_w, abs=1e-5)
    q = [pi * wi for pi, wi in zip(p, expected_w)]
    got = guided_probs(logits, alpha, lam, torch.tensor([100]), params)[0]
    assert got.tolist() == pytest.approx([x / sum(q) for x in q], abs=1e-5)
    # a row with no reliable candidate is left as the LM has it (the reference forces the argmax)
    none_reliable = guided_probs(logits, alpha, torch.full_like(lam, 0.5), torch.tensor([100]), params)[0]
    assert none_reliable.tolist() == pytest.approx(torch.softmax(logits, -1)[0].tolist(), abs=1e-6)
    with pytest.raises(ValueError, match="unreliable"):
        GuidanceParams(unreliable="one")


def test_smaller_budget_favours_tokens_predicting_shorter_remainders() -> None:
    # token 0 predicts ~20 remaining tokens, token 1 ~400: a tight budget moves mass to token 0
    logits = torch.zeros(1, 2)
    alpha, lam = torch.tensor([[60.0, 120.0]]), torch.tensor([[20.0, 20.0]])
    tight = guided_probs(logits, alpha, lam, torch.tensor([30]))[0]
    loose = guided_probs(logits, alpha, lam, torch.tensor([5000]))[0]
    assert tight[0] > 0.99 and loose[0] == pytest.approx(0.5, abs=1e-3)


# ------------------------------------------------------------------------------ guided sampling in HFEngine


class ForceNewlineEvery3:
    """Test processor: newline exactly at steps 1, 4, 7, ... (never elsewhere)."""

    def __init__(self, newline_id: int) -> None:
        self.nl = newline_id

    def __call__(self, step, input_ids, logits_BV, state):
        out = logits_BV.clone()
        if step % 3 == 1:
            out[:] = float("-inf")
            out[:, self.nl] = 0.0
        else:
            out[:, self.nl] = float("-inf")
        return out


class RecordingGuidance(BudgetGuidance):
    """BudgetGuidance that records, per step, which (request, sample) rows it changed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.changed: set[tuple[int, int, int]] = set()
        self.hidden_shapes: list[tuple[int, ...]] = []

    def __call__(self, step, input_ids, logits_BV, state):
        out = super().__call__(step, input_ids, logits_BV, state)
        self.hidden_shapes.append(tuple(state.extra[HIDDEN_STATES_KEY].shape))
        diff = (out.float() != logits_BV.float()).any(-1)
        for i, (r, s) in enumerate(zip(state.request_index_B.tolist(), state.sample_index_B.tolist())):
            if bool(diff[i]):
                self.changed.add((r, s, step))
        return out


@pytest.fixture(scope="module")
def engine(tiny_model_dir: str) -> HFEngine:
    return HFEngine(tiny_model_dir, max_batch_size=64, seed=0)


@pytest.fixture(scope="module")
def predictor(engine: HFEngine) -> GammaPredictor:
    torch.manual_seed(0)
    cfg = PredictorConfig(d_model=64, vocab_size=int(engine.model.get_output_embeddings().weight.shape[0]),
                          num_hidden_states=3, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    return GammaPredictor(cfg).eval()


def logits_width(engine: HFEngine) -> int:
    return int(engine.model.get_output_embeddings().weight.shape[0])


def _newline_id(engine: HFEngine) -> int:
    ids = engine.tokenizer.encode("\n")
    assert len(ids) == 1
    return ids[0]


def _requests(engine: HFEngine) -> list[RolloutRequest]:
    enc = engine.tokenizer.encode
    return [
        RolloutRequest(enc("What is 2+3?"), SamplingParams(max_new_tokens=7, temperature=1.0, n=2, seed=1), 0, budget=4),
        RolloutRequest(enc("Tom has 5 apples."), SamplingParams(max_new_tokens=10, temperature=1.0, n=2, seed=2), 1),
        RolloutRequest(enc("Hi"), SamplingParams(max_new_tokens=12, temperature=0.5, seed=3), 2, budget=50),
        RolloutRequest(enc("What is 7+1?"), SamplingParams(max_new_tokens=9, temperature=1.0, seed=4), 3, budget=0),
    ]


def _reference_logprobs(engine: HFEngine, predictor: GammaPredictor, c: Completion, req: RolloutRequest,
                        nl: int) -> tuple[list[float], list[bool]]:
    """Teacher-forced, unbatched recomputation of each token's behaviour logprob under guidance."""
    ids = torch.tensor([c.prompt_ids + c.token_ids])
    with torch.no_grad():
        out = engine.model(input_ids=ids, output_hidden_states=True)
    P, T = len(c.prompt_ids), req.params.temperature
    hidden = torch.stack(out.hidden_states, 2)[0]  # (S, N+1, H)
    lps, guided = [], []
    for t, tok in enumerate(c.token_ids):
        logits = ForceNewlineEvery3(nl)(t, None, out.logits[0, P - 1 + t][None].float(), None)
        g = req.budget is not None and req.budget > 0 and (t == 0 or c.token_ids[t - 1] == nl)
        if g:
            with torch.no_grad():
                a, lam = predictor(hidden[P - 1 + t][None])
            p = guided_probs(logits, a, lam, torch.tensor([max(req.budget - t, 1)]), PERMISSIVE)
            lps.append(math.log(float(p[0, tok])))
        else:
            lps.append(float(torch.log_softmax(logits / T, -1)[0, tok]))
        guided.append(g)
    return lps, guided


def test_guidance_only_after_newlines_and_only_for_budgeted_rows(
    engine: HFEngine, predictor: GammaPredictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hf, "PRUNE_MIN_ROWS", 1)  # prune finished rows: row memory must follow
    nl = _newline_id(engine)
    guide = RecordingGuidance(predictor, engine.tokenizer, PERMISSIVE)
    reqs = _requests(engine)
    for r in reqs:
        r.meta["logits_processors"] = [ForceNewlineEvery3(nl), guide]
    comps = engine.generate(reqs)
    assert guide.hidden_shapes and all(s[1:] == (3, 64) for s in guide.hidden_shapes)
    req_of = [0, 0, 1, 1, 2, 3]
    for c, ri in zip(comps, req_of, strict=True):
        req = reqs[ri]
        lps, guided = _reference_logprobs(engine, predictor, c, req, nl)
        assert c.logprobs == pytest.approx(lps, abs=1e-4)
        s = c.meta["sample_index"]
        changed = {t for t in range(len(c.token_ids)) if (ri, s, t) in guide.changed}
        assert changed == {t for t, g in enumerate(guided) if g}
        if req.budget:  # step 0 and the steps right after each forced newline (2, 5, 8, ...)
            assert changed == {0} | {t for t in range(2, len(c.token_ids), 3)}
        else:
            assert not changed
    assert guide.guided_row_steps == len(guide.changed)


def test_batched_equals_one_request_at_a_time(engine: HFEngine, predictor: GammaPredictor) -> None:
    nl = _newline_id(engine)
    guide = BudgetGuidance(predictor, engine.tokenizer, PERMISSIVE)
    procs = [ForceNewlineEvery3(nl), guide]
    reqs = _requests(engine)
    for r in reqs:
        r.meta["logits_processors"] = procs
    together = engine.generate(reqs)
    alone = [c for r in reqs for c in engine.generate([r])]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    for a, b in zip(together, alone):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_no_budget_is_the_plain_engine(engine: HFEngine, predictor: GammaPredictor) -> None:
    reqs = _requests(engine)
    for r in reqs:
        r.budget = None
    plain = engine.generate(reqs)
    guide = BudgetGuidance(predictor, engine.tokenizer, PERMISSIVE)
    for r in reqs:
        r.meta["logits_processors"] = [guide]
    guided = engine.generate(reqs)
    assert [c.token_ids for c in plain] == [c.token_ids for c in guided]
    assert [c.logprobs for c in plain] == [c.logprobs for c in guided]
    assert guide.guided_row_steps == 0


def test_hidden_states_are_opt_in(engine: HFEngine) -> None:
    seen: list[bool] = []

    def probe(step, input_ids, logits, state):
        seen.append(HIDDEN_STATES_KEY in state.extra)
        return logits

    req = RolloutRequest(engine.tokenizer.encode("Hi"), SamplingParams(max_new_tokens=3, temperature=0.0), budget=5)
    req.meta["logits_processors"] = [probe]
    engine.generate([req])
    assert seen == [False] * 3


def test_think_end_turns_guidance_off_and_think_start_gates_it(engine: HFEngine, predictor: GammaPredictor) -> None:
    tok = engine.tokenizer
    nl = _newline_id(engine)
    marker_id = tok.encode("!")[0]
    marker = tok.decode([marker_id])
    has_marker = token_string_mask(tok, logits_width(engine), [marker])

    def force_marker_at_3(step, input_ids, logits, state):
        out = logits.clone()
        out[:, has_marker] = float("-inf")
        if step == 3:
            out[:] = float("-inf")
            out[:, marker_id] = 0.0
        return out

    prompt = tok.encode("What is 2+3?")
    for params, expected in [
        (GuidanceParams(min_lambda=0, min_alpha=0, min_mode=-1, think_end=marker), {0, 2}),  # stops after step 3
        (GuidanceParams(min_lambda=0, min_alpha=0, min_mode=-1, think_start=marker, think_end=None), {5, 8}),
    ]:
        guide = RecordingGuidance(predictor, tok, params)
        req = RolloutRequest(prompt, SamplingParams(max_new_tokens=10, temperature=1.0, seed=5), budget=8)
        req.meta["logits_processors"] = [force_marker_at_3, ForceNewlineEvery3(nl), guide]
        engine.generate([req])
        assert {t for (_, _, t) in guide.changed} == expected


# ------------------------------------------------------------------------------ predictor training & io


def test_extract_features_positions_and_targets(engine: HFEngine) -> None:
    seq = engine.tokenizer.encode("Tom has 5 apples and gets 7 more. How many apples does Tom have?")
    data = extract_features(engine.model, [seq, seq[:8]], [(3, 9), (2, 7)], batch_size=2, feature_dtype=torch.float32)
    with torch.no_grad():
        hs = torch.stack(engine.model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states, 2)[0]
    first = data.seq_M == 0
    # positions 2..8 predict tokens 3..9; L = 9 - (p + 1) + 1 = 7, 6, ..., 1
    assert data.lengths_M[first].tolist() == [7, 6, 5, 4, 3, 2, 1]
    assert data.tokens_M[first].tolist() == seq[3:10]
    assert torch.allclose(data.features_MLD[first], hs[2:9], atol=1e-5)
    assert data.lengths_M[~first].tolist() == [6, 5, 4, 3, 2, 1]
    with pytest.raises(ValueError, match="region"):
        extract_features(engine.model, [seq[:5]], [(0, 3)])


def test_fit_reduces_loss_on_learnable_lengths() -> None:
    # remaining length is a function of the hidden states: a few steps must lower the NLL
    g = torch.Generator().manual_seed(0)
    M, seqs = 240, 24
    lengths = torch.randint(1, 200, (M,), generator=g).float()
    feats = torch.randn(M, 3, 16, generator=g) * 0.1
    feats[:, :, 0] = torch.log1p(lengths)[:, None]
    from rollout.budget_fit import BudgetData

    data = BudgetData(feats, torch.randint(0, 10, (M,), generator=g), lengths, torch.arange(M) % seqs)
    torch.manual_seed(0)
    net = GammaPredictor(PredictorConfig(16, 10, 3, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
    before = evaluate_predictor(net, data)["nll"]
    losses = fit_predictor(net, data, FitParams(epochs=4, lr=3e-3, batch_sequences=4))
    after = evaluate_predictor(net, data)["nll"]
    assert len(losses) == 4 * 6 and after < before - 0.5


def test_end_to_end_train_save_load(tiny_model_dir: str, tmp_path) -> None:
    out = tmp_path / "bg"
    summary = train_budget_predictor(
        tiny_model_dir, str(out), 6, samples_per_prompt=2, max_new_tokens=16, temperature=1.0,
        mode="think", think_end="e", concise_mix=0.0, val_fraction=0.25,
        predictor={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        fit=FitParams(epochs=3, lr=3e-3), feature_dtype="float32", seed=0, progress=False,
    )
    assert summary["train_positions"] > 0 and summary["steps"] > 0
    assert summary["after"]["train"]["nll"] < summary["before"]["train"]["nll"]
    net, meta = load_predictor(out)
    assert meta["guidance"]["think_end"] == "e" and meta["base_model"] == tiny_model_dir
    # round trip: a fresh copy computes the same Gamma parameters
    net2, _ = load_predictor(out / "budget_predictor.safetensors")
    x = torch.randn(5, 3, 64)
    with torch.no_grad():
        a1, l1 = net(x)
        a2, l2 = net2(x)
    assert torch.equal(a1, a2) and torch.equal(l1, l2)
    from transformers import AutoTokenizer

    guide = BudgetGuidance.from_pretrained(out, AutoTokenizer.from_pretrained(tiny_model_dir), min_lambda=1.0)
    assert guide.params.think_end == "e" and guide.params.min_lambda == 1.0
    assert guide.params.trigger_strings == ("\n",)
    # the sampled completions were saved; refitting on them samples nothing and sees the same data
    saved = load_completions(out / "completions.jsonl")
    assert len(saved) == 12 and {c.group_id for c in saved} == set(range(6))
    again = train_budget_predictor(
        tiny_model_dir, str(tmp_path / "refit"), 6, mode="think", think_end="e", concise_mix=0.0,
        val_fraction=0.25, predictor={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        fit=FitParams(epochs=3, lr=3e-3), feature_dtype="float32", seed=0, progress=False,
        completions_file=out / "completions.jsonl",
    )
    for k in ("completions", "traces", "train_positions", "val_positions", "completion_tokens_mean"):
        assert again[k] == summary[k], k
    assert again["after"]["train"]["nll"] == pytest.approx(summary["after"]["train"]["nll"], rel=1e-5)
    (tmp_path / "bad.jsonl").write_text((out / "completions.jsonl").read_text() + "{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl line 13"):
        load_completions(tmp_path / "bad.jsonl")


def test_save_load_linear_encoder(tmp_path) -> None:
    torch.manual_seed(0)
    net = GammaPredictor(PredictorConfig(8, 11, 4, encoder_type="linear")).eval()
    save_predictor(net, tmp_path, meta={"x": 1})
    back, meta = load_predictor(tmp_path)
    x = torch.randn(2, 4, 8)
    assert meta == {"x": 1}
    assert all(torch.equal(u, v) for u, v in zip(net(x), back(x)))
    with pytest.raises(ValueError, match="hidden states"):
        back(torch.randn(2, 3, 8))
    with pytest.raises(FileNotFoundError):
        load_predictor(tmp_path / "missing")


def test_regions_and_concise_augmentation(engine: HFEngine) -> None:
    tok = engine.tokenizer
    excl = tok.encode("!")[0]
    comp = tok.encode("2 + 3") + [excl] + tok.encode(" 5") + [tok.eos_token_id]
    k = comp.index(excl)
    assert think_region(4, comp, True, tok, think_end="!") == (4, 4 + k)
    assert think_region(4, comp, True, tok, think_end="</think>") == (4, 4 + len(comp) - 1)  # auto -> response
    assert think_region(4, comp, False, tok, think_end="</think>") is None  # truncated: end unknown
    assert think_region(4, comp, True, tok, think_end="</think>", mode="think") is None
    assert concise_text("<think>long\n**Final Answer**42</think>\n\nIt is 42") == (
        "<think>\nIt is 42\n\n**Final Answer**42</think>\n\nIt is 42")
    assert concise_text("long thought</think>It is 42") == "\nIt is 42\n</think>\n\nIt is 42"
    assert concise_text("no closed thought") is None
    c = Completion(prompt_ids=[1, 2, 3], token_ids=comp, logprobs=[0.0] * len(comp), finish_reason="stop")
    traces = build_traces([c], tok, [tok.eos_token_id], prompt_index=[0], think_end="!", concise_mix=1.0)
    assert traces[0].region == (3, 3 + k) and not traces[0].concise
    assert len(traces) == 2 and traces[1].concise
    first, last = traces[1].region
    assert "!" in tok.decode([traces[1].ids[last]]) and first == 3


def test_diagnostics_count_unreliable_and_changed_steps(engine: HFEngine, predictor: GammaPredictor) -> None:
    """A mask nothing passes falls back to the LM argmax: every guided step is counted unreliable and
    greedy output is the plain engine's; with the mask open the counters split the guided steps."""
    reqs = _requests(engine)
    for r in reqs:
        r.params = SamplingParams(max_new_tokens=r.params.max_new_tokens, temperature=0.0, n=1)
    plain = engine.generate(reqs)
    strict = BudgetGuidance(predictor, engine.tokenizer, GuidanceParams(min_lambda=1e9))
    for r in reqs:
        r.meta["logits_processors"] = [strict]
    out = engine.generate(reqs)
    assert strict.guided_row_steps > 0
    assert strict.unreliable_row_steps == strict.guided_row_steps and strict.changed_row_steps == 0
    assert [c.token_ids for c in out] == [c.token_ids for c in plain]
    loose = BudgetGuidance(predictor, engine.tokenizer, PERMISSIVE)
    for r in reqs:
        r.meta["logits_processors"] = [loose]
    engine.generate(reqs)
    assert loose.guided_row_steps > 0 and loose.unreliable_row_steps == 0
    assert 0 <= loose.changed_row_steps <= loose.guided_row_steps


def test_head_bias_starts_at_the_marginal_gamma() -> None:
    from rollout.budget import encode_length, gamma_moments, init_head_bias

    torch.manual_seed(0)
    cfg = PredictorConfig(16, 10, 3, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, head_bias=True)
    net = GammaPredictor(cfg)
    with torch.no_grad():
        net.alpha_head.weight.zero_()
        net.lam_head.weight.zero_()
    lengths = torch.tensor([5.0, 20.0, 60.0, 200.0])
    alpha, lam = init_head_bias(net, lengths)
    z = encode_length(lengths)
    assert alpha / lam == pytest.approx(float(z.mean()), rel=1e-6)  # Gamma mean = mean of z
    assert alpha / lam**2 == pytest.approx(float(z.var(unbiased=False)), rel=1e-6)
    a, lm = net.params_at(torch.randn(4, 3, 16), torch.tensor([0, 3, 7, 9]))
    assert a.tolist() == pytest.approx([alpha] * 4, rel=1e-5) and lm.tolist() == pytest.approx([lam] * 4, rel=1e-5)
    a_full, l_full = net(torch.randn(2, 3, 16))
    assert torch.allclose(a_full, torch.full_like(a_full, alpha), rtol=1e-5)
    assert gamma_moments(torch.tensor([3.0, 4.0, 5.0])) == pytest.approx((24.0, 6.0))
    with pytest.raises(ValueError, match="head_bias=True"):
        init_head_bias(GammaPredictor(PredictorConfig(16, 10, 3, hidden_size=32, num_layers=1, num_heads=2,
                                                      intermediate_size=64)), lengths)
