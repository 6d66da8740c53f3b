"""Which task gives the methods something to act on? The base model, greedy, on candidate tasks (CPU).

For each candidate (a set of dotted overrides on a recipe), the untrained model answers the task's
held-out problems and the script prints what a task for the efficient-reasoning comparison needs:

- accuracy, ``\\boxed{}`` rate and tokens (a learnable task starts between about 10% and 40%:
  below, GRPO groups are all-wrong and give no signal; above, there is little left to learn);
- how the work is written: non-empty lines per response, the share with 3 or more lines, and the
  step boundaries SPAE would probe: tokens ending ``".\\n\\n"`` (its default), the same matched on
  the text (``step_probe.boundary_match: text``, for tokenizers that split ``"."`` from ``"\\n\\n"``)
  and every ``"\\n"`` —
  a task whose answers are one line leaves SPAE and TEMPO nothing to act on.

    .venv/bin/python bench/task_baselines.py                 # the built-in candidates, 64 problems each
    .venv/bin/python bench/task_baselines.py --limit 16 --only words3,chain3

Prints one table and, last, one JSON line with every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPWISE = "{prompt}\nSolve it step by step, one step per line, then give the final number as \\boxed{{answer}}."
ONE_SHOT = ("Example: Ann has 4 pens. Then she buys 3 more. Later she loses 2. How many pens does she have now?\n"
            "Ann starts with 4 pens.\n4 + 3 = 7.\n7 - 2 = 5.\nThe answer is \\boxed{{5}}.\n\n"
            "Now solve this one the same way, one step per line.\n{prompt}")
WORDS = "data.generator={n: 2000, min_value: 1, max_value: 30, ops: ['+', '-'], word_problems: true, n_terms: %d}"
CANDIDATES: dict[str, list[str]] = {
    "words2 (quickstart)": [],
    "words3": [WORDS % 3],
    "words3 step-by-step": [WORDS % 3, f"data.prompt_template={STEPWISE}"],
    "words4 step-by-step": [WORDS % 4, f"data.prompt_template={STEPWISE}"],
    "words3 small +": ["data.generator={n: 2000, min_value: 1, max_value: 10, ops: ['+'], word_problems: true, "
                       "n_terms: 3}"],
    "words3 small +-": ["data.generator={n: 2000, min_value: 1, max_value: 10, ops: ['+', '-'], "
                        "word_problems: true, n_terms: 3}"],
    "words3 small +- step-by-step": ["data.generator={n: 2000, min_value: 1, max_value: 10, ops: ['+', '-'], "
                                     "word_problems: true, n_terms: 3}", f"data.prompt_template={STEPWISE}"],
    "words3 small +- one-shot": ["data.generator={n: 2000, min_value: 1, max_value: 10, ops: ['+', '-'], "
                                 "word_problems: true, n_terms: 3}", f"data.prompt_template={ONE_SHOT}"],
    "words3 +- one-shot": [WORDS % 3, f"data.prompt_template={ONE_SHOT}"],
    "words2-3 small +-": ["data.generator={n: 2000, min_value: 1, max_value: 10, ops: ['+', '-'], "
                          "word_problems: true, n_terms: [2, 3]}"],
    "words2-3 +-": ["data.generator={n: 2000, min_value: 1, max_value: 20, ops: ['+', '-'], "
                    "word_problems: true, n_terms: [2, 3]}"],
    "expr3": ["data.generator={n: 2000, min_value: 1, max_value: 30, ops: ['+', '-'], n_terms: 3, "
              "word_problems: false}", f"data.prompt_template={STEPWISE}"],
    "chain3 (reasoning-gym)": ["data.source=reasoning_gym",
                               "data.generator={task: chain_sum, size: 2000, min_terms: 3, max_terms: 3, "
                               "min_digits: 1, max_digits: 2}", f"data.prompt_template={STEPWISE}"],
    "gsm_symbolic (reasoning-gym)": ["data.source=reasoning_gym", "data.generator={task: gsm_symbolic, size: 500}",
                                     f"data.prompt_template={STEPWISE}"],
}


def measure(name: str, overrides: list[str], a: argparse.Namespace) -> dict:
    from rlkit.algorithms.spae import find_step_boundaries
    from rlkit.cli import _engine_for
    from rlkit.config import load_config
    from rlkit.infra.data import recipe_rows
    from rlkit.infra.models import load_tokenizer, resolve_model_path
    from rlkit.methods.step_probes import TokenTexts
    from rlkit.tools.budget_eval import prompt_encoder
    from rlkit.tools.evaluate import evaluate_rows

    cfg = load_config(str(ROOT / "recipes" / "quickstart.yaml"),
                      [*overrides, f"eval.max_new_tokens={a.max_new_tokens}", f"data.eval_size={a.limit}"])
    _, rows = recipe_rows(cfg)
    rows = rows[: a.limit]
    model = resolve_model_path(cfg.model.name)
    tok = load_tokenizer(model)
    engine = _engine_for(model, None, cfg)
    encode = prompt_encoder(cfg, tok)
    comps: list = []

    def generate(reqs):
        out = engine.generate(reqs)
        comps.extend(out)
        return out

    t0 = time.perf_counter()
    res = evaluate_rows(cfg, rows, lambda r: encode(r, None), generate)
    texts = TokenTexts(tok)
    lines = [len([x for x in c.text.splitlines() if x.strip()]) for c in comps]
    res.update({
        "lines_mean": statistics.fmean(lines),
        "multiline_frac": statistics.fmean(n >= 3 for n in lines),
        "spae_steps_mean": statistics.fmean(len(find_step_boundaries(texts(c.token_ids))) for c in comps),
        "spae_text_steps_mean": statistics.fmean(
            len(find_step_boundaries(texts(c.token_ids), match="text")) for c in comps),
        "newline_steps_mean": statistics.fmean(
            len(find_step_boundaries(texts(c.token_ids), suffixes=("\n",), match="text")) for c in comps),
        "seconds": time.perf_counter() - t0,
        "example": comps[0].text if comps else "",
        "prompt_example": rows[0]["prompt"] if rows else "",
    })
    if hasattr(engine, "close"):
        engine.close()
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=64, help="held-out problems per candidate")
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--only", help="comma-separated candidate name prefixes")
    a = p.parse_args(argv)
    names = [n for n in CANDIDATES if not a.only or any(n.startswith(x) for x in a.only.split(","))]
    results = {}
    for n in names:
        print(f"[bench] {n} ...", flush=True)
        results[n] = measure(n, CANDIDATES[n], a)
        r = results[n]
        print(f"  accuracy {r['accuracy']:.1%}  boxed {r['format_rate']:.1%}  tokens {r['tokens_mean']:.1f}"
              f"  truncated {r['truncated_rate']:.1%}  lines {r['lines_mean']:.2f}  >=3 lines "
              f"{r['multiline_frac']:.1%}  SPAE steps {r['spae_steps_mean']:.2f} (text {r['spae_text_steps_mean']:.2f})  newline steps "
              f"{r['newline_steps_mean']:.2f}  ({r['seconds']:.0f} s)\n  example: {r['example'][:300]!r}", flush=True)
    print(f"\n== base model, greedy, {a.limit} held-out problems, {a.max_new_tokens} new tokens ==")
    print("| task | accuracy | boxed | tokens | truncated | lines | >=3 lines | SPAE steps | SPAE steps (text) | newline steps |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, r in results.items():
        print(f"| {n} | {r['accuracy']:.1%} | {r['format_rate']:.1%} | {r['tokens_mean']:.1f} | "
              f"{r['truncated_rate']:.1%} | {r['lines_mean']:.2f} | {r['multiline_frac']:.1%} | "
              f"{r['spae_steps_mean']:.2f} | {r['spae_text_steps_mean']:.2f} | {r['newline_steps_mean']:.2f} |")
    print(json.dumps({"bench": "task_baselines", "limit": a.limit, "max_new_tokens": a.max_new_tokens,
                      "candidates": CANDIDATES, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
