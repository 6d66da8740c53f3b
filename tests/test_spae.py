"""SPAE (docs/algorithms.md §2): worked example §2.7, segmentation §2.1, reference loop §2.6, real engine probes §2.2."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rlkit.algorithms import ADVANTAGES, AdvantageInputs, AdvantageOutput
from rlkit.algorithms.spae import (
    SPAEParams,
    difference_shaping,
    find_step_boundaries,
    pad_steps,
    potential_differences,
    saturation_counts,
    saturation_factor,
    spae_advantage,
    step_potential,
    think_region_length,
)
from rlkit.methods.step_probes import (
    ProbeParams,
    ProbeResult,
    TokenTexts,
    _boxed_content,
    _match_rates,
    probe_groups,
    run_step_probes,
    segment_responses,
)
from rollout.engine import Completion, RolloutRequest, SamplingParams

TOL = 5.1e-5  # the spec prints 4 decimals

# ------------------------------------------------------------------------- §2.7 worked example

ACC = [[0.05, 0.3, 0.98, 0.99, 0.99], [0.1, 0.6, 0.9], [0.0, 0.02, 0.01]]
CONF = [[0.2, 0.4, 0.95, 0.97, 0.98], [0.1, 0.5, 0.8], [0.3, 0.8, 0.9]]
LENS = [[3, 2, 2, 1, 2], [2, 3, 2], [2, 2, 3]]
BOUNDS = [[x - 1 for x in itertools.accumulate(lens)] for lens in LENS]  # last token of each step
PHI = [[-0.1600, -0.0700, 0.9365, 0.9654, 0.9703], [-0.0350, 0.2500, 0.7300], [-0.3000, -0.7660, -0.8815]]
DPHI = [[0, 0.0900, 1.0065, 0.0290, 0.0049], [0, 0.2850, 0.4800], [0, -0.4660, -0.1155]]
CSAT_R0 = [0, 0, 0, 1, 2]
F_R0 = [1, 1, 1, 0.6839, 0.5677]
G = [[-0.1646, -0.0781, 1.1814, -0.1373, -0.1601], [-0.1646, 0.1285, 0.3643], [-0.1646, -0.5369, -0.2681]]
A_STEP = [[0.2510, 0.2943, 0.9240, 0.1593, 0.1092], [0.2510, 0.3976, 0.5155], [-0.7490, -0.9351, -0.8007]]
A_FINAL = [[0.3962, 0.4710, 1.5595, 0.2377, 0.1511], [0.3962, 0.6495, 0.8533], [-1.3322, -1.6539, -1.4216]]


def _assert_extras_untouched(inp: AdvantageInputs) -> None:
    """Diagnostics come back in the AdvantageOutput; the estimator never writes ``inp.extras``."""
    assert "metrics" not in inp.extras and "token_maps" not in inp.extras


def _example_inputs(T: int = 10, tail: list[int] | None = None) -> AdvantageInputs:
    """The §2.7 batch: R = [1, 1, 0] in one group, step token counts LENS (+ optional tail tokens)."""
    tail = tail or [0, 0, 0]
    mask = torch.zeros(3, T)
    for i, lens in enumerate(LENS):
        mask[i, : sum(lens) + tail[i]] = 1
    return AdvantageInputs(
        rewards_B=torch.tensor([1.0, 1.0, 0.0]),
        group_ids_B=torch.tensor([7, 7, 7]),
        response_mask_BT=mask,
        extras={
            "spae_boundaries_BK": pad_steps(BOUNDS, -1, torch.long),
            "spae_acc_BK": pad_steps(ACC, 0.0, torch.float32),
            "spae_conf_BK": pad_steps(CONF, 0.0, torch.float32),
        },
    )


def _per_step(adv_BT: torch.Tensor) -> list[list[float]]:
    """Value at each step's boundary token (all tokens of a step share it)."""
    return [[float(adv_BT[i, b]) for b in bounds] for i, bounds in enumerate(BOUNDS)]


def _assert_close(got: list[list[float]], want: list[list[float]], tol: float = TOL) -> None:
    for g_row, w_row in zip(got, want, strict=True):
        assert g_row == pytest.approx(w_row, abs=tol)


def test_worked_example_step_quantities() -> None:
    """Φ, ΔΦ, C_sat, f and the shaping g of §2.7 from the pure building blocks."""
    acc, conf = pad_steps(ACC, 0.0, torch.float64), pad_steps(CONF, 0.0, torch.float64)
    step_mask = pad_steps([[1.0] * len(a) for a in ACC], 0.0, torch.float64)
    phi = step_potential(acc, conf) * step_mask
    _assert_close([phi[i, : len(r)].tolist() for i, r in enumerate(PHI)], PHI)
    dphi = potential_differences(phi, step_mask)
    _assert_close([dphi[i, : len(r)].tolist() for i, r in enumerate(DPHI)], DPHI)
    csat, total = saturation_counts(phi, step_mask, eps_sat=0.9)
    assert csat[0].tolist() == CSAT_R0 and csat[1:].abs().sum() == 0
    assert total.tolist() == [3, 0, 0]  # r0's steps 3, 4, 5 exceed 0.9
    f = saturation_factor(csat, alpha=0.5)
    assert f[0].tolist() == pytest.approx(F_R0, abs=TOL)  # 1 - 0.5(1 - e^-1) = 0.6839
    g = difference_shaping(dphi, step_mask)
    _assert_close([g[i, : len(r)].tolist() for i, r in enumerate(G)], G)
    # E_B[exp(ΔΦ̃)] = 1.5369 over the 11 steps; ΔΦ̃ spans [-0.4660, 1.0065]
    norm = (dphi[step_mask.bool()] + 0.4660) / (1.0065 + 0.4660)
    assert float(torch.exp(norm).mean()) == pytest.approx(1.5369, abs=2e-4)


def test_worked_example_step_advantage_before_standardisation() -> None:
    adv = spae_advantage(_example_inputs(), SPAEParams(standardize=False)).advantages_BT
    _assert_close(_per_step(adv), A_STEP)


def test_worked_example_final_advantage() -> None:
    inp = _example_inputs()
    out = spae_advantage(inp, SPAEParams())  # defaults: α = ξ = 0.5, ε_sat = 0.9, population std
    adv = out.advantages_BT
    _assert_close(_per_step(adv), A_FINAL)
    # every token of a step carries the step's value; token mean 0.0218, population std 0.5786
    for i in range(len(LENS)):
        starts = [0, *[b + 1 for b in BOUNDS[i][:-1]]]
        for s, b in zip(starts, BOUNDS[i]):
            assert torch.allclose(adv[i, s : b + 1], adv[i, b].expand(b + 1 - s))
    _assert_extras_untouched(inp)
    m = out.metrics
    assert m["spae/adv_mean_raw"] == pytest.approx(0.0218, abs=TOL)
    assert m["spae/adv_std_raw"] == pytest.approx(0.5786, abs=TOL)
    assert m["spae/saturation_count"] == 3.0
    assert m["spae/num_steps_mean"] == pytest.approx(11 / 3)
    valid = inp.response_mask_BT.bool()
    assert float(adv[valid].mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(adv[valid].std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    assert adv[:, 7:][~valid[:, 7:]].abs().sum() == 0  # zeros on padding


def test_token_maps_and_registry() -> None:
    inp = _example_inputs()
    entry = ADVANTAGES.get("spae")
    out = entry.fn(inp, ADVANTAGES.build_params("spae", {}))
    assert isinstance(out, AdvantageOutput)
    adv = out.advantages_BT
    assert ADVANTAGES.build_params("spae", {}) == SPAEParams(alpha=0.5, xi=0.5, eps_sat=0.9)
    assert getattr(entry.params, "needs_step_probes", False)
    _assert_extras_untouched(inp)
    maps = out.token_maps
    for key in ("spae/potential", "spae/step_boundary", "spae/sat_factor", "spae/shaping"):
        assert maps[key].shape == adv.shape
    assert maps["spae/step_boundary"].sum() == 11
    assert maps["spae/step_boundary"][0].nonzero().flatten().tolist() == BOUNDS[0]
    assert float(maps["spae/potential"][0, 5]) == pytest.approx(PHI[0][2], abs=TOL)  # token 5 is in step 3
    assert float(maps["spae/sat_factor"][0, 9]) == pytest.approx(F_R0[4], abs=TOL)
    with pytest.raises(ValueError, match="alpha"):
        ADVANTAGES.build_params("spae", {"alpha": 2.0})


def test_tail_tokens_and_responses_without_steps() -> None:
    """Tail tokens: f with C_sat over all K steps and g = 0; K = 0: plain group advantage (§2.4)."""
    inp = _example_inputs(T=14, tail=[3, 0, 0])
    inp.rewards_B = torch.tensor([1.0, 1.0, 0.0])
    adv = spae_advantage(inp, SPAEParams(standardize=False)).advantages_BT
    _assert_close(_per_step(adv), A_STEP)  # tail tokens do not enter the step statistics
    f_total = 1 - 0.5 * (1 - math.exp(-3))  # r0 has 3 saturated steps
    assert adv[0, 10:13].tolist() == pytest.approx([f_total / 3] * 3, abs=1e-6)

    # a 4th response in another group, no boundary: Â^Group only (singleton group -> baseline 0)
    inp2 = AdvantageInputs(
        rewards_B=torch.tensor([1.0, 0.0, 1.0]),
        group_ids_B=torch.tensor([0, 0, 1]),
        response_mask_BT=torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]),
        extras={"spae_boundaries_BK": torch.tensor([[0], [-1], [-1]]),
                "spae_acc_BK": torch.tensor([[0.5], [0.0], [0.0]]),
                "spae_conf_BK": torch.tensor([[0.5], [0.0], [0.0]])},
    )
    out2 = spae_advantage(inp2, SPAEParams(standardize=False))
    adv2 = out2.advantages_BT
    # one step in the batch: min-max range 0 -> g = 0; all f = 1
    assert torch.allclose(adv2, torch.tensor([[0.5, 0.5, 0.5, 0], [-0.5] * 4, [1, 1, 0, 0]]), atol=1e-6)
    assert out2.metrics["spae/no_step_frac"] == pytest.approx(2 / 3)
    _assert_extras_untouched(inp2)


def _reference_loop(rewards, groups, lens_T, bounds, acc, conf, p: SPAEParams, T: int) -> torch.Tensor:
    """Straight transcription of the §2.6 pseudo-code (plus the §2.4 tail/K=0 rules)."""
    B = len(rewards)
    base = []
    for i in range(B):
        members = [rewards[k] for k in range(B) if groups[k] == groups[i]]
        base.append(rewards[i] - (sum(members) / len(members) if len(members) > 1 else 0.0))
    phis, dphis, fs = [], [], []
    for i in range(B):
        phi = [1.5 * a * c + 0.5 * a - c for a, c in zip(acc[i], conf[i])]
        dphis.append([phi[k] - phi[k - 1] if k else 0.0 for k in range(len(phi))])
        fs.append([1 - p.alpha * (1 - math.exp(-sum(v > p.eps_sat for v in phi[:k]))) for k in range(len(phi) + 1)])
        phis.append(phi)
    flat = [d for row in dphis for d in row]
    lo, hi = min(flat), max(flat)
    norm = [[(d - lo) / (hi - lo) for d in row] for row in dphis]
    centre = sum(math.exp(x) for row in norm for x in row) / len(flat)
    out = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        k = 0
        for j in range(lens_T[i]):
            while k < len(bounds[i]) and bounds[i][k] < j:
                k += 1
            if k < len(bounds[i]):
                out[i, j] = base[i] * fs[i][k] + p.xi * (math.exp(norm[i][k]) - centre)
            else:
                out[i, j] = base[i] * fs[i][len(phis[i])]
    vals = torch.cat([out[i, : lens_T[i]] for i in range(B)])
    return torch.stack([torch.where(torch.arange(T) < lens_T[i], (out[i] - vals.mean()) /
                                    (vals.std(unbiased=False) + p.eps), torch.zeros(T)) for i in range(B)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_matches_reference_loop(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    B, T = 9, 30
    lens_T = torch.randint(5, T + 1, (B,), generator=gen).tolist()
    bounds, acc, conf = [], [], []
    for i in range(B):
        K = int(torch.randint(0, 6, (1,), generator=gen))
        pos = sorted(torch.randperm(lens_T[i], generator=gen)[:K].tolist())
        bounds.append(pos)
        acc.append(torch.rand(len(pos), generator=gen).tolist())
        conf.append(torch.rand(len(pos), generator=gen).tolist())
    rewards = torch.randint(0, 2, (B,), generator=gen).double().tolist()
    groups = [i // 3 for i in range(B)]
    mask = (torch.arange(T)[None] < torch.tensor(lens_T)[:, None]).double()
    p = SPAEParams(alpha=0.3, xi=0.7, eps_sat=0.5)
    inp = AdvantageInputs(torch.tensor(rewards), torch.tensor(groups), mask, extras={
        "spae_boundaries_BK": pad_steps(bounds, -1, torch.long),
        "spae_acc_BK": pad_steps(acc, 0.0, torch.float64), "spae_conf_BK": pad_steps(conf, 0.0, torch.float64)})
    got = spae_advantage(inp, p).advantages_BT
    want = _reference_loop(rewards, groups, lens_T, bounds, acc, conf, p, T)
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_token_weighted_shaping_scope() -> None:
    step = spae_advantage(_example_inputs(), SPAEParams(standardize=False)).advantages_BT
    tok_inp = _example_inputs()
    tok = spae_advantage(tok_inp, SPAEParams(standardize=False, shaping_scope="token")).advantages_BT
    # token-weighted E_B: exp(ΔΦ̃) weighted by step lengths; only the centring constant changes
    dphi = [d for row in DPHI for d in row]
    w = [n for row in LENS for n in row]
    e = [math.exp((d + 0.4660) / (1.0065 + 0.4660)) for d in dphi]
    shift = 0.5 * (sum(a * b for a, b in zip(e, w)) / sum(w) - sum(e) / len(e))
    assert torch.allclose(tok, (step - shift) * tok_inp.response_mask_BT, atol=2e-4)


def test_step_boundary_map_with_padded_steps() -> None:
    """A padded step (-1) must not erase a real boundary at position 0 in the token map."""
    inp = AdvantageInputs(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.ones(2, 4), extras={
        "spae_boundaries_BK": torch.tensor([[0, 2], [0, -1]]),
        "spae_acc_BK": torch.tensor([[0.2, 0.9], [0.1, float("nan")]]),  # padding values are ignored
        "spae_conf_BK": torch.tensor([[0.3, 0.8], [0.4, float("nan")]])})
    out = spae_advantage(inp, SPAEParams())
    assert torch.isfinite(out.advantages_BT).all()
    assert out.token_maps["spae/step_boundary"].tolist() == [[1, 0, 1, 0], [1, 0, 0, 0]]
    _assert_extras_untouched(inp)


def test_bad_extras_raise() -> None:
    inp = _example_inputs()
    del inp.extras["spae_conf_BK"]
    with pytest.raises(KeyError, match="spae_conf_BK"):
        spae_advantage(inp, SPAEParams())
    inp = _example_inputs()
    inp.extras["spae_boundaries_BK"] = torch.tensor([[2, 1], [0, -1], [-1, 3]])
    inp.extras["spae_acc_BK"] = inp.extras["spae_conf_BK"] = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="increasing|padding"):
        spae_advantage(inp, SPAEParams())
    inp.extras["spae_boundaries_BK"] = torch.tensor([[0, 12], [0, -1], [-1, -1]])
    with pytest.raises(ValueError, match="T=10"):
        spae_advantage(inp, SPAEParams())


# ------------------------------------------------------------------------- §2.1 segmentation


def test_segmentation_with_think_tags() -> None:
    toks = ["<think>", "Let", " x", ".\n\n", "So", " y", ".\n\n", "Then", ".", "\n\n", "</think>",
            "Answer", ".\n\n"]
    assert find_step_boundaries(toks) == [3, 6]  # "." + "\n\n" split: not a boundary token
    assert find_step_boundaries(toks, match="text") == [3, 6, 9]
    assert find_step_boundaries(toks, think_end=None) == [3, 6, 12]  # summary searched too
    assert find_step_boundaries(toks, max_steps=1) == [3]
    assert find_step_boundaries(toks, suffixes=(".\n\n", "\n\n")) == [3, 6, 9]
    # a think tag split over several tokens still ends the search region
    split = ["A", ".\n\n", "</", "think", ">", "B", ".\n\n"]
    assert think_region_length(split) == 2
    assert find_step_boundaries(split) == [1]


def test_segmentation_without_think_tags() -> None:
    toks = ["Step", " one", ".\n\n", "Step", " two", "!\n\n", "Done", ".\n\n"]
    assert find_step_boundaries(toks) == [2, 7]
    assert find_step_boundaries(toks, suffixes=("\n\n",)) == [2, 5, 7]
    assert find_step_boundaries([]) == []
    assert find_step_boundaries(["no", " steps"]) == []
    with pytest.raises(ValueError, match="suffixes"):
        find_step_boundaries(toks, suffixes=("",))


def test_segmentation_with_real_tokenizer(tiny_model_dir: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with_think = tok.encode("<think>Tom has 5 apples. He gets 7 more. </think> So 12.", add_special_tokens=False)
    no_think = tok.encode("Tom has 5 apples. He gets 7 more. So 12.", add_special_tokens=False)
    texts = TokenTexts(tok)
    p = ProbeParams(step_suffixes=(".",))  # this tiny BPE splits "." from whitespace
    got = segment_responses([with_think, no_think], texts, p)
    for ids, bounds, n_expected in zip([with_think, no_think], got, [2, 3]):
        assert len(bounds) == n_expected
        assert all(texts([ids[b]])[0].endswith(".") for b in bounds)
    assert "".join(texts(with_think)) == tok.decode(with_think)


# ------------------------------------------------------------------------- §2.2 probes on a real engine


class CountingEngine:
    """A real HFEngine behind a call counter (the engine itself is not replaced)."""

    def __init__(self, engine) -> None:
        self.engine, self.calls = engine, {"generate": 0, "score": 0}

    def generate(self, requests):
        self.calls["generate"] += 1
        return self.engine.generate(requests)

    def score(self, prefixes, continuations):
        self.calls["score"] += 1
        return self.engine.score(prefixes, continuations)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: str):
    from rollout.hf import HFEngine

    return HFEngine(tiny_model_dir, max_batch_size=64, seed=0)


PROBE = ProbeParams(step_suffixes=(".",))


def _groups(engine) -> list:
    """Two prompt groups: sampled responses plus one hand-written response with steps."""
    from rlkit.loop.experience import Group

    tok = engine.tokenizer
    prompts = [tok.encode("What is 5+7?"), tok.encode("Ann has 12 pens.")]
    comps = engine.generate([RolloutRequest(q, SamplingParams(max_new_tokens=24, n=2, seed=3)) for q in prompts])
    steps = tok.encode("<think>Tom has 5 apples. He gets 7 more. 5 + 7 = 12. </think> So \\boxed{12}.",
                       add_special_tokens=False)
    comps[0] = Completion(prompts[0], steps, [0.0] * len(steps), "stop")
    return [Group(row={"prompt": "a", "answer": "12"}, prompt_ids=prompts[0], completions=comps[:2]),
            Group(row={"prompt": "b", "answer": "$12$"}, prompt_ids=prompts[1], completions=comps[2:])]


def test_probes_end_to_end_one_call_per_kind(engine) -> None:
    from rlkit.loop.batch import build_batch

    groups = _groups(engine)
    counting = CountingEngine(engine)
    res = probe_groups(groups, [counting], engine.tokenizer, PROBE, seed=5)
    assert counting.calls == {"generate": 1, "score": 1}
    assert res.boundaries[0] == segment_responses([groups[0].completions[0].token_ids], engine.tokenizer, PROBE)[0]
    assert len(res.boundaries[0]) == 3  # the three "." inside <think>
    n_probes = sum(len(b) for b in res.boundaries)
    assert res.metrics["spae/probe_boundaries"] == n_probes
    assert 0 < res.metrics["spae/probe_gen_tokens"] <= n_probes * PROBE.num_samples * PROBE.max_new_tokens
    for accs, confs in zip(res.acc, res.conf):
        assert all(0.0 <= a <= 1.0 for a in accs) and all(0.0 < c <= 1.0 for c in confs)

    # advantages on the packed batch
    comps = [c for g in groups for c in g.completions]
    batch = build_batch([g.prompt_ids for g in groups for _ in g.completions], [c.token_ids for c in comps],
                        pad_id=engine.pad_id)
    inp = AdvantageInputs(rewards_B=torch.tensor([1.0, 0.0, 0.0, 1.0]), group_ids_B=torch.tensor([0, 0, 1, 1]),
                          response_mask_BT=batch.response_mask_BT, extras=res.extras())
    out = spae_advantage(inp, SPAEParams())
    adv = out.advantages_BT
    assert adv.shape == batch.response_mask_BT.shape
    assert torch.isfinite(adv).all() and adv[batch.response_mask_BT == 0].abs().sum() == 0
    assert out.metrics["spae/num_steps_mean"] == pytest.approx(n_probes / 4)
    _assert_extras_untouched(inp)


def test_probe_values_match_direct_model_computation(engine) -> None:
    """Acc = mean_m p(y*_m | h, y*_<m) by a plain forward; Conf from the same seeded samples."""
    from rlkit.loop.experience import step_seed

    tok = engine.tokenizer
    prompt = tok.encode("What is 5+7?")
    resp = tok.encode("<think>Tom has 5 apples. He gets 7 more.</think> 12", add_special_tokens=False)
    res = run_step_probes(engine, tok, [prompt], [resp], ["12"], PROBE, seed=11)
    b = res.boundaries[0][1]
    h = prompt + resp[: b + 1] + tok.encode(PROBE.probe, add_special_tokens=False)
    y = tok.encode("12", add_special_tokens=False)
    with torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([h + y])).logits[0].float()
    logp = torch.log_softmax(logits[len(h) - 1 : len(h) - 1 + len(y)], -1)
    acc = float(logp.gather(-1, torch.tensor(y)[:, None]).exp().mean())
    assert res.acc[0][1] == pytest.approx(acc, rel=1e-4)

    params = SamplingParams(max_new_tokens=10, temperature=0.6, n=5, return_entropy=True, seed=step_seed(11, 0, 1))
    conf = 0.0
    for c in engine.generate([RolloutRequest(h, params)]):
        with torch.no_grad():
            lg = engine.model(input_ids=torch.tensor([h + c.token_ids])).logits[0].float()
        lp = torch.log_softmax(lg[len(h) - 1 : len(h) - 1 + len(c.token_ids)] / 0.6, -1)
        conf += math.exp(-float(-(lp.exp() * lp).sum(-1).mean())) / 5
    assert res.conf[0][1] == pytest.approx(conf, rel=1e-3)


def test_probes_shard_over_engines(engine, tiny_model_dir: str) -> None:
    from rollout.hf import HFEngine

    groups = _groups(engine)
    one = probe_groups(groups, engine, engine.tokenizer, PROBE, seed=2)
    engines = [CountingEngine(engine), CountingEngine(HFEngine(tiny_model_dir, max_batch_size=3, seed=9))]
    two = probe_groups(groups, engines, engine.tokenizer, PROBE, seed=2)
    assert [e.calls for e in engines] == [{"generate": 1, "score": 1}] * 2
    assert two.boundaries == one.boundaries
    for a, b in zip(two.acc + two.conf, one.acc + one.conf):
        assert a == pytest.approx(b, rel=1e-4)


def test_rows_without_answer_and_sampled_accuracy(engine) -> None:
    tok = engine.tokenizer
    prompt = tok.encode("What is 5+7?")
    resp = tok.encode("A. B. C.", add_special_tokens=False)
    counting = CountingEngine(engine)
    p = ProbeParams(step_suffixes=(".",), acc_source="sampled", num_samples=4)
    res = run_step_probes(counting, tok, [prompt, prompt], [resp, resp], ["12", None], p)
    assert counting.calls == {"generate": 1, "score": 0}  # no teacher forcing in "sampled" mode
    assert res.boundaries[1] == [] and len(res.boundaries[0]) == 3
    assert all(a * 4 == int(a * 4) for a in res.acc[0])  # a share of 4 samples
    assert res.metrics["spae/probe_rows_no_answer"] == 1
    assert "spae/probe_match_rate" in res.metrics
    extras = res.extras()
    assert extras["spae_boundaries_BK"].tolist()[1] == [-1, -1, -1]


def test_probe_answer_matching() -> None:
    assert _boxed_content("12}.\n") == "12"
    assert _boxed_content("\\frac{1}{2}} rest") == "\\frac{1}{2}"
    assert _boxed_content("12") == "12"  # unclosed within the 10 probe tokens
    comps = [Completion([1], [2], [0.0], "stop", text=t) for t in ("12}", "\\frac{24}{2}}", "13}", "")]
    assert _match_rates([comps], ["12"]) == [0.5]


def test_probe_result_extras_shapes() -> None:
    res = ProbeResult(boundaries=[[1, 4], [], [0]], acc=[[0.1, 0.2], [], [0.3]], conf=[[0.5, 0.6], [], [0.7]])
    ex = res.extras()
    assert ex["spae_boundaries_BK"].tolist() == [[1, 4], [-1, -1], [0, -1]]
    assert ex["spae_acc_BK"].dtype == torch.float32 and ex["spae_conf_BK"].shape == (3, 2)
    empty = ProbeResult(boundaries=[[], []], acc=[[], []], conf=[[], []]).extras()
    assert empty["spae_boundaries_BK"].shape == (2, 0)
    inp = AdvantageInputs(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.ones(2, 3), extras=empty)
    adv = spae_advantage(inp, SPAEParams(standardize=False)).advantages_BT
    assert adv.tolist() == [[0.5] * 3, [-0.5] * 3]


@pytest.mark.slow
def test_probes_through_ray_rollout_workers(engine, tiny_model_dir: str) -> None:
    """The trainer's engines are Ray ``RolloutWorker`` handles: same values, both kinds concurrently."""
    import ray

    from rlkit.config import load_config
    from rlkit.orchestration.ray_actors import RolloutWorker, init_ray

    groups = _groups(engine)
    local = probe_groups(groups, engine, engine.tokenizer, PROBE, seed=4)
    init_ray(load_config(None, ["cluster.num_cpus=2"]))
    try:
        workers = [ray.remote(num_cpus=0.5)(RolloutWorker).remote("hf", tiny_model_dir, {"seed": k}, 1)
                   for k in range(2)]
        remote = probe_groups(groups, workers, engine.tokenizer, PROBE, seed=4)
    finally:
        ray.shutdown()
    assert remote.boundaries == local.boundaries
    assert remote.metrics["spae/probe_engine_calls"] == 4  # one generate + one score per worker
    for a, b in zip(remote.acc + remote.conf, local.acc + local.conf):
        assert a == pytest.approx(b, rel=1e-4)
