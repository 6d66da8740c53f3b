"""Train the budget-guidance predictor (docs/algorithms.md §4.3) on the model's own completions.

    python -m rlkit.tools.budget_train --model smollm2-135m-instruct --out runs/budget_predictor
    rlkit train-budget-predictor --recipe recipes/quickstart.yaml --out runs/budget_predictor_smollm2

Pipeline: prompts from a prompt source (default: the built-in arithmetic generator) -> sampled
completions from ``rollout.hf.HFEngine`` -> thinking regions (``<think>`` .. ``</think>``, or the
whole response through EOS for models without think tags) plus the reference's "concise"
augmentation -> hidden states of the frozen LM at every region position -> the Gamma NLL of
§4.3 -> ``budget_predictor.safetensors`` + ``.json`` (and ``train_summary.json``) in ``out_dir``.

Departures: no external traces (OpenR1) — the model's own samples are the data; completions that
hit ``max_new_tokens`` have no known end and are dropped; prompts are split into train/validation
so the report shows held-out NLL.

``--recipe`` takes the model, the prompt rows (its training split, never its held-out problems),
the system prompt and the template from a recipe, so the predictor learns the lengths of the task
it will guide. The sampled completions are saved as ``completions.jsonl`` in ``out_dir``;
``--completions FILE`` refits on saved ones without generating again.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from rollout.budget import GammaPredictor, PredictorConfig, init_head_bias, save_predictor
from rollout.budget_fit import FitParams, evaluate_predictor, extract_features, fit_predictor
from rollout.engine import Completion, RolloutRequest, SamplingParams

DEFAULT_PROMPT_TEMPLATE = "{prompt}\nThink briefly, then give the final number as \\boxed{{answer}}."
"""The quickstart recipe's template, so traces look like what the model sees at evaluation."""
Region = Literal["auto", "think", "response"]


@dataclass
class Trace:
    """A training sequence (prompt + completion ids) and its thinking region (token indices)."""

    ids: list[int]
    region: tuple[int, int]
    prompt_index: int
    concise: bool = False


def think_region(
    prompt_len: int, completion_ids: Sequence[int], stopped: bool, tokenizer: Any, *,
    think_start: str | None = None, think_end: str | None = "</think>", mode: Region = "auto",
) -> tuple[int, int] | None:
    """``(first, last)`` indices (in prompt + completion) of the region to budget, or None.

    ``think``: from the token containing ``think_start`` (else the first response token) through
    the first token containing ``think_end``. ``response``: the whole response through its last
    token, only if the model stopped by itself (EOS). ``auto``: ``think`` if ``think_end``
    occurs, else ``response``. Tags are matched per token, as guided decoding does.
    """
    if mode not in ("auto", "think", "response"):
        raise ValueError(f"mode must be 'auto', 'think' or 'response', got {mode!r}")
    if not completion_ids:
        return None
    texts = tokenizer.batch_decode([[t] for t in completion_ids], skip_special_tokens=False)
    end = next((k for k, t in enumerate(texts) if think_end and think_end in t), None)
    if mode != "response" and end is not None:
        start = next((k for k, t in enumerate(texts[:end]) if think_start and think_start in t), 0)
        return prompt_len + start, prompt_len + end
    if mode == "think" or not stopped:
        return None
    return prompt_len, prompt_len + len(completion_ids) - 1


def concise_text(text: str, think_start: str = "<think>", think_end: str = "</think>") -> str | None:
    """The reference's "concise" rewrite of ``[<think>]X</think>Z`` (§4.3 data augmentation).

    ``X`` with "**Final Answer**" -> ``<think>\\nZ\\n\\n**Final Answer**Y</think>\\n\\nZ`` (Y = the
    text after it in X), else ``<think>\\nZ\\n</think>\\n\\nZ``. The opening tag is kept only if
    ``text`` had it (it may sit in the prompt). None when there is no closed thought or no Z.
    """
    if think_end not in text:
        return None
    thought, answer = text.split(think_end, 1)
    answer = answer.lstrip("\n")
    if not answer.strip():
        return None
    opened = thought.lstrip().startswith(think_start)
    head = think_start if opened else ""
    marker = "**Final Answer**"
    if marker in thought:
        tail = thought.split(marker, 1)[1]
        return f"{head}\n{answer}\n\n{marker}{tail}{think_end}\n\n{answer}"
    return f"{head}\n{answer}\n{think_end}\n\n{answer}"


def build_traces(
    completions: Sequence[Completion], tokenizer: Any, eos_ids: Sequence[int], *,
    prompt_index: Sequence[int], think_start: str | None = None, think_end: str | None = "</think>",
    mode: Region = "auto", concise_mix: float = 1.0, seed: int = 0,
) -> list[Trace]:
    """Traces with regions from sampled completions, plus concise copies of a ``concise_mix``
    share of those with a closed thought (``[INFERRED: mix]``: the reference's ratio is unknown)."""
    rng = random.Random(seed)
    out: list[Trace] = []
    for c, pi in zip(completions, prompt_index, strict=True):
        stopped = c.finish_reason == "stop" and bool(c.token_ids) and c.token_ids[-1] in eos_ids
        region = think_region(len(c.prompt_ids), c.token_ids, stopped, tokenizer,
                              think_start=think_start, think_end=think_end, mode=mode)
        if region is None:
            continue
        ids = list(c.prompt_ids) + list(c.token_ids)
        out.append(Trace(ids, region, pi))
        if not (think_end and stopped and rng.random() < concise_mix):
            continue
        body = c.token_ids[:-1]  # drop EOS, re-added below
        new = concise_text(tokenizer.decode(body, skip_special_tokens=False), think_start or "<think>", think_end)
        if new is None:
            continue
        comp = tokenizer.encode(new, add_special_tokens=False) + [c.token_ids[-1]]
        region = think_region(len(c.prompt_ids), comp, True, tokenizer, think_start=think_start,
                              think_end=think_end, mode="think")
        if region is not None:
            out.append(Trace(list(c.prompt_ids) + comp, region, pi, concise=True))
    return out


def _sample(engine: Any, prompts: list[list[int]], max_new_tokens: int, temperature: float, n: int,
            max_batch_size: int, progress: bool) -> list[Completion]:
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=n)
    out: list[Completion] = []
    chunk = max(1, max_batch_size // n)
    for s in range(0, len(prompts), chunk):
        reqs = [RolloutRequest(p, params, group_id=s + k) for k, p in enumerate(prompts[s : s + chunk])]
        out += engine.generate(reqs)
        _say(progress, f"generated {len(out)}/{len(prompts) * n} completions "
                       f"({engine.engine_stats().get('rollout/tokens_per_s', 0.0):.0f} tok/s)")
    return out


_SAVED_FIELDS = ("group_id", "prompt_ids", "token_ids", "finish_reason")


def save_completions(completions: Sequence[Completion], path: str | Path) -> None:
    """One JSON line per completion (its prompt, tokens, finish reason and prompt index)."""
    with open(path, "w") as f:
        for c in completions:
            f.write(json.dumps({k: getattr(c, k) for k in _SAVED_FIELDS}) + "\n")


def load_completions(path: str | Path) -> list[Completion]:
    """Completions written by :func:`save_completions`; a malformed line names its number."""
    out: list[Completion] = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            out.append(Completion(prompt_ids=list(d["prompt_ids"]), token_ids=list(d["token_ids"]),
                                  logprobs=[0.0] * len(d["token_ids"]), finish_reason=d["finish_reason"],
                                  group_id=int(d["group_id"])))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} line {i}: not a saved completion ({e})") from None
    if not out:
        raise ValueError(f"{path}: no completions")
    return out


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[budget-train] {msg}", file=sys.stderr, flush=True)


def train_budget_predictor(
    model_path: str, out_dir: str, num_prompts: int = 16, *,
    samples_per_prompt: int = 4, max_new_tokens: int = 192, temperature: float = 0.7,
    source: str = "arithmetic", generator_kwargs: dict[str, Any] | None = None,
    prompt_template: str | None = DEFAULT_PROMPT_TEMPLATE, system_prompt: str | None = None,
    mode: Region = "auto", think_start: str | None = None, think_end: str | None = "</think>",
    trigger_strings: tuple[str, ...] = ("\n",), concise_mix: float = 1.0,
    predictor: dict[str, Any] | None = None, fit: FitParams | None = None, val_fraction: float = 0.15,
    dtype: str = "float32", max_batch_size: int = 64, feature_dtype: str = "bfloat16",
    seed: int = 42, progress: bool = True, rows: Sequence[dict] | None = None,
    completions_file: str | Path | None = None,
) -> dict[str, Any]:
    """Generate traces with the model itself, train a Gamma predictor on them, save it to ``out_dir``.

    ``model_path``: a local HF directory or a built-in alias (``smollm2-135m-instruct``).
    ``predictor``: ``PredictorConfig`` fields to override (``hidden_size``, ``num_layers``,
    ``encoder_type``...). ``rows``: prompt rows to use (the first ``num_prompts``) instead of
    ``source``. ``completions_file``: reuse completions saved by an earlier run (``completions.jsonl``)
    instead of sampling. Returns (and writes as ``train_summary.json``) counts, timings and
    NLL / mode-MAE on train and held-out prompts before and after training.
    """
    from rlkit.infra.data import format_prompt, load_rows
    from rlkit.infra.models import apply_chat_template, load_tokenizer, resolve_model_path
    from rollout.hf import HFEngine

    if num_prompts < 2:
        raise ValueError(f"num_prompts must be >= 2 (train + validation), got {num_prompts}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    fit = fit or FitParams(seed=seed)
    t0 = time.perf_counter()
    path = resolve_model_path(model_path)
    engine = HFEngine(path, dtype=dtype, max_batch_size=max_batch_size, seed=seed)
    tok = load_tokenizer(path)
    if rows is None:
        rows, _ = load_rows(source, generator_kwargs=generator_kwargs, seed=seed, limit=num_prompts)
    rows = list(rows)[:num_prompts]
    prompts = [apply_chat_template(tok, format_prompt(r, system_prompt, prompt_template)) for r in rows]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    if completions_file is not None:
        completions = load_completions(completions_file)
        prompts = sorted({c.group_id: c.prompt_ids for c in completions}.items())
        prompts = [p for _, p in prompts]
        _say(progress, f"loaded {len(completions)} completions of {len(prompts)} prompts from {completions_file}")
    else:
        completions = _sample(engine, prompts, max_new_tokens, temperature, samples_per_prompt,
                              max_batch_size, progress)
    save_completions(completions, Path(out_dir) / "completions.jsonl")
    t_gen = time.perf_counter()
    traces = build_traces(completions, tok, engine.eos_ids, prompt_index=[c.group_id for c in completions],
                          think_start=think_start, think_end=think_end, mode=mode, concise_mix=concise_mix, seed=seed)
    if not traces:
        raise RuntimeError(f"none of {len(completions)} completions has a usable region (all hit "
                           f"max_new_tokens={max_new_tokens}?); raise max_new_tokens")
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    val_prompts = set(order[: max(1, round(val_fraction * len(prompts)))] if val_fraction else [])
    data = extract_features(engine.model, [t.ids for t in traces], [t.region for t in traces],
                            batch_size=max(1, max_batch_size // 4), feature_dtype=getattr(torch, feature_dtype),
                            pad_id=engine.pad_id)
    train_seqs = [i for i, t in enumerate(traces) if t.prompt_index not in val_prompts]
    val_seqs = [i for i, t in enumerate(traces) if t.prompt_index in val_prompts]
    train, val = data.subset(train_seqs), data.subset(val_seqs)
    t_feat = time.perf_counter()
    _say(progress, f"{len(traces)} traces ({sum(t.concise for t in traces)} concise), {len(train)} train / "
                   f"{len(val)} val positions, features {tuple(data.features_MLD.shape)}")

    model_cfg = engine.model.config
    vocab = int(engine.model.get_output_embeddings().weight.shape[0])
    torch.manual_seed(seed)
    cfg = PredictorConfig(d_model=int(model_cfg.hidden_size), vocab_size=vocab,
                          num_hidden_states=int(data.features_MLD.shape[1]), **(predictor or {}))
    net = GammaPredictor(cfg)
    if cfg.head_bias:
        a0, l0 = init_head_bias(net, train.lengths_M)
        _say(progress, f"head bias: marginal Gamma(alpha={a0:.2f}, lam={l0:.2f}) of log(L+1) over "
                       f"{len(train)} train positions")
    before = {"train": evaluate_predictor(net, train), "val": evaluate_predictor(net, val) if len(val) else None}
    every = max(1, (fit.epochs * len(train_seqs)) // (fit.batch_sequences * 10))

    def log(step: int, total: int, loss: float) -> None:
        if step % every == 0 or step == total:
            _say(progress, f"step {step}/{total} loss {loss:.4f}")

    losses = fit_predictor(net, train, fit, log=log)
    after = {"train": evaluate_predictor(net, train), "val": evaluate_predictor(net, val) if len(val) else None}
    t_fit = time.perf_counter()
    lens = [len(c.token_ids) for c in completions]
    summary: dict[str, Any] = {
        "out_dir": str(out_dir), "base_model": path, "predictor": asdict(cfg), "fit": asdict(fit),
        "prompts": len(prompts), "completions": len(completions), "traces": len(traces),
        "concise_traces": sum(t.concise for t in traces), "train_positions": len(train),
        "val_positions": len(val), "completion_tokens_mean": sum(lens) / len(lens),
        "truncated_rate": sum(c.finish_reason == "length" for c in completions) / len(completions),
        "predictor_params": sum(p.numel() for p in net.parameters()), "steps": len(losses),
        "before": before, "after": after,
        "time_s": {"generate": t_gen - t0, "features": t_feat - t_gen, "fit": t_fit - t_feat, "total": t_fit - t0},
    }
    guidance = {"think_start": think_start, "think_end": think_end, "trigger_strings": list(trigger_strings)}
    save_predictor(net, out_dir, meta={"base_model": path, "guidance": guidance, "train": summary})
    (Path(out_dir) / "train_summary.json").write_text(json.dumps(summary, indent=2))
    _say(progress, f"saved to {out_dir}: val nll {_fmt(before['val'])} -> {_fmt(after['val'])}, "
                   f"train nll {before['train']['nll']:.3f} -> {after['train']['nll']:.3f} "
                   f"in {t_fit - t0:.0f} s")
    return summary


def _fmt(metrics: dict[str, float] | None) -> str:
    return "n/a" if metrics is None else f"{metrics['nll']:.3f}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the training command (also used by ``rlkit train-budget-predictor``)."""
    p.add_argument("--model", default=None,
                   help="HF directory or built-in alias (default: the recipe's model, else smollm2-135m-instruct)")
    p.add_argument("--out", required=True, help="output directory for the predictor")
    p.add_argument("--recipe", default=None,
                   help="take model, prompt rows (training split), system prompt and template from a recipe")
    p.add_argument("--completions", default=None, help="refit on a saved completions.jsonl (no sampling)")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--samples-per-prompt", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--generator", default="{}", help='arithmetic generator kwargs as JSON, e.g. {"max_value": 30}')
    p.add_argument("--prompt-template", default=DEFAULT_PROMPT_TEMPLATE)
    p.add_argument("--mode", choices=["auto", "think", "response"], default="auto")
    p.add_argument("--think-start", default=None)
    p.add_argument("--think-end", default="</think>")
    p.add_argument("--encoder", choices=["bert", "linear"], default="bert")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--head-bias", action=argparse.BooleanOptionalAction, default=True,
                   help="heads with a bias started at the marginal length distribution (the reference has none)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-sequences", type=int, default=1, help="sequences per optimiser step")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Run the command for parsed ``args``; prints the summary as JSON."""
    model, rows, template, system = args.model or "smollm2-135m-instruct", None, args.prompt_template, None
    if args.recipe:
        from rlkit.config import load_config
        from rlkit.infra.data import recipe_rows

        cfg = load_config(args.recipe)
        model = args.model or cfg.model.name
        rows, _ = recipe_rows(cfg)
        random.Random(args.seed).shuffle(rows)
        template, system = cfg.data.prompt_template, cfg.data.system_prompt
    summary = train_budget_predictor(
        model, args.out, args.num_prompts, samples_per_prompt=args.samples_per_prompt,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        generator_kwargs=json.loads(args.generator), prompt_template=template, system_prompt=system,
        mode=args.mode, think_start=args.think_start, think_end=args.think_end or None,
        predictor={"encoder_type": args.encoder, "hidden_size": args.hidden_size, "num_layers": args.num_layers,
                   "head_bias": args.head_bias},
        fit=FitParams(epochs=args.epochs, lr=args.lr, batch_sequences=args.batch_sequences, seed=args.seed),
        seed=args.seed, progress=not args.quiet, rows=rows, completions_file=args.completions,
    )
    print(json.dumps({k: summary[k] for k in ("out_dir", "traces", "train_positions", "before", "after", "time_s")}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlkit.tools.budget_train", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
