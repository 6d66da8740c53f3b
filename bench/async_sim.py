"""Async training (``train.async``) vs sync at GPU scale: a discrete-event simulation from per-token costs.

    .venv/bin/python bench/async_sim.py [--steps 20] [--json out.json]      # ~10 s on one CPU core

Replays the control flow of ``rlkit.methods.async_rollout`` (producer, consumer, FIFO weight push)
on a simulated clock; nothing of rlkit is imported, its rules are copied:

- sync == ``async`` with ``max_staleness: 0``: one engine call with the whole batch (prompts_per_step
  P x G), train, push. one_step_off == async k=1, whole requests (``async_settings``). A new round
  (P prompts, regenerations first) starts when ``ahead // P + pending_update <= k``.
- A call (built as soon as the previous one ends) holds every running sample's next chunk (partial)
  plus a new round if allowed, round-robin over the engines by request (a new prompt = one request
  of n=G); it lasts as long as its slowest engine. A push queues behind it (actor FIFO).
- The learner takes P complete groups in completion order; a group whose oldest token is more than
  k versions old is dropped and its prompt generated again (``async/dropped_stale``: regen/step).
  As in rlkit, dropped prompts count in ``ahead``, so near the end a round's target can pass the
  last step and be refused while the step still lacks groups: a stall (rlkit would hang), reported
  as ``stalled_at_step``; it can only hit the k + 2 unmeasured steps at the end.

Cost of one call on one engine (rows: context c_i, n_i new tokens; rows beyond ``max_seqs`` wait for
a free slot, continuous batching), summed exactly over decode steps::

    t = call_overhead + prefill_tokens * 2N / (peak * prefill_mfu)
      + sum_steps [step_overhead + max((2N + kv_bytes * sum_alive c) / (hbm_bw * hbm_eff),   # memory
                                       rows_alive * 2N / (peak * decode_mfu))]                # compute

Prefill: once per new prompt (prefix cache shared by its G samples); a resumed sample re-prefills its
prompt + tokens unless it stays on the same engine with no push between (rlkit's vLLM engine resets
the prefix cache at every load). Learner: ``tokens * 6N / (gpus * peak * train_mfu)`` over prompt +
response tokens. Push: split = ZeRO-3 gather (NVLink) + NCCL broadcast (NVLink in a node, InfiniBand
across nodes) + fixed; colocated (cuda_ipc) = gather + vLLM sleep/wake (weights over PCIe both ways)
+ fixed. Lengths: ``log L = log 2048 + N(0, .6) per prompt + N(0, .6) per sample`` (bench/segments.py's
shape), cap 8192 (~5% truncated), prompts 512 tokens; P = 64 (8 GPUs) / 512 (64 GPUs), G = 8. Seeded:
every arm sees the same prompts and lengths. Split arms try {N/4, N/2, 3N/4} engine GPUs (TP=1:
both models fit one H100) and report the best; measured steps follow max(3, steps/4) warm-up steps.

Ignores: KV-cache capacity (kv_peak = an engine's peak KV demand / capacity; above 1 vLLM would
preempt: optimistic arm), attention FLOPs, reward scoring, reference/old-log-prob passes (+2N/token
each on the learner), optimizer step, padding, learner scaling losses, failures, length drift,
prefix-cache eviction, and what staleness does to learning. Idle: engines = 1 - per-engine busy /
(E x wall), learner = 1 - training / wall (the learner blocks in pushes: idle for both).
"""

from __future__ import annotations

import argparse
import heapq
import json
import time
from dataclasses import asdict, dataclass, replace

import numpy as np


@dataclass(frozen=True)
class Cost:
    params: float  # N: Qwen2.5-1.5B 1.54e9, Qwen2.5-7B 7.62e9 (model cards); weights W = 2N bytes (bf16)
    kv_bytes: float  # KV bytes/token = 2 (K,V) x layers x kv_heads x head_dim x 2 B (Qwen2.5 config.json)
    hbm_bw: float = 3.35e12  # H100 SXM HBM3 bytes/s (NVIDIA datasheet)
    hbm_eff: float = 0.7  # assumption: share of HBM bandwidth reached by decode kernels
    peak: float = 989e12  # H100 SXM dense BF16 FLOP/s (NVIDIA datasheet)
    decode_mfu: float = 0.5  # assumption: MFU of a compute-bound decode step
    prefill_mfu: float = 0.5  # assumption: MFU of prefill (large GEMMs)
    train_mfu: float = 0.35  # assumption: fwd+bwd MFU of a ZeRO-3/FSDP bf16 learner (30-45% typical)
    step_overhead: float = 2e-3  # assumption: s per decode step (scheduler, sampling, launches; CUDA graphs)
    call_overhead: float = 0.1  # assumption: s per engine call (Ray round trip, request building)
    max_seqs: int = 256  # assumption: vLLM max_num_seqs per engine at this scale (rlkit default 64 is for CPU)
    gpu_mem: float = 80e9  # H100 80 GB
    mem_util: float = 0.85  # rlkit engine.vllm.gpu_memory_utilization default (split placement)
    mem_util_coloc: float = 0.45  # assumption: lowered when the learner shares the GPU (schema doc)
    nvlink_bw: float = 150e9  # assumption: NCCL broadcast / all-gather bus bandwidth inside an 8xH100 node
    ib_bw: float = 45e9  # assumption: 400 Gb/s NDR InfiniBand per GPU -> ~45 GB/s NCCL across nodes
    pcie_bw: float = 25e9  # assumption: effective host<->GPU copy (vLLM sleep/wake), PCIe Gen5 x16
    sync_fixed: float = 0.5  # assumption: s per push (reload_weights, prefix-cache reset, Ray round trips)


@dataclass(frozen=True)
class Workload:
    prompts: int = 64  # prompts_per_step: 64 on 8 GPUs, 512 on 64 GPUs (task brief)
    G: int = 8  # samples_per_prompt
    prompt_len: int = 512  # assumption: math prompt + chat template
    median: float = 2048.0  # assumption: median response length (1.5B-7B reasoning RL)
    sigma_prompt: float = 0.6  # log-normal per-prompt effect, as bench/segments.py
    sigma_sample: float = 0.6  # log-normal per-sample effect, as bench/segments.py
    max_len: int = 8192  # engine.max_new_tokens (cap)
    chunk: int = 0  # partial_rollout chunk_tokens; 0 = max_len // 4 (AsyncConfig.resolved_chunk default)


MODELS = {"1.5b": {"params": 1.54e9, "kv_bytes": 2 * 28 * 2 * 128 * 2},  # 28 layers, 2 KV heads, d=128
          "7b": {"params": 7.62e9, "kv_bytes": 2 * 28 * 4 * 128 * 2}}  # 28 layers, 4 KV heads, d=128
PROMPTS = {8: 64, 64: 512}
ARMS = [("sync colocated", "sync", 0, False), ("sync split", "sync", 0, False), ("one_step_off", "one_step_off", 1, False),
        ("async k=1", "async", 1, False), ("async k=2", "async", 2, False), ("async k=2 + partial", "async", 2, True)]


def _engine_times(c: Cost, E: int, eng, ctx, n, prefill):
    """Seconds each engine spends on one call (module docstring), and the peak KV tokens of an engine."""
    s0 = np.zeros(len(n))
    counts = np.bincount(eng, minlength=E)
    for e in np.nonzero(counts > c.max_seqs)[0]:  # queued rows start when a slot frees
        idx = np.nonzero(eng == e)[0]
        heap = sorted(float(x) for x in n[idx[: c.max_seqs]])
        for i in idx[c.max_seqs:]:
            s0[i] = heapq.heappop(heap)
            heapq.heappush(heap, s0[i] + n[i])
    pts, ee, ones = np.concatenate([s0, s0 + n]), np.concatenate([eng, eng]), np.ones(len(n))
    o = np.lexsort((pts, ee))  # by engine, then step: per-engine deltas sum to 0, so cumsums restart
    pts, ee = pts[o], ee[o]
    b = np.cumsum(np.concatenate([ones, -ones])[o])[:-1]  # rows alive on each segment
    C = np.cumsum(np.concatenate([ctx - s0, s0 - ctx])[o])[:-1]  # sum(ctx - s0): context = C + b * step
    x0, m = pts[:-1], np.where(ee[1:] == ee[:-1], pts[1:] - pts[:-1], 0.0) * (b > 0.5)
    bw, W, F = c.hbm_bw * c.hbm_eff, 2 * c.params, 2 * c.params
    a, D, K = (W + c.kv_bytes * (C + b * x0)) / bw, c.kv_bytes * b / bw, b * F / (c.peak * c.decode_mfu)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.where(D > 0, np.clip(np.ceil((K - a) / D), 0, m), np.where(a < K, m, 0.0))  # compute-bound steps
    seg = m * c.step_overhead + k * K + (m - k) * a + D * (m * (m - 1) - k * (k - 1)) / 2
    t = np.bincount(ee[:-1], seg, minlength=E) + (counts > 0) * c.call_overhead
    t = t + np.bincount(eng, prefill, minlength=E) * F / (c.peak * c.prefill_mfu)
    return t, float(np.max(np.where(m > 0, C + b * (x0 + m), 0.0), initial=0.0))


def simulate(model: str, gpus: int, mode: str, max_staleness: int, partial: bool, steps: int = 20, seed: int = 0,
             *, engine_gpus: int | None = None, cost: dict | None = None, workload: dict | None = None) -> dict:
    """One arm. ``mode`` sync (colocated unless ``engine_gpus``) | one_step_off | async (split:
    ``engine_gpus``, default gpus // 2). ``cost`` / ``workload``: field overrides. Measures ``steps``
    steps after ``max(3, steps // 4)`` warm-up steps (k + 2 more steps run after, so no end effect)."""
    c = replace(Cost(**MODELS[model]), **(cost or {}))
    wl = replace(Workload(prompts=PROMPTS.get(gpus, 8 * gpus)), **(workload or {}))
    k, partial = (0, False) if mode == "sync" else (1, False) if mode == "one_step_off" else (max_staleness, partial)
    coloc = mode == "sync" and engine_gpus is None
    E = gpus if coloc else (engine_gpus or gpus // 2)
    LG = gpus if coloc else gpus - E  # learner GPUs
    assert E >= 1 and LG >= 1, "split placement needs engine and learner GPUs"
    P, G, W, chunk = wl.prompts, wl.G, 2 * c.params, (wl.chunk or max(1, wl.max_len // 4)) if partial else wl.max_len
    warm = max(3, steps // 4)  # warm-up steps, then ``steps`` measured ones, then k + 2 more (no end effect)
    last = warm + steps + k + 2
    t_sync = W / c.nvlink_bw + c.sync_fixed + (2 * W / c.pcie_bw if coloc else W / (c.nvlink_bw if gpus <= 8 else c.ib_bw))
    kv_cap = (c.gpu_mem * (c.mem_util_coloc if coloc else c.mem_util) - W) / c.kv_bytes if c.kv_bytes else float("inf")
    rng, rng_regen = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    prompt_eff = rng.normal(0.0, wl.sigma_prompt, 2 * last * P)  # fresh prompts: partial may run ahead
    fresh_eff = rng.normal(0.0, wl.sigma_sample, (2 * last * P, G))
    pid, (L, gen, vmin, vlast, elast) = np.zeros(4 * last * P, int), np.zeros((5, 4 * last * P * G), int)
    live: dict[int, None] = {}  # groups not yet handed to a step, in creation order
    ready, todo = [], []  # complete groups in completion order; prompts to generate again
    v, pending, now, dropped, n_groups, next_pid, stalled = 0, False, 0.0, 0, 0, 0, None
    learner, learn_until, taken, step_ends, stale, train_log = "wait", 0.0, [], [0.0], [], []
    queue, job, job_until, busy_log, calls, kv_peak = [], None, 0.0, [], 0, 0.0  # engine FIFO: calls, pushes

    def new_group(p: int, eff) -> int:
        nonlocal n_groups
        assert n_groups < len(pid), "stale regenerations outgrew the group store"
        g, n_groups = n_groups, n_groups + 1
        pid[g], live[g] = p, None
        L[g * G:(g + 1) * G] = np.clip(np.rint(wl.median * np.exp(prompt_eff[p] + eff)), 1, wl.max_len)
        gen[g * G:(g + 1) * G], vmin[g * G:(g + 1) * G] = 0, -1
        return g

    def allowed() -> bool:
        ahead = len(live) + len(todo)
        return v + 1 + pending + ahead // P <= last and ahead // P + pending <= k

    def running():
        if not partial or not live:
            return np.zeros(0, int)
        s = (np.fromiter(live, int)[:, None] * G + np.arange(G)).ravel()
        return s[(gen[s] > 0) & (gen[s] < L[s])]

    def build() -> tuple | None:
        nonlocal next_pid, todo
        run, new = running(), []
        if allowed():
            take, todo = todo[:P], todo[P:]
            new = [new_group(p, rng_regen.normal(0.0, wl.sigma_sample, G)) for p in take]
            while len(new) < P:
                new.append(new_group(next_pid, fresh_eff[next_pid]))
                next_pid += 1
        return ("call", run, new) if len(run) or new else None

    def start(item) -> float:
        nonlocal calls, kv_peak
        if item[0] == "sync":
            return t_sync
        run, ng = item[1], np.asarray(item[2], int)
        rows = np.concatenate([run, (ng[:, None] * G + np.arange(G)).ravel()])
        eng = np.concatenate([np.arange(len(run)), np.repeat(len(run) + np.arange(len(ng)), G)]) % E
        ctx, nn = wl.prompt_len + gen[rows], np.minimum(L[rows] - gen[rows], chunk)
        cached = (vlast[rows] == v) & (elast[rows] == eng) | (gen[rows] == 0)  # fresh rows: per-prompt prefill below
        pre = np.where(cached, 0, ctx).astype(float)
        pre[len(run)::G] += wl.prompt_len
        t_e, kv = _engine_times(c, E, eng, ctx.astype(float), nn.astype(float), pre)
        busy_log.append((now, t_e))
        calls, kv_peak = calls + 1, max(kv_peak, kv / kv_cap)
        gen[rows] += nn  # the call's outcome, absorbed at its end
        vmin[rows], vlast[rows], elast[rows], item[1] = np.where(vmin[rows] < 0, v, vmin[rows]), v, eng, rows
        return float(t_e.max())

    while len(step_ends) <= last:
        progress = True
        while progress:
            progress = False
            if job is not None and now >= job_until:  # the engines' job ends
                if job[0] == "call":  # complete groups join the FIFO in the order the call held them
                    ready += [g for g in dict.fromkeys((job[1] // G).tolist()) if (gen[g * G:(g + 1) * G] >=
                                                                               L[g * G:(g + 1) * G]).all()]
                else:
                    v, pending, learner = v + 1, False, "wait"
                    step_ends.append(now)
                job, progress = None, True
            if learner == "train" and now >= learn_until:
                learner, progress = "push", True
                queue.append(("sync",))
            if learner == "wait" and len(ready) >= P - len(taken):
                got, ready = ready[: P - len(taken)], ready[P - len(taken):]
                for g in got:
                    live.pop(g)
                    if v - vmin[g * G:(g + 1) * G].min() > k:
                        dropped += 1
                        todo.append(int(pid[g]))
                    else:
                        taken.append(g)
                progress = True
                if len(taken) == P:
                    s = (np.asarray(taken)[:, None] * G + np.arange(G)).ravel()
                    T = float((wl.prompt_len + L[s]).sum()) * 6 * c.params / (LG * c.peak * c.train_mfu)
                    stale.append(v - vmin[s])
                    train_log.append((now, T))
                    learner, learn_until, pending, taken = "train", now + T, True, []
            if not any(q[0] == "call" for q in queue) and (job is None or job[0] != "call"):
                item = build()
                if item is not None:
                    queue.append(list(item))
                    progress = True
            if job is None and queue:
                job = queue.pop(0)
                job_until, progress = now + start(job), True
        ends = [t for t, on in ((job_until, job is not None), (learn_until, learner == "train")) if on]
        if not ends and len(step_ends) <= last:  # stalled (rlkit's last-step rule, module docstring)
            assert len(step_ends) > warm + steps, f"stalled at t={now:.1f}s in the measured steps ({mode}, k={k})"
            stalled = len(step_ends)
            break
        now = min(ends, default=now)

    ta, tb = step_ends[warm], step_ends[warm + steps]
    span = tb - ta
    eng_busy = sum(float(np.clip(np.minimum(t0 + t_e, tb) - max(t0, ta), 0, None).sum()) for t0, t_e in busy_log)
    train_busy = sum(max(0.0, min(t0 + T, tb) - max(t0, ta)) for t0, T in train_log)
    st = np.concatenate(stale[warm: warm + steps])
    return {"model": model, "gpus": gpus, "mode": mode, "max_staleness": k, "partial": partial,
            "placement": "colocated" if coloc else "split", "engine_gpus": E, "learner_gpus": LG,
            "samples_per_s": steps * P * G / span, "step_s": span / steps, "staleness_mean": float(st.mean()),
            "staleness_max": int(st.max()), "engine_idle": 1 - eng_busy / (E * span),
            "learner_idle": 1 - train_busy / span, "dropped_stale": dropped, "calls": calls,
            "dropped_per_step": dropped / len(stale), "sync_s": t_sync, "kv_peak": kv_peak,
            "stalled_at_step": stalled}


def run_all(steps: int = 20, seed: int = 0) -> list[dict]:
    out = []
    for model, gpus in [(m, g) for m in MODELS for g in PROMPTS]:
        rows = []
        for name, mode, k, partial in ARMS:
            splits = [None] if name == "sync colocated" else [gpus // 4, gpus // 2, 3 * gpus // 4]
            runs = [simulate(model, gpus, mode, k, partial, steps, seed, engine_gpus=e) for e in splits]
            rows.append({"arm": name, **max(runs, key=lambda r: r["samples_per_s"])})
        best = max(r["samples_per_s"] for r in rows if r["mode"] == "sync")
        out += [{**r, "ratio_vs_best_sync": r["samples_per_s"] / best} for r in rows]
    return out


def table(rows: list[dict]) -> str:
    head = (f"\n### {rows[0]['model']}, {rows[0]['gpus']} GPUs: {PROMPTS[rows[0]['gpus']]} prompts x 8 per step\n\n"
            "| mode | GPUs engines/learner | samples/s | vs best sync | mean staleness | engine idle | learner idle"
            " | regen/step | kv_peak |\n|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['arm']} | {r['engine_gpus']}/{r['learner_gpus']}{' shared' if r['placement'] == 'colocated' else ''}"
             f" | {r['samples_per_s']:.2f} | {r['ratio_vs_best_sync']:.2f}x | {r['staleness_mean']:.2f} | "
             f"{r['engine_idle']:.2f} | {r['learner_idle']:.2f} | {r['dropped_per_step']:.1f} | {r['kv_peak']:.2f} |"
             for r in rows]
    return "\n".join([head, *lines])


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="measured steps per arm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write every number here")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rows = run_all(args.steps, args.seed)
    for i in range(0, len(rows), len(ARMS)):
        print(table(rows[i: i + len(ARMS)]))
    print(f"\n{len(rows)} best-of-split arms in {time.perf_counter() - t0:.1f}s; costs: Cost, Workload (--json)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "costs": {m: asdict(Cost(**kw)) for m, kw in MODELS.items()},
                       "workload": asdict(Workload()), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
