"""Segment rollout (UloRL, docs/algorithms.md §5.1) vs full-length rollout: finished samples/s and step time.

Two parts, both driving the real :class:`rollout.segments.SegmentScheduler`; "full-length" is the
same scheduler with ``seg_len = global_max_len`` (one segment: every round runs until the
slowest sample of the batch stops), so the only difference between the arms is segmentation.

1. ``cpu`` — the real ``rollout.hf.HFEngine`` on CPU (tiny random Llama by default; ``--model``
   takes any HF dir or alias, e.g. ``smollm2-135m-instruct``). The arms run interleaved, one
   step each in turn, in the same process, so machine-load drift hits all of them alike.
   Prompt mix: 1 in 4 prompts asks for a long answer, the rest for a short one. A random tiny
   model has no notion of answer length, so (unless ``--no-length-profile``) an engine-level
   logits processor gives each prompt kind a constant EOS hazard: ``P(EOS) = 1/mean_len`` at
   every step (``--short-mean 24``, ``--long-mean 400``; natural lengths are geometric, the long
   ones mostly hit ``--max-len``). It runs inside the engine's decode loop before sampling, like
   any processor, so the decode work is the engine's own. With a real model, pass
   ``--no-length-profile`` and the prompts' natural lengths are used.
2. ``sim`` — a simulated engine whose wall time follows a GPU decode model, to show the scaling
   to 64k-token outputs (UloRL: Qwen3-30B-A3B, 128 prompts x 8, 2 segments 1.6x, 4 segments
   2.06x). Decode model of one ``generate`` call over rows i with context ``p_i`` (prompt +
   resumed prefix) that generate ``n_i`` tokens, continuous batching within the call::

       t = t_prefill * sum_i p_i                              # prefill (no prefix cache: resumed
                                                              #   prefixes are re-read)
         + t_step * max_i n_i                                 # one decode iteration per step, until
                                                              #   the slowest row stops
         + t_row * sum_i n_i                                  # per-token compute (MoE FFN, sampling)
         + t_kv * sum_i (n_i p_i + n_i (n_i - 1) / 2)         # attention reads the KV cache

   Defaults model one 8-GPU H100 node serving a 30B-A3B MoE in bf16: ``t_step`` 25 ms (weights +
   launches), ``t_row`` 0.03 ms, ``t_kv`` 2e-9 s per cached token (48 layers x 4 KV heads x 128
   x 2 x 2 B ~ 96 KiB/token over ~50 TB/s aggregate HBM), ``t_prefill`` 3e-7 s/token. KV-cache
   capacity is not modelled (it only hurts full-length batches more). Natural lengths are
   log-normal: ``log L = log(median) + N(0, 0.6)`` per prompt + ``N(0, 0.6)`` per sample
   (median 12k: mean ~17k, ~2.7% reach 64k). Tokens are simulated in blocks of ``--sim-block``
   (64) so pools stay small; times use real token counts.

Rollout only (no update): the paper's end-to-end numbers include training, which at these
lengths is a small share of a step. Every step hands ``groups x G`` finished samples to
"training" (complete groups), so samples/s ratio == step-time ratio over the measured steps.

    .venv/bin/python bench/segments.py                 # both parts, ~2-3 min on 2 CPU cores
    .venv/bin/python bench/segments.py --part sim --sim-groups 128
    .venv/bin/python bench/segments.py --part cpu --steps 10 --segments 2 4 8

Prints a table per part, ratios vs full-length, and a final JSON line with every number.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rollout.engine import Completion, RolloutRequest, SamplingParams  # noqa: E402
from rollout.segments import SegmentConfig, SegmentScheduler  # noqa: E402

SHORT = ["What is {a}+{b}? Answer with the number only.", "Is {a} larger than {b}? Say yes or no.",
         "{who} has {a} pens and gets {b} more. How many pens? One number."]
LONG = ["Write a very long, detailed story about {who} counting {a} apples, step by step, "
        "explaining every single addition from 1 to {a}."]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["all", "cpu", "sim"], default="all")
    p.add_argument("--segments", type=int, nargs="+", default=[2, 4], help="segment counts to compare")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--topup", choices=["constant", "deficit"], default="constant", help="SegmentConfig.topup")
    g = p.add_argument_group("cpu (HF engine)")
    g.add_argument("--model", default="tiny", help="'tiny' (random 2-layer Llama) or an HF dir / alias")
    g.add_argument("--groups", type=int, default=4, help="prompt groups per step (train_batch_size)")
    g.add_argument("--group-size", type=int, default=4, help="G")
    g.add_argument("--max-len", type=int, default=256, help="global_max_len (tokens)")
    g.add_argument("--steps", type=int, default=20, help="measured steps per arm")
    g.add_argument("--warmup", type=int, default=4, help="unmeasured steps per arm (pools fill up)")
    g.add_argument("--threads", type=int, default=1, help="torch threads")
    g.add_argument("--short-mean", type=float, default=24.0)
    g.add_argument("--long-mean", type=float, default=400.0)
    g.add_argument("--no-length-profile", action="store_true", help="use the model's natural lengths")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (cpu part)")
    s = p.add_argument_group("sim (GPU decode model)")
    s.add_argument("--sim-max-len", type=int, default=65536)
    s.add_argument("--sim-groups", type=int, default=128)
    s.add_argument("--sim-group-size", type=int, default=8)
    s.add_argument("--sim-steps", type=int, default=12)
    s.add_argument("--sim-warmup", type=int, default=12)
    s.add_argument("--sim-block", type=int, default=64, help="tokens per simulated token")
    s.add_argument("--sim-median", type=float, default=12000.0, help="median natural length (tokens)")
    s.add_argument("--t-step", type=float, default=25e-3)
    s.add_argument("--t-row", type=float, default=3e-5)
    s.add_argument("--t-kv", type=float, default=2e-9)
    s.add_argument("--t-prefill", type=float, default=3e-7)
    return p.parse_args(argv)


def _h(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


# ---------------------------------------------------------------------- CPU: real HF engine


class LengthProfile:
    """Engine-level logits processor: each prompt kind stops with a constant per-step hazard.

    Sets the EOS logit so that ``P(EOS) = hazard`` at temperature 1 (the rest of the
    distribution keeps its shape). ``hazard_of`` maps prompt ids to the hazard.
    """

    def __init__(self, eos_id: int, hazard_of: dict[tuple[int, ...], float]) -> None:
        self.eos_id, self.hazard_of = eos_id, hazard_of

    def __call__(self, step: int, input_ids: torch.Tensor, logits_BV: torch.Tensor, state) -> torch.Tensor:
        h_R = state.extra.get("hazard_R")
        if h_R is None:
            h_R = torch.tensor([self.hazard_of[tuple(r.prompt_ids)] for r in state.requests])
            state.extra["hazard_R"] = h_R
        h_B = h_R[state.request_index_B.cpu()].to(logits_BV.device, logits_BV.dtype)
        others_BV = logits_BV.clone()
        others_BV[:, self.eos_id] = float("-inf")
        logits_BV = logits_BV.clone()
        logits_BV[:, self.eos_id] = torch.logsumexp(others_BV, -1) + torch.log(h_B) - torch.log1p(-h_B)
        return logits_BV


def _prompt_texts(n: int, seed: int) -> list[tuple[str, bool]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        long = i % 4 == 3
        tmpl = rng.choice(LONG if long else SHORT)
        out.append((tmpl.format(a=rng.randint(2, 99), b=rng.randint(2, 99), who=rng.choice(["Tom", "Ann"])), long))
    return out


def _build_engine(args: argparse.Namespace):
    from rlkit.infra.models import apply_chat_template, make_tiny_model, resolve_model_path
    from rollout.hf import HFEngine

    torch.set_num_threads(args.threads)
    if args.model == "tiny":
        path = make_tiny_model(tempfile.mkdtemp(prefix="bench_seg_"), seed=args.seed)
    else:
        path = resolve_model_path(args.model)
    rows = max(64, args.groups * args.group_size * (max(args.segments) + 1))
    eng = HFEngine(path, max_batch_size=rows, seed=args.seed)
    prompts = []
    for text, long in _prompt_texts(64, args.seed):
        ids = apply_chat_template(eng.tokenizer, [{"role": "user", "content": text}])
        prompts.append((ids, long))
    if not args.no_length_profile:
        hazard = {tuple(ids): 1.0 / (args.long_mean if long else args.short_mean) for ids, long in prompts}
        eng.logits_processors.append(LengthProfile(eng.eos_ids[0], hazard))
    return eng, prompts


def _source(prompts: list, seed: int):
    """Same seeded prompt order for every arm; the payload is the prompt index."""
    rng = random.Random(seed)
    order = [rng.randrange(len(prompts)) for _ in range(100_000)]
    state = {"next": 0}

    def take(k: int):
        i = state["next"]
        state["next"] += k
        return [(prompts[j][0], j) for j in order[i : i + k]]

    return take


def _summ(step_s: list[float], samples: list[int], metrics: list[dict[str, float]]) -> dict[str, float]:
    tot = sum(step_s)

    def mean(key: str) -> float:
        vals = [m.get(key, 0.0) for m in metrics]
        return statistics.fmean(vals) if vals else 0.0

    return {
        "step_s": statistics.fmean(step_s), "samples_per_s": sum(samples) / tot if tot else 0.0,
        "rounds_per_step": mean("segments/rounds"), "unfinished_pool": mean("segments/unfinished_pool"),
        "seg_count_mean": mean("segments/seg_count_mean"), "version_lag_mean": mean("segments/version_lag_mean"),
        "tokens_per_step": mean("segments/tokens_generated"), "truncated_frac": mean("segments/truncated_frac"),
    }


def run_cpu(args: argparse.Namespace) -> dict[str, Any]:
    eng, prompts = _build_engine(args)
    arms = {"full": 1, **{f"seg{k}": k for k in args.segments}}
    params = SamplingParams(temperature=args.temperature)
    scheds, versions = {}, {}
    for name, k in arms.items():
        cfg = SegmentConfig(seg_len=math.ceil(args.max_len / k), global_max_len=args.max_len,
                            group_size=args.group_size, train_groups=args.groups, seed=args.seed,
                            topup=args.topup)
        scheds[name] = SegmentScheduler(eng, params, cfg, _source(prompts, args.seed))
        versions[name] = 0
    rec: dict[str, tuple[list, list, list]] = {n: ([], [], []) for n in arms}
    lengths: list[int] = []  # natural lengths: the full-length arm's finished samples
    t_all = time.perf_counter()
    for step in range(args.warmup + args.steps):
        for name, sched in scheds.items():
            eng.policy_version = versions[name]  # each arm has its own policy history
            t0 = time.perf_counter()
            batch = sched.step()
            dt = time.perf_counter() - t0
            versions[name] += 1
            if step >= args.warmup:
                rec[name][0].append(dt)
                rec[name][1].append(len(batch.samples))
                rec[name][2].append(batch.metrics)
                if name == "full":
                    lengths += [len(smp.token_ids) for smp in batch.samples]
    res = {n: _summ(*rec[n]) for n in arms}
    if lengths:
        q = statistics.quantiles(lengths, n=10)
        res["_lengths"] = {"mean": statistics.fmean(lengths), "p50": statistics.median(lengths), "p90": q[-1],
                           "at_max_frac": sum(n >= args.max_len for n in lengths) / len(lengths)}
    res["_wall_s"] = time.perf_counter() - t_all
    return res


# ---------------------------------------------------------------------- simulated GPU engine


class SimulatedEngine:
    """Engine with a simulated clock (module docstring). One simulated token = ``block`` tokens.

    A sample's natural length is drawn when it starts and rides in its first token (a
    simulation device, like a real sample whose continuation is determined by its prefix)."""

    EOS = 1

    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.block = args.sim_block
        self.clock = 0.0
        self.policy_version = 0

    def _natural(self, prompt_key: int, seed: int, j: int) -> int:
        a = self.a
        prompt_eff = random.Random(_h("p", prompt_key)).gauss(0.0, 0.6)
        sample_eff = random.Random(_h("s", seed, j)).gauss(0.0, 0.6)
        tokens = a.sim_median * math.exp(prompt_eff + sample_eff)
        return max(2, math.ceil(tokens / self.block))

    def generate(self, requests: list[RolloutRequest]) -> list[Completion]:
        a, out = self.a, []
        p_tok, n_tok, n_max, kv = 0, 0, 0, 0.0
        for r in requests:
            for j in range(r.params.n):
                start = len(r.resume_ids)
                L = r.resume_ids[0] - 10 if start else self._natural(r.prompt_ids[0], r.params.seed, j)
                n = min(r.params.max_new_tokens, L - start)
                toks = [10 + L if start + i == 0 else 2 for i in range(n)]
                if start + n == L:
                    toks[-1] = self.EOS
                reason = "stop" if toks[-1] == self.EOS else "length"
                out.append(Completion(list(r.prompt_ids), toks, [0.0] * n, reason, r.group_id,
                                      policy_version=self.policy_version))
                p = (len(r.prompt_ids) + start) * self.block
                nt = n * self.block
                p_tok, n_tok, n_max = p_tok + p, n_tok + nt, max(n_max, nt)
                kv += nt * p + nt * (nt - 1) / 2
        self.clock += a.t_prefill * p_tok + a.t_step * n_max + a.t_row * n_tok + a.t_kv * kv
        return out


def run_sim(args: argparse.Namespace) -> dict[str, Any]:
    arms = {"full": 1, **{f"seg{k}": k for k in args.segments}}
    max_len = math.ceil(args.sim_max_len / args.sim_block)
    prompt_blocks = max(1, 512 // args.sim_block)
    res: dict[str, Any] = {}
    t_all = time.perf_counter()
    for name, k in arms.items():
        eng = SimulatedEngine(args)
        cfg = SegmentConfig(seg_len=math.ceil(max_len / k), global_max_len=max_len, group_size=args.sim_group_size,
                            train_groups=args.sim_groups, seed=args.seed, topup=args.topup)
        counter = {"next": 0}

        def source(n: int, counter=counter):
            i = counter["next"]
            counter["next"] += n
            return [([j] + [0] * (prompt_blocks - 1), j) for j in range(i, i + n)]

        sched = SegmentScheduler(eng, SamplingParams(temperature=1.0), cfg, source)
        step_s, samples, metrics = [], [], []
        for step in range(args.sim_warmup + args.sim_steps):
            c0 = eng.clock
            batch = sched.step()
            eng.policy_version += 1
            if step >= args.sim_warmup:
                step_s.append(eng.clock - c0)
                samples.append(len(batch.samples))
                metrics.append(batch.metrics)
        res[name] = _summ(step_s, samples, metrics)
        res[name]["tokens_per_step"] *= args.sim_block
    res["_wall_s"] = time.perf_counter() - t_all
    return res


# ---------------------------------------------------------------------- report


def _table(title: str, res: dict[str, Any], unit: str) -> str:
    base = res["full"]
    lines = [title, f"{'arm':<6} {'step ' + unit:>12} {'samples/s':>11} {'ratio':>6} {'rounds':>7} "
                    f"{'pool':>7} {'segs':>5} {'v-lag':>6} {'trunc':>6}"]
    for name, r in res.items():
        if name.startswith("_"):
            continue
        r["ratio_vs_full"] = r["samples_per_s"] / base["samples_per_s"] if base["samples_per_s"] else 0.0
        lines.append(f"{name:<6} {r['step_s']:>12.3f} {r['samples_per_s']:>11.4f} {r['ratio_vs_full']:>5.2f}x "
                     f"{r['rounds_per_step']:>7.2f} {r['unfinished_pool']:>7.1f} {r['seg_count_mean']:>5.2f} "
                     f"{r['version_lag_mean']:>6.2f} {r['truncated_frac']:>6.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out: dict[str, Any] = {"args": vars(args)}
    if args.part in ("all", "cpu"):
        out["cpu"] = run_cpu(args)
        print(_table(f"CPU, HFEngine ({args.model}), {args.groups}x{args.group_size} samples/step, max_len "
                     f"{args.max_len}, {args.steps} measured steps (+{args.warmup} warm-up), "
                     f"{out['cpu']['_wall_s']:.0f}s", out["cpu"], "s"))
        if "_lengths" in out["cpu"]:
            L = out["cpu"]["_lengths"]
            print(f"lengths (full-length arm): mean {L['mean']:.1f}, median {L['p50']:.0f}, p90 {L['p90']:.0f}, "
                  f"{L['at_max_frac'] * 100:.0f}% at max_len")
    if args.part in ("all", "sim"):
        out["sim"] = run_sim(args)
        print(_table(f"\nSimulated GPU decode, {args.sim_groups}x{args.sim_group_size} samples/step, max_len "
                     f"{args.sim_max_len}, {args.sim_steps} measured steps (+{args.sim_warmup} warm-up)",
                     out["sim"], "sim-s"))
    for part in ("cpu", "sim"):
        if part in out:
            ratios = ", ".join(f"{k}: {v['ratio_vs_full']:.2f}x" for k, v in out[part].items() if not k.startswith("_"))
            print(f"{part}: finished samples/s vs full-length -> {ratios}")
    print(json.dumps(out, default=str))
    return out


if __name__ == "__main__":
    main()
