"""Config: composition, overrides, and errors that name the key and suggest the nearest one."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from rlkit.config import ConfigError, compose, describe, load_config, parse_override

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(recipe):
    cfg = load_config(recipe)
    assert cfg.train.steps >= 1
    assert cfg.reward.verifiers


def test_groups_recipe_and_overrides_compose_in_order():
    cfg = load_config(ROOT / "recipes/quickstart.yaml", ["learner.lr=3e-4", 'engine.stop=["\\n\\n"]'])
    assert cfg.learner.lr == pytest.approx(3e-4)  # override beats recipe
    assert cfg.algorithm.advantage == "grpo"  # from configs/algorithm/grpo.yaml
    assert cfg.engine.max_new_tokens == 64  # recipe beats group (128)
    assert cfg.engine.stop == ["\n\n"]


def test_parse_override_types():
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    assert parse_override("a=null") == {"a": None}
    assert parse_override("a=[1, 2]") == {"a": [1, 2]}
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("novalue")


def test_unknown_key_names_key_and_nearest():
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "recipes/quickstart.yaml", ["learner.lrr=1e-5"])
    msg = str(e.value)
    assert "learner.lrr" in msg and "learner.lr" in msg and "did you mean" in msg


def test_unknown_top_level_section():
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_config(None, ["trian.steps=3"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["train.steps=many"])


def test_out_of_range_value():
    with pytest.raises(ConfigError, match="engine.top_p"):
        load_config(None, ["engine.top_p=1.5"])


def test_impossible_combination():
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        load_config(None, ["algorithm.dynamic_sampling.enabled=true", "train.samples_per_prompt=1"])
    with pytest.raises(ConfigError, match="mini_batches"):
        load_config(None, ["train.mini_batches=3", "train.prompts_per_step=2", "train.samples_per_prompt=2"])
    with pytest.raises(ConfigError, match="data.path"):
        load_config(None, ["data.source=jsonl"])


def test_unknown_registered_names_suggest():
    with pytest.raises(ConfigError, match="grpo"):
        load_config(None, ["algorithm.advantage=grpoo"])
    with pytest.raises(ConfigError, match="clip_low"):
        load_config(None, ["algorithm.loss_params={clip_lo: 0.1}"])
    with pytest.raises(ConfigError, match="did you mean 'math'"):
        load_config(None, ["reward.verifiers=[{name: maths}]"])



def test_verifier_params_are_checked_at_load():
    """A misspelt or mistyped verifier param is a one-line config error, not a failure at every step."""
    with pytest.raises(ConfigError, match=r"reward.verifiers.0.params: .*require_boxd"):
        load_config(None, ["reward.verifiers=[{name: math, params: {require_boxd: true}}]"])
    with pytest.raises(ConfigError, match=r"reward.verifiers.0.params: format: placeholders must be a list"):
        load_config(None, ["reward.verifiers=[{name: format, params: {placeholders: answer}}]"])
    cfg = load_config(None, ["reward.verifiers=[{name: format, params: {placeholders: [answer]}}]"])
    assert cfg.reward.verifiers[0].params == {"placeholders": ["answer"]}


def test_length_shaper_warmup_is_checked_at_load():
    with pytest.raises(ConfigError, match=r"reward.length_shapers: unknown parameter 'dely_steps' for "
                                          r"length_shapers\[0\].warmup"):
        load_config(None, ["reward.length_shapers=[{name: kimi, warmup: {dely_steps: 4}}]"])
    cfg = load_config(None, ["reward.length_shapers=[{name: kimi, warmup: {delay_steps: 4, ramp_steps: 4}}]"])
    assert cfg.reward.length_shapers[0]["warmup"] == {"delay_steps": 4, "ramp_steps": 4}


def test_missing_group_suggests(tmp_path):
    r = tmp_path / "recipes" / "x.yaml"
    r.parent.mkdir()
    r.write_text("defaults: [algorithm/grop]\n")
    with pytest.raises(ConfigError, match="algorithm/grpo"):
        compose(r)


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.steps = 3  # type: ignore[misc]


def test_reference_lists_every_leaf_with_description():
    rows = describe()
    keys = {k for k, _, _ in rows}
    assert {"learner.lr", "algorithm.kl.beta", "train.samples_per_prompt"} <= keys


def test_extends_replaces_same_group_and_merges_bodies(tmp_path):
    parent = tmp_path / "recipes" / "base.yaml"
    parent.parent.mkdir()
    parent.write_text("defaults: [algorithm/grpo, learner/torch]\nname: base\nlearner: {lr: 3.0e-4}\n"
                      "train: {steps: 7, prompts_per_step: 4}\n")
    child = tmp_path / "recipes" / "child.yaml"
    child.write_text("extends: base.yaml\ndefaults: [algorithm/hapo]\nname: child\ntrain: {steps: 9}\n")
    cfg = load_config(child)
    assert cfg.name == "child" and cfg.algorithm.advantage == "hapo_token_mean"
    assert cfg.algorithm.policy_loss == "hapo" and "clip_c" not in cfg.algorithm.loss_params  # grpo's group is gone
    assert cfg.learner.lr == 3.0e-4 and cfg.train.steps == 9 and cfg.train.prompts_per_step == 4


def test_extends_errors_name_the_recipe(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("extends: b.yaml\n")
    b.write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(a)
    a.write_text("extends: nope.yaml\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: extends: recipe not found: .*nope\.yaml"):
        load_config(a)


@pytest.mark.parametrize("name", ["tempo", "spae", "hapo", "l1_budget", "hapo_history", "kimi_length",
                                  "budget_penalty",
                                  "budget_guidance", "brpo_anytime"])
def test_method_recipes_share_the_quickstart_setup(name):
    """The method recipes differ from the quickstart only in the method, so their runs compare."""
    q = load_config(ROOT / "recipes/quickstart.yaml").model_dump()
    r = load_config(ROOT / f"recipes/{name}.yaml").model_dump()
    for key in ("seed", "learner", "train"):
        if name == "hapo" and key == "train":  # HAPO's clip needs several updates per step
            assert {**r[key], "mini_batches": 1} == q[key] and r[key]["mini_batches"] == 4
            continue
        assert r[key] == q[key], key
    assert {k: v for k, v in r["model"].items() if not k.startswith("budget_guidance")} == \
        {k: v for k, v in q["model"].items() if not k.startswith("budget_guidance")}
    assert r["data"]["generator"] == q["data"]["generator"]
    assert r["data"]["prompt_template"] == q["data"]["prompt_template"]
    assert r["engine"]["max_new_tokens"] == q["engine"]["max_new_tokens"]


@pytest.mark.parametrize("name", ["kimi", "kimi_boxed", "tempo", "spae", "hapo", "dapo"])
def test_multistep_method_recipes_share_its_setup(name):
    """The multi-step method recipes change only the method: same data, splits, model, budget of samples."""
    q = load_config(ROOT / "recipes/multistep.yaml").model_dump()
    r = load_config(ROOT / f"recipes/multistep_{name}.yaml").model_dump()
    for key in ("seed", "learner", "model", "data", "eval"):
        assert r[key] == q[key], key
    assert {**r["train"], "mini_batches": 1} == q["train"]  # HAPO takes 4 updates of the same samples
    assert r["engine"]["max_new_tokens"] == q["engine"]["max_new_tokens"] == 128
    assert q["data"]["generator"]["n_terms"] == [2, 3] and q["eval"]["splits"]["ood"]["generator"] == {"n_terms": 4}


def test_multistep_kimi_boxed_differs_from_kimi_only_in_the_box_and_the_ramp():
    """Boxed-only math, the placeholder box refused by format, the delayed ramp: nothing else."""
    a = load_config(ROOT / "recipes/multistep_kimi_boxed.yaml").model_dump()
    b = load_config(ROOT / "recipes/multistep_kimi.yaml").model_dump()
    assert [v["params"] for v in a["reward"]["verifiers"]] == [{"require_boxed": True}, {"placeholders": ["answer"]}]
    assert a["reward"]["length_shapers"] == [{"name": "kimi", "params": {"weight": 0.5, "delay_steps": 4,
                                                                         "ramp_steps": 4}}]
    for r in (a, b):
        r.pop("name"), r["reward"].pop("length_shapers")
        for v in r["reward"]["verifiers"]:
            v.pop("params")
    assert a == b


@pytest.mark.parametrize("name", ["budget_penalty", "l1", "brpo"])
def test_multistep_length_recipes_share_its_setup(name):
    """The length recipes of the multi-step task: same model, problems, splits and samples as GRPO's; the
    budget recipes add a prompt budget, keep the box like multistep_kimi_boxed and delay their term."""
    q = load_config(ROOT / "recipes/multistep.yaml").model_dump()
    r = load_config(ROOT / f"recipes/multistep_{name}.yaml").model_dump()
    for key in ("seed", "learner", "model", "eval", "train"):
        assert r[key] == q[key], key
    assert {**r["data"], "budget": None} == q["data"] and r["engine"] == q["engine"]
    if name == "brpo":
        assert r["algorithm"]["advantage"] == "brpo" and r["data"]["budget"] is None
        assert r["algorithm"]["advantage_params"]["b_max"] == q["engine"]["max_new_tokens"]
        return
    kimi = load_config(ROOT / "recipes/multistep_kimi_boxed.yaml").model_dump()
    assert r["reward"]["verifiers"] == kimi["reward"]["verifiers"] and r["algorithm"] == q["algorithm"]
    (shaper,) = r["reward"]["length_shapers"]
    assert shaper["warmup"] == {"delay_steps": 4, "ramp_steps": 4}
    assert r["data"]["budget"]["prior"] == {"budget_penalty": "fixed", "l1": "uniform"}[name]


def test_budget_penalty_boxed_is_budget_penalty_from_the_quickstart_adapter():
    """Stage 2 of a two-stage recipe: only the start model and the boxed-only verifier differ."""
    a = load_config(ROOT / "recipes/budget_penalty_boxed.yaml").model_dump()
    b = load_config(ROOT / "recipes/budget_penalty.yaml").model_dump()
    assert a["model"].pop("name") == "runs/quickstart/final" and b["model"].pop("name") == "smollm2-135m-instruct"
    assert [(v["name"], v["params"]) for v in a["reward"].pop("verifiers")] == [("math", {"require_boxed": True})]
    b["reward"].pop("verifiers")
    a.pop("name"), b.pop("name")
    assert a == b
