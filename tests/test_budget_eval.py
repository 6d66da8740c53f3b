"""``rlkit eval --budgets`` (accuracy vs budget, unguided vs budget-guided), the budget recipes,
``model.budget_guidance`` config + RolloutWorker wiring and ``rlkit train-budget-predictor``,
on a tiny random model with tiny predictors built here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlkit.cli import main
from rlkit.config import ConfigError, load_config
from rlkit.tools.budget_eval import format_budget_table, output_paths, parse_budgets
from rollout.budget import BudgetGuidance, GammaPredictor, PredictorConfig, save_predictor

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = str(ROOT / "recipes/quickstart.yaml")


def _shapes(model_dir: str) -> tuple[int, int, int]:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    return c.hidden_size, c.num_hidden_layers + 1, c.vocab_size


def _predictor(model_dir: str) -> GammaPredictor:
    d, n, v = _shapes(model_dir)
    torch.manual_seed(0)
    cfg = PredictorConfig(d_model=d, vocab_size=v, num_hidden_states=n, hidden_size=32, num_layers=1,
                          num_heads=2, intermediate_size=64, dropout=0.0)
    return GammaPredictor(cfg).eval()


@pytest.fixture(scope="module")
def random_predictor_dir(tiny_model_dir: str, tmp_path_factory) -> str:
    """Random init: every alpha, lam ~ softplus(small) < 10, so the reliability mask rejects every
    token and guided steps fall back to the LM argmax (= greedy decoding, unchanged)."""
    out = tmp_path_factory.mktemp("pred_random")
    save_predictor(_predictor(tiny_model_dir), out, meta={"guidance": {"think_end": None}})
    return str(out)


@pytest.fixture(scope="module")
def eos_predictor_dir(tiny_model_dir: str, tmp_path_factory) -> str:
    """A predictor whose only reliable candidate is EOS: the last BERT LayerNorm is zeroed with bias 1,
    so the CLS summary is the all-ones vector h for every input; the heads then give every token
    alpha = 20 and lam = 0.01 (lam < 10: masked), except EOS with lam = 20 (mode exp(19/20)-1 = 1.59
    >= 0.9, CDF at log(b+1) ~ 1). A guided step therefore must emit EOS."""
    from transformers import AutoTokenizer

    net = _predictor(tiny_model_dir)
    eos = AutoTokenizer.from_pretrained(tiny_model_dir).eos_token_id
    H = net.cfg.hidden_size
    inv_softplus = lambda y: float(torch.log(torch.expm1(torch.tensor(y))))  # noqa: E731
    with torch.no_grad():
        ln = net.encoder[1].layer[-1].output.LayerNorm
        ln.weight.zero_()
        ln.bias.fill_(1.0)
        net.alpha_head.weight.fill_(inv_softplus(20.0) / H)
        net.lam_head.weight.fill_(inv_softplus(0.01) / H)
        net.lam_head.weight[eos] = inv_softplus(20.0) / H
    out = tmp_path_factory.mktemp("pred_eos")
    save_predictor(net, out, meta={"guidance": {"think_end": None}})
    return str(out)


def _tiny(model_dir: str) -> list[str]:
    return [f"model.name={model_dir}", "data.generator={n: 40, max_value: 9}", "data.eval_size=6",
            "eval.batch_size=4"]


def _run_eval(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["eval", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ----------------------------------------------------------------------------- pure helpers


def test_parse_budgets_and_errors() -> None:
    assert parse_budgets("64,128,256") == [64, 128, 256]
    assert parse_budgets(" 32 , 8") == [8, 32]
    for bad, msg in (("", "empty"), ("64,abc", "'abc' is not an integer"), ("0,8", ">= 1"),
                     ("8,8", "listed twice"), ("8,,16", "not an integer")):
        with pytest.raises(ValueError, match=msg):
            parse_budgets(bad)


def test_output_paths_and_table() -> None:
    assert output_paths(None, "runs/x") == (Path("runs/x/eval_budgets.json"), Path("runs/x/eval_budgets.png"))
    assert output_paths("o/r.json", "runs/x") == (Path("o/r.json"), Path("o/r.png"))
    assert output_paths("o", "runs/x")[1] == Path("o/eval_budgets.png")
    assert output_paths(None, "runs/x", "eval_budgets_ood")[0] == Path("runs/x/eval_budgets_ood.json")
    recs = [{"mode": "unguided", "budget": 64, "accuracy": 0.25, "tokens_mean": 40.0, "truncated_rate": 0.5},
            {"mode": "guided", "budget": 64, "accuracy": 0.5, "tokens_mean": 30.25, "truncated_rate": 0.0}]
    lines = format_budget_table(recs).splitlines()
    assert "unguided acc" in lines[0] and "guided acc" in lines[0]
    assert lines[2].split() == ["64", "|", "25.0%", "40.0", "50.0%", "|", "50.0%", "30.2", "0.0%"]


# ----------------------------------------------------------------------------- config + recipes


def test_budget_guidance_config_keys_validate() -> None:
    cfg = load_config(QUICKSTART, ["model.budget_guidance=some/dir",
                                   'model.budget_guidance_params={min_lambda: 5.0, trigger_strings: ["\\n"]}'])
    assert cfg.model.budget_guidance == "some/dir" and cfg.model.budget_guidance_params["min_lambda"] == 5.0
    with pytest.raises(ConfigError) as e:
        load_config(QUICKSTART, ["model.budget_guidance_params={min_lamda: 5.0}"])
    msg = str(e.value)
    assert "min_lamda" in msg and "Did you mean 'min_lambda'" in msg and "model.budget_guidance_params" in msg
    with pytest.raises(ConfigError, match="trigger_strings"):
        load_config(QUICKSTART, ["model.budget_guidance_params={trigger_strings: []}"])
    with pytest.raises(ConfigError, match="unreliable"):
        load_config(QUICKSTART, ["model.budget_guidance_params={unreliable: drop}"])
    ok = load_config(QUICKSTART, ["model.budget_guidance_params={unreliable: neutral}"])
    assert ok.model.budget_guidance_params == {"unreliable": "neutral"}


@pytest.mark.parametrize("name", ["l1_budget", "hapo_history", "kimi_length", "budget_penalty",
                                  "budget_guidance", "brpo_anytime"])
def test_budget_recipes_validate_and_match_quickstart(name: str, capsys) -> None:
    from rewards.budget_prompt import budget_params
    from rewards.length import LengthShaping

    recipe = ROOT / "recipes" / f"{name}.yaml"
    assert main(["config", str(recipe)]) == 0
    assert f"name: {name}" in capsys.readouterr().out
    cfg, quick = load_config(recipe), load_config(QUICKSTART)
    for section in ("model", "data", "train", "learner", "eval"):
        a, b = getattr(cfg, section).model_dump(), getattr(quick, section).model_dump()
        for key in ("budget", "budget_guidance", "budget_guidance_params"):  # the recipes' own additions
            a.pop(key, None), b.pop(key, None)
        assert a == b, section  # like for like with the quickstart
    assert cfg.engine.max_new_tokens == quick.engine.max_new_tokens and cfg.seed == quick.seed
    shapers = [s.name for s in LengthShaping.from_config(cfg.reward.length_shapers).shapers]
    if name == "l1_budget":
        p = budget_params(cfg.data.budget)
        assert shapers == ["l1_max"] and p.high <= cfg.engine.max_new_tokens
    elif name == "hapo_history":
        assert shapers == ["hapo_history"] and cfg.data.budget is None
    elif name == "kimi_length":
        weights = {v.name: v.weight for v in cfg.reward.verifiers}
        assert shapers == ["kimi"] and cfg.data.budget is None and weights == {"math": 1.0, "format": 0.5}
    elif name == "budget_penalty":
        p = budget_params(cfg.data.budget)
        assert shapers == ["budget_penalty"] and p.prior == "fixed" and p.low < cfg.engine.max_new_tokens
    elif name == "brpo_anytime":
        from rlkit.algorithms import ADVANTAGES

        p = ADVANTAGES.build_params(cfg.algorithm.advantage, cfg.algorithm.advantage_params)
        assert cfg.algorithm.advantage == "brpo" and shapers == [] and p.b_max <= cfg.engine.max_new_tokens
    else:
        assert cfg.model.budget_guidance == "runs/budget_predictor_smollm2"


# ----------------------------------------------------------------------------- rlkit eval --budgets


def test_eval_budgets_errors_before_loading_a_model(tiny_model_dir, tmp_path, capsys) -> None:
    rc, _, err = _run_eval(capsys, QUICKSTART, *_tiny(tiny_model_dir), "--budgets", "8,x")
    assert rc == 2 and "'x' is not an integer" in err
    rc, _, err = _run_eval(capsys, QUICKSTART, *_tiny(tiny_model_dir), "--budgets", "8",
                           "--guidance", str(tmp_path / "nope"))
    assert rc == 2 and "does not exist" in err and "rlkit train-budget-predictor" in err
    rc, _, err = _run_eval(capsys, QUICKSTART, *_tiny(tiny_model_dir), "--guidance", str(tmp_path))
    assert rc == 2 and "--guidance needs --budgets" in err


def test_eval_budgets_end_to_end_json_png(tiny_model_dir, random_predictor_dir, tmp_path, capsys) -> None:
    out = tmp_path / "ev"
    rc, stdout, _ = _run_eval(capsys, QUICKSTART, *_tiny(tiny_model_dir), "--budgets", "12,4",
                              "--guidance", random_predictor_dir, "--out", str(out), "--limit", "5", "--quiet")
    assert rc == 0
    doc = json.loads((out / "eval_budgets.json").read_text())
    assert (out / "eval_budgets.png").stat().st_size > 1000
    assert doc["budgets"] == [4, 12] and doc["problems"] == 5 and doc["guidance"] == random_predictor_dir
    recs = {(r["mode"], r["budget"]): r for r in doc["records"]}
    assert set(recs) == {("unguided", 4), ("unguided", 12), ("guided", 4), ("guided", 12)}
    for b in (4, 12):
        u, g = recs[("unguided", b)], recs[("guided", b)]
        assert u["problems"] == 5 and 1 <= u["tokens_mean"] <= b  # truncation at the budget
        assert u["guided_row_steps"] == 0 and g["guided_row_steps"] >= 5  # every row's first step is guided
        assert g["unreliable_row_steps"] == g["guided_row_steps"] and g["changed_row_steps"] == 0
        # an all-unreliable predictor falls back to the LM argmax: greedy output is unchanged
        for k in ("accuracy", "tokens_mean", "truncated_rate", "format_rate"):
            assert g[k] == u[k], (b, k)
    assert "guided acc" in stdout and "eval_budgets.png" in stdout


def test_guided_rows_really_get_the_processor(tiny_model_dir, eos_predictor_dir, tmp_path, capsys) -> None:
    """Predictor from model.budget_guidance (no --guidance flag); JSON path given as a file."""
    rc, _, _ = _run_eval(capsys, QUICKSTART, *_tiny(tiny_model_dir), f"model.budget_guidance={eos_predictor_dir}",
                         "--budgets", "10", "--out", str(tmp_path / "r.json"), "--quiet")
    assert rc == 0 and (tmp_path / "r.png").is_file()
    recs = {r["mode"]: r for r in json.loads((tmp_path / "r.json").read_text())["records"]}
    # EOS is the only reliable candidate: every guided row stops at its first (guided) step
    assert recs["guided"]["tokens_mean"] == 1.0 and recs["guided"]["truncated_rate"] == 0.0
    assert recs["guided"]["guided_row_steps"] == 6 and recs["guided"]["unreliable_row_steps"] == 0
    # unguided rows longer than 1 token had a greedy first token other than EOS: guidance changed it
    assert 1 <= recs["guided"]["changed_row_steps"] <= 6
    assert recs["unguided"]["tokens_mean"] > 1.0


def test_budget_is_written_into_prompts_when_data_budget_is_set(tiny_model_dir, tmp_path, capsys) -> None:
    from rlkit.infra.models import load_tokenizer
    from rlkit.tools.budget_eval import prompt_encoder

    cfg = load_config(ROOT / "recipes/l1_budget.yaml", _tiny(tiny_model_dir))
    tok = load_tokenizer(tiny_model_dir)
    enc = prompt_encoder(cfg, tok)
    row = {"prompt": "Tom has 3 apples.", "answer": "3"}
    assert "maximum 7 tokens" in tok.decode(enc(row, 7)) and "tokens" not in tok.decode(enc(row, None))
    rc, _, _ = _run_eval(capsys, str(ROOT / "recipes/l1_budget.yaml"), *_tiny(tiny_model_dir), "--budgets", "6",
                         "--out", str(tmp_path), "--quiet")
    doc = json.loads((tmp_path / "eval_budgets.json").read_text())
    assert rc == 0 and doc["budget_in_prompt"] and [r["mode"] for r in doc["records"]] == ["unguided"]


# ----------------------------------------------------------------------------- RolloutWorker + training CLI


def test_rollout_worker_appends_guidance_last(tiny_model_dir, random_predictor_dir, tmp_path) -> None:
    from rlkit.orchestration.ray_actors import RolloutWorker

    def first(step, input_ids, logits, state):
        return logits

    threads = torch.get_num_threads()
    try:
        w = RolloutWorker("hf", tiny_model_dir, {"seed": 0, "logits_processors": [first],
                                                 "budget_guidance": random_predictor_dir,
                                                 "budget_guidance_params": {"min_mode": 0.5}}, threads)
        procs = w.engine.logits_processors
        assert procs[0] is first and isinstance(procs[-1], BudgetGuidance) and len(procs) == 2
        assert procs[-1].params.min_mode == 0.5 and procs[-1].params.think_end is None  # saved, then overrides
        plain = RolloutWorker("hf", tiny_model_dir, {"seed": 0}, threads)
        assert plain.engine.logits_processors == []
        other = tmp_path / "other"
        d, n, v = _shapes(tiny_model_dir)
        save_predictor(GammaPredictor(PredictorConfig(d, v + 1, n, encoder_type="linear")), other)
        with pytest.raises(ValueError, match="trained for another model"):
            RolloutWorker("hf", tiny_model_dir, {"budget_guidance": str(other)}, threads)
    finally:
        torch.set_num_threads(threads)


def test_train_budget_predictor_subcommand(tiny_model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "bp"
    rc = main(["train-budget-predictor", "--model", tiny_model_dir, "--out", str(out), "--num-prompts", "4",
               "--samples-per-prompt", "2", "--max-new-tokens", "16", "--temperature", "1.0", "--mode", "think",
               "--think-end", "e", "--hidden-size", "32", "--num-layers", "1", "--epochs", "1", "--quiet"])
    assert rc == 0
    assert (out / "budget_predictor.safetensors").is_file() and (out / "budget_predictor.json").is_file()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["out_dir"] == str(out)
    with pytest.raises(SystemExit):  # its own parser: --out is required
        main(["train-budget-predictor", "--model", tiny_model_dir])


def test_train_budget_predictor_from_a_recipe_uses_its_training_rows(tiny_model_dir, tmp_path, capsys) -> None:
    from rlkit.config import load_config
    from rlkit.infra.data import format_prompt, recipe_rows
    from rlkit.infra.models import apply_chat_template, load_tokenizer

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"extends: {QUICKSTART}\nmodel: {{name: {tiny_model_dir}}}\n"
                      "data: {generator: {n: 40, max_value: 9}, eval_size: 6}\n")
    out = tmp_path / "bp"
    rc = main(["train-budget-predictor", "--recipe", str(recipe), "--out", str(out), "--num-prompts", "5",
               "--samples-per-prompt", "2", "--max-new-tokens", "16", "--mode", "think", "--think-end", "e", "--temperature", "1.0", "--hidden-size", "32",
               "--num-layers", "1", "--epochs", "1", "--quiet"])
    assert rc == 0
    cfg = load_config(recipe)
    train, held_out = recipe_rows(cfg)
    tok = load_tokenizer(tiny_model_dir)

    def ids(r):
        return apply_chat_template(tok, format_prompt(r, cfg.data.system_prompt, cfg.data.prompt_template))

    prompts = {tuple(json.loads(line)["prompt_ids"]) for line in (out / "completions.jsonl").read_text().splitlines()}
    assert len(prompts) == 5 and prompts <= {tuple(ids(r)) for r in train}  # the recipe's template, train rows
    assert not prompts & {tuple(ids(r)) for r in held_out}
    assert json.loads((out / "budget_predictor.json").read_text())["meta"]["base_model"] == tiny_model_dir


@pytest.mark.slow
def test_training_rollouts_are_guided_and_counted(tiny_model_dir, eos_predictor_dir, tmp_path) -> None:
    """``rlkit train`` with ``model.budget_guidance`` + ``data.budget``: the Ray rollout workers guide
    every budgeted rollout (this predictor forces EOS at the first guided step, so every response is
    the one EOS token) and the step logs the guidance counters."""
    from test_train_e2e import tiny_overrides

    from rlkit.infra.tracking import read_metrics
    from rlkit.trainer import Trainer

    ov = tiny_overrides(tiny_model_dir, tmp_path, "guided", steps=2) + [
        "eval.after=false", "data.budget={prior: fixed, low: 8, high: 8}",
        f"model.budget_guidance={eos_predictor_dir}"]
    Trainer(load_config(QUICKSTART, ov)).run()
    m = read_metrics(tmp_path / "guided")
    assert [x["step"] for x in m] == [1, 2]
    for x in m:  # 2 prompts x 4 samples, each guided once (its first token) and ended there
        assert x["response/len_max"] == 1.0
        assert x["budget_guidance/guided_steps"] == 8.0 and x["budget_guidance/changed_steps"] <= 8.0
        assert x["budget_guidance/unreliable_steps"] == 0.0  # EOS always passes the mask
    unguided = tiny_overrides(tiny_model_dir, tmp_path, "plain", steps=1) + [
        "eval.after=false", "data.budget={prior: fixed, low: 8, high: 8}"]
    Trainer(load_config(QUICKSTART, unguided)).run()
    (p,) = read_metrics(tmp_path / "plain")
    assert p["response/len_max"] > 1.0 and not any(k.startswith("budget_guidance/") for k in p)
    # Under the rollout correction, guided samples are off-policy: the engine reports the log-prob
    # of the guided distribution (EOS forced: ~0), the learner its own (EOS unlikely), so w << 1.
    # mode none (the default, above): trained as the policy's own, the gap is only measured;
    # tis: w < C is left as it is (the token's weight is w, tiny); mis: dropped.
    for x in m:
        assert x["mismatch/ratio_mean"] < 0.5 and x["mismatch/kl"] > 0.1 and x["mismatch/corrected_frac"] == 0.0
    mis = tiny_overrides(tiny_model_dir, tmp_path, "guided_mis", steps=1) + [
        "eval.after=false", "data.budget={prior: fixed, low: 8, high: 8}",
        f"model.budget_guidance={eos_predictor_dir}", "algorithm.rollout_correction={mode: mis, clip: 2.0}"]
    Trainer(load_config(QUICKSTART, mis)).run()
    (x,) = read_metrics(tmp_path / "guided_mis")
    assert x["mismatch/corrected_frac"] == 1.0 and x["actor/pg_loss"] == 0.0  # every guided token dropped


@pytest.mark.slow
def test_guidance_counters_stay_right_across_an_engine_restart(tiny_model_dir, eos_predictor_dir) -> None:
    """The pool reports guided steps per call (deltas of each engine's running counters); an engine
    killed and recreated starts its counters at 0, and the next report still counts exactly the
    steps guided since the last one (without the reset it would subtract the dead engine's total)."""
    import ray

    from rlkit.orchestration.ray_actors import init_ray, spawn_actors
    from rollout.engine import RolloutRequest, SamplingParams

    cfg = load_config(None, [f"model.name={tiny_model_dir}", "engine.num_engines=2", "learner.num_threads=1",
                             "cluster.num_cpus=2", "cluster.max_actor_restarts=1"])
    init_ray(cfg)
    kw = {"seed": 0, "max_batch_size": 8, "budget_guidance": eos_predictor_dir,
          "budget_guidance_params": dict(cfg.model.budget_guidance_params)}
    _, pool = spawn_actors(cfg, tiny_model_dir, kw)
    try:
        params = SamplingParams(max_new_tokens=6, temperature=1.0, n=2, seed=3)
        # 4 requests x 2 samples, round-robin over 2 engines; each sample is guided once (EOS at once)
        reqs = [RolloutRequest([3, 4, 5 + i], params, group_id=i, budget=8) for i in range(4)]
        for _ in range(2):
            comps, _ = pool.generate(reqs)
            assert all(len(c.token_ids) == 1 for c in comps)
            assert pool.guidance_metrics()["budget_guidance/guided_steps"] == 8.0
        ray.kill(pool.actors[1], no_restart=True)
        pool.generate(reqs)  # engine 1 is recreated and its shard retried
        assert pool.restarts == [0, 1]
        m = pool.guidance_metrics()
        assert m["budget_guidance/guided_steps"] == 8.0 and m["budget_guidance/unreliable_steps"] == 0.0
    finally:
        pool.shutdown()
        ray.shutdown()
