"""AnytimeReasoner / BRPO (docs/algorithms.md §6b): prior, summary prompts, advantages, engine round trip."""

from __future__ import annotations

import doctest

import pytest
import torch

import rlkit.algorithms.brpo as brpo_mod
from rlkit.algorithms import ADVANTAGES, AdvantageInputs, AdvantageOutput
from rlkit.algorithms.brpo import (
    BudgetPrior,
    brpo_summary_advantages,
    brpo_thinking_advantages,
    budget_probs,
    budget_rewards,
    budget_support,
    plan_summary_prompts,
)
from rlkit.loop.batch import build_batch
from rlkit.methods.anytime import (
    AnytimeParams,
    brpo_rows,
    sample_summaries,
    summary_scores,
    thinking_params,
    thinking_status,
)
from rollout.engine import Completion, RolloutRequest, SamplingParams

# docs/algorithms.md §6b worked example: G = 3, S = 4, uniform p = 0.25
RBAR = torch.tensor([[0, 0.5, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.float64)
P_UNI = torch.full((4,), 0.25, dtype=torch.float64)
# columns (Ret, V2, V1, baseline, A^BRPO, Ret - V2), exact fractions of the table's rounded values:
#   Ret_0 = 0.25 (0 + .5 + 1 + 1) = 0.625 ; V2_0 = (0.625 + 0.25 + 0) / 3 = 0.2917
#   V1_{0,2} = (0*1 + .5*2) / 3 * 0.5 = 1/6 ; V1_{0,3} = (0 + 1 + 4) / 7 * 0.25 = 5/28
#   baseline_{0,1} = (1 * 0 + 3 * 0.2917) / 4 = 0.21875
TABLE = {
    0: [(0.625, 7 / 24, 0, 7 / 24, 1 / 3, 1 / 3),
        (0.625, 7 / 24, 0, 7 / 32, 0.40625, 1 / 3),
        (0.5, 0.25, 1 / 6, 5 / 24, 7 / 24, 0.25),
        (0.25, 1 / 6, 5 / 28, (3 * 5 / 28 + 1 / 6) / 4, 0.25 - (3 * 5 / 28 + 1 / 6) / 4, 1 / 12)],
    1: [(0.25, 7 / 24, 0, 7 / 24, -1 / 24, -1 / 24),
        (0.25, 7 / 24, 0, 7 / 32, 1 / 32, -1 / 24),
        (0.25, 0.25, 0, 0.125, 0.125, 0.0),
        (0.25, 1 / 6, 0, 1 / 24, 5 / 24, 1 / 12)],
    2: [(0, 7 / 24, 0, 7 / 24, -7 / 24, -7 / 24),
        (0, 7 / 24, 0, 7 / 32, -7 / 32, -7 / 24),
        (0, 0.25, 0, 0.125, -0.125, -0.25),
        (0, 1 / 6, 0, 1 / 24, -1 / 24, -1 / 6)],
}
ROUNDED = {  # the spec's printed A^BRPO column, to 4 decimals
    0: [0.3333, 0.4062, 0.2917, 0.0744], 1: [-0.0417, 0.0312, 0.1250, 0.2083], 2: [-0.2917, -0.2188, -0.1250, -0.0417],
}


def _col(i: int) -> torch.Tensor:
    return torch.tensor([[row[i] for row in TABLE[g]] for g in range(3)], dtype=torch.float64)


def test_doctests() -> None:
    assert doctest.testmod(brpo_mod).failed == 0


# ----------------------------------------------------------------------------- prior


def test_budget_prior() -> None:
    assert budget_support(8000, 4) == [2000, 4000, 6000, 8000]
    assert budget_support(16000, 2) == [8000, 16000]
    assert budget_support(100, 3) == [33, 66, 100]
    assert budget_probs("uniform", [1, 2, 3, 4]).tolist() == [0.25] * 4
    assert budget_probs("linear", [2000, 4000, 6000, 8000]).tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert budget_probs("base", [1, 2, 3]).tolist() == [0.0, 0.0, 1.0]
    v = BudgetPrior.validation(16000)
    assert v.budgets == [4000, 8000, 12000, 16000] and v.probs_S.tolist() == [0.25] * 4
    with pytest.raises(ValueError, match="unknown budget prior 'linaer'"):
        BudgetPrior(probs="linaer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_support <= b_max"):
        budget_support(3, 4)


# ----------------------------------------------------------------------------- thinking advantages


def test_worked_example_table() -> None:
    out = brpo_thinking_advantages(RBAR, P_UNI, torch.zeros(3, dtype=torch.long), "brpo")
    for i, key in enumerate(["ret", "v2", "v1", "baseline", "adv"]):
        torch.testing.assert_close(out[key], _col(i), atol=1e-12, rtol=0)
    torch.testing.assert_close(out["ret"] - out["v2"], _col(5), atol=1e-12, rtol=0)
    rounded = torch.tensor([ROUNDED[g] for g in range(3)], dtype=torch.float64)
    assert (out["adv"] - rounded).abs().max() <= 5.1e-5


@pytest.mark.parametrize("mode,baseline_col", [("v1only", 2), ("v2only", 1), ("none", None)])
def test_other_variance_reductions(mode: str, baseline_col: int | None) -> None:
    out = brpo_thinking_advantages(RBAR, P_UNI, torch.zeros(3, dtype=torch.long), mode)
    expected = _col(0) - (0 if baseline_col is None else _col(baseline_col))
    torch.testing.assert_close(out["adv"], expected, atol=1e-12, rtol=0)


def _loop_reference(rbar, probs, gids, mode):
    """Direct transcription of docs/algorithms.md §6b, one response and segment at a time."""
    N, S = rbar.shape
    p = probs / probs.sum()
    adv = torch.zeros(N, S, dtype=torch.float64)
    for n in range(N):
        members = [m for m in range(N) if gids[m] == gids[n]]
        for s in range(S):
            ret = sum(p[k] * rbar[n, k] for k in range(s, S))
            v2 = 0.0
            if len(members) > 1:
                v2 = sum(sum(p[k] * rbar[m, k] for k in range(s, S)) for m in members) / len(members)
            v1 = 0.0
            if s > 0:
                v1 = sum(2**k * rbar[n, k] for k in range(s)) / sum(2**k for k in range(s)) * p[s:].sum()
            base = {"brpo": (s * v1 + (S - s) * v2) / S, "v1only": v1, "v2only": v2, "none": 0.0}[mode]
            adv[n, s] = ret - base
    return adv


@pytest.mark.parametrize("mode", ["brpo", "v1only", "v2only", "none"])
def test_vectorised_matches_loop_over_interleaved_groups(mode: str) -> None:
    g = torch.Generator().manual_seed(0)
    rbar = (torch.randint(0, 5, (9, 3), generator=g) / 4).to(torch.float64)
    gids = torch.tensor([4, -1, 4, 9, -1, 4, 9, 9, 2])  # group 2 is a singleton -> V2 = 0
    probs = budget_probs("linear", [10, 20, 30])
    got = brpo_thinking_advantages(rbar, probs, gids, mode)["adv"]
    torch.testing.assert_close(got, _loop_reference(rbar, probs, gids.tolist(), mode), atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- summary advantages


def test_summary_advantage_worked_example() -> None:
    # 4 summaries at budget 4000 of g0 score [1, 0, 1, 0] -> mean 0.5 -> [0.5, -0.5, 0.5, -0.5]
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0])
    z = torch.zeros(4, dtype=torch.long)
    adv = brpo_summary_advantages(scores, z, torch.ones(4, dtype=torch.long), torch.ones(4, dtype=torch.long),
                                  torch.zeros(1, 4), torch.zeros(1, dtype=torch.long))
    assert adv.tolist() == [0.5, -0.5, 0.5, -0.5]


def test_summary_advantage_shared_prompt_and_singletons() -> None:
    # parent 0: prompt 0 (budget 0) x2 ; shared prompt 1 (budgets 1, 2) x2 each -> one baseline of 4
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    parent = torch.zeros(6, dtype=torch.long)
    prompt = torch.tensor([0, 0, 1, 1, 1, 1])
    budget = torch.tensor([0, 0, 1, 1, 2, 2])
    rbar = budget_rewards(scores, parent, budget, 1, 3)
    assert rbar.tolist() == [[1.0, 0.5, 0.0]]
    adv = brpo_summary_advantages(scores, parent, prompt, budget, rbar, torch.zeros(1, dtype=torch.long))
    assert adv.tolist() == [0.0, 0.0, 0.75, -0.25, -0.25, -0.25]


def test_summary_advantage_a1_uses_group_mean_and_grpo_keeps_last() -> None:
    # A = 1: G = 2 responses, S = 2 budgets; baseline = mean over the group at the same budget
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0])
    parent = torch.tensor([0, 0, 1, 1])
    budget = torch.tensor([0, 1, 0, 1])
    rbar = budget_rewards(scores, parent, budget, 2, 2)
    gids = torch.tensor([5, 5])
    adv = brpo_summary_advantages(scores, parent, budget, budget, rbar, gids)
    assert adv.tolist() == [0.5, 0.0, -0.5, 0.0]
    grpo = brpo_summary_advantages(scores, parent, budget, budget, rbar, gids, method="grpo")
    assert grpo.tolist() == [0.0, 0.0, 0.0, 0.0]  # last-budget summaries: 1 - mean(1, 1) = 0
    scores2 = torch.tensor([1.0, 1.0, 0.0, 0.0])
    rbar2 = budget_rewards(scores2, parent, budget, 2, 2)
    assert brpo_summary_advantages(scores2, parent, budget, budget, rbar2, gids, method="grpo").tolist() == [
        0.0, 0.5, 0.0, -0.5]


# ----------------------------------------------------------------------------- summary prompts

T, F = [90], [91]  # truncation marker tokens, final-answer delimiter tokens


def _plan(z, closed, budgets=(2, 4, 6), eos_ended=False):
    return plan_summary_prompts([1, 2], z, list(budgets), closed=closed, truncation_ids=T, answer_ids=F,
                                eos_ended=eos_ended)


def test_plan_closed_thinking_shares_the_end_prompt() -> None:
    plans = _plan([10, 11, 12, 99], closed=True)  # |z| = 4, closed: budgets 4 and 6 share the full z
    assert [p.prompt_ids for p in plans] == [[1, 2, 10, 11, 90, 91], [1, 2, 10, 11, 12, 99, 91]]
    assert [p.budget_indices for p in plans] == [(0,), (1, 2)]
    assert [(p.prefix_len, p.truncated, p.dead) for p in plans] == [(2, True, False), (4, False, False)]


def test_plan_unclosed_and_eos_ended() -> None:
    trunc = _plan([10, 11, 12, 13, 14, 15], closed=False)  # hit b_max without closing
    assert [p.prompt_ids[2:] for p in trunc] == [[10, 11, 90, 91], [10, 11, 12, 13, 90, 91],
                                                 [10, 11, 12, 13, 14, 15, 90, 91]]
    assert all(p.truncated and not p.dead for p in trunc)
    eos = _plan([10, 11, 12, 0], closed=False, eos_ended=True)
    assert [(p.budget_indices, p.dead) for p in eos] == [((0,), False), ((1, 2), True)]
    with pytest.raises(ValueError, match="strictly increasing"):
        _plan([1], closed=True, budgets=(4, 2))


def test_thinking_status() -> None:
    def comp(text, reason, last):
        return Completion([1], [5, last], [0.0, 0.0], reason, text=text)
    assert thinking_status(comp("a</think>", "stop", 7), "</think>", [0]) == (True, False)
    assert thinking_status(comp("a", "stop", 0), "</think>", [0]) == (False, True)
    assert thinking_status(comp("a", "length", 7), "</think>", [0]) == (False, False)


def test_thinking_params() -> None:
    ap = AnytimeParams(b_max=64, n_support=2)
    p = thinking_params(SamplingParams(max_new_tokens=8, temperature=0.7, stop=("\n\n",)), ap)
    assert (p.max_new_tokens, p.temperature, p.stop) == (64, 0.7, ("\n\n", "</think>"))
    assert thinking_params(p, ap).stop == p.stop  # not added twice
    assert ap.prior.budgets == [32, 64]


# ----------------------------------------------------------------------------- registered advantage


def _toy_inputs():
    # 2 thinking rows (group 0) of lengths 5 and 3, budgets [2, 4, 6], then 3 summary rows of row 0
    rbar = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]],
                        dtype=torch.float32)
    extras = {
        "brpo_kind_B": torch.tensor([0, 0, 1, 1, 1]),
        "brpo_budget_rewards_BS": torch.cat([rbar, torch.zeros(3, 3, dtype=torch.float64)]),
        "brpo_budgets_S": torch.tensor([2, 4, 6]),
        "brpo_probs_S": torch.full((3,), 1 / 3),
        "brpo_parent_B": torch.tensor([-1, -1, 0, 0, 0]),
        "brpo_prompt_B": torch.tensor([-1, -1, 1, 1, 1]),
        "brpo_budget_index_B": torch.tensor([-1, -1, 1, 1, 1]),
    }
    rewards = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0])
    return AdvantageInputs(rewards_B=rewards, group_ids_B=torch.tensor([0, 0, 9, 9, 9]), response_mask_BT=mask,
                           extras=extras), rbar


def test_registered_brpo_places_segment_and_summary_advantages() -> None:
    inp, rbar = _toy_inputs()
    extras_before = dict(inp.extras)
    out = ADVANTAGES.get("brpo").fn(inp, ADVANTAGES.build_params("brpo", {}))
    assert isinstance(out, AdvantageOutput)
    adv = out.advantages_BT
    parts = brpo_thinking_advantages(rbar, torch.full((3,), 1 / 3), torch.tensor([0, 0]))["adv"]
    seg = [0, 0, 1, 1, 2]
    expected_think = torch.stack([parts[0, seg], parts[1, seg]]).float() * inp.response_mask_BT[:2]
    torch.testing.assert_close(adv[:2], expected_think)
    # summaries of prompt 1 score [1, 1, 0] -> baseline 2/3
    torch.testing.assert_close(adv[2:], torch.tensor([[1 / 3, 1 / 3, 0, 0, 0], [1 / 3, 0, 0, 0, 0],
                                                      [-2 / 3, -2 / 3, -2 / 3, 0, 0]]))
    m = out.metrics
    assert m["brpo/score@4"] == pytest.approx(0.5) and "brpo/summary_adv_abs_mean" in m
    seg_map = out.token_maps["brpo_segment"]
    assert seg_map[0].tolist() == [0, 0, 1, 1, 2] and seg_map[2].tolist() == [-1] * 5
    # diagnostics are returned, the inputs are not modified
    assert inp.extras.keys() == extras_before.keys() and "metrics" not in inp.extras
    assert all(inp.extras[k] is v for k, v in extras_before.items())
    with pytest.raises(ValueError, match="unknown parameter 'variance'"):
        ADVANTAGES.build_params("brpo", {"variance": "none"})


def test_registered_brpo_missing_extras() -> None:
    inp, _ = _toy_inputs()
    del inp.extras["brpo_budgets_S"]
    with pytest.raises(KeyError, match="needs inp.extras\\['brpo_budgets_S'\\]"):
        ADVANTAGES.get("brpo").fn(inp, ADVANTAGES.build_params("brpo", {}))


# ----------------------------------------------------------------------------- engine end to end


class _CountingEngine:
    """The real HFEngine, counting generate calls (checks the 'one call per engine' contract)."""

    def __init__(self, engine):
        self.engine, self.calls = engine, 0

    def generate(self, requests):
        self.calls += 1
        return self.engine.generate(requests)


@pytest.fixture(scope="module")
def hf_engine(tiny_model_dir: str):
    from rollout.hf import HFEngine

    return HFEngine(tiny_model_dir, max_batch_size=64, seed=0)


def test_sample_summaries_end_to_end(hf_engine) -> None:
    tok = hf_engine.tokenizer
    ap = AnytimeParams(b_max=12, n_support=3, budget_probs="linear", n_summary=2, summary_max_new_tokens=5)
    questions = [tok.encode("What is 2+3?"), tok.encode("Ann has 12 pens.")]
    think = SamplingParams(max_new_tokens=ap.b_max, temperature=1.0, n=2, seed=11, stop=(ap.think_end,))
    thinking = hf_engine.generate([RolloutRequest(q, think, group_id=i) for i, q in enumerate(questions)])
    # the random model never closes its thinking: add a closed one (budgets 8 and 12 share its end
    # prompt) and one that ended with EOS (its end prompt is dead) to the second group
    z = thinking[2].token_ids
    closed_ids = z[:5] + tok.encode(ap.think_end, add_special_tokens=False)
    thinking += [
        Completion(questions[1], closed_ids, [-1.0] * len(closed_ids), "stop", group_id=1, text="x" + ap.think_end),
        Completion(questions[1], z[:6] + [hf_engine.eos_ids[0]], [-1.0] * 7, "stop", group_id=1, text="x"),
    ]
    group_ids = [c.group_id for c in thinking]
    engines = [_CountingEngine(hf_engine), _CountingEngine(hf_engine)]
    samples, plans = sample_summaries(engines, thinking, ap, tokenizer=tok, seed=5)
    assert [e.calls for e in engines] == [1, 1]

    trunc = tok.encode(ap.truncation_text, add_special_tokens=False)
    answer = tok.encode(ap.answer_delimiter, add_special_tokens=False)
    expected = 0
    for n, c in enumerate(thinking):
        closed, eos_ended = thinking_status(c, ap.think_end, hf_engine.eos_ids)
        assert plans[n] == plan_summary_prompts(c.prompt_ids, c.token_ids, [4, 8, 12], closed=closed,
                                                truncation_ids=trunc, answer_ids=answer, eos_ended=eos_ended)
        expected += sum(2 for p in plans[n] if not p.dead)  # A = 2 per prompt, shared by its budgets
    assert len(samples) == expected
    assert [p.budget_indices for p in plans[4]] == [(0,), (1, 2)] and not plans[4][1].truncated
    assert [p.dead for p in plans[5]] == [False, True]
    assert {s.budget_index for s in samples if s.parent == 5} == {0}
    for s in samples:
        sp = plans[s.parent][s.prompt_index]
        assert s.budget_index in sp.budget_indices and not sp.dead
        assert s.completion.prompt_ids == sp.prompt_ids == s.prompt_ids
        assert 1 <= len(s.completion.token_ids) <= 5
    assert [(s.parent, s.budget_index) for s in samples] == sorted((s.parent, s.budget_index) for s in samples)
    # reproducible: same seed -> same summaries
    again, _ = sample_summaries([hf_engine], thinking, ap, tokenizer=tok, seed=5)
    assert [s.completion.token_ids for s in again] == [s.completion.token_ids for s in samples]

    # score with a deterministic "verifier", build the batch and the advantages
    correct = [float(len(s.completion.token_ids) % 2) for s in samples]
    scores = summary_scores(samples, correct, ap.think_end)
    rows = brpo_rows(thinking, group_ids, samples, scores, ap)
    batch = build_batch(rows.prompts, rows.responses, pad_id=hf_engine.pad_id, rollout_logprobs=rows.logprobs)
    inp = AdvantageInputs(rows.rewards_B, rows.group_ids_B, batch.response_mask_BT, extras=rows.extras)
    adv = ADVANTAGES.get("brpo").fn(inp, ADVANTAGES.build_params("brpo", {})).advantages_BT
    N = len(thinking)
    assert adv.shape == batch.response_mask_BT.shape
    assert bool((adv[batch.response_mask_BT == 0] == 0).all())
    parts = brpo_thinking_advantages(rows.rbar_NS, ap.prior.probs_S, torch.tensor(group_ids))["adv"]
    seg = brpo_mod.segment_index(torch.tensor([4, 8, 12]), adv.shape[1])
    for n in range(N):
        L = len(thinking[n].token_ids)
        torch.testing.assert_close(adv[n, :L], parts[n, seg[:L]].float())
    # r̄ is the mean score per (thinking, budget); dead budgets score 0
    for n in range(N):
        for j in range(3):
            vals = [sc for s, sc in zip(samples, scores) if s.parent == n and j in s.budgets]
            assert float(rows.rbar_NS[n, j]) == pytest.approx(sum(vals) / len(vals) if vals else 0.0)


def test_budgets_beyond_a_short_thinking_share_one_set_of_summaries(hf_engine) -> None:
    """A thinking that closed before the first budget has one summary prompt for all S budgets: the
    paper samples A summaries for it, not S * A, and trains each once. Before the fix: 12 summaries
    (3 budgets x A = 4), i.e. 3x the samples and 3x the weight in the loss."""
    tok = hf_engine.tokenizer
    ap = AnytimeParams(b_max=24, n_support=3, budget_probs="uniform", n_summary=4, summary_max_new_tokens=4)
    q = tok.encode("What is 2+3?")
    z = tok.encode("5", add_special_tokens=False) + tok.encode(ap.think_end, add_special_tokens=False)
    assert len(z) < ap.prior.budgets[0]
    short = Completion(q, z, [-1.0] * len(z), "stop", group_id=0, text="5" + ap.think_end)
    samples, (plan,) = sample_summaries([hf_engine], [short], ap, tokenizer=tok, seed=3)
    assert [sp.budget_indices for sp in plan] == [(0, 1, 2)]
    assert len(samples) == 4 and all(s.budgets == (0, 1, 2) and s.budget_index == 2 for s in samples)
    scores = [1.0, 0.0, 1.0, 1.0]
    rows = brpo_rows([short], [0], samples, scores, ap)
    assert len(rows.responses) == 1 + 4  # the thinking and each summary once
    torch.testing.assert_close(rows.rbar_NS, torch.full((1, 3), 0.75, dtype=torch.float64))
