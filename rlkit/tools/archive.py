"""``rlkit archive RUN_DIR... --to DIR``: keep a run's record without its weights.

A run dir holds two kinds of files: the record (the resolved ``config.yaml``, ``metrics.jsonl``, the
logged samples, ``summary.json``, the held-out evaluations ``eval_*.json`` and the figures) and the
heavy state (checkpoints, the final model, TensorBoard events, per-step dumps). The record is a few
hundred KB and is all that ``rlkit compare`` and ``rlkit plot`` read, so archiving it (into a results
repository, next to a paper's tables) lets anyone recompute the tables and figures later, after the
checkpoints are gone. Only the run dir's own top-level files with a record suffix are copied; folders
are not. Copying again refreshes the archive (e.g. after ``rlkit eval RUN --budgets``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["RECORD_SUFFIXES", "record_files", "archive_runs"]

RECORD_SUFFIXES = (".yaml", ".json", ".jsonl", ".md", ".png")


def record_files(run_dir: str | Path) -> list[Path]:
    """The record files of ``run_dir`` (sorted), or ``FileNotFoundError`` if it is not a run dir."""
    d = Path(run_dir)
    if not (d / "config.yaml").is_file():
        raise FileNotFoundError(f"{d} is not an rlkit run dir (no config.yaml)")
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix in RECORD_SUFFIXES)


def archive_runs(run_dirs: list[str | Path], dest: str | Path) -> list[tuple[Path, int, int]]:
    """Copy each run's record files to ``dest/<run dir name>/``; ``[(archived dir, files, bytes)]``.

    Every run dir is checked before anything is copied, and two runs with the same dir name are refused
    (one would overwrite the other)."""
    runs = [(Path(d), record_files(d)) for d in run_dirs]
    names = [d.resolve().name for d, _ in runs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ValueError(f"two run dirs are named {dup!r}; archive them to different destinations")
    out: list[tuple[Path, int, int]] = []
    for (d, files), name in zip(runs, names):
        target = Path(dest) / name
        if target.resolve() == d.resolve():
            raise ValueError(f"{d}: the destination is the run dir itself")
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, target / f.name)
        out.append((target, len(files), sum(f.stat().st_size for f in files)))
    return out
