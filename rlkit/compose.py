"""Recipe composition: YAML config groups, ``extends`` chains and dotted overrides merged into one
raw dict, before the schema in :mod:`rlkit.config` validates it. Imports nothing of rlkit.

Load order (later wins): config groups named in the recipe's ``defaults`` list
(``configs/<group>/<name>.yaml``) <- the bodies of the recipes it extends, parent first <- the
recipe body <- the dotted CLI overrides, taken together as one layer.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported with the dotted key at fault."""


from rlkit.common import nearest  # noqa: E402,F401  (re-exported: the config errors' did-you-mean)


def default_configs_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "configs"


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def merge_layer(raw: dict, layer: dict) -> dict:
    """``deep_merge``, except that a layer switching ``data.source`` starts ``data.generator``
    afresh: one source's generator keys (arithmetic's ``min_value``, ``ops``) mean nothing to another."""
    new_source = layer.get("data", {}).get("source") if isinstance(layer.get("data"), dict) else None
    old = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    if new_source is not None and new_source != old.get("source") and "generator" in old:
        raw = {**raw, "data": {k: v for k, v in old.items() if k != "generator"}}
    return deep_merge(raw, layer)


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _resolve_group(entry: str, search: list[Path]) -> Path:
    if "/" not in entry:
        raise ConfigError(f"defaults entry '{entry}' must look like 'group/name' (e.g. algorithm/grpo)")
    for d in search:
        p = d / f"{entry}.yaml"
        if p.is_file():
            return p
    group, name = entry.split("/", 1)
    have = sorted({q.stem for d in search for q in (d / group).glob("*.yaml")})
    hint = nearest(name, have)
    raise ConfigError(
        f"config group '{entry}' not found in {[str(d) for d in search]}"
        + (f"; did you mean '{group}/{hint}'?" if hint else "")
        + (f" (available in {group}/: {', '.join(have)})" if have else "")
    )


def compose(recipe: str | Path | None, overrides: Sequence[str] = (), sections: Collection[str] = ()) -> dict:
    """Merge config groups, the recipe and dotted overrides into one raw dict (not validated).

    A group named in ``sections`` (the schema's top-level sections) is merged under its own key;
    any other group (e.g. a group of recipes) at the top level.

    A recipe may start from another one: ``extends: quickstart.yaml`` (a path relative to the recipe).
    Its ``defaults`` entries replace the parent's entry of the same group (``algorithm/tempo`` replaces
    ``algorithm/grpo``) or are appended; then the groups, the parent's body and this body are merged.
    """
    raw: dict = {}
    if recipe is not None:
        rp = Path(recipe)
        if not rp.is_file():
            raise ConfigError(f"recipe not found: {rp}")
        defaults, bodies = _recipe_chain(rp, ())
        search = [rp.resolve().parent.parent / "configs", default_configs_dir()]
        for entry, _ in defaults:
            group = entry.split("/", 1)[0]
            part = _read_yaml(_resolve_group(entry, search))
            raw = merge_layer(raw, {group: part} if group in sections else part)
        for body in bodies:
            raw = merge_layer(raw, body)
    layer: dict = {}
    for ov in overrides:  # one layer: the order of the dotted overrides does not matter
        layer = deep_merge(layer, parse_override(ov))
    return merge_layer(raw, layer)


def _recipe_chain(rp: Path, chain: tuple[Path, ...]) -> tuple[list[tuple[str, str]], list[dict]]:
    """(defaults as (entry, group), bodies parent-first) of ``rp`` and the recipes it extends."""
    body = _read_yaml(rp)
    parent = body.pop("extends", None)
    own = body.pop("defaults", []) or []
    defaults: list[tuple[str, str]] = []
    bodies: list[dict] = []
    if parent is not None:
        pp = (rp.parent / str(parent)).resolve()
        if not pp.is_file():
            raise ConfigError(f"{rp}: extends: recipe not found: {pp}")
        if pp in chain or pp == rp.resolve():
            raise ConfigError(f"{rp}: extends: cycle through {pp}")
        defaults, bodies = _recipe_chain(pp, (*chain, rp.resolve()))
    for entry in own:
        group = str(entry).split("/", 1)[0]
        at = [i for i, (_, g) in enumerate(defaults) if g == group]
        if at:
            defaults[at[0]] = (str(entry), group)
        else:
            defaults.append((str(entry), group))
    return defaults, [*bodies, body]


def parse_override(ov: str) -> dict:
    """``a.b.c=value`` -> nested dict; the value is parsed as YAML (numbers, lists, null...)."""
    if "=" not in ov:
        raise ConfigError(f"override '{ov}' must look like key.sub=value")
    key, val = ov.split("=", 1)
    try:
        value = yaml.safe_load(val) if val != "" else ""
    except yaml.YAMLError:
        value = val
    out: Any = value
    for part in reversed(key.strip().split(".")):
        out = {part: out}
    return out


def load_plugins(raw: Any) -> Any:
    """Import the top-level ``plugins`` (file paths made absolute, so every worker finds them), so
    that the names they register resolve; an import error is a :class:`ConfigError` naming the
    plugin and the failing line. Returns ``raw`` with the absolute paths."""
    import traceback

    from rewards.registry import load_plugins as import_plugins

    given = (raw.get("plugins") or []) if isinstance(raw, dict) else raw.plugins
    if not isinstance(given, list):
        raise ConfigError(f"plugins must be a list of module names or .py paths, got {given!r}")
    plugins = [os.path.abspath(p) if isinstance(p, str) and p.endswith(".py") else p for p in given]
    for p in plugins:
        try:
            import_plugins([p])
        except Exception as e:  # noqa: BLE001  (any error in a user's module)
            if isinstance(e, SyntaxError):
                where = f"{e.filename}:{e.lineno}"
            else:
                frame = traceback.extract_tb(e.__traceback__)[-1]
                where = f"{frame.filename}:{frame.lineno}"
            raise ConfigError(f"plugins: cannot import {p!r}: {type(e).__name__}: {e} ({where})") from None
    if not isinstance(raw, dict) or not given:
        return raw
    return {**raw, "plugins": plugins}
