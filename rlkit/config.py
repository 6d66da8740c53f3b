"""Loading a run's configuration: recipes composed from config groups, dotted overrides, checks.

Load order (later wins): schema defaults <- config groups named in the recipe's ``defaults`` list
(``configs/<group>/<name>.yaml``, merged under the ``<group>`` section) <- the recipe body <- dotted
CLI overrides (``train.lr=1e-5``). Unknown keys, wrong types and impossible combinations raise
:class:`ConfigError` naming the dotted key and the nearest valid one, before any model is loaded.
The schema itself is :mod:`rlkit.schema` (re-exported here).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from rlkit.compose import (  # noqa: F401  (re-exported: the names callers import from rlkit.config)
    ConfigError,
    deep_merge,
    default_configs_dir,
    load_plugins,
    merge_layer,
    nearest,
    parse_override,
)
from rlkit.compose import compose as _compose
from rlkit.config_checks import check_combinations, check_registries
from rlkit.schema import (  # noqa: F401  (re-exported)
    AdaptiveTemperatureConfig,
    AlgorithmConfig,
    CheckpointConfig,
    ClusterConfig,
    Config,
    DataConfig,
    DeepSpeedConfig,
    DynamicSamplingConfig,
    EngineConfig,
    EvalConfig,
    KLConfig,
    LearnerConfig,
    LoraConfig,
    ModelConfig,
    OverlongShapingConfig,
    RewardConfig,
    RolloutCorrectionConfig,
    SandboxConfig,
    SegmentsConfig,
    TrackingConfig,
    TrainConfig,
    VerifierConfig,
    VLLMConfig,
)

# ----------------------------------------------------------------------------- errors


def _fields_at(path: tuple, model: type[BaseModel] = Config) -> list[str]:
    """Valid field names of the section at a dotted path (for suggestions)."""
    cur: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        f = getattr(cur, "model_fields", {}).get(part)
        if f is None:
            return []
        ann = f.annotation
        cur = next((x for x in _unwrap(ann) if isinstance(x, type) and issubclass(x, BaseModel)), None)
        if cur is None:
            return []
    return list(getattr(cur, "model_fields", {}))


def _unwrap(ann: Any) -> list[Any]:
    args = getattr(ann, "__args__", None)
    if not args:
        return [ann]
    out: list[Any] = []
    for x in args:
        out.extend(_unwrap(x))
    return out


def _format_validation_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        key = ".".join(str(x) for x in loc) or "<config>"
        if err["type"] == "extra_forbidden":
            valid = _fields_at(loc[:-1])
            hint = nearest(str(loc[-1]), valid)
            msg = f"unknown key '{key}'"
            msg += f"; did you mean '{'.'.join(map(str, (*loc[:-1], hint)))}'?" if hint else ""
            msg += f" (valid keys here: {', '.join(valid)})" if valid else ""
        elif err["type"] == "value_error":
            msg = str(err["msg"]).removeprefix("Value error, ")
        else:
            msg = f"{key}: {err['msg']} (got {err.get('input')!r})"
        lines.append(msg)
    return "invalid config:\n  " + "\n  ".join(lines)


# ----------------------------------------------------------------------------- loading


def compose(recipe: str | Path | None, overrides: list[str] = ()) -> dict:
    """Config groups, the recipe and dotted overrides merged into one raw dict (not validated);
    see :mod:`rlkit.compose`."""
    return _compose(recipe, overrides, Config.model_fields)


def build(raw: dict) -> Config:
    raw = load_plugins(raw)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None
    try:
        check_combinations(cfg)
    except ValueError as e:
        raise ConfigError("invalid config:\n  " + str(e)) from None
    check_registries(cfg)
    return cfg


def load_config(recipe: str | Path | None, overrides: list[str] = ()) -> Config:
    """Compose, validate and check names against the registries. Never loads a model."""
    return build(compose(recipe, overrides))


def config_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain JSON types, keyed as written in YAML (``train.async``)."""
    return cfg.model_dump(mode="json", by_alias=True)


def save_config(cfg: Config, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config_dict(cfg), sort_keys=False))
    os.replace(tmp, p)


def describe(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every field: the config reference."""
    rows = []
    for name, f in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = next((x for x in _unwrap(f.annotation) if isinstance(x, type) and issubclass(x, BaseModel)), None)
        if sub is not None and sub is not VerifierConfig:
            rows.extend(describe(sub, key + "."))
        else:
            default = f.default_factory() if f.default_factory else f.default
            rows.append((key, repr(default), f.description or ""))
    return rows
