"""Per-step dumps of sampled responses and their per-token maps, for ``rlkit inspect``.

Format and page: see :mod:`rlkit.tools.inspector`. The trainer writes a dump with
:func:`write_step_dump`; the renderer reads it with :func:`load_step_dump`.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

DUMP_DIR = "inspect"
FORMAT = "rlkit-inspect/1"
H_HAT_PIVOT = 0.8
_STEP_RE = re.compile(r"^step_(\d+)\.json$")


def _r5(x: Any) -> float | int | None:
    """Round to 5 significant digits (shortest repr); non-finite -> None; integral -> int."""
    x = float(x)
    if not math.isfinite(x):
        return None
    v = float(f"{x:.5g}")
    return int(v) if v.is_integer() and abs(v) < 2**53 else v


def _jsonable(obj: Any) -> Any:
    """Meta / answers -> JSON values: floats rounded, tensors and arrays to lists, others to str."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return _r5(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):
        return _jsonable(obj.tolist())
    return str(obj)


def _round5(x: Any) -> Any:
    """Tensor rounded to 5 significant digits (float64; x·10^k rounded, k = 4 - floor(log10|x|)).

    Dividing / multiplying by an exact power of ten gives the double nearest to the 5-digit
    decimal, so ``repr`` (hence the JSON) prints at most 5 digits. ~50x faster than formatting.
    """
    import torch

    x = x.double()
    k = 4 - torch.floor(torch.log10(x.abs().clamp_min(1e-300)))
    up = torch.pow(10.0, k.clamp(min=0)), torch.pow(10.0, (-k).clamp(min=0))
    return torch.where(k >= 0, torch.round(x * up[0]) / up[0], torch.round(x / up[1]) * up[1])


def _clean(row: list[float]) -> list[float | int | None]:
    """Non-finite -> None, integral -> int (compact JSON)."""
    return [None if not math.isfinite(v) else int(v) if v.is_integer() and abs(v) < 1e15 else v for v in row]


def _map_rows(name: str, value: Any, lengths: list[int]) -> list[list[float | int | None]]:
    """A [B, T] tensor or list of lists -> per-response rounded values, cut to each row's length."""
    import torch

    B = len(lengths)
    if hasattr(value, "detach"):
        if value.dim() != 2:
            raise ValueError(f"map {name!r} must be 2-D [B, T], got shape {tuple(value.shape)}")
        rows = list(value.detach().cpu().double())
    else:
        rows = [torch.tensor([math.nan if v is None else float(v) for v in row], dtype=torch.float64)
                for row in value]
    if len(rows) != B:
        raise ValueError(f"map {name!r} has {len(rows)} rows, expected B={B} (one per response)")
    out = []
    for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        if len(row) < n:
            raise ValueError(f"map {name!r} row {i} has {len(row)} values but the response has {n} tokens")
        out.append(row[:n])
    flat = _round5(torch.cat(out)).tolist() if out else []
    ends = [0, *itertools.accumulate(lengths)]
    return [_clean(flat[a:b]) for a, b in zip(ends[:-1], ends[1:], strict=True)]


def write_step_dump(
    run_dir: str | Path,
    step: int,
    *,
    prompts: list[str],
    answers: list,
    rewards: list[float],
    finish_reasons: list[str],
    group_ids: list[int],
    token_ids: list[list[int]],
    token_texts: list[list[str]],
    maps: dict[str, Any],
    meta: dict,
) -> Path:
    """Write ``RUN_DIR/inspect/step_{step:06d}.json`` for ``B`` sampled responses; returns its path.

    Args:
        run_dir: the run directory.
        step: training step (>= 0).
        prompts, answers, rewards, finish_reasons, group_ids: one entry per response (length B);
            responses of one group must share prompt and answer.
        token_ids, token_texts: per response, its valid tokens (ids and decoded text), same lengths.
        maps: name -> [B, T] tensor or list of lists (T >= each row's length; values beyond the
            row's length are ignored). Must contain ``"advantage"``.
        meta: at least ``{"advantage": name, "policy_loss": name}``, plus optional scalar metrics.
    """
    B = len(token_ids)
    cols = {"prompts": prompts, "answers": answers, "rewards": rewards, "finish_reasons": finish_reasons,
            "group_ids": group_ids, "token_texts": token_texts}
    for name, col in cols.items():
        if len(col) != B:
            raise ValueError(f"{name} has {len(col)} entries, expected B={B} (len(token_ids))")
    if "advantage" not in maps:
        raise ValueError(f"maps must include 'advantage'; got {sorted(maps)}")
    for key in ("advantage", "policy_loss"):
        if key not in meta:
            raise ValueError(f"meta must include {key!r} (the method name); got keys {sorted(meta)}")
    lengths = [len(ids) for ids in token_ids]
    for i, (ids, texts) in enumerate(zip(token_ids, token_texts, strict=True)):
        if len(texts) != len(ids):
            raise ValueError(f"response {i}: {len(texts)} token_texts for {len(ids)} token_ids")
    rows = {name: _map_rows(name, value, lengths) for name, value in maps.items()}

    groups: dict[int, dict] = {}
    for i in range(B):
        g = int(group_ids[i])
        info = {"id": g, "prompt": str(prompts[i]), "answer": _jsonable(answers[i])}
        if groups.setdefault(g, info) != info:
            raise ValueError(f"responses of group {g} disagree on prompt/answer (response {i})")
    responses = [
        {"group": int(group_ids[i]), "reward": _r5(rewards[i]), "finish_reason": str(finish_reasons[i]),
         "token_ids": [int(t) for t in token_ids[i]], "tokens": [str(t) for t in token_texts[i]],
         "maps": {name: rows[name][i] for name in rows}}
        for i in range(B)
    ]
    dump = {"format": FORMAT, "step": int(step), "meta": _jsonable(dict(meta)),
            "groups": list(groups.values()), "responses": responses}
    out_dir = Path(run_dir) / DUMP_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"step_{int(step):06d}.json"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".step_", suffix=".tmp")
    try:  # atomic: a reader (``rlkit inspect`` during training) never sees half a file
        with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as f:
            f.write(json.dumps(dump, separators=(",", ":"), ensure_ascii=False, allow_nan=False))  # C encoder
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------------------- loading


def _dump_dir(run_dir: str | Path) -> Path:
    p = Path(run_dir)
    if not p.is_dir():
        raise FileNotFoundError(f"run dir {p} does not exist")
    return p / DUMP_DIR if (p / DUMP_DIR).is_dir() or not any(p.glob("step_*.json")) else p


def available_steps(run_dir: str | Path) -> list[int]:
    """Sorted steps with a dump in ``RUN_DIR/inspect`` (or in ``run_dir`` itself if it holds dumps)."""
    d = _dump_dir(run_dir)
    found = (_STEP_RE.match(f.name) for f in d.glob("step_*.json")) if d.is_dir() else ()
    return sorted(int(m.group(1)) for m in found if m)


def _resolve_step(run_dir: str | Path, step: int | None) -> tuple[int, list[int]]:
    steps = available_steps(run_dir)
    if not steps:
        raise FileNotFoundError(
            f"no inspect dumps in {_dump_dir(run_dir)} (no step_*.json). The trainer writes them only "
            "when tracking.inspect_groups > 0; rerun with e.g. tracking.inspect_groups=2")
    if step is None:
        return steps[-1], steps
    if step not in steps:
        raise FileNotFoundError(f"no inspect dump for step {step} in {_dump_dir(run_dir)}; "
                                f"available steps: {', '.join(map(str, steps))}")
    return step, steps


def _derive_h_hat(dump: dict) -> None:
    """Add ``hapo/h_hat`` from ``entropy`` (pivot 0.8, over the dump's valid tokens) if missing."""
    resps = dump["responses"]
    if not resps or "entropy" not in resps[0]["maps"] or "hapo/h_hat" in resps[0]["maps"]:
        return
    import torch

    from rlkit.algorithms.hapo import compute_entropy_h

    T = max(1, max(len(r["token_ids"]) for r in resps))
    nan = float("nan")
    rows = [[nan if v is None else v for v in r["maps"]["entropy"]] for r in resps]
    ent_BT = torch.tensor([row + [nan] * (T - len(row)) for row in rows], dtype=torch.float64)
    mask_BT = torch.isfinite(ent_BT)
    h_BT, _ = compute_entropy_h(ent_BT.nan_to_num(0.0), mask_BT.double(), pivot=H_HAT_PIVOT)
    for r, h, m in zip(resps, h_BT.tolist(), mask_BT.tolist(), strict=True):
        r["maps"]["hapo/h_hat"] = [_r5(x) if ok else None for x, ok in zip(h[: len(r["token_ids"])], m)]
    dump.setdefault("derived", []).append("hapo/h_hat")


def load_step_dump(run_dir: str | Path, step: int | None = None) -> dict:
    """The dump of ``step`` (None = latest), with derived maps (ĥ from entropy) added."""
    step, _ = _resolve_step(run_dir, step)
    path = _dump_dir(run_dir) / f"step_{step:06d}.json"
    dump = json.loads(path.read_text(encoding="utf-8"))
    if dump.get("format") != FORMAT:
        raise ValueError(f"{path} is not an rlkit inspect dump (format {dump.get('format')!r}, "
                         f"expected {FORMAT!r})")
    _derive_h_hat(dump)
    return dump


# --------------------------------------------------------------------------------------- stats
