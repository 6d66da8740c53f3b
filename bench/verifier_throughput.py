"""Verifier throughput: math-verify through the reward worker pool vs serially in the trainer, and
``code_tests`` (sandboxed code execution).

    .venv/bin/python bench/verifier_throughput.py                    # 1024 math samples, 2 workers
    .venv/bin/python bench/verifier_throughput.py --workers 4 --math-samples 4096 --code-samples 128
    .venv/bin/python bench/verifier_throughput.py --sandboxed-math   # also: math with sandbox: true
    .venv/bin/python bench/verifier_throughput.py --no-math --confine auto,namespace,landlock,none

Math: GRPO-shaped batches (``--group`` completions per prompt share a gold answer) of synthetic
completions in the forms models write (``\\boxed{}``, LaTeX fractions, a trailing number, wrong
answers, no answer). "serial" calls ``rewards.math.math_reward`` on each batch in this process;
"pool" scores the same batches with ``RewardManager(["math"], mode="process", num_workers=W)``
(one warm-up batch first for both; best of ``--repeat`` passes). Code: completions of small functions (half correct) scored
by ``code_tests`` with three assert tests each, and stdin/stdout programs with three cases each
(one sandboxed interpreter per case), once per ``--confine`` mode: ``none`` (no filesystem
confinement) is the baseline each mode is compared with. Prints samples/s for each and the
ratios, then one JSON line with every number. CPU-bound: on a busy machine the numbers drop; run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rewards import RewardManager, VerifierSpec  # noqa: E402
from rewards.code import CodeTests  # noqa: E402
from rewards.math import math_reward  # noqa: E402


def math_batches(n: int, batch: int, group: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """``n`` (completion, gold) pairs in batches of ``batch``; ``group`` consecutive ones share a gold."""
    rng = random.Random(seed)
    completions, golds = [], []
    while len(completions) < n:
        a, b = rng.randint(1, 99), rng.randint(2, 12)
        kind = rng.choice(["int", "frac"])
        gold = str(a + b) if kind == "int" else f"\\frac{{{a}}}{{{b}}}"
        value = a + b if kind == "int" else a / b
        for _ in range(group):
            wrong = rng.random() < 0.4
            v = value + 1 if wrong else value
            style = rng.randrange(4)
            if style == 0:
                text = f"We add {a} and {b}. So the answer is \\boxed{{{v:g}}}."
            elif style == 1 and kind == "frac" and not wrong:
                text = f"Dividing gives $\\frac{{{a}}}{{{b}}}$, i.e. \\boxed{{\\frac{{{a}}}{{{b}}}}}"
            elif style == 2:
                text = f"First {a}, then {b}; the result is {v:g}"
            else:
                text = "I am not sure how to solve this one."
            completions.append(text)
            golds.append(gold)
    completions, golds = completions[:n], golds[:n]
    return [(completions[i : i + batch], golds[i : i + batch]) for i in range(0, n, batch)]


def bench_math(a: argparse.Namespace) -> dict:
    batches = math_batches(a.math_samples, a.batch, a.group)
    n = sum(len(c) for c, _ in batches)
    math_reward(*batches[0][:1], answer=batches[0][1])  # warm-up: imports, sympy caches
    serial_s, serial = best_of(a.repeat, lambda: [r for c, g in batches for r in math_reward(c, answer=g)])
    out = {"math_samples": n, "serial_s": serial_s, "serial_samples_per_s": n / serial_s}
    variants = [("pool", VerifierSpec("math", timeout_s=60.0))]
    if a.sandboxed_math:
        variants.append(("sandboxed_pool", VerifierSpec("math", timeout_s=120.0, sandbox=True)))
    for name, spec in variants:
        with RewardManager([spec], num_workers=a.workers, mode="process") as rm:
            rm.score(*_cols(batches[0]))  # warm-up: workers started and imported
            reps = 1 if spec.sandbox else a.repeat
            secs, pooled = best_of(reps, lambda: [r for b in batches for r in rm.score(*_cols(b))[2]["math"]])
        if pooled != [float(x) for x in serial]:
            raise SystemExit(f"{name} and serial rewards differ")
        out.update({f"{name}_s": secs, f"{name}_samples_per_s": n / secs,
                    f"{name}_vs_serial": (n / secs) / (n / serial_s)})  # fmt: skip
    out["math_accuracy"] = sum(serial) / n
    return out


def best_of(repeat: int, fn: Callable[[], list]) -> tuple[float, list]:
    """Fastest of ``repeat`` timed calls (a shared machine's noise only ever adds time)."""
    best, out = float("inf"), []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _cols(batch: tuple[list[str], list[str]]) -> tuple[list[str], dict]:
    return batch[0], {"answer": batch[1]}


def code_samples(
    n: int, seed: int = 0
) -> tuple[list[str], list[list[str]], list[str], list[list[str]], list[list[str]]]:
    """(function completions, assert tests, stdin programs, inputs, outputs); half of each correct."""
    rng = random.Random(seed)
    funcs, tests, progs, ins, outs = [], [], [], [], []
    for i in range(n):
        k = rng.randint(2, 9)
        op = "+" if i % 2 == 0 else "-"  # odd samples are wrong
        funcs.append(f"Sure:\n```python\ndef shift(x):\n    return x {op} {k}\n```")
        tests.append([f"assert shift({x}) == {x + k}" for x in (0, 5, -3)])
        progs.append(f"```python\nx = int(input())\nprint(x {op} {k})\n```")
        ins.append([str(x) for x in (1, 7, 20)])
        outs.append([str(x + k) for x in (1, 7, 20)])
    return funcs, tests, progs, ins, outs


def bench_code(a: argparse.Namespace) -> dict:
    """code_tests with each filesystem confinement (``auto`` first, the default) and without it
    (``none``: the same sandbox minus the filesystem view), the arms interleaved over ``repeat``
    rounds and the best round of each kept, so the ratio compares like with like."""
    funcs, tests, progs, ins, outs = code_samples(a.code_samples)
    expected = [1.0 if i % 2 == 0 else 0.0 for i in range(a.code_samples)]
    arms = {c: CodeTests(timeout_s=10.0, max_parallel=a.code_parallel, confine=c, allow_unconfined=c == "none")
            for c in a.confine}  # fmt: skip
    best: dict[str, list[float]] = {c: [float("inf")] * 2 for c in arms}
    for verifier in arms.values():
        verifier(funcs[:2], tests=tests[:2])  # warm-up
    for _ in range(a.code_repeat):
        for c, verifier in arms.items():
            t0 = time.perf_counter()
            r_assert = verifier(funcs, tests=tests)
            t1 = time.perf_counter()
            r_io = verifier(progs, inputs=ins, outputs=outs)
            t2 = time.perf_counter()
            if r_assert != expected or r_io != expected:
                raise SystemExit(f"code_tests rewards are wrong (confine={c})")
            best[c] = [min(best[c][0], t1 - t0), min(best[c][1], t2 - t1)]
    n = a.code_samples
    out = {"code_samples": n, "code_parallel": next(iter(arms.values())).max_parallel}
    for c, (assert_s, io_s) in best.items():
        out[f"code_{c}"] = {"assert_samples_per_s": n / assert_s, "stdio_samples_per_s": n / io_s,
                            "sandbox_runs_per_s": (n + 3 * n) / (assert_s + io_s)}  # fmt: skip
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--math-samples", type=int, default=1024)
    p.add_argument("--batch", type=int, default=64, help="samples per score() call (a GRPO step's batch)")
    p.add_argument("--group", type=int, default=8, help="completions per prompt (share a gold answer)")
    p.add_argument("--workers", type=int, default=2, help="reward worker processes")
    p.add_argument("--code-samples", type=int, default=64)
    p.add_argument("--code-parallel", type=int, default=None, help="sandboxed runs at once (default: CPUs)")
    p.add_argument("--sandboxed-math", action="store_true", help="also time math with sandbox: true")
    p.add_argument("--repeat", type=int, default=3, help="math timings: best of this many passes")
    p.add_argument("--code-repeat", type=int, default=3, help="code timings: best of this many rounds")
    p.add_argument("--confine", default="auto,none", type=lambda v: v.split(","),
                   help="code_tests arms: filesystem confinement modes (none = off, the baseline)")
    p.add_argument("--no-math", action="store_true", help="time code_tests only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    res = {"cpus": os.cpu_count(), "workers": a.workers, "batch": a.batch, "load_avg_1m": os.getloadavg()[0]}
    if not a.no_math:
        res.update(bench_math(a))
        print(f"math-verify serial (in trainer):  {res['serial_samples_per_s']:8.1f} samples/s")
        print(f"math-verify pool ({a.workers} workers):     {res['pool_samples_per_s']:8.1f} samples/s"
              f"   ({res['pool_vs_serial']:.2f}x serial)")  # fmt: skip
        if a.sandboxed_math:
            print(f"math-verify sandboxed pool:       {res['sandboxed_pool_samples_per_s']:8.1f} samples/s"
                  f"   ({res['sandboxed_pool_vs_serial']:.2f}x serial)")  # fmt: skip
    res.update(bench_code(a))
    base = res.get("code_none")
    for c in a.confine:
        r = res[f"code_{c}"]
        vs = "" if base is None or c == "none" else (
            f"   ({r['assert_samples_per_s'] / base['assert_samples_per_s']:.2f}x / "
            f"{r['stdio_samples_per_s'] / base['stdio_samples_per_s']:.2f}x unconfined)")
        print(f"code_tests confine={c:<9} 3 asserts: {r['assert_samples_per_s']:6.1f} samples/s, "
              f"3 stdin/stdout: {r['stdio_samples_per_s']:6.1f} samples/s{vs}")  # fmt: skip
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
