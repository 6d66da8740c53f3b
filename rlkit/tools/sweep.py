"""``rlkit sweep RECIPE --seeds 0,1,2``: one run per seed, one after another, then the seed statistics.

Seed ``s`` of a recipe whose ``name`` is ``base`` trains as ``name=base_s{s}`` (run dir
``output_dir/base_s{s}``). Rerunning the same command resumes the sweep (:func:`plan_sweep`): a seed
whose run dir has ``summary.json`` is done and skipped, one with a checkpoint but no summary resumes
from it (the trainer's default), the others start. A done or resumable run dir that was trained with
another config (other than seed / name / output_dir) stops the sweep before any training
(:func:`config_conflicts`), so the statistics never mix configs. At the end the runs are grouped as in
``rlkit compare`` (mean ± 95% CI half-width over the seeds) and written to
``output_dir/base_sweep.md`` and ``.json``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from rlkit.tools.compare import SEED_KEYS, read_config, with_defaults

__all__ = ["parse_seeds", "seed_overrides", "plan_sweep", "config_conflicts", "write_report"]

DONE, RESUME, START = "done", "resume", "start"
_SEED_RE = re.compile(r"\d+")


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``: comma-separated non-negative integers, no duplicates.

    >>> parse_seeds("3, 1,2")
    [3, 1, 2]
    """
    items = [t.strip() for t in text.split(",")]
    seeds: list[int] = []
    for t in items:
        if not _SEED_RE.fullmatch(t):
            what = "an empty item" if not t else f"{t!r} is not a non-negative integer"
            raise ValueError(f"--seeds {text!r}: {what} (expected comma-separated seeds, e.g. --seeds 0,1,2)")
        if int(t) in seeds:
            raise ValueError(f"--seeds {text!r}: seed {int(t)} is listed twice")
        seeds.append(int(t))
    return seeds


def seed_overrides(overrides: list[str], seed: int, base_name: str) -> list[str]:
    """The overrides of seed ``seed``'s run: the sweep's, then ``seed=`` and ``name=base_s{seed}``."""
    for o in overrides:
        if o.split("=", 1)[0].strip() == "seed":
            raise ValueError(f"override {o!r}: the sweep sets seed itself, from --seeds")
    return [*overrides, f"seed={seed}", f"name={base_name}_s{seed}"]


def plan_sweep(seeds: list[int], run_dirs: list[str | Path]) -> list[tuple[int, str]]:
    """``(seed, "done" | "resume" | "start")`` per seed: ``done`` when its run dir has ``summary.json``,
    ``resume`` when it has a complete checkpoint (and no summary), else ``start``."""
    from rlkit.infra.checkpoint import latest_checkpoint

    if len(seeds) != len(run_dirs):
        raise ValueError(f"{len(seeds)} seeds but {len(run_dirs)} run dirs")
    plan = []
    for seed, d in zip(seeds, map(Path, run_dirs)):
        if (d / "summary.json").is_file():
            plan.append((seed, DONE))
        elif latest_checkpoint(d) is not None:
            plan.append((seed, RESUME))
        else:
            plan.append((seed, START))
    return plan


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """The dotted key where two config dicts first differ (``None`` when equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if prefix == "" and k in SEED_KEYS:
                continue
            d = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d is not None:
                return d
        return None
    return None if a == b else prefix.rstrip(".")


def config_conflicts(plan: list[tuple[int, str]], run_dirs: list[str | Path],
                     configs: list[dict[str, Any]]) -> list[str]:
    """One message per done / resumable run dir whose saved ``config.yaml`` differs from the config this
    sweep would train it with (``configs``: resolved configs as ``rlkit.config.config_dict``)."""
    out = []
    for (seed, state), d, cfg in zip(plan, map(Path, run_dirs), configs):
        if state == START:
            continue
        saved = read_config(d / "config.yaml", fill_defaults=True)
        key = _first_difference(saved, with_defaults(cfg)) if saved is not None else None
        if key is not None:
            out.append(f"{d} (seed {seed}, {state}) was trained with another config: {key} differs; "
                       "rerun with the recipe and overrides it was started with, or pick another name= / --out")
    return out


def write_report(output_dir: str | Path, base_name: str, markdown: str, meta: dict[str, Any],
                 rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """Write ``output_dir/base_sweep.md`` (the table) and ``.json`` (``meta`` + the rows)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / f"{base_name}_sweep.md", out / f"{base_name}_sweep.json"
    md.write_text(markdown + "\n")
    js.write_text(json.dumps({**meta, "rows": rows}, indent=2, default=str))
    return md, js
