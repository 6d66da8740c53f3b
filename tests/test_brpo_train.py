"""BRPO wired into training (docs/algorithms.md §6b): batch packing, summary scoring, config, two trainer steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_brpo import RBAR, TABLE, _CountingEngine

from rlkit.algorithms import ADVANTAGES, AdvantageInputs
from rlkit.algorithms.brpo import plan_summary_prompts
from rlkit.config import ConfigError, load_config
from rlkit.loop.batch import build_batch
from rlkit.loop.experience import Group, make_batch
from rlkit.methods.anytime import SummarySample, brpo_rows, summarize_groups, summary_groups
from rollout.engine import Completion, RolloutRequest, SamplingParams

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes/brpo_anytime.yaml"
HAS_DIGIT = f"{ROOT / 'tests/e2e_rewards.py'}:has_digit"


def _cfg(*extra: str):
    # budgets [2, 4, 6, 8] with uniform p = 0.25: the spec's worked example when each thinking is 8 tokens
    return load_config(RECIPE, ["algorithm.advantage_params={b_max: 8, n_support: 4, n_summary: 2, "
                                "eos_ends_thinking: false}", *extra])


# ----------------------------------------------------------------------------- batch packing


def test_batch_from_thinking_and_summaries_carries_brpo_rows_advantages() -> None:
    cfg = _cfg()
    p = ADVANTAGES.build_params("brpo", cfg.algorithm.advantage_params)
    q = [5, 6, 7]
    thinking = [Completion(q, list(range(10 + 8 * g, 18 + 8 * g)), [-0.5] * 8, "length", group_id=0)
                for g in range(3)]
    group = Group(row={"prompt": "x", "answer": "1"}, prompt_ids=q, completions=thinking)
    # A = 2 summaries per budget whose scores give the spec's r̄: g0 [0, .5, 1, 1], g1 [0, 0, 0, 1], g2 0
    pairs = {0: [(0, 0), (1, 0), (1, 1), (1, 1)], 1: [(0, 0), (0, 0), (0, 0), (1, 1)], 2: [(0, 0)] * 4}
    samples, scores = [], []
    for n, c in enumerate(thinking):
        plan = plan_summary_prompts(q, c.token_ids, p.prior.budgets, closed=False, truncation_ids=[90],
                                    answer_ids=[91])
        for k, sp in enumerate(plan):
            (j,) = sp.budget_indices
            for a, sc in enumerate(pairs[n][j]):
                ids = [100 + a, 101, 102][: a + 2]  # summaries of different lengths
                samples.append(SummarySample(n, k, j, sp.prompt_ids, Completion(sp.prompt_ids, ids, [-1.0] * len(ids),
                                                                                 "stop", group_id=n)))
                scores.append(float(sc))
    rows = brpo_rows(thinking, [0, 0, 0], samples, scores, p)
    torch.testing.assert_close(rows.rbar_NS, RBAR)

    # pack as the trainer does: thinking group first, then one group per summary prompt
    sgroups = summary_groups([group], samples)
    assert len(sgroups) == 12 and [len(g.completions) for g in sgroups] == [2] * 12
    group.rewards = rows.rewards_B[:3].tolist()  # J = Ret_0: 0.625, 0.25, 0
    for i, g in enumerate(sgroups):
        g.rewards = scores[2 * i : 2 * i + 2]
    batch, rewards_B, extras = make_batch([group, *sgroups], cfg, pad_id=0, extras=rows.extras)

    ref = build_batch(rows.prompts, rows.responses, pad_id=0, rollout_logprobs=rows.logprobs)
    inp = AdvantageInputs(rows.rewards_B, rows.group_ids_B, ref.response_mask_BT, extras=dict(rows.extras))
    ref_adv = ADVANTAGES.get("brpo").fn(inp, p).advantages_BT
    assert torch.equal(batch.input_ids_BS, ref.input_ids_BS)
    torch.testing.assert_close(batch.response_mask_BT, ref.response_mask_BT)
    torch.testing.assert_close(rewards_B, rows.rewards_B)
    torch.testing.assert_close(batch.advantages_BT, ref_adv)
    # the spec's table: thinking token t is in segment t // 2 and gets A^BRPO of that segment
    for n in range(3):
        expected = [TABLE[n][t // 2][4] for t in range(8)]
        assert batch.advantages_BT[n].tolist() == pytest.approx(expected, abs=1e-6)
    assert rewards_B[:3].tolist() == pytest.approx([0.625, 0.25, 0.0])
    # summaries: score minus the mean of the two summaries of the same prompt; only g0 at budget 4
    # (scores [1, 0], rows 3 + 2 and 3 + 3) is not constant -> A^sum = [0.5, -0.5] on their tokens
    summ = batch.advantages_BT[3:]
    assert summ[2, :2].tolist() == [0.5, 0.5] and summ[3, :3].tolist() == [-0.5, -0.5, -0.5]
    assert float(summ.abs().sum()) == pytest.approx(0.5 * 2 + 0.5 * 3)
    assert extras["metrics"]["brpo/score@4"] == pytest.approx((0.5 + 0 + 0) / 3)


def test_summary_groups_reject_interleaved_samples() -> None:
    c = Completion([1], [2], [0.0], "stop")
    g = Group(row={"prompt": "x"}, prompt_ids=[1], completions=[c])
    s = [SummarySample(0, k, k, [1, k], c) for k in (0, 1, 0)]
    with pytest.raises(ValueError, match="not contiguous"):
        summary_groups([g], s)


# ----------------------------------------------------------------------------- real engine + reward manager


def test_summarize_groups_with_engine_and_reward_manager(tiny_model_dir: str) -> None:
    from rewards import RewardManager
    from rollout.hf import HFEngine

    engine = HFEngine(tiny_model_dir, max_batch_size=64, seed=0)
    tok = engine.tokenizer
    p = ADVANTAGES.build_params("brpo", {"b_max": 8, "n_support": 2, "n_summary": 2, "summary_max_new_tokens": 4})
    think = p.rollout_params(SamplingParams(max_new_tokens=64, temperature=1.0, n=3, seed=3))
    assert think.max_new_tokens == 8 and think.stop == ("</think>",)
    rows = [{"prompt": "What is 2+3?", "answer": "5"}, {"prompt": "Ann has 12 pens.", "answer": "12"}]
    prompts = [tok.encode(r["prompt"]) for r in rows]
    comps = engine.generate([RolloutRequest(q, think, group_id=i) for i, q in enumerate(prompts)])
    groups = [Group(row=r, prompt_ids=q, completions=comps[3 * i : 3 * i + 3]) for i, (r, q) in
              enumerate(zip(rows, prompts))]
    engines = [_CountingEngine(engine), _CountingEngine(engine)]
    with RewardManager([{"name": HAS_DIGIT}], mode="inline") as manager:
        res = summarize_groups(groups, engines, tok, manager, p, base_params=SamplingParams(temperature=1.0),
                               seed=7, acc_key="has_digit")
    assert [e.calls for e in engines] == [1, 1]  # one generate call per engine for the whole batch
    samples = [SummarySample(n, 0, 0, g.prompt_ids, c) for n, g in enumerate(res.summary_groups) for c in g.completions]
    assert len(samples) == res.metrics["anytime/summaries"] > 0
    scores = [r for g in res.summary_groups for r in g.rewards]
    texts = [c.text for g in res.summary_groups for c in g.completions]
    assert scores == [float(any(ch.isdigit() for ch in t) and "</think>" not in t) for t in texts]
    # extras equal brpo_rows on the same summaries; thinking rewards become J = sum_j p_j r̄_j
    thinking = [c for g in groups for c in g.completions]
    parents, budgets = res.extras["brpo_parent_B"][6:].tolist(), res.extras["brpo_budget_index_B"][6:].tolist()
    prompts_k = res.extras["brpo_prompt_B"][6:].tolist()
    again = brpo_rows(thinking, [0, 0, 0, 1, 1, 1],
                      [SummarySample(n, k, j, s.prompt_ids, s.completion) for n, k, j, s in
                       zip(parents, prompts_k, budgets, samples)], scores, p)
    for key, value in again.extras.items():
        torch.testing.assert_close(res.extras[key], value)
    J = [r for g in groups for r in g.rewards]
    assert J == pytest.approx(again.rewards_B[:6].tolist())
    delim = tok.encode(p.answer_delimiter, add_special_tokens=False)
    for s, n in zip(samples, parents):  # question + (cut) thinking + markers
        q = thinking[n].prompt_ids
        assert s.prompt_ids[: len(q)] == q and s.prompt_ids[-len(delim) :] == delim
    for k, b in enumerate((4, 8)):  # share of the summaries at budget b the verifier accepted
        vals = [float(any(ch.isdigit() for ch in t)) for t, j in zip(texts, budgets) if j == k]
        assert res.metrics[f"anytime/acc@{b}"] == pytest.approx(sum(vals) / len(vals) if vals else 0.0)
    assert res.metrics["anytime/engine_calls"] == 2


def test_eos_ends_thinking_summarises_a_plain_response(tiny_model_dir: str) -> None:
    from rlkit.methods.anytime import sample_summaries
    from rollout.hf import HFEngine

    engine = HFEngine(tiny_model_dir, max_batch_size=8, seed=0)
    tok = engine.tokenizer
    q = tok.encode("What is 2+3?")
    z = tok.encode("2+3=5", add_special_tokens=False) + [engine.eos_ids[0]]
    c = Completion(q, z, [-1.0] * len(z), "stop", text="2+3=5")
    answer = tok.encode("\n\n**Final Answer**\n", add_special_tokens=False)
    for flag in (False, True):
        p = ADVANTAGES.build_params("brpo", {"b_max": 2 * len(z), "n_support": 2, "n_summary": 1,
                                             "summary_max_new_tokens": 3, "eos_ends_thinking": flag})
        samples, (plan,) = sample_summaries([engine], [c], p, tokenizer=tok, seed=0)
        if not flag:  # paper: the response ended with EOS inside the thinking -> nothing to summarise
            assert [sp.dead for sp in plan] == [True] and samples == []
        else:  # the response is the thinking: its end (EOS dropped) is summarised for both budgets
            assert len(plan) == 1 and not plan[0].dead and not plan[0].truncated
            assert plan[0].prompt_ids == q + z[:-1] + answer and plan[0].budget_indices == (0, 1)
            # one set of n_summary = 1 summaries stands for both budgets (the paper shares it)
            assert len(samples) == 1 and samples[0].budgets == (0, 1)


# ----------------------------------------------------------------------------- config


def test_brpo_config_validates_before_any_model(capsys) -> None:
    from rlkit.cli import main

    cfg = load_config(RECIPE)
    p = ADVANTAGES.build_params(cfg.algorithm.advantage, cfg.algorithm.advantage_params)
    assert p.prior.budgets == [12, 24, 36, 48] and p.eos_ends_thinking and p.n_summary == 1
    with pytest.raises(ConfigError, match="Did you mean 'n_summary'"):
        load_config(RECIPE, ["algorithm.advantage_params.n_sumary=2"])
    with pytest.raises(ConfigError, match="algorithm.advantage_params: .*variance_reduction"):
        load_config(RECIPE, ["algorithm.advantage_params.variance_reduction=v3"])
    with pytest.raises(ConfigError, match="n_support <= b_max"):
        load_config(RECIPE, ["algorithm.advantage_params.b_max=3"])
    for ov, key in (("segments.enabled=true", "segments.enabled"),
                    ("algorithm.dynamic_sampling.enabled=true", "algorithm.dynamic_sampling"),
                    ("reward.length_shapers=[{name: kimi}]", "reward.length_shapers"),
                    ("algorithm.overlong_filter=true", "algorithm.overlong_filter")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(RECIPE, [ov])
    assert main(["config", "--reference"]) == 0
    out = capsys.readouterr().out
    assert "algorithm.advantage_params.eos_ends_thinking [brpo]" in out and "thinking length cap" in out


# ----------------------------------------------------------------------------- two trainer steps


@pytest.mark.slow
def test_brpo_trains_through_the_trainer(tiny_model_dir, tmp_path, monkeypatch) -> None:
    from test_train_e2e import tiny_overrides

    from rlkit.infra.tracking import read_metrics
    from rlkit.orchestration.engine_pool import EnginePool
    from rlkit.tools.inspector import render_inspect
    from rlkit.trainer import Trainer

    calls: list[tuple[str, int]] = []
    real_generate = EnginePool.generate

    def counting_generate(pool, requests):
        kind = "summary" if requests and "parent" in requests[0].meta else "other"
        calls.append((kind, len(requests)))
        return real_generate(pool, requests)

    monkeypatch.setattr(EnginePool, "generate", counting_generate)
    ov = tiny_overrides(tiny_model_dir, tmp_path, "brpo", steps=2) + [
        "eval.before=false", "eval.after=false", "checkpoint.every=0", "checkpoint.export_final=false",
        "tracking.inspect_groups=1", f"reward.verifiers=[{{name: '{HAS_DIGIT}'}}]",
        "algorithm.advantage_params={b_max: 8, n_support: 2, n_summary: 2, summary_max_new_tokens: 4}",
    ]
    cfg = load_config(RECIPE, ov)
    Trainer(cfg).run()
    m = read_metrics(tmp_path / "brpo")
    assert [x["step"] for x in m] == [1, 2]
    assert [k for k, _ in calls] == ["other", "summary"] * 2  # per step: thinking, then ONE summary call
    for x in m:
        for key in ("brpo/score@4", "brpo/score@8", "anytime/acc@4", "anytime/acc@8", "anytime/summary_tokens",
                    "time/summary_s", "brpo/adv_mean", "actor/pg_loss"):
            assert key in x, (key, sorted(x))
        assert x["anytime/summaries"] > 0 and x["anytime/engine_calls"] == 1
        assert x["response/len_max"] <= 8  # the thinking is capped at b_max, not engine.max_new_tokens
    html = render_inspect(tmp_path / "brpo").read_text()
    assert "advantage" in html and "brpo_segment" in html
