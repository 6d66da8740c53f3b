"""Accuracy vs token budget, with and without budget guidance (docs/algorithms.md §4.4).

``rlkit eval RECIPE_OR_RUN --budgets 64,128,256 [--guidance DIR]`` runs, for every budget ``b``:

* ``unguided``: the held-out problems with ``max_new_tokens = b`` (plain truncation);
* ``guided`` (when a predictor is given, or ``model.budget_guidance`` is set): the same requests
  with ``budget = b`` and :class:`rollout.budget.BudgetGuidance` in the request's processors.

When the config writes budgets into prompts (``data.budget``, L1-style training), both modes write
``b`` into the prompt too, so the run is evaluated the way it was trained. Results are one record
per (mode, budget) with the fields of :func:`rlkit.tools.evaluate.evaluate_rows`, written as JSON with an
accuracy-vs-mean-tokens PNG (:func:`rlkit.tools.plot.plot_budget_curve`).

The glue that turns a predictor into a processor on an engine is :mod:`rlkit.methods.budget_guidance`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "MODES",
    "evaluate_budgets",
    "format_budget_table",
    "output_paths",
    "parse_budgets",
    "prompt_encoder",
    "write_budget_report",
]

MODES = ("unguided", "guided")
REPORT_NAME = "eval_budgets"


# ----------------------------------------------------------------------------- evaluation


def parse_budgets(text: str) -> list[int]:
    """``"64,128,256"`` -> ``[64, 128, 256]`` (sorted, positive, distinct); ``ValueError`` otherwise.

    >>> parse_budgets("128, 64")
    [64, 128]
    """
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise ValueError("--budgets is empty; give comma-separated token counts, e.g. --budgets 64,128,256")
    out: list[int] = []
    for p in parts:
        try:
            b = int(p)
        except ValueError:
            raise ValueError(f"--budgets: {p!r} is not an integer token count (e.g. --budgets 64,128,256)") from None
        if b < 1:
            raise ValueError(f"--budgets: every budget must be >= 1 token, got {b}")
        if b in out:
            raise ValueError(f"--budgets: {b} is listed twice")
        out.append(b)
    return sorted(out)


def prompt_encoder(cfg: Any, tokenizer: Any) -> Callable[[dict, int | None], list[int]]:
    """``encode(row, budget) -> prompt ids``: the config's prompt, with ``budget`` written in by
    the ``data.budget`` template when the config has one (``max`` phrasing if ``max_prob > 0.5``)."""
    from rlkit.infra.data import format_prompt
    from rlkit.infra.models import apply_chat_template

    d = cfg.data
    bp = None
    if d.budget is not None:
        from rewards.budget_prompt import budget_params

        bp = budget_params(d.budget)

    def encode(row: dict, budget: int | None = None) -> list[int]:
        msgs = format_prompt(row, d.system_prompt, d.prompt_template)
        if budget is not None and bp is not None:
            from rewards.budget_prompt import BudgetAssignment, apply_budget

            msgs = apply_budget(msgs, BudgetAssignment(budget, "max" if bp.max_prob > 0.5 else "exact"), bp)
        return apply_chat_template(tokenizer, msgs)

    return encode


class _Progress:
    """A rich progress bar over problems x points on a terminal (stderr); a line per point always."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        from rich.console import Console

        self.console = Console(file=sys.stderr)
        self.enabled = enabled
        self.bar = None
        if enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]eval {task.description}"), BarColumn(bar_width=24),
                                MofNCompleteColumn(), TimeRemainingColumn(), console=self.console)
            self.task = self.bar.add_task("", total=total)
            self.bar.start()

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=text)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=n)

    def say(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, markup=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def evaluate_budgets(
    cfg: Any,
    rows: list[dict],
    encode: Callable[[dict, int | None], list[int]],
    generate: Callable[[list], list],
    budgets: Sequence[int],
    guidance: Any = None,
    *,
    budget_in_prompt: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One record per (mode, budget): ``{"mode", "budget", "budget_in_prompt", "guided_row_steps",
    "unreliable_row_steps", "changed_row_steps", "time_s", **evaluate_rows(...)}`` (accuracy, tokens_mean, truncated_rate, ...).

    ``guidance``: a ``BudgetGuidance`` processor, passed per request (``meta["logits_processors"]``)
    for the guided mode only; None runs the unguided mode alone. ``budget_in_prompt``: call
    ``encode(row, b)`` (budget text in the prompt) instead of ``encode(row, None)``.
    """
    from rlkit.tools.evaluate import evaluate_rows
    from rollout.budget import BudgetGuidance

    modes = list(MODES if guidance is not None else MODES[:1])
    bar = _Progress(len(rows) * len(budgets) * len(modes), enabled=progress)
    records: list[dict[str, Any]] = []
    try:
        for mode in modes:
            for b in budgets:
                guided = mode == "guided"
                bar.describe(f"{mode} b={b}")
                before = guidance.counts() if guided else {}
                t0 = time.perf_counter()
                res = evaluate_rows(
                    cfg, rows, lambda r, _b=b: encode(r, _b if budget_in_prompt else None), generate,
                    max_new_tokens=b, budget=b if guided else None,
                    request_meta={"logits_processors": [guidance]} if guided else None, on_batch=bar.advance,
                )
                after = guidance.counts() if guided else {}
                rec = {"mode": mode, "budget": b, "budget_in_prompt": budget_in_prompt,
                       **{k: after.get(k, 0) - before.get(k, 0) for k in BudgetGuidance.COUNTERS},
                       "time_s": time.perf_counter() - t0, **res}
                records.append(rec)
                extra = (f"  guided steps {rec['guided_row_steps']} (no reliable token "
                         f"{rec['unreliable_row_steps']}, argmax changed {rec['changed_row_steps']})" if guided else "")
                bar.say(f"[eval] {mode:>8} b={b:<5} accuracy {rec['accuracy'] * 100:5.1f}%  "
                        f"tokens {rec['tokens_mean']:6.1f}  truncated {rec['truncated_rate'] * 100:5.1f}%  "
                        f"({rec['time_s']:.0f} s){extra}")
    finally:
        bar.close()
    return records


def format_budget_table(records: Sequence[Mapping[str, Any]]) -> str:
    """Plain-text table: one row per budget, accuracy / mean tokens / truncation per mode."""
    modes = [m for m in MODES if any(r["mode"] == m for r in records)]
    budgets = sorted({int(r["budget"]) for r in records})
    by = {(r["mode"], int(r["budget"])): r for r in records}
    head = f"{'budget':>7}" + "".join(f" | {m + ' acc':>13} {'tokens':>7} {'trunc':>6}" for m in modes)
    lines = [head, "-" * len(head)]
    for b in budgets:
        cells = []
        for m in modes:
            r = by.get((m, b))
            cells.append(" | " + (f"{r['accuracy'] * 100:>12.1f}% {r['tokens_mean']:>7.1f} "
                                  f"{r['truncated_rate'] * 100:>5.1f}%" if r else f"{'-':>13} {'-':>7} {'-':>6}"))
        lines.append(f"{b:>7}" + "".join(cells))
    return "\n".join(lines)


def output_paths(out: str | None, default_dir: str | Path, name: str = REPORT_NAME) -> tuple[Path, Path]:
    """(json, png) paths: ``out`` ending in ``.json`` is the JSON file (PNG beside it, same stem);
    any other ``out`` is a directory; None -> ``default_dir``. Names: ``<name>.{json,png}``
    (``eval_budgets`` by default)."""
    if out is not None and out.endswith(".json"):
        j = Path(out)
        return j, j.with_suffix(".png")
    d = Path(out) if out is not None else Path(default_dir)
    return d / f"{name}.json", d / f"{name}.png"


def write_budget_report(
    records: Sequence[Mapping[str, Any]], meta: Mapping[str, Any], json_path: Path, png_path: Path,
) -> tuple[Path, Path]:
    """Write ``{**meta, "records": records}`` as JSON and the accuracy-vs-tokens PNG."""
    from rlkit.tools.plot import plot_budget_curve

    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({**meta, "records": list(records)}, indent=2))
    png_path.parent.mkdir(parents=True, exist_ok=True)
    title = f"accuracy vs tokens ({meta.get('problems', '?')} problems)"
    plot_budget_curve(records, png_path, title=title)
    return json_path, png_path
