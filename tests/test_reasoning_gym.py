"""reasoning-gym as a data source and a verifier: switching the source does not inherit another
source's generator keys, bad keys are one-line config errors, and the ``reasoning_gym`` verifier
scores any task (numeric or not) with the row's own dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rewards import RewardManager, VerifierSpec, resolve
from rewards.gym import extract_gym_answer
from rlkit.config import ConfigError, load_config
from rlkit.infra.data import recipe_rows

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
SWITCH = ["data.source=reasoning_gym", "data.generator={task: spell_backward, n: 40}", "data.eval_size=8"]


@pytest.mark.parametrize("order", [1, -1])
def test_switching_the_source_drops_the_other_sources_generator_keys(order):
    # before: the quickstart's arithmetic keys (min_value, ops, ...) reached reasoning_gym -> traceback
    cfg = load_config(QUICKSTART, ["data.source=reasoning_gym", "data.generator.task=chain_sum"][::order])
    assert cfg.data.generator == {"task": "chain_sum"}
    train, held_out = recipe_rows(load_config(QUICKSTART, SWITCH))
    assert len(train) == 32 and len(held_out) == 8 and "metadata" in train[0]


def test_a_recipe_that_switches_source_in_its_body(tmp_path):
    r = tmp_path / "gym.yaml"
    r.write_text(f"extends: {QUICKSTART}\ndata: {{source: reasoning_gym, generator: {{task: chain_sum, min_terms: 3}}}}\n")
    assert load_config(r).data.generator == {"task": "chain_sum", "min_terms": 3}
    assert load_config(QUICKSTART).data.generator["ops"] == ["+"]  # the same source keeps merging


@pytest.mark.parametrize(("overrides", "match"), [
    (["data.generator={task: chain_sum, min_value: 3}"], r"min_value not a parameter of reasoning-gym task 'chain_sum'"),
    (["data.generator.task=chian_sum"], r"unknown reasoning-gym task 'chian_sum'; did you mean 'chain_sum'"),
    ([], r"data.generator.task is required"),
])  # fmt: skip
def test_generator_mistakes_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(QUICKSTART, ["data.source=reasoning_gym", *overrides])
    with pytest.raises(ConfigError, match=r"min_vlaue not a parameter of source 'arithmetic'"):
        load_config(QUICKSTART, ["data.generator.min_vlaue=3"])


def test_extraction():
    assert extract_gym_answer("a \\boxed{1} b \\boxed{2}") == "2"
    assert extract_gym_answer("<answer> x </answer> then <answer>y</answer>") == "y"
    assert extract_gym_answer("<answer>y</answer>", "boxed") is None
    assert extract_gym_answer("\\boxed{1} <answer>y</answer>", "answer_tag") == "y"
    assert extract_gym_answer("nothing") is None
    with pytest.raises(ValueError, match="extract must be one of"):
        extract_gym_answer("x", "last_line")


def test_verifier_scores_non_numeric_and_numeric_tasks_with_their_own_datasets():
    rows = []
    for task in ("spell_backward", "word_sorting", "chain_sum"):
        rows += recipe_rows(load_config(QUICKSTART, ["data.source=reasoning_gym", f"data.generator={{task: {task}, n: 6}}",
                                                     "data.eval_size=2"]))[0][:2]  # fmt: skip
    right = [f"so \\boxed{{{r['answer']}}}" if i % 2 else f"<answer>{r['answer']}</answer>" for i, r in enumerate(rows)]
    wrong = ["<answer>zzz</answer>", "\\boxed{0}", "no answer at all", "\\boxed{}", "<answer></answer>", "\\boxed{x}"]
    fn = resolve("reasoning_gym")
    cols = {"answer": [r["answer"] for r in rows], "metadata": [r["metadata"] for r in rows]}
    assert fn(right, **cols) == [1.0] * 6
    assert all(s < 1.0 for s in fn(wrong, **cols))
    assert fn(["\\boxed{1}"], answer=["1"], metadata=[json.dumps({})]) == [None]  # no task named: not applicable
    # as training runs it: spawned reward workers, the score mixed with format
    specs = [VerifierSpec("reasoning_gym", timeout_s=60.0), VerifierSpec("format", weight=0.1)]
    with RewardManager(specs, num_workers=1) as rm:
        total, _, per = rm.score(right, cols)
    assert per["reasoning_gym"] == [1.0] * 6 and total == pytest.approx([1.0, 1.1] * 3)
