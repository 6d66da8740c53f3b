"""Length shapers (docs/algorithms.md §6a, §6d, §6e, §6f, budget penalty) and budget prompts: worked examples.

Every worked example feeds ``rewards = 1[correct]`` (a single 0/1 accuracy verifier), so the shaped
reward must equal the paper's total reward exactly.
"""

from __future__ import annotations

import doctest
import json
import math

import pytest

import rewards.budget_prompt as budget_prompt
import rewards.length as length
from rewards.budget_prompt import (
    BudgetAssignment,
    BudgetPromptParams,
    apply_budget,
    budget_params,
    sample_budget,
)
from rewards.length import (
    SHAPERS,
    KimiParams,
    LengthContext,
    LengthShaping,
    build_shaper,
    dapo_overlong_penalty,
)


def _ctx(lengths, correct, **kw) -> LengthContext:
    kw.setdefault("max_len", 100000)
    return LengthContext(rewards=[float(c) for c in correct], correct=[bool(c) for c in correct],
                         lengths=list(lengths), **kw)


def _approx(values, abs=1e-9):
    return pytest.approx(values, abs=abs)


def test_doctests() -> None:
    for mod in (length, budget_prompt):
        assert doctest.testmod(mod).failed == 0


def test_registry_names_and_errors() -> None:
    assert SHAPERS.names() == ["budget_penalty", "dapo_overlong", "hapo_history", "kimi", "l1_dual", "l1_exact",
                               "l1_max"]
    with pytest.raises(KeyError, match="Did you mean 'kimi'"):
        build_shaper("kimmi")
    with pytest.raises(ValueError, match="Did you mean 'w_lr'.*Valid parameters: w_lr, mode"):
        build_shaper("hapo_history", {"wlr": 0.5})
    with pytest.raises(ValueError, match=r"w_lr must be in \[0, 1\]"):
        build_shaper("hapo_history", {"w_lr": 1.5})
    with pytest.raises(ValueError, match="must be \\{name"):
        LengthShaping.from_config([{"name": "kimi", "weight": 1.0}])


# ----------------------------------------------------------------------------- §6e DAPO


def test_dapo_overlong_worked_example() -> None:
    # L_max 20480, L_cache 4096: 0 up to 16384, then (16384 - |y|) / 4096
    shaper = build_shaper("dapo_overlong", {"buffer_len": 4096})
    ctx = _ctx([16000, 16384, 18432, 20480], [1, 1, 0, 1], max_len=20480)
    assert shaper.terms(ctx) == _approx([0.0, 0.0, -0.5, -1.0])
    assert shaper(ctx) == _approx([1.0, 1.0, -0.5, 0.0])
    # the plain function keeps its API (used by rlkit.loop.experience)
    assert dapo_overlong_penalty(18432, max_len=20480, buffer_len=4096, penalty_factor=0.5) == pytest.approx(-0.25)


def test_dapo_overlong_buffer_must_fit() -> None:
    with pytest.raises(ValueError, match="buffer_len .* must be < max_len"):
        build_shaper("dapo_overlong", {"buffer_len": 64}).terms(_ctx([10], [1], max_len=64))


# ----------------------------------------------------------------------------- §6d Kimi


def test_kimi_worked_example() -> None:
    # min 100, max 400: lam = 0.5 - (len - 100)/300 = [0.5, -0.5, 0.3333, -0.1667]
    # wrong answers keep min(0, lam): [0, -0.5, 0.3333, -0.1667]
    shaper = build_shaper("kimi")
    ctx = _ctx([100, 400, 150, 300], [0, 1, 1, 0], group_ids=[0, 0, 0, 0], step=1)
    assert shaper.terms(ctx) == _approx([0.0, -0.5, 1 / 3, -1 / 6])
    assert shaper(ctx) == _approx([0.0, 0.5, 4 / 3, -1 / 6])


def test_kimi_groups_are_independent_and_equal_lengths_give_zero() -> None:
    shaper = build_shaper("kimi", {"weight": 0.5})
    ctx = _ctx([100, 50, 400, 50, 150, 300], [0, 1, 1, 0, 1, 0], group_ids=[7, 3, 7, 3, 7, 7], step=1)
    # group 7 is the worked example (x 0.5); group 3 has equal lengths -> 0
    assert shaper.terms(ctx) == _approx([0.0, 0.0, -0.25, 0.0, 1 / 6, -1 / 12])


def test_kimi_warmup_schedule() -> None:
    p = KimiParams(weight=0.8, delay_steps=10, ramp_steps=4)
    assert [p.weight_at(s) for s in (1, 10, 11, 12, 14, 100)] == _approx([0.0, 0.0, 0.2, 0.4, 0.8, 0.8])
    shaper = build_shaper("kimi", {"weight": 0.8, "delay_steps": 10, "ramp_steps": 4})
    base = dict(group_ids=[0, 0, 0, 0])
    assert shaper.terms(_ctx([100, 400, 150, 300], [0, 1, 1, 0], step=10, **base)) == _approx([0.0] * 4)
    assert shaper.terms(_ctx([100, 400, 150, 300], [0, 1, 1, 0], step=11, **base)) == _approx(
        [0.0, -0.1, 0.2 / 3, -0.2 / 6])


def test_warmup_scales_any_shaper() -> None:
    """``warmup`` beside a shaper's params: budget penalty over a budget of 20, lam 1, delay 2, ramp 2."""
    shaping = LengthShaping.from_config(
        [{"name": "budget_penalty", "warmup": {"delay_steps": 2, "ramp_steps": 2}}])
    lengths, correct, budgets = [30, 10], [1, 1], [20, 20]  # terms without warm-up: -0.5, 0
    for step, factor in ((1, 0.0), (2, 0.0), (3, 0.5), (4, 1.0), (9, 1.0)):
        rewards, metrics = shaping(_ctx(lengths, correct, budgets=budgets, step=step))
        assert rewards == _approx([1.0 - 0.5 * factor, 1.0])
        assert metrics["length/budget_penalty/warmup"] == factor
        assert metrics["length/budget_penalty/term_mean"] == _approx(-0.25 * factor)
    # no warm-up: full strength at step 1, and no warm-up metric
    rewards, metrics = LengthShaping.from_config([{"name": "budget_penalty"}])(
        _ctx(lengths, correct, budgets=budgets, step=1))
    assert rewards == _approx([0.5, 1.0]) and "length/budget_penalty/warmup" not in metrics
    # Kimi's own delay_steps / ramp_steps are the same schedule
    kw = dict(group_ids=[0, 0, 0, 0])
    own = LengthShaping.from_config([{"name": "kimi", "params": {"weight": 0.8, "delay_steps": 3, "ramp_steps": 4}}])
    spec = LengthShaping.from_config([{"name": "kimi", "params": {"weight": 0.8},
                                       "warmup": {"delay_steps": 3, "ramp_steps": 4}}])
    for step in range(1, 10):
        ctx = _ctx([100, 400, 150, 300], [0, 1, 1, 0], step=step, **kw)
        assert own(ctx)[0] == _approx(spec(ctx)[0])
    with pytest.raises(ValueError, match="unknown parameter 'dely_steps' for length_shapers\\[0\\].warmup. "
                                         "Did you mean 'delay_steps'"):
        LengthShaping.from_config([{"name": "kimi", "warmup": {"dely_steps": 2}}])
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="warmup.ramp_steps must be an integer >= 0"):
            LengthShaping.from_config([{"name": "kimi", "warmup": {"ramp_steps": bad}}])


def test_kimi_needs_group_ids() -> None:
    with pytest.raises(ValueError, match="'kimi' needs LengthContext.group_ids"):
        build_shaper("kimi").terms(_ctx([1, 2], [1, 0]))


# ----------------------------------------------------------------------------- §6f L1

L1_TABLE = [  # n_y, correct, Exact, Max   (n_gold = 1000, alpha 0.0003, delta 0.5)
    (1000, 1, 1.00, 0.50),
    (1500, 1, 0.85, 0.35),
    (500, 1, 0.85, 0.65),
    (500, 0, -0.15, 0.00),
    (3000, 1, 0.40, 0.00),
]


@pytest.mark.parametrize("name,col", [("l1_exact", 2), ("l1_max", 3)])
def test_l1_worked_example(name: str, col: int) -> None:
    ctx = _ctx([r[0] for r in L1_TABLE], [r[1] for r in L1_TABLE], budgets=[1000] * len(L1_TABLE))
    assert build_shaper(name)(ctx) == _approx([r[col] for r in L1_TABLE])


def test_l1_dual_picks_equation_by_kind() -> None:
    ctx = _ctx([1500, 1500, 500], [1, 1, 1], budgets=[1000] * 3, budget_kinds=["exact", "max", "max"])
    assert build_shaper("l1_dual")(ctx) == _approx([0.85, 0.35, 0.65])
    with pytest.raises(ValueError, match="unknown budget kind 'min'"):
        build_shaper("l1_dual")(_ctx([1], [1], budgets=[5], budget_kinds=["min"]))


def test_budget_shapers_need_budgets() -> None:
    with pytest.raises(ValueError, match="'l1_exact' needs LengthContext.budgets"):
        build_shaper("l1_exact").terms(_ctx([1], [1]))
    with pytest.raises(ValueError, match="positive budget for every response"):
        build_shaper("budget_penalty").terms(_ctx([1, 2], [1, 1], budgets=[10, None]))


# ----------------------------------------------------------------------------- budget penalty


def test_budget_penalty_hand_computed() -> None:
    # correct - lam * max(0, len - budget) / budget, lam = 0.5:
    #   1500 / 1000 correct: 1 - 0.5 * 0.5 = 0.75 ; 800 / 1000: 1 ; 300 / 100 wrong: 0 - 0.5 * 2 = -1
    shaper = build_shaper("budget_penalty", {"lam": 0.5})
    assert shaper(_ctx([1500, 800, 300], [1, 1, 0], budgets=[1000, 1000, 100])) == _approx([0.75, 1.0, -1.0])


# ----------------------------------------------------------------------------- §6a HAPO-history

HAPO_TABLE = [  # L, correct, r_len, total   (h = 300)
    (150, 1, 0.70710678, 1.70710678),
    (300, 1, 0.0, 1.0),
    (450, 1, -0.7, 0.3),  # cos = -0.7071, clipped
    (700, 1, -0.7, 0.3),  # L >= 600 gives -1, clipped
    (150, 0, 0.0, 0.0),
    (450, 0, -0.70710678, -0.70710678),
    (700, 0, -1.0, -1.0),
]


def _hapo(**params):
    shaper = build_shaper("hapo_history", params)
    shaper.h["q"] = 300
    return shaper


def test_hapo_history_worked_example() -> None:
    shaper = _hapo()
    ctx = _ctx([r[0] for r in HAPO_TABLE], [r[1] for r in HAPO_TABLE], problem_ids=["q"] * len(HAPO_TABLE))
    assert shaper.terms(ctx) == _approx([r[2] for r in HAPO_TABLE], abs=1e-8)
    assert shaper(ctx) == _approx([r[3] for r in HAPO_TABLE], abs=1e-8)
    # the batch used the old h; correct lengths {150, 300, 450, 700} -> h = 150
    assert shaper.history("q") == 150


def test_hapo_history_null_then_min_update() -> None:
    shaper = build_shaper("hapo_history")
    ctx = _ctx([150, 300, 450, 700], [1, 0, 1, 0], problem_ids=[1, 1, 2, 2])
    assert shaper(ctx) == _approx([1.0, 0.0, 1.0, 0.0])  # h Null -> r_len = 0
    assert (shaper.history(1), shaper.history(2)) == (150, 450)
    shaper(_ctx([200, 100], [1, 1], problem_ids=[1, 2]))
    assert (shaper.history(1), shaper.history(2)) == (150, 100)  # min never goes up


def test_hapo_history_mean_mode_is_count_weighted() -> None:
    shaper = build_shaper("hapo_history", {"mode": "mean"})
    shaper(_ctx([100, 300, 999], [1, 1, 0], problem_ids=["a"] * 3))
    assert shaper.history("a") == pytest.approx(200.0)  # mean of correct lengths only
    shaper(_ctx([500], [1], problem_ids=["a"]))
    assert shaper.history("a") == pytest.approx((100 + 300 + 500) / 3)
    assert shaper.count["a"] == 3


def test_hapo_history_linear_variant_hand_computed() -> None:
    # h = 300, tolerance 0.1 -> band [300, 330)
    # correct: 150 -> 1 - 0.5 = 0.5 ; 300, 320 -> 0 ; 450 -> -(450-330)/300 = -0.4 ; 700 -> max(-0.7, -1.2333)
    # wrong:   320 -> 0 ; 450 -> -0.4 ; 700 -> max(-1, -1.2333) = -1
    shaper = _hapo(type_lr="linear")
    lens = [150, 300, 320, 450, 700, 320, 450, 700]
    correct = [1, 1, 1, 1, 1, 0, 0, 0]
    assert shaper.terms(_ctx(lens, correct, problem_ids=["q"] * 8)) == _approx(
        [0.5, 0.0, 0.0, -0.4, -0.7, 0.0, -0.4, -1.0])


def test_hapo_history_weight() -> None:
    shaper = _hapo(w_lr=0.5)
    assert shaper.terms(_ctx([150, 700], [1, 0], problem_ids=["q", "q"])) == _approx([0.5 * math.sqrt(0.5), -0.5])


def test_hapo_history_state_round_trip_through_json() -> None:
    """state_dict -> JSON -> load gives identical subsequent rewards (checkpoint / resume)."""
    batches = [
        _ctx([120, 80, 300, 40], [1, 1, 0, 1], problem_ids=[0, 0, 5, "x"]),
        _ctx([90, 70, 310, 50, 66], [1, 0, 1, 1, 1], problem_ids=[0, 0, 5, "x", 9]),
        _ctx([60, 200, 45, 33], [1, 1, 1, 0], problem_ids=[0, 5, "x", 9]),
    ]
    for mode in ("min", "mean"):
        specs = [{"name": "hapo_history", "params": {"mode": mode}}, {"name": "kimi", "params": {"weight": 0.1}}]
        batches = [LengthContext(**{**b.__dict__, "group_ids": [0] * len(b), "step": 1}) for b in batches]
        live = LengthShaping.from_config(specs)
        live(batches[0])
        saved = json.loads(json.dumps(live.state_dict()))
        resumed = LengthShaping.from_config(specs)
        resumed.load_state_dict(saved)
        for b in batches[1:]:
            assert resumed(b) == live(b)
        assert resumed.state_dict() == live.state_dict()


def test_hapo_history_state_mismatch_errors() -> None:
    state = build_shaper("hapo_history").state_dict()
    with pytest.raises(ValueError, match="saved with mode='min'"):
        build_shaper("hapo_history", {"mode": "mean"}).load_state_dict(state)
    shaping = LengthShaping.from_config([{"name": "kimi"}])
    with pytest.raises(ValueError, match="keep reward.length_shapers unchanged"):
        shaping.load_state_dict({"shapers": [{"name": "hapo_history", "state": state}]})


# ----------------------------------------------------------------------------- composition


def test_shapers_compose_in_order_and_keep_other_verifiers() -> None:
    # rewards = 1[correct] + 0.2 format bonus; L1-Exact then DAPO overlong (L_max 2000, cache 1000)
    ctx = LengthContext(rewards=[1.2, 0.2], correct=[True, False], lengths=[1500, 500], max_len=2000,
                        budgets=[1000, 1000])
    shaping = LengthShaping.from_config([{"name": "l1_exact"}, {"name": "dapo_overlong",
                                                               "params": {"buffer_len": 1000}}])
    rewards, metrics = shaping(ctx)
    # row 0: 1.2 - 0.15 - 0.5 = 0.55 ; row 1: 0.2 - 0.15 - 0 = 0.05
    assert rewards == _approx([0.55, 0.05])
    assert metrics["length/l1_exact/term_mean"] == pytest.approx(-0.15)
    assert metrics["length/dapo_overlong/term_mean"] == pytest.approx(-0.25)
    assert ctx.rewards == [1.2, 0.2]  # the context is not mutated


def test_context_validates_lengths() -> None:
    with pytest.raises(ValueError, match="group_ids has length 1, expected B=2"):
        LengthContext(rewards=[1.0, 0.0], correct=[True, False], lengths=[3, 4], max_len=8, group_ids=[0])


# ----------------------------------------------------------------------------- budget prompts


def test_budget_sampling_is_reproducible_and_in_range() -> None:
    p = BudgetPromptParams(low=100, high=4000)
    a = [sample_budget(p, seed=3, step=7, prompt_key=k) for k in range(200)]
    assert a == [sample_budget(p, seed=3, step=7, prompt_key=k) for k in range(200)]
    assert all(100 <= x.budget <= 4000 and x.kind == "exact" for x in a)
    assert len({x.budget for x in a}) > 150  # spread over U{100..4000}
    other_step = [sample_budget(p, seed=3, step=8, prompt_key=k).budget for k in range(200)]
    other_seed = [sample_budget(p, seed=4, step=7, prompt_key=k).budget for k in range(200)]
    assert other_step != [x.budget for x in a] and other_seed != [x.budget for x in a]


def test_budget_priors() -> None:
    choice = budget_params({"prior": "choice", "choices": [64, 128], "weights": [0, 1]})
    assert {sample_budget(choice, seed=0, step=s, prompt_key=0).budget for s in range(50)} == {128}
    fixed = BudgetPromptParams(prior="fixed", low=256, high=256)
    assert sample_budget(fixed, seed=0, step=1, prompt_key="a").budget == 256
    logu = BudgetPromptParams(prior="log_uniform", low=16, high=1024, multiple_of=16)
    vals = [sample_budget(logu, seed=0, step=1, prompt_key=k).budget for k in range(300)]
    assert all(16 <= v <= 1024 and v % 16 == 0 for v in vals)
    assert sum(v < 128 for v in vals) > sum(v > 896 for v in vals)  # log-uniform favours short
    mixed = BudgetPromptParams(max_prob=0.5)
    kinds = [sample_budget(mixed, seed=0, step=1, prompt_key=k).kind for k in range(200)]
    assert 60 < kinds.count("max") < 140


def test_budget_params_errors() -> None:
    with pytest.raises(ValueError, match="Did you mean 'template'"):
        budget_params({"templat": "{prompt} {budget}"})
    with pytest.raises(ValueError, match="must contain"):
        BudgetPromptParams(template="Think for {budget} tokens.")
    with pytest.raises(ValueError, match="low <= high"):
        BudgetPromptParams(low=500, high=100)
    with pytest.raises(ValueError, match="weights"):
        BudgetPromptParams(prior="choice", choices=(1, 2), weights=(1.0,))


def test_apply_budget_to_string_and_chat() -> None:
    p = BudgetPromptParams(template="{prompt} [budget {budget}]")
    assert apply_budget("Q", BudgetAssignment(64), p) == "Q [budget 64]"
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "Q"}]
    out = apply_budget(msgs, BudgetAssignment(64, "max"), p)
    assert out[1]["content"] == "Q\n\nThink for maximum 64 tokens."
    assert msgs[1]["content"] == "Q"  # input untouched
    with pytest.raises(ValueError, match="no user message"):
        apply_budget([{"role": "system", "content": "s"}], BudgetAssignment(64), p)
