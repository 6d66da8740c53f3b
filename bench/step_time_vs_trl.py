"""Step time: rlkit vs TRL's GRPOTrainer on the same model, prompts and batch shape (CPU).

Both sides run SmolLM2-135M-Instruct (``rlkit.infra.models.resolve_model_path("smollm2-135m-instruct")``)
in fp32, on the same arithmetic prompts in the same order (the rows rlkit's quickstart config
loads, split and walks with its ``PromptCursor``), with the same chat template and prompt
template, group size G, max_new_tokens, prompts per step, steps, lr, temperature 1.0, no KL
(beta 0), one optimizer step per generation batch, micro-batch size and reward
(math-verify ``math`` + 0.2 * ``format``, from the ``rewards`` package). Each side runs in its
own subprocess, one after the other. The first step of each is a warm-up and is left out of the
means.

    .venv/bin/python bench/step_time_vs_trl.py                       # 4 prompts x G 8, 64 tokens, 4 steps
    .venv/bin/python bench/step_time_vs_trl.py --steps 6 --only trl  # one side only
    .venv/bin/python bench/step_time_vs_trl.py --prompts 2 --group 4 --max-new-tokens 32 --steps 3

Prints both mean step times, the ratio rlkit/TRL (< 1: rlkit is faster) and, last, one JSON line
with every number. TRL's step time is measured with a ``TrainerCallback`` (``on_step_begin`` ->
``on_step_end``; TRL generates inside the step, so it covers generation + reward + update).
rlkit's is its own ``time/step_s`` (generate + reward + advantage + update + weight sync) from
``metrics.jsonl``, with the ``time/gen_s``, ``time/reward_s``, ``time/train_s`` and
``time/sync_s`` breakdown.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"
MODEL = "smollm2-135m-instruct"
REWARDS = [("math", 1.0), ("format", 0.2)]  # the quickstart recipe's verifiers and weights


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="samples per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="steps per side; the first is warm-up")
    p.add_argument("--micro-batch", type=int, default=16,
                   help="sequences per forward/backward on both sides (rlkit learner.micro_batch_size, "
                        "TRL per_device_train_batch_size with gradient accumulation up to prompts*group)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--only", choices=["trl", "rlkit"], default=None)
    p.add_argument("--output-dir", default=os.path.join(tempfile.gettempdir(), "bench_runs"))
    p.add_argument("--timeout", type=float, default=1800, help="seconds per side")
    p.add_argument("--rlkit-override", action="append", default=[],
                   help="extra KEY=VALUE for the rlkit side, e.g. train.async.mode=one_step_off")
    p.add_argument("--worker", choices=["trl", "rlkit"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    n = a.prompts * a.group
    a.micro_batch = min(a.micro_batch, n)
    if n % a.micro_batch:
        p.error(f"prompts*group ({n}) must be a multiple of --micro-batch ({a.micro_batch})")
    if a.steps < 2:
        p.error("--steps must be >= 2 (the first step is warm-up)")
    return a


def rlkit_overrides(a: argparse.Namespace) -> list[str]:
    return [
        f"train.steps={a.steps}", f"train.prompts_per_step={a.prompts}", f"train.samples_per_prompt={a.group}",
        f"engine.max_new_tokens={a.max_new_tokens}", "engine.temperature=1.0", "engine.top_p=1.0",
        f"learner.lr={a.lr}", "learner.warmup_steps=0", "learner.lr_schedule=constant",
        f"learner.micro_batch_size={a.micro_batch}", "algorithm.kl.beta=0", "model.dtype=float32", "model.lora.rank=0",
        "train.ppo_epochs=1", "train.mini_batches=1",
        "eval.before=false", "eval.after=false", "checkpoint.every=0", "checkpoint.export_final=false",
        f"output_dir={a.output_dir}", "name=rlkit_bench", "tracking.tensorboard=false", "seed=0",
        *a.rlkit_override,
    ]


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


# ------------------------------------------------------------------------------------ TRL side
def run_trl(a: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewards import resolve
    from rlkit.config import load_config
    from rlkit.infra.data import PromptCursor, format_prompt, load_rows, split_rows
    from rlkit.infra.models import load_tokenizer, resolve_model_path

    # The exact rows, in the exact order, that rlkit's trainer uses for these steps.
    cfg = load_config(str(RECIPE), rlkit_overrides(a))
    d = cfg.data
    rows, _ = load_rows(d.source, path=d.path, split=d.split, prompt_key=d.prompt_key,
                        answer_key=d.answer_key, on_bad_row=d.on_bad_row,
                        generator_kwargs=d.generator, seed=cfg.seed, limit=d.limit)
    train_rows, _ = split_rows(rows, d.eval_size, cfg.seed)
    cursor = PromptCursor(len(train_rows), cfg.seed, shuffle=d.shuffle)
    picked = [train_rows[i] for i in cursor.next_indices(a.steps * a.prompts)]
    ds = Dataset.from_list([
        {"prompt": format_prompt(r, d.system_prompt, d.prompt_template), "answer": str(r["answer"])}
        for r in picked
    ])

    t0 = time.perf_counter()
    path = resolve_model_path(MODEL)
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    load_s = time.perf_counter() - t0

    n = a.prompts * a.group
    out_dir = os.path.join(a.output_dir, "trl_bench")
    shutil.rmtree(out_dir, ignore_errors=True)
    args = GRPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=a.micro_batch,
        gradient_accumulation_steps=n // a.micro_batch,   # one optimizer step per generation batch
        steps_per_generation=n // a.micro_batch,          # generation batch = prompts * group, generated at once
        num_generations=a.group,
        max_completion_length=a.max_new_tokens,
        num_iterations=1,
        beta=0.0,
        epsilon=0.2, epsilon_high=0.2,
        loss_type="dapo",                                # token-mean over the batch, like rlkit's grpo recipe
        scale_rewards="group",
        temperature=1.0, top_p=1.0,
        learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0,
        max_steps=a.steps,
        shuffle_dataset=False,
        reward_weights=[w for _, w in REWARDS],
        use_vllm=False, bf16=False, fp16=False, use_cpu=True,
        report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=cfg.seed,
        gradient_checkpointing=cfg.model.gradient_checkpointing,  # TRL defaults to True, rlkit to False
    )

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.begin: list[float] = []
            self.end: list[float] = []
            self.logs: list[dict] = []

        def on_step_begin(self, args, state, control, **kw):
            self.begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.end.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                self.logs.append(dict(logs))

    timer = Timer()
    gen_score_s: list[float] = []   # TRL's _generate_and_score_completions: generation + rewards
    reward_s: list[float] = []      # the reward functions' share of it

    def timed_reward(fn):
        def wrapped(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                reward_s[-1] += time.perf_counter() - t
        wrapped.__name__ = fn.__name__
        return wrapped

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[timed_reward(resolve(name)) for name, _ in REWARDS],
        args=args,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[timer],
    )
    gen_and_score = trainer._generate_and_score_completions

    def timed_gen_and_score(*args, **kw):
        reward_s.append(0.0)
        t = time.perf_counter()
        out = gen_and_score(*args, **kw)
        gen_score_s.append(time.perf_counter() - t)
        return out

    trainer._generate_and_score_completions = timed_gen_and_score
    t_train = time.perf_counter()
    trainer.train()
    total_s = time.perf_counter() - t_train

    step_s = [e - b for b, e in zip(timer.begin, timer.end)]
    step_logs = [lg for lg in timer.logs if "loss" in lg or "reward" in lg]
    lens = [lg.get("completions/mean_length") for lg in step_logs]
    rew = [lg.get("reward") for lg in step_logs]
    tokens_per_s = [
        n * ln / s for ln, s in zip(lens, step_s) if ln is not None and s > 0
    ]
    gen_s = [g - r for g, r in zip(gen_score_s, reward_s)]
    train_s = [s - g for s, g in zip(step_s, gen_score_s)]
    return {
        "side": "trl",
        "step_s": step_s,
        "mean_step_s": _mean(step_s[1:]),
        "gen_s": gen_s, "reward_s": reward_s, "train_s": train_s,
        "mean_gen_s": _mean(gen_s[1:]), "mean_reward_s": _mean(reward_s[1:]),
        "mean_train_s": _mean(train_s[1:]),
        "completion_len_mean": lens,
        "reward_mean": rew,
        "tokens_per_s": tokens_per_s,
        "model_load_s": load_s,
        "train_total_s": total_s,
        "torch_threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------- rlkit side
def run_rlkit(a: argparse.Namespace) -> dict:
    from rlkit.config import load_config
    from rlkit.infra.tracking import read_metrics
    from rlkit.trainer import Trainer

    cfg = load_config(str(RECIPE), rlkit_overrides(a))
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    Trainer(cfg, resume=False).run()
    total_s = time.perf_counter() - t0
    recs = [r for r in read_metrics(cfg.run_dir) if "time/step_s" in r]
    recs.sort(key=lambda r: r["step"])

    def col(key: str) -> list[float | None]:
        return [r.get(key) for r in recs]

    out = {
        "side": "rlkit",
        "run_dir": str(cfg.run_dir),
        "step_s": col("time/step_s"),
        "completion_len_mean": col("response/len_mean"),
        "reward_mean": col("reward/mean"),
        "tokens_per_s": col("perf/tokens_per_s"),
        "run_total_s": total_s,
    }
    out["mean_step_s"] = _mean([x for x in out["step_s"][1:] if x is not None])
    for k in ("gen_s", "reward_s", "train_s", "sync_s"):
        out[k] = col(f"time/{k}")
        out[f"mean_{k}"] = _mean([x for x in out[k][1:] if x is not None])
    return out


# ------------------------------------------------------------------------------------- driver
def run_side(side: str, a: argparse.Namespace) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [sys.executable, __file__, "--worker", side, "--result", result_path,
           "--prompts", str(a.prompts), "--group", str(a.group),
           "--max-new-tokens", str(a.max_new_tokens), "--steps", str(a.steps),
           "--micro-batch", str(a.micro_batch), "--lr", str(a.lr), "--output-dir", a.output_dir,
           *[x for o in a.rlkit_override for x in ("--rlkit-override", o)]]
    print(f"[bench] running {side} ...", flush=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # peak memory the same way for both sides: PSS summed over the worker's process tree (rlkit's
    # includes its local Ray: raylet, GCS, the learner and engine actors), sampled every 0.5 s
    from rlkit.infra.sysmon import MemoryMonitor

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    mon = MemoryMonitor(interval_s=0.5, root_pid=proc.pid).start()
    try:
        proc.wait(timeout=a.timeout)
    finally:
        mon.stop()
        if proc.poll() is None:
            proc.kill()
    wall = time.perf_counter() - t0
    try:
        if proc.returncode != 0:
            raise RuntimeError(f"{side} worker exited with {proc.returncode}")
        res = json.loads(Path(result_path).read_text())
    finally:
        Path(result_path).unlink(missing_ok=True)
    res["process_wall_s"] = wall
    res["peak_pss_gib"], res["peak_rss_sum_gib"] = mon.peak_pss_gib, mon.peak_rss_gib
    res["peak_pss_by_role"] = mon.peak_roles  # which process held what at the peak ("driver" = the worker)
    # 1-min load average: other processes on the box inflate both sides' times (2 cores here).
    res["loadavg_before"], res["loadavg_after"] = list(load_before), list(os.getloadavg())
    return res


def _fmt(x: float | None, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.worker:
        res = run_trl(a) if a.worker == "trl" else run_rlkit(a)
        Path(a.result).write_text(json.dumps(res))
        return 0

    from rlkit.infra.sysmon import format_roles

    sides = [a.only] if a.only else ["trl", "rlkit"]
    results = {side: run_side(side, a) for side in sides}
    setup = {"model": MODEL, "prompts": a.prompts, "group": a.group, "max_new_tokens": a.max_new_tokens,
             "steps": a.steps, "warmup_steps_excluded": 1, "micro_batch": a.micro_batch, "lr": a.lr,
             "dtype": "float32", "beta": 0.0, "temperature": 1.0, "rewards": dict(REWARDS)}

    print(f"\n== step time, {MODEL} fp32, {a.prompts} prompts x G={a.group}, "
          f"{a.max_new_tokens} new tokens, {a.steps} steps (first excluded) ==")
    for side, r in results.items():
        per = ", ".join(_fmt(x) for x in r["step_s"])
        lens = ", ".join(_fmt(x, 1) for x in r["completion_len_mean"])
        print(f"{side:6s} mean step {_fmt(r['mean_step_s'])} s | per step [{per}] | mean completion len [{lens}]")
        keys = ("gen_s", "reward_s", "train_s") + (("sync_s",) if side == "rlkit" else ())
        print("       breakdown (mean, excl. warm-up): " + ", ".join(
            f"{k} {_fmt(r.get('mean_' + k))} s" for k in keys)
            + f" | load avg before/after {_fmt(r['loadavg_before'][0])}/{_fmt(r['loadavg_after'][0])}"
            + f" | peak PSS {_fmt(r['peak_pss_gib'])} GiB (process tree)")
        print(f"       peak PSS by process, GiB: {format_roles(r.get('peak_pss_by_role') or {}, top=8)}")
    ratio = None
    if "trl" in results and "rlkit" in results and results["trl"]["mean_step_s"]:
        ratio = results["rlkit"]["mean_step_s"] / results["trl"]["mean_step_s"]
        print(f"ratio rlkit/TRL step time: {ratio:.3f} ({'rlkit faster' if ratio < 1 else 'TRL faster'})")
    print(json.dumps({"bench": "step_time_vs_trl", "setup": setup,
                      "trl_mean_step_s": results.get("trl", {}).get("mean_step_s"),
                      "rlkit_mean_step_s": results.get("rlkit", {}).get("mean_step_s"),
                      "rlkit_overrides": a.rlkit_override,
                      "peak_pss_gib": {k: r.get("peak_pss_gib") for k, r in results.items()},
                      "ratio_rlkit_over_trl": ratio, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
