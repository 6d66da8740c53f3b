"""``rlkit`` command line: train, eval, plot, config, models.

    rlkit train recipes/quickstart.yaml [key.sub=value ...] [--resume | --no-resume]
    rlkit eval  recipes/quickstart.yaml | RUN_DIR [key=value ...] [--model DIR] [--out FILE]
    rlkit plot  RUN_DIR
    rlkit inspect RUN_DIR [--step N] [--out FILE]   # HTML view of per-token advantages
    rlkit config [RECIPE] [overrides]   # print the resolved config (or the reference with --reference)
    rlkit models [--convert NAME]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_train(args: argparse.Namespace) -> int:
    from rlkit.config import load_config
    from rlkit.trainer import Trainer

    cfg = load_config(args.recipe, args.overrides)
    resume = True if args.resume else (False if args.no_resume else None)
    summary = Trainer(cfg, resume=resume).run()
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
    from rlkit.data import format_prompt, load_rows, split_rows
    from rlkit.evaluate import evaluate_rows, format_table
    from rlkit.models import apply_chat_template, load_tokenizer, resolve_model_path

    cfg, run_model = _load_target(args.target, args.overrides)
    base = resolve_model_path(cfg.model.name)
    model_path = args.model or run_model or base
    d = cfg.data
    rows, _ = load_rows(d.source, path=d.path, split=d.split, prompt_key=d.prompt_key, answer_key=d.answer_key,
                        on_bad_row=d.on_bad_row, generator_kwargs=d.generator, seed=cfg.seed, limit=d.limit)
    _, eval_rows = split_rows(rows, d.eval_size, cfg.seed)
    lora = None
    if Path(model_path, "adapter_config.json").is_file():
        lora, model_path = model_path, base  # PEFT adapter dir on top of the base model
    engine = _engine_for(model_path, lora, cfg)
    tok = load_tokenizer(model_path)

    def encode(row):
        return apply_chat_template(tok, format_prompt(row, d.system_prompt, d.prompt_template))

    res = evaluate_rows(cfg, eval_rows, encode, engine.generate)
    label = Path(lora or model_path).name
    print(format_table({label: res}))
    if args.out:
        Path(args.out).write_text(json.dumps({"model": lora or model_path, **res}, indent=2))
    print(json.dumps(res))
    return 0


def _engine_for(model_path: str, adapter_dir: str | None, cfg):
    """An in-process HF engine; a PEFT adapter dir is loaded on top of its base model."""
    from rollout.hf import HFEngine

    kw = dict(dtype=cfg.model.dtype, max_batch_size=cfg.eval.batch_size, seed=cfg.seed)
    if adapter_dir is None:
        return HFEngine(model_path, **kw)
    from safetensors.torch import load_file

    ac = json.loads(Path(adapter_dir, "adapter_config.json").read_text())
    lora = {"rank": ac["r"], "alpha": ac["lora_alpha"], "dropout": 0.0, "target_modules": ac["target_modules"]}
    engine = HFEngine(model_path, lora=lora, **kw)
    engine.load_weights(load_file(str(Path(adapter_dir, "adapter_model.safetensors"))))
    return engine


def _cmd_plot(args: argparse.Namespace) -> int:
    from rlkit.plot import plot_run

    for p in plot_run(args.run_dir):
        print(p)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from rlkit.inspector import render_inspect

    try:
        print(render_inspect(args.run_dir, step=args.step, out=args.out))
    except (FileNotFoundError, ValueError) as e:
        print(f"rlkit: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from rlkit.config import describe, load_config

    if args.reference:
        for key, default, desc in describe():
            print(f"{key:<45} {default:<28} {desc}")
        return 0
    cfg = load_config(args.recipe, args.overrides)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from rlkit.models import BUILTIN_MODELS, resolve_model_path

    if args.convert:
        print(resolve_model_path(args.convert))
        return 0
    for name in BUILTIN_MODELS:
        print(name)
    return 0


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
    e.add_argument("--out", help="write the results JSON here")
    e.set_defaults(fn=_cmd_eval)
    p = sub.add_parser("plot", help="write PNG curves of a run")
    p.add_argument("run_dir")
    p.set_defaults(fn=_cmd_plot)
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


def main(argv: list[str] | None = None) -> int:
    from rlkit.config import ConfigError

    args = build_parser().parse_args(argv)
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
