"""``rlkit`` command line: train, sweep, eval, train-budget-predictor, plot, compare, inspect, config, models.

    rlkit train recipes/quickstart.yaml [key.sub=value ...] [--resume | --no-resume]
    rlkit eval  recipes/quickstart.yaml | RUN_DIR [key=value ...] [--model DIR] [--out FILE] [--limit N]
    rlkit eval  RECIPE | RUN_DIR --budgets 64,128,256 [--guidance PREDICTOR_DIR]  # accuracy vs budget
    rlkit train-budget-predictor --model smollm2-135m-instruct --out runs/budget_predictor_smollm2
    rlkit sweep recipes/quickstart.yaml --seeds 0,1,2 [overrides]   # one run per seed, resumable
    rlkit plot  RUN_DIR
    rlkit compare RUN_DIR [RUN_DIR ...]   # runs differing only by seed: mean ± 95% interval
    rlkit inspect RUN_DIR [--step N] [--out FILE]   # HTML view of per-token advantages
    rlkit config [RECIPE] [overrides]   # print the resolved config (or the reference with --reference)
    rlkit models [--convert NAME]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def _cmd_train(args: argparse.Namespace) -> int:
    from rlkit.config import load_config
    from rlkit.trainer import Trainer

    cfg = load_config(args.recipe, args.overrides)
    from rlkit.infra.data import DataError
    from rlkit.orchestration.engine_pool import EngineFailure
    from rlkit.orchestration.placement import PlacementError
    from rlkit.orchestration.sync_check import SyncVerificationError
    from rlkit.orchestration.weight_sync import SyncTimeout
    from rollout.weight_transfer import DistributedInitError

    resume = True if args.resume else (False if args.no_resume else None)
    try:
        summary = Trainer(cfg, resume=resume).run()
    except (SyncVerificationError, DataError, PlacementError) as e:  # a verdict, bad data, a cluster too small
        print(f"rlkit: {e}", file=sys.stderr)
        return 1
    except (EngineFailure, SyncTimeout, DistributedInitError) as e:  # the cluster failed under the run
        from rlkit.infra.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(cfg.run_dir)
        cause = getattr(e, "cause", None) or e  # an actor's error arrives wrapped by Ray
        print(f"rlkit: {str(cause).strip().splitlines()[0]}\nrlkit: the run stopped; rerun the same command to "
              f"resume from {ckpt if ckpt else 'the start (no checkpoint yet)'}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, indent=None))
    return 0


def _load_target(target: str, overrides: list[str]):
    """A recipe file, or a run dir (its saved config + its exported final model)."""
    from rlkit.config import load_config

    p = Path(target)
    if p.is_dir():
        if not (p / "config.yaml").is_file():
            raise SystemExit(f"rlkit: {p} is not a run dir (no config.yaml)")
        cfg = load_config(p / "config.yaml", overrides)
        model = p / "final"
        return cfg, (str(model) if (model / "config.json").is_file() or (model / "adapter_config.json").is_file() else None)
    return load_config(target, overrides), None


def _cmd_eval(args: argparse.Namespace) -> int:
    from rlkit.infra.data import recipe_rows
    from rlkit.infra.models import load_tokenizer, resolve_model_path
    from rlkit.methods.budget_guidance import check_predictor_dir
    from rlkit.tools.budget_eval import parse_budgets, prompt_encoder
    from rlkit.tools.evaluate import evaluate_rows, format_table

    cfg, run_model = _load_target(args.target, args.overrides)
    # flag errors before any model loads
    try:
        budgets = parse_budgets(args.budgets) if args.budgets is not None else None
        guidance = args.guidance or (cfg.model.budget_guidance if budgets else None)
        if args.guidance and budgets is None:
            raise ValueError("--guidance needs --budgets (guidance acts on a token budget), e.g. --budgets 64,128,256")
        if guidance and cfg.engine.name != "hf":
            raise ValueError(f"--guidance needs engine.name=hf (got {cfg.engine.name!r}): guided sampling reads "
                             "every layer's hidden state at each decode step")
        if guidance:
            check_predictor_dir(guidance)
    except (ValueError, FileNotFoundError) as e:
        print(f"rlkit: {e}", file=sys.stderr)
        return 2
    base = resolve_model_path(cfg.model.name)
    model_path = args.model or run_model or base
    train_rows, eval_rows = recipe_rows(cfg)
    if args.split:
        from rlkit.infra.eval_splits import load_eval_splits

        if args.split not in cfg.eval.splits:
            have = ", ".join(cfg.eval.splits) or "none; add eval.splits.<name> to the recipe"
            print(f"rlkit: --split {args.split}: no such eval.splits entry (have: {have})", file=sys.stderr)
            return 2
        try:
            eval_rows = load_eval_splits(cfg, train_rows, eval_rows, names=[args.split])[args.split]
        except ValueError as e:
            print(f"rlkit: {e}", file=sys.stderr)
            return 2
    if args.limit:
        eval_rows = eval_rows[: args.limit]
    lora = None
    if Path(model_path, "adapter_config.json").is_file():
        lora, model_path = model_path, base  # PEFT adapter dir on top of the base model
    engine = _engine_for(model_path, lora, cfg)
    encode = prompt_encoder(cfg, load_tokenizer(model_path))
    if budgets is not None:
        return _eval_budgets(args, cfg, eval_rows, encode, engine, budgets, guidance, lora or model_path)

    res = evaluate_rows(cfg, eval_rows, lambda r: encode(r, None), engine.generate)
    label = Path(lora or model_path).name
    print(format_table({label: res}))
    if args.out:
        Path(args.out).write_text(json.dumps({"model": lora or model_path, **res}, indent=2))
    print(json.dumps(res))
    return 0


def _eval_budgets(args, cfg, rows, encode, engine, budgets, guidance, model) -> int:
    """``rlkit eval --budgets``: accuracy / mean tokens per budget, unguided vs guided; JSON + PNG."""
    from rlkit.methods.budget_guidance import build_guidance
    from rlkit.tools.budget_eval import (
        REPORT_NAME,
        evaluate_budgets,
        format_budget_table,
        output_paths,
        write_budget_report,
    )

    proc = build_guidance(engine, guidance, cfg.model.budget_guidance_params) if guidance else None
    records = evaluate_budgets(cfg, rows, encode, engine.generate, budgets, proc,
                               budget_in_prompt=cfg.data.budget is not None, progress=not args.quiet)
    target = Path(args.target)
    name = f"{REPORT_NAME}_{args.split}" if args.split else REPORT_NAME  # a split's curve beside the ID one
    json_path, png_path = output_paths(args.out, target if target.is_dir() else cfg.run_dir, name)
    meta = {"target": str(target), "split": args.split, "model": model, "guidance": str(guidance) if guidance else None,
            "guidance_params": dataclasses.asdict(proc.params) if proc else None, "problems": len(rows),
            "budgets": budgets, "budget_in_prompt": cfg.data.budget is not None,
            "temperature": cfg.eval.temperature, "num_samples": cfg.eval.num_samples, "seed": cfg.seed}
    write_budget_report(records, meta, json_path, png_path)
    print(format_budget_table(records))
    print(f"wrote {json_path}\nwrote {png_path}")
    return 0


def _engine_for(model_path: str, adapter_dir: str | None, cfg):
    """An in-process ``engine.name`` engine (hf, or vllm with ``engine.vllm.*``); a PEFT adapter dir
    is loaded on top of its base model (only the adapter tensors, as a weight sync would)."""
    from rollout.engine import get_engine_class

    kw = dict(dtype=cfg.model.dtype, max_batch_size=cfg.eval.batch_size, seed=cfg.seed)
    if cfg.engine.name == "vllm":
        kw.update(cfg.engine.vllm.model_dump(), tensor_parallel_size=cfg.engine.tensor_parallel_size)
    cls = get_engine_class(cfg.engine.name)
    if adapter_dir is None:
        return cls(model_path, **kw)
    from safetensors.torch import load_file

    ac = json.loads(Path(adapter_dir, "adapter_config.json").read_text())
    lora = {"rank": ac["r"], "alpha": ac["lora_alpha"], "dropout": 0.0, "target_modules": ac["target_modules"]}
    engine = cls(model_path, lora=lora, **kw)
    engine.load_weights(load_file(str(Path(adapter_dir, "adapter_model.safetensors"))))
    return engine


def _cmd_train_budget_predictor(argv: list[str]) -> int:
    """``rlkit train-budget-predictor [flags]``: the flags of ``rlkit.tools.budget_train``."""
    from rlkit.tools.budget_train import add_arguments, run

    ap = argparse.ArgumentParser(prog="rlkit train-budget-predictor",
                                 description="Train the budget-guidance predictor (docs/algorithms.md §4.3) on the model's "
                                             "own completions; writes budget_predictor.{json,safetensors}.")
    add_arguments(ap)
    try:
        return run(ap.parse_args(argv))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"rlkit: {e}", file=sys.stderr)
        return 2


def _cmd_compare(args: argparse.Namespace) -> int:
    from rlkit.tools.compare import (
        compare_groups,
        format_markdown,
        group_runs,
        plot_compare,
        plot_compare_budgets,
    )
    from rlkit.tools.diagnostics import diagnostics_table
    from rlkit.tools.paired import format_paired, paired_differences

    try:
        rows = compare_groups(args.run_dirs, tail=args.tail, by_seed=args.by_seed)
    except FileNotFoundError as e:
        print(f"rlkit: {e}", file=sys.stderr)
        return 2
    print(format_markdown(rows))
    groups = group_runs(args.run_dirs, args.by_seed)
    paired = format_paired(paired_differences(groups), rows[0]["run"]) if args.by_seed else ""
    if paired:
        print("\n" + paired)
    print("\nMethod diagnostics:\n\n" + diagnostics_table(groups, [r["run"] for r in rows]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.png:
        print(f"wrote {plot_compare(args.run_dirs, args.png, by_seed=args.by_seed)}")
        png = Path(args.png)
        budgets = plot_compare_budgets(args.run_dirs, png.with_name(png.stem + "_budgets.png"), by_seed=args.by_seed)
        if budgets is not None:
            print(f"wrote {budgets}")
    return 0


def _cmd_archive(args: argparse.Namespace) -> int:
    from rlkit.tools.archive import archive_runs

    try:
        done = archive_runs(args.run_dirs, args.to)
    except (FileNotFoundError, ValueError) as e:
        print(f"rlkit: {e}", file=sys.stderr)
        return 2
    for target, n, size in done:
        print(f"{target}: {n} files, {size / 1024:.0f} KiB")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    """One ``rlkit train`` per seed (through ``_cmd_train``), skipping done seeds, then the grouped table."""
    from rlkit.config import config_dict, load_config
    from rlkit.tools.compare import compare_groups, format_markdown, group_runs
    from rlkit.tools.diagnostics import diagnostics_table
    from rlkit.tools.sweep import config_conflicts, parse_seeds, plan_sweep, seed_overrides, write_report

    overrides = [*args.overrides, *([f"output_dir={args.out}"] if args.out else [])]
    try:
        seeds = parse_seeds(args.seeds)
        base = load_config(args.recipe, overrides)
        per_seed = {s: seed_overrides(overrides, s, base.name) for s in seeds}
    except ValueError as e:
        print(f"rlkit: {e}", file=sys.stderr)
        return 2
    cfgs = [load_config(args.recipe, per_seed[s]) for s in seeds]
    run_dirs = [c.run_dir for c in cfgs]
    plan = plan_sweep(seeds, run_dirs)
    conflicts = config_conflicts(plan, run_dirs, [config_dict(c) for c in cfgs])
    if conflicts:
        print(f"rlkit: {conflicts[0]}", file=sys.stderr)
        return 2
    for (seed, state), d in zip(plan, run_dirs):
        print(f"rlkit sweep: seed {seed}: {state} ({d})", flush=True)
    for (seed, state), d in zip(plan, run_dirs):
        if state == "done":
            continue
        print(f"rlkit sweep: training seed {seed} ({state}) -> {d}", flush=True)
        ns = argparse.Namespace(recipe=args.recipe, overrides=per_seed[seed], resume=False, no_resume=False)
        rc = _cmd_train(ns)
        if rc:
            print(f"rlkit: sweep stopped at seed {seed}; rerun the same command to resume it", file=sys.stderr)
            return rc
    rows = compare_groups(run_dirs, by_seed=True)
    table = format_markdown(rows) + "\n\nMethod diagnostics:\n\n" + diagnostics_table(
        group_runs(run_dirs, by_seed=True), [r["run"] for r in rows])
    print(table)
    meta = {"recipe": str(args.recipe), "overrides": overrides, "seeds": seeds,
            "run_dirs": [str(d) for d in run_dirs], "plan": [list(p) for p in plan]}
    for p in write_report(base.output_dir, base.name, table, meta, rows):
        print(f"wrote {p}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from rlkit.tools.plot import plot_run

    for p in plot_run(args.run_dir):
        print(p)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from rlkit.tools.inspector import render_inspect

    try:
        print(render_inspect(args.run_dir, step=args.step, out=args.out))
    except (FileNotFoundError, ValueError) as e:
        print(f"rlkit: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from rlkit.config import config_dict, describe, load_config

    if args.reference:
        from rlkit.algorithms import ADVANTAGES, POLICY_LOSSES

        for key, default, desc in describe():
            print(f"{key:<45} {default:<28} {desc}")
        for reg, key, sel in ((ADVANTAGES, "algorithm.advantage_params", "advantage"),
                              (POLICY_LOSSES, "algorithm.loss_params", "policy_loss")):
            print(f"\n{key} (keys of the chosen algorithm.{sel}):")
            for name, field, default, desc in reg.describe_params():
                print(f"{f'{key}.{field} [{name}]':<45} {default:<28} {desc}")
        return 0
    cfg = load_config(args.recipe, args.overrides)
    print(yaml.safe_dump(config_dict(cfg), sort_keys=False))
    from rlkit.methods import active_stages

    print(f"# method stages of this run: {', '.join(s.name for s in active_stages(cfg)) or 'none'}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from rlkit.infra.models import BUILTIN_MODELS, resolve_model_path

    if args.convert:
        print(resolve_model_path(args.convert))
        return 0
    for name in BUILTIN_MODELS:
        print(name)
    return 0


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rlkit", description="RL post-training for efficient reasoning.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="run an RL recipe")
    t.add_argument("recipe")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=5")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="resume from the run dir's latest checkpoint")
    g.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    t.set_defaults(fn=_cmd_train)
    e = sub.add_parser("eval", help="evaluate a model on the held-out set")
    e.add_argument("target", help="recipe YAML or run dir")
    e.add_argument("overrides", nargs="*")
    e.add_argument("--model", help="HF model dir or PEFT adapter dir to evaluate")
    e.add_argument("--out", help="write the results JSON here (with --budgets: a .json file, the PNG beside "
                                 "it, or a directory; default: the run dir)")
    e.add_argument("--limit", type=_positive_int, help="evaluate only the first N held-out problems")
    e.add_argument("--split", metavar="NAME", help="evaluate the recipe's eval.splits.NAME set instead of the "
                   "in-distribution held-out problems")
    e.add_argument("--budgets", metavar="B1,B2,...",
                   help="token budgets: accuracy and mean tokens per budget, truncated (unguided) and, with a "
                        "predictor, budget-guided; writes eval_budgets.json + .png")
    e.add_argument("--guidance", metavar="DIR",
                   help="budget predictor dir for the guided runs (default: model.budget_guidance)")
    e.add_argument("--quiet", action="store_true", help="no progress output")
    e.set_defaults(fn=_cmd_eval)
    # listed here for `rlkit --help`; main() hands its arguments to rlkit.tools.budget_train's own parser
    # (importing it pulls in torch, which the other commands' parsing should not pay for)
    sub.add_parser("train-budget-predictor", add_help=False,
                   help="train the budget-guidance length predictor on the model's own completions")
    p = sub.add_parser("plot", help="write PNG curves of a run")
    p.add_argument("run_dir")
    p.set_defaults(fn=_cmd_plot)
    cp = sub.add_parser("compare", help="table (markdown) + overlaid curves of several runs; the first is the baseline")
    cp.add_argument("run_dirs", nargs="+")
    cp.add_argument("--png", help="write the overlaid reward / accuracy / length curves here (and, for runs "
                                  "evaluated with rlkit eval --budgets, accuracy vs tokens to <stem>_budgets.png)")
    cp.add_argument("--json", help="write the table rows as JSON here")
    cp.add_argument("--tail", type=int, default=3, help="training metrics are averaged over the last N steps")
    cp.add_argument("--by-seed", action=argparse.BooleanOptionalAction, default=True,
                    help="merge runs whose configs differ only in seed / name / output_dir into one row: mean "
                         "± 95%% CI half-width over the seeds (default: on)")
    cp.set_defaults(fn=_cmd_compare)
    ar = sub.add_parser("archive", help="copy runs' records (config, metrics, evaluations, figures; no "
                                       "weights) to DIR/<run name>/, for rlkit compare later")
    ar.add_argument("run_dirs", nargs="+")
    ar.add_argument("--to", required=True, metavar="DIR")
    ar.set_defaults(fn=_cmd_archive)
    sw = sub.add_parser("sweep", help="train a recipe once per seed (resumable), then compare the seeds")
    sw.add_argument("recipe")
    sw.add_argument("overrides", nargs="*", help="dotted overrides for every seed, e.g. train.steps=5")
    sw.add_argument("--seeds", required=True, metavar="S1,S2,...", help="comma-separated seeds, e.g. 0,1,2")
    sw.add_argument("--out", metavar="DIR", help="output_dir of the runs and the report (default: the config's)")
    sw.set_defaults(fn=_cmd_sweep)
    i = sub.add_parser("inspect", help="write an HTML page of sampled responses coloured by per-token advantage")
    i.add_argument("run_dir")
    i.add_argument("--step", type=int, help="training step to show (default: the latest dump)")
    i.add_argument("--out", help="HTML file to write (default: RUN_DIR/inspect/step_N.html)")
    i.set_defaults(fn=_cmd_inspect)
    c = sub.add_parser("config", help="print the resolved config, or the reference")
    c.add_argument("recipe", nargs="?")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--reference", action="store_true")
    c.set_defaults(fn=_cmd_config)
    m = sub.add_parser("models", help="list built-in model aliases / convert one")
    m.add_argument("--convert", metavar="NAME")
    m.set_defaults(fn=_cmd_models)
    return ap


def parse(argv: list[str]) -> argparse.Namespace:
    """The parsed command line; dotted overrides may also come after the options
    (``rlkit sweep RECIPE --seeds 0,1 key=value``), where argparse alone stops collecting them."""
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*(args.overrides or []), *extra]
    elif extra:
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    from rlkit.compose import ConfigError

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train-budget-predictor"]:
        return _cmd_train_budget_predictor(argv[1:])
    args = parse(argv)
    try:
        return int(args.fn(args) or 0)
    except ConfigError as e:
        print(f"rlkit: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
