"""What a training step leaves behind for people: per-token credit dumps, sample tables, evals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _prompt_text(row: dict[str, Any]) -> str:
    return row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]


def dump_inspect(cfg, run_dir: Path, tokenizer, step: int, groups: list, batch, extras: dict[str, Any]) -> None:
    """Write the first ``tracking.inspect_groups`` groups' per-token credit for ``rlkit inspect``."""
    k = cfg.tracking.inspect_groups
    if not k:
        return
    from rlkit.tools.inspector import write_step_dump

    sel = [(gi, g, c, r) for gi, g in enumerate(groups[:k]) for c, r in zip(g.completions, g.rewards)]
    n = len(sel)
    maps: dict[str, Any] = {"advantage": batch.advantages_BT[:n]}
    for name, t in extras.get("token_maps", {}).items():
        maps[name] = t[:n]
    if all(c.entropies for _, _, c, _ in sel):
        maps["entropy"] = [list(c.entropies) for _, _, c, _ in sel]
    a = cfg.algorithm
    write_step_dump(
        run_dir, step, prompts=[_prompt_text(g.row) for _, g, _, _ in sel],
        answers=[g.row.get("answer") for _, g, _, _ in sel],
        rewards=[float(r) for *_, r in sel], finish_reasons=[c.finish_reason for _, _, c, _ in sel],
        group_ids=[gi for gi, *_ in sel], token_ids=[list(c.token_ids) for _, _, c, _ in sel],
        token_texts=[[tokenizer.decode([t]) for t in c.token_ids] for _, _, c, _ in sel],
        maps=maps, meta={"advantage": a.advantage, "policy_loss": a.policy_loss,
                         **{k2: float(v) for k2, v in extras.get("metrics", {}).items()}},
    )


def log_samples(cfg, step: int, groups: list, tracker) -> None:
    """The first completion of the first ``tracking.samples_per_step`` groups, as a table."""
    k = cfg.tracking.samples_per_step
    if not k:
        return
    samples = []
    for g in groups[:k]:
        c, r = g.completions[0], g.rewards[0]
        samples.append({"prompt": _prompt_text(g.row), "completion": c.text, "reward": r,
                        "answer": g.row.get("answer"), "finish_reason": c.finish_reason, "tokens": len(c.token_ids)})
    tracker.log_samples(step, samples)


def evaluate(cfg, run_dir: Path, rows: list[dict], encode, engines, tracker, tag: str) -> dict[str, float]:
    """Held-out evaluation through the engines; printed as a table and written to ``eval_<tag>.json``."""
    from rlkit.tools.evaluate import evaluate_rows, format_table

    res = evaluate_rows(cfg, rows, encode, lambda reqs: engines.generate(reqs)[0])
    tracker.print(f"eval ({tag}, {len(rows)} held-out problems):\n" + format_table({tag: res}))
    (run_dir / f"eval_{tag}.json").write_text(json.dumps(res, indent=2))
    return res
