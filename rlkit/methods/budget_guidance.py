"""Budget guidance as a stage (``model.budget_guidance``): a Gamma predictor steers decoding.

The predictor (trained by ``rlkit train-budget-predictor``) reads the LM's hidden states and
predicts, for every candidate token, the distribution of the remaining thinking length; guided
decoding reweights the candidates by how well they fit the request's remaining budget
(docs/algorithms.md §4). In training it acts on requests that carry a budget (``data.budget``):
the stage passes the predictor to every engine, which appends the guidance last to its logits
processors, and logs ``budget_guidance/*`` counters each step. ``rlkit eval --budgets`` uses the
same glue.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rlkit.common import build_dataclass
from rlkit.methods.base import Stage, register_stage


def guidance_params(overrides: Mapping[str, Any] | None, base: Any = None) -> Any:
    """``rollout.budget.GuidanceParams`` from ``base`` (default: the class defaults) + ``overrides``.

    Unknown keys raise ``ValueError`` naming the nearest field (``model.budget_guidance_params``).
    """
    import dataclasses

    from rollout.budget import GuidanceParams

    kw = dict(overrides or {})
    if "trigger_strings" in kw:
        ts = kw["trigger_strings"]
        kw["trigger_strings"] = (ts,) if isinstance(ts, str) else tuple(ts)
    start = dataclasses.asdict(base) if base is not None else {}
    return build_dataclass(GuidanceParams, {**start, **kw}, "model.budget_guidance_params")


def check_predictor_dir(path: str | Path) -> Path:
    """The predictor dir, or ``FileNotFoundError`` saying how to train one."""
    from rollout.budget import CONFIG_FILE, WEIGHTS_FILE

    root = Path(path)
    if not (root / CONFIG_FILE).is_file() or not (root / WEIGHTS_FILE).is_file():
        what = "does not exist" if not root.exists() else f"has no {CONFIG_FILE} + {WEIGHTS_FILE}"
        raise FileNotFoundError(
            f"budget predictor dir {str(root)!r} {what}; train one with "
            f"`rlkit train-budget-predictor --model MODEL --out {root}`"
        )
    return root


def build_guidance(engine: Any, path: str | Path, params: Mapping[str, Any] | None = None) -> Any:
    """A :class:`rollout.budget.BudgetGuidance` for ``engine``'s model from the predictor at ``path``.

    Guidance params: those saved with the predictor, then ``params``. Checks that the predictor
    was trained for this model's shapes (hidden size, layers + 1, vocab) before any decoding.
    """
    from rollout.budget import BudgetGuidance, load_predictor

    root = check_predictor_dir(path)
    if not hasattr(engine, "logits_processors") or not hasattr(engine, "tokenizer"):
        raise ValueError(f"budget guidance needs an engine with logits processors and hidden states "
                         f"(engine.name=hf); {type(engine).__name__} has none")
    predictor, meta = load_predictor(root, getattr(engine, "device", "cpu"))
    model = engine.model
    want = (int(model.config.hidden_size), int(model.config.num_hidden_layers) + 1,
            int(model.get_output_embeddings().weight.shape[0]))
    c = predictor.cfg
    if (c.d_model, c.num_hidden_states, c.vocab_size) != want:
        raise ValueError(
            f"budget predictor {str(root)!r} was trained for another model: it reads (d_model, layers+1, "
            f"vocab) = {(c.d_model, c.num_hidden_states, c.vocab_size)}, this model has {want} "
            f"(predictor base model: {meta.get('base_model', '?')})"
        )
    saved = meta.get("guidance", {})
    base = guidance_params(saved)
    return BudgetGuidance(predictor, engine.tokenizer, guidance_params(params, base))


def attach_budget_guidance(engine: Any, path: str | Path, params: Mapping[str, Any] | None = None) -> Any:
    """Append budget guidance, last, to ``engine.logits_processors``; returns the processor.

    It acts only on requests carrying a budget (``RolloutRequest.budget``), so unbudgeted
    requests decode exactly as before (at the cost of the hidden-state outputs).
    """
    proc = build_guidance(engine, path, params)
    engine.logits_processors.append(proc)
    return proc


@register_stage("budget_guidance", order=50)
class BudgetGuidanceStage(Stage):
    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        return bool(cfg.model.budget_guidance)

    @classmethod
    def check(cls, cfg: Any) -> None:
        if cfg.model.budget_guidance_params:
            guidance_params(cfg.model.budget_guidance_params)  # unknown keys name the nearest valid one

    @classmethod
    def engine_kwargs(cls, cfg: Any) -> dict[str, Any]:
        return {"budget_guidance": str(Path(cfg.model.budget_guidance).resolve()),
                "budget_guidance_params": dict(cfg.model.budget_guidance_params)}

    def metrics(self) -> dict[str, float]:
        return self.ctx.engines.guidance_metrics()
