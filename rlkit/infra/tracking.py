"""Experiment tracking: ``metrics.jsonl``, ``samples.jsonl``, TensorBoard, optional W&B, console.

One :class:`Tracker` per run writes every metric to three sinks at once:

* ``run_dir/metrics.jsonl`` — the source of truth (one ``{"step": s, **metrics}`` line per
  :meth:`Tracker.log` call, flushed immediately, so a crash loses at most the line being written).
  Values are plain finite floats; NaN/inf become ``null`` so every line is strict JSON.
* ``run_dir/tb`` — TensorBoard scalars (``torch.utils.tensorboard``).
* Weights & Biases, only when a ``wandb`` dict is given (``wandb`` is imported lazily).

The console shows one ``rich`` progress bar over ``total_steps`` with a few headline metrics; when
stdout is not a terminal (CI, ``nohup``, Ray logs) it prints one compact line per step instead.

Resuming: with ``start_step > 0`` the JSONL files are first truncated to lines with
``step < start_step`` (atomically), so a crash after step 57 and a resume from the step-50
checkpoint leaves no duplicate steps 50..57 in the curves.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["Tracker", "read_metrics", "truncate_metrics", "to_float"]

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TB_DIR = "tb"


def to_float(value: Any) -> float | None:
    """Convert a scalar metric (python number, bool, 0-d/1-element tensor or numpy value) to a
    finite ``float``; NaN and +-inf become ``None`` (written as JSON ``null``).

    >>> to_float(3), to_float(float("nan"))
    (3.0, None)
    """
    if value is None:
        return None
    if hasattr(value, "item") and callable(value.item):  # torch.Tensor, numpy scalar/array
        numel = getattr(value, "numel", None)
        size = numel() if callable(numel) else getattr(value, "size", 1)
        if size != 1:
            raise TypeError(f"metric must be a scalar, got a tensor/array with {size} elements")
        value = value.item()
    if isinstance(value, (bool, int, float)):
        out = float(value)
        return out if math.isfinite(out) else None
    raise TypeError(f"metric must be a number, got {type(value).__name__}: {value!r}")


def _json_default(obj: Any) -> Any:
    """``json.dumps`` fallback for sample fields: tensors/arrays -> lists, paths -> str."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return repr(obj)


def _sanitize(obj: Any) -> Any:
    """Recursively replace non-finite floats by ``None`` so ``allow_nan=False`` never fails."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return _sanitize(obj.tolist())
    return obj


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(_sanitize(record), allow_nan=False, default=_json_default, ensure_ascii=False)


def _iter_records(path: Path) -> list[dict[str, Any]]:
    """Parse a JSONL file, skipping blank lines and a torn (crash-truncated) line."""
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash; everything before it is intact
            if isinstance(rec, dict):
                records.append(rec)
    return records


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Return the records of ``run_dir/metrics.jsonl`` in file order (``[]`` if absent).

    ``run_dir`` may also be the path of a ``.jsonl`` file itself.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        return []
    return _iter_records(path)


def append_record(path: str | Path, rec: dict[str, Any]) -> None:
    """Append one JSON line to ``path`` (directories made), flushed and fsynced: a step's record of
    what it consumed survives a kill -9 right after (read back with :func:`read_metrics`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_metrics(path: str | Path, from_step: int) -> int:
    """Atomically drop every line of the JSONL file ``path`` whose ``step >= from_step``.

    Unparseable lines (a torn last line) are dropped too. The file is rewritten to a temporary file
    in the same directory, fsynced, then ``os.replace``d over the original, so a crash during
    truncation leaves either the old or the new file, never a mix. Returns the number of lines
    removed (0 if the file does not exist).
    """
    path = Path(path)
    if not path.exists():
        return 0
    kept: list[str] = []
    removed = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                step = rec.get("step") if isinstance(rec, dict) else None
            except json.JSONDecodeError:
                step = None
                rec = None
            if rec is not None and (step is None or step < from_step):
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                removed += 1
    if removed == 0:
        return 0
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return removed


def _short_name(key: str) -> str:
    """``reward/mean`` -> ``reward``, ``response/len_mean`` -> ``len_mean``, ``time/step_s`` ->
    ``step_s``: the most informative path component, for the one-line progress summary."""
    parts = key.split("/")
    if len(parts) > 1 and parts[-1] == "mean":
        return parts[-2]
    return parts[-1]


def _fmt(value: float | None) -> str:
    if value is None:
        return "nan"
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.2e}"


class Tracker:
    """Log metrics and samples of one run to JSONL, TensorBoard, W&B and the console.

    Args:
        run_dir: run directory; created if needed.
        total_steps: number of training steps in the run (the progress bar's total).
        start_step: first step this process will log; ``> 0`` means resume, and JSONL lines with
            ``step >= start_step`` from the previous attempt are truncated away first.
        tensorboard: write TensorBoard scalars to ``run_dir/tb``.
        wandb: keyword arguments for ``wandb.init`` (``project``, ``name``, ``mode``, ``id``,
            ``resume``...); ``None`` disables W&B and never imports it.
        console: show the progress bar (TTY) or one line per step (non-TTY).
        progress_keys: metric keys shown next to the progress bar, when present.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = True,
        wandb: dict[str, Any] | None = None,
        console: bool = True,
        progress_keys: tuple[str, ...] = (
            "reward/mean",
            "acc/mean",
            "response/len_mean",
            "time/step_s",
        ),
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.progress_keys = tuple(progress_keys)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.samples_path = self.run_dir / SAMPLES_FILE
        if self.start_step > 0:
            truncate_metrics(self.metrics_path, self.start_step)
            truncate_metrics(self.samples_path, self.start_step)
        self._metrics_f = open(self.metrics_path, "a", encoding="utf-8")
        self._samples_f: Any = None  # opened on first log_samples
        self._closed = False
        self._tb: Any = None
        self._wandb: Any = None
        self._wandb_run: Any = None
        self._progress: Any = None
        self._task: Any = None
        self._completed = max(0, self.start_step - 1)  # steps are 1-based: start_step-1 are done
        self._last_step: int | None = None
        self._shown: dict[str, float | None] = {}  # progress-key values of the current step
        self._show = console
        try:
            if tensorboard:
                self._tb = self._make_tb_writer()
            if wandb is not None:
                self._init_wandb(dict(wandb))
            self._init_console()
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- setup
    def _make_tb_writer(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # tensorboard missing
            raise ImportError(
                "TensorBoard logging needs the `tensorboard` package: `pip install tensorboard`, "
                "or pass tensorboard=False to Tracker."
            ) from e
        return SummaryWriter(log_dir=str(self.run_dir / TB_DIR), purge_step=self.start_step or None)

    def _init_wandb(self, kwargs: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ImportError(
                "W&B logging was requested (tracking.wandb is set) but `wandb` is not installed: "
                "`pip install wandb`, or remove the wandb block from the config."
            ) from e
        kwargs.setdefault("dir", str(self.run_dir))
        self._wandb = wandb
        self._wandb_run = wandb.init(**kwargs)

    def _init_console(self) -> None:
        from rich.console import Console

        self._console = Console(file=sys.stdout)
        self._interactive = bool(self._show and self._console.is_terminal)
        if not self._interactive:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("<"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self._console,
        )
        self._progress.start()
        self._task = self._progress.add_task(
            "train", total=self.total_steps, completed=max(0, self.start_step - 1), info=""
        )

    # ---------------------------------------------------------------- logging
    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` for ``step`` in every sink and advance the progress display.

        Several calls with the same step are allowed (e.g. train and eval metrics); the progress
        bar advances once per distinct step.
        """
        self._check_open()
        clean = {str(k): to_float(v) for k, v in metrics.items()}
        self._metrics_f.write(_dumps({"step": int(step), **clean}) + "\n")
        self._metrics_f.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if v is not None:
                    self._tb.add_scalar(k, v, global_step=int(step))
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(clean, step=int(step))
        new_step = step != self._last_step
        if new_step:
            self._completed += 1
            self._last_step = step
            self._shown = {}
        self._update_console(int(step), clean, new_step)

    def _summary(self, clean: dict[str, float | None]) -> str:
        return "  ".join(
            f"{_short_name(k)} {_fmt(clean[k])}" for k in self.progress_keys if k in clean
        )

    def _update_console(self, step: int, clean: dict[str, float | None], new_step: bool) -> None:
        if not self._show:
            return
        self._shown.update({k: v for k, v in clean.items() if k in self.progress_keys})
        if self._progress is not None:
            self._progress.update(
                self._task,
                completed=min(self._completed, self.total_steps),
                info=self._summary(self._shown),
            )
            return
        summary = self._summary(clean)
        if new_step or summary:
            self._console.print(
                f"step {step}/{self.total_steps}  {summary}".rstrip(), highlight=False
            )

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        """Append ``samples`` (dicts with ``prompt``, ``completion``, ``reward``, any extras) to
        ``run_dir/samples.jsonl``, one line each, tagged with ``step``."""
        self._check_open()
        if self._samples_f is None:
            self._samples_f = open(self.samples_path, "a", encoding="utf-8")
        for s in samples:
            head = {k: s[k] for k in ("prompt", "completion", "reward") if k in s}
            rest = {k: v for k, v in s.items() if k not in head and k != "step"}
            self._samples_f.write(_dumps({"step": int(step), **head, **rest}) + "\n")
        self._samples_f.flush()

    def print(self, msg: Any) -> None:
        """Print ``msg`` above the progress bar (so the bar is not garbled)."""
        console = self._progress.console if self._progress is not None else self._console
        if isinstance(msg, str):  # plain text: brackets in error messages ("[.../pair.cc:537]") are not markup
            console.print(msg, markup=False, highlight=False, soft_wrap=True)  # a log line stays one line
        else:
            console.print(msg)

    # ---------------------------------------------------------------- lifecycle
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("Tracker is closed")

    def close(self) -> None:
        """Stop the progress bar, flush and close every sink. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        for f in (getattr(self, "_metrics_f", None), self._samples_f):
            if f is not None:
                f.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
