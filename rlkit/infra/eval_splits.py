"""Extra held-out sets (``eval.splits``): the run's data source with some keys changed.

The in-distribution held-out set is ``data.eval_size`` rows split off the training data. An extra
split, e.g. ``eval.splits.ood.generator.n_terms=4``, loads the same source with those keys merged in
(generator keys over ``data.generator``; another ``path`` or ``split`` for file and hub sources),
drops every prompt that training or the in-distribution set holds, and keeps the first ``size`` rows.
"""

from __future__ import annotations

import re
from typing import Any

from rlkit.infra.data import DataError, Row, load_rows

__all__ = ["load_eval_splits", "SPLIT_NAME"]

SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # becomes part of a file name: eval_after_<name>.json


def _text(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else repr(prompt)


def load_eval_splits(cfg: Any, train: list[Row], held_out: list[Row],
                     names: list[str] | None = None) -> dict[str, list[Row]]:
    """``{name: rows}`` for every ``eval.splits`` entry (config order), or only those in ``names``. Errors
    are one-line ``DataError``s naming the ``eval.splits.<name>`` key."""
    d = cfg.data
    seen = {_text(r["prompt"]) for r in [*train, *held_out]}
    out: dict[str, list[Row]] = {}
    for name, sp in cfg.eval.splits.items():
        if names is not None and name not in names:
            continue
        key = f"eval.splits.{name}"
        if not SPLIT_NAME.match(name):
            raise DataError(f"{key}: a split name may hold letters, digits, '_' and '-' only")
        if sp.generator and d.source not in ("arithmetic", "reasoning_gym"):
            raise DataError(f"{key}.generator: data.source={d.source} has no generator; give {key}.path instead")
        if sp.path and d.source in ("arithmetic", "reasoning_gym"):
            raise DataError(f"{key}.path: data.source={d.source} is generated; give {key}.generator keys instead")
        if not (sp.generator or sp.path or sp.split):
            raise DataError(f"{key}: give the keys that make it differ from training (generator, path or split)")
        try:
            rows, _ = load_rows(d.source, path=sp.path or d.path, split=sp.split or d.split,
                                prompt_key=d.prompt_key, answer_key=d.answer_key, on_bad_row=d.on_bad_row,
                                generator_kwargs={**d.generator, **sp.generator}, seed=cfg.seed)
        except (ValueError, TypeError, OSError, ImportError) as e:
            raise DataError(f"{key}: {e}") from e
        fresh = [r for r in rows if _text(r["prompt"]) not in seen]
        if not fresh:
            raise DataError(f"{key}: every problem it drew is also in training or the held-out set")
        out[name] = fresh[: sp.size]
    return out
