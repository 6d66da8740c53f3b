"""Golden runs: every method recipe, two steps on the tiny random model, per-step metrics recorded.

The driver layer (trainer, collectors, method stages, engine pool, learners) is refactored against
these: a change that should not alter behaviour must reproduce every recorded metric to 1e-6.
The runs are single-threaded (one torch thread per actor) so each float sum has one order.

Record (only when a change is *meant* to alter the numbers, and say why in the commit)::

    python tests/golden.py            # all runs -> tests/golden/*.json
    python tests/golden.py tempo spae # some of them

A canary (a fixed forward/backward of the tiny model) is stored with the fixtures: on a machine
whose float kernels differ from the recording machine's, the comparison is skipped with a message
instead of failing on a last-bit difference that says nothing about the code.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(__file__).resolve().parent / "golden"

_SPAE_PROBE = ("algorithm.step_probe={boundary_match: text, num_samples: 2, max_new_tokens: 4, "
               "step_suffixes: [a, e, i, o, u, n, s, t, r, ' ', '.', '0', '1', '2', '3']}")

# name -> (recipe, extra overrides). Every method recipe; LoRA everywhere the recipe has it is
# turned off by the shared overrides except in "lora", which keeps an adapter.
RUNS: dict[str, tuple[str, list[str]]] = {
    "grpo": ("recipes/quickstart.yaml", []),
    "dr_grpo": ("recipes/dr_grpo.yaml", ["algorithm.norm_length=12"]),
    "dapo": ("recipes/dapo.yaml", []),
    "gspo": ("recipes/gspo.yaml", []),
    "tempo": ("recipes/tempo.yaml", []),
    "spae": ("recipes/spae.yaml", [_SPAE_PROBE]),
    "hapo": ("recipes/hapo.yaml", []),
    "brpo": ("recipes/brpo_anytime.yaml",
             ["algorithm.advantage_params={b_max: 12, n_support: 3, summary_max_new_tokens: 4}"]),
    "segments_dmmpt": ("recipes/ulorl_segments.yaml", ["segments.seg_len=5", "engine.max_new_tokens=15"]),
    "budget_guidance": ("recipes/budget_guidance.yaml", ["data.budget={prior: uniform, low: 4, high: 12}"]),
    "kimi": ("recipes/kimi_length.yaml",
             ["reward.verifiers=[{name: math}, {name: tests/e2e_rewards.py:digit_fraction}]"]),
    "l1_max": ("recipes/l1_budget.yaml", ["data.budget={prior: uniform, low: 4, high: 12, max_prob: 1.0}"]),
    "budget_penalty": ("recipes/budget_penalty.yaml",
                       ["data.budget={prior: fixed, low: 6, high: 6, template: '{prompt} At most {budget} tokens.'}"]),
    "hapo_history": ("recipes/hapo_history.yaml", []),
    "lora": ("recipes/lora.yaml", ["model.lora.rank=4", "algorithm.kl.beta=0.01"]),
}

# wall-clock and machine metrics differ between any two runs; everything else is a function of the code
_VOLATILE = ("time/", "perf/", "sys/", "cluster/")


def overrides(model_dir: str, out: Path, name: str) -> list[str]:
    return [
        f"model.name={model_dir}", f"output_dir={out}", f"name={name}", "train.steps=2",
        "train.prompts_per_step=2", "train.samples_per_prompt=4", "engine.max_new_tokens=12",
        "data.generator={n: 40, max_value: 9}", "data.eval_size=4", "checkpoint.every=0",
        "checkpoint.export_final=false", "learner.lr=1e-3", "learner.micro_batch_size=3",
        "tracking.tensorboard=false", "tracking.console=false", "reward.mode=inline", "model.lora.rank=0",
        "reward.verifiers=[{name: math}, {name: tests/e2e_rewards.py:digit_fraction}]",
        "eval.before=false", "eval.after=false", "cluster.num_cpus=2", "learner.num_threads=1",
    ]


def tiny_predictor(model_dir: str, out: Path) -> str:
    """A seeded random budget predictor for the tiny model (what ``model.budget_guidance`` loads)."""
    import torch
    from transformers import AutoConfig

    from rollout.budget import GammaPredictor, PredictorConfig, save_predictor

    mc = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    pc = PredictorConfig(d_model=mc.hidden_size, vocab_size=mc.vocab_size, num_hidden_states=mc.num_hidden_layers + 1,
                         hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    save_predictor(GammaPredictor(pc).eval(), out)
    return str(out)


def canary(model_dir: str) -> float:
    """Sum of a fixed forward+backward of the tiny model in one thread: a fingerprint of the kernels."""
    import torch
    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
        ids = torch.arange(3, 35).reshape(2, 16)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        g = sum(float(p.grad.double().sum()) for p in model.parameters() if p.grad is not None)
        return float(out.logits.detach().double().sum()) + g
    finally:
        torch.set_num_threads(threads)


def run(name: str, model_dir: str, out: Path) -> list[dict[str, float]]:
    """Train run ``name`` for two steps; its per-step metrics without the volatile ones."""
    from rlkit.config import load_config
    from rlkit.infra.tracking import read_metrics
    from rlkit.trainer import Trainer

    recipe, extra = RUNS[name]
    ov = overrides(model_dir, out, name) + list(extra)
    if name == "budget_guidance":
        ov.append(f"model.budget_guidance={tiny_predictor(model_dir, out / 'predictor')}")
    Trainer(load_config(ROOT / recipe, ov)).run()
    return [stable(m) for m in read_metrics(out / name)]


def stable(m: dict) -> dict[str, float]:
    """The metrics of one step that are a function of the code (no timings, no machine state)."""
    return {k: v for k, v in m.items()
            if isinstance(v, (int, float)) and not k.startswith(_VOLATILE) and not k.endswith("_s")}


def compare(name: str, got: list[dict[str, float]], want: list[dict[str, float]], tol: float = 1e-6) -> list[str]:
    """Differences between two runs' metrics, as readable lines (empty when they agree)."""
    bad = []
    if [m["step"] for m in got] != [m["step"] for m in want]:
        return [f"{name}: steps {[m['step'] for m in got]} != {[m['step'] for m in want]}"]
    for a, b in zip(got, want):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                bad.append(f"{name} step {b['step']}: {k} only in {'the new run' if k in a else 'the golden run'}")
            elif not (math.isclose(a[k], b[k], rel_tol=tol, abs_tol=tol)
                      or (math.isnan(a[k]) and math.isnan(b[k]))):
                bad.append(f"{name} step {b['step']}: {k} = {a[k]!r}, golden {b[k]!r}")
    return bad


def main(names: list[str]) -> None:
    import tempfile

    from rlkit.infra.models import make_tiny_model

    GOLDEN_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(str(Path(tmp) / "tiny"), arch="llama", seed=0)
        (GOLDEN_DIR / "canary.json").write_text(json.dumps({"canary": canary(model_dir)}) + "\n")
        for name in names or list(RUNS):
            metrics = run(name, model_dir, Path(tmp) / "runs")
            (GOLDEN_DIR / f"{name}.json").write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
            print(f"{name}: {len(metrics)} steps, {len(metrics[-1])} metrics", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(sys.argv[1:])
