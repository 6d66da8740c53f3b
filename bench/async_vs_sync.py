"""Samples/s of one recipe in sync, one-step-off and async (k = 1, 2) mode, measured in one run (CPU).

Every mode trains the same recipe (default: the quickstart, SmolLM2-135M-Instruct) for the same
number of steps through the real CLI, each in its own process, one after the other. The first step
of each is a warm-up and is left out. Modes::

    sync (all threads)     the default: engine and learner each use every core, one after the other
    sync (1 thread each)   the placement the overlapped modes use, without the overlap
    one_step_off           engine and learner on one core each, generating step t+1 while training t
    async k=1, k=2         the same with up to k versions of lookahead (k=2 also with partial rollouts)

Samples/s = trained samples / wall time of steps 2..N (the sum of ``time/step_s``, which includes
the learner's waits). Tokens/s counts generated tokens. Also printed: staleness (mean, max), the
learner's wait and the engine's idle time per step, peak memory (PSS of the process tree).

    .venv/bin/python bench/async_vs_sync.py                      # quickstart, 6 steps per mode
    .venv/bin/python bench/async_vs_sync.py --steps 4 --modes sync,async1

For the same comparison at GPU scale (1.5B / 7B models, 8 / 64 GPUs), see ``bench/async_sim.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "sync": [],
    "sync_1t": ["learner.num_threads=1", "cluster.placement=split"],
    "one_step_off": ["learner.num_threads=1", "cluster.placement=split", "train.async.mode=one_step_off"],
    "async1": ["learner.num_threads=1", "cluster.placement=split", "train.async.mode=async",
               "train.async.max_staleness=1"],
    "async2": ["learner.num_threads=1", "cluster.placement=split", "train.async.mode=async",
               "train.async.max_staleness=2"],
    "async2_partial": ["learner.num_threads=1", "cluster.placement=split", "train.async.mode=async",
                       "train.async.max_staleness=2", "train.async.partial_rollout=true"],
}


def run_mode(name: str, a: argparse.Namespace, out: Path) -> dict:
    ov = [f"output_dir={out}", f"name={name}", f"train.steps={a.steps}", "eval.before=false", "eval.after=false",
          "checkpoint.every=0", "checkpoint.export_final=false", "tracking.tensorboard=false", *MODES[name],
          *a.override]
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "rlkit.cli", "train", str(ROOT / a.recipe), *ov], cwd=ROOT,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{name}: rlkit train failed ({p.returncode}):\n{p.stderr[-3000:]}")
    ms = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = ms[1:]  # the first step is a warm-up
    wall = sum(m["time/step_s"] for m in timed)
    samples = sum(m["rollout/kept_groups"] for m in timed) * a.group
    tokens = sum(m.get("rollout/tokens_generated", m["perf/tokens_per_s"] * m["time/step_s"]) for m in timed)
    summary = json.loads((out / name / "summary.json").read_text())

    def mean(k: str) -> float:
        return statistics.fmean(m.get(k, 0.0) for m in timed)

    return {"mode": name, "samples_per_s": samples / wall, "tokens_per_s": tokens / wall, "step_s": wall / len(timed),
            "staleness_mean": mean("async/staleness_mean"),
            "staleness_max": max(m.get("async/staleness_max", 0.0) for m in timed),
            "learner_wait_s": mean("time/learner_wait_s"), "engine_idle_s": mean("time/engine_idle_s"),
            "train_s": mean("time/train_s"), "gen_s": mean("time/gen_s"),
            "reward_last": ms[-1]["reward/mean"], "peak_pss_gib": (summary.get("peak_memory_gib") or {}).get("pss"),
            "wall_total_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="recipes/quickstart.yaml")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--group", type=int, default=8, help="samples per prompt of the recipe (for samples/s)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {list(MODES)}")
    p.add_argument("--override", action="append", default=[], help="extra KEY=VALUE for every mode")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.modes.split(","):
            rows.append(run_mode(name, a, Path(tmp)))
            print(f"{name}: {rows[-1]['samples_per_s']:.2f} samples/s", file=sys.stderr, flush=True)
    base = {r["mode"]: r["samples_per_s"] for r in rows}
    print("| mode | samples/s | tokens/s | step s | vs sync | vs sync 1 thread | staleness mean / max | "
          "learner wait s | engine idle s | peak PSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        vs = {k: f"{r['samples_per_s'] / base[k]:.2f}x" if k in base else "-" for k in ("sync", "sync_1t")}
        print(f"| {r['mode']} | {r['samples_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['step_s']:.1f} | {vs['sync']} | "
              f"{vs['sync_1t']} | {r['staleness_mean']:.2f} / {r['staleness_max']:.0f} | {r['learner_wait_s']:.1f} | "
              f"{r['engine_idle_s']:.1f} | {r['peak_pss_gib'] or 0:.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
