"""Atomic, resumable checkpoints and HF/PEFT export.

Layout::

    run_dir/checkpoints/
        step_00000100/            model.safetensors (or model.pt), optimizer.pt, scheduler.pt,
                                  trainer_state.pt, meta.json, COMPLETE
        step_00000200/
        latest                    text file: "step_00000200"
        .tmp_step_300_<pid>/      a save in progress (or one that crashed)

A save writes everything into a ``.tmp_step_N_<pid>`` directory, fsyncs the files, writes the
``COMPLETE`` marker last, renames the directory to ``step_{N:08d}`` and only then moves the
``latest`` pointer (temp file + ``os.replace``). A crash at any point leaves the previous
checkpoint valid; the half-written temp directory is ignored by :func:`latest_checkpoint` and
removed by the next save/load. Like DeepSpeed's ``latest`` file, but a directory only counts once it
has the ``COMPLETE`` marker, so a stale pointer can never select a torn checkpoint.

Model weights go through ``safetensors`` when importable (no pickle, mmap-able); tensors that share
memory (tied embeddings) are stored once and re-aliased on load, since safetensors refuses shared
storage. Everything else (optimizer, scheduler, trainer state with RNG states and data cursors) is
``torch.save``d. Only rank 0 should call :func:`save_checkpoint`.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "save_checkpoint",
    "write_state_files",
    "load_checkpoint",
    "load_trainer_state",
    "latest_checkpoint",
    "list_checkpoints",
    "capture_rng_state",
    "restore_rng_state",
    "export_hf",
]

CKPT_DIR = "checkpoints"
LATEST = "latest"
COMPLETE = "COMPLETE"
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_RE = re.compile(r"^\.(?:tmp_step_\d+|trash_step_\d+|latest)_(\d+)(?:\..*)?$")
_ALIASES_KEY = "rlkit_aliases"


def _step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of *this* pid is from a crashed earlier process (pid reuse)
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _cleanup_stale(ckpt_dir: Path) -> list[Path]:
    """Remove temp/trash entries left by crashed saves (those whose writer pid is not alive)."""
    removed: list[Path] = []
    if not ckpt_dir.is_dir():
        return removed
    for entry in ckpt_dir.iterdir():
        m = _TMP_RE.match(entry.name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.parent / f".latest_{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ------------------------------------------------------------------ model weights
def _dedupe_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Make a state dict safetensors-safe without copying more than needed.

    Returns ``(tensors, aliases)``: tensors identical to an earlier one (same storage, offset,
    shape, stride, dtype: tied weights) become ``aliases[name] = first_name``; other views into an
    already-used storage are cloned; everything is detached, on CPU and contiguous.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen_views: dict[tuple[Any, ...], str] = {}
    seen_storages: set[tuple[str, int]] = set()
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"model_state[{name!r}] is {type(t).__name__}, expected a Tensor")
        t = t.detach()
        if t.numel() == 0:
            tensors[name] = t.cpu().clone()
            continue
        storage = (str(t.device), t.untyped_storage().data_ptr())
        view = (*storage, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if view in seen_views:
            aliases[name] = seen_views[view]
            continue
        seen_views[view] = name
        if storage in seen_storages:
            t = t.cpu().clone().contiguous()
        else:
            seen_storages.add(storage)
            t = t.cpu().contiguous()
        tensors[name] = t
    return tensors, aliases


def _safetensors_available() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def _save_model_state(state: dict[str, torch.Tensor], out: Path) -> str:
    tensors, aliases = _dedupe_state(state)
    if _safetensors_available():
        from safetensors.torch import save_file

        save_file(
            tensors,
            str(out / "model.safetensors"),
            metadata={"format": "pt", _ALIASES_KEY: json.dumps(aliases)},
        )
        return "model.safetensors"
    torch.save({"tensors": tensors, "aliases": aliases}, out / "model.pt")
    return "model.pt"


def _load_model_state(path: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    st = path / "model.safetensors"
    if st.exists():
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(st), framework="pt") as f:
            meta = f.metadata() or {}
        device = str(map_location) if map_location is not None else "cpu"
        tensors = load_file(str(st), device=device)
        aliases = json.loads(meta.get(_ALIASES_KEY, "{}"))
    else:
        blob = torch.load(path / "model.pt", map_location=map_location, weights_only=True)
        tensors, aliases = blob["tensors"], blob["aliases"]
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    return tensors


# ------------------------------------------------------------------ save / find / load
def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of ``run_dir`` as ``(step, path)`` sorted by step (incomplete and
    temporary directories are ignored)."""
    ckpt_dir = Path(run_dir) / CKPT_DIR
    if not ckpt_dir.is_dir():
        return []
    out = []
    for entry in ckpt_dir.iterdir():
        m = _STEP_RE.match(entry.name)
        if m and entry.is_dir() and (entry / COMPLETE).exists():
            out.append((int(m.group(1)), entry))
    return sorted(out)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Path of the newest complete checkpoint of ``run_dir``, or ``None``.

    Follows the ``latest`` pointer when it names a complete checkpoint; otherwise (pointer missing,
    stale or torn) falls back to the complete checkpoint with the highest step.
    """
    ckpt_dir = Path(run_dir) / CKPT_DIR
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        cand = ckpt_dir / name
        if _STEP_RE.match(name) and (cand / COMPLETE).exists():
            return cand
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def write_state_files(out: str | Path, model_state: dict[str, torch.Tensor],
                      optimizer_state: dict[str, Any] | None = None,
                      scheduler_state: dict[str, Any] | None = None) -> list[str]:
    """Write a learner's part of a checkpoint (weights, optimizer, scheduler) into the directory ``out``;
    returns the file names. Run by the learner itself when it shares the run dir's machine, so the
    state never travels through the driver (see :func:`save_checkpoint`'s ``write_files``)."""
    out = Path(out)
    files = [_save_model_state(model_state, out)]
    for name, obj in (("optimizer.pt", optimizer_state), ("scheduler.pt", scheduler_state)):
        if obj is not None:
            torch.save(obj, out / name)
            files.append(name)
    return files


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    scheduler_state: dict[str, Any] | None = None,
    trainer_state: dict[str, Any] | None = None,
    keep_last: int | None = 2,
    write_files: Callable[[Path], list[str]] | None = None,
) -> Path:
    """Atomically write a checkpoint for ``step`` and return its directory.

    Args:
        run_dir: run directory; checkpoints go under ``run_dir/checkpoints``.
        step: training step (the number of completed updates is the usual convention).
        model_state: parameter name -> tensor (may contain tied/shared tensors).
        optimizer_state: ``optimizer.state_dict()`` or ``None``.
        scheduler_state: ``scheduler.state_dict()`` or ``None``.
        trainer_state: anything picklable — data cursor, :func:`capture_rng_state`, pools.
        keep_last: keep this many newest checkpoints (the new one always survives); ``None`` or
            ``<= 0`` keeps all.
        write_files: instead of ``model_state`` / ``optimizer_state`` / ``scheduler_state``, a
            function that writes those files into the (temporary) checkpoint directory it is given
            and returns their names, e.g. by asking the learner to (:func:`write_state_files`).
            The checkpoint is complete, as always, only once every file is synced and marked.
    """
    if (write_files is None) == (model_state is None):
        raise ValueError("save_checkpoint needs exactly one of model_state and write_files")
    step = int(step)
    ckpt_dir = Path(run_dir) / CKPT_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    _cleanup_stale(ckpt_dir)
    tmp = ckpt_dir / f".tmp_step_{step}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        files = (list(write_files(tmp)) if write_files is not None
                 else write_state_files(tmp, model_state, optimizer_state, scheduler_state))
        torch.save(trainer_state if trainer_state is not None else {}, tmp / "trainer_state.pt")
        files.append("trainer_state.pt")
        meta = {"step": step, "time": time.time(), "files": files}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        for name in [*files, "meta.json"]:
            _fsync_file(tmp / name)
        # COMPLETE is written (and synced) last: its presence certifies every other file.
        with open(tmp / COMPLETE, "w", encoding="utf-8") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        final = ckpt_dir / _step_dir_name(step)
        if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
            trash = ckpt_dir / f".trash_step_{step}_{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_atomic_text(ckpt_dir / LATEST, final.name + "\n")
    if keep_last is not None and keep_last > 0:
        for _step, path in list_checkpoints(run_dir)[:-keep_last]:
            if path != final:
                shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | Path, *, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint directory written by :func:`save_checkpoint`.

    ``path`` may be a ``step_*`` directory, or a run directory / its ``checkpoints`` directory (then
    the latest complete checkpoint is loaded). Returns a dict with ``model_state``,
    ``optimizer_state``, ``scheduler_state``, ``trainer_state`` (``None`` where not saved) and
    ``step``. Stale temp directories of crashed saves next to it are removed.
    """
    path = Path(path)
    if not (path / COMPLETE).exists():
        run_dir = path.parent if path.name == CKPT_DIR else path
        latest = latest_checkpoint(run_dir)
        if latest is None:
            if path.is_dir() and _STEP_RE.match(path.name):
                raise ValueError(f"{path} is incomplete (no {COMPLETE} marker): a crashed save?")
            raise FileNotFoundError(f"no complete checkpoint at or under {path}")
        path = latest
    _cleanup_stale(path.parent)
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))

    def _maybe(name: str) -> Any:
        f = path / name
        return torch.load(f, map_location=map_location, weights_only=False) if f.exists() else None

    return {
        "model_state": _load_model_state(path, map_location),
        "optimizer_state": _maybe("optimizer.pt"),
        "scheduler_state": _maybe("scheduler.pt"),
        "trainer_state": _maybe("trainer_state.pt"),
        "step": int(meta["step"]),
    }


def load_trainer_state(path: str | Path) -> tuple[int, dict[str, Any]]:
    """``(step, trainer_state)`` of a checkpoint directory, without loading its weights or optimizer
    (the learner restores those itself)."""
    path = Path(path)
    if not (path / COMPLETE).exists():
        raise ValueError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    f = path / "trainer_state.pt"
    return int(meta["step"]), (torch.load(f, weights_only=False) if f.exists() else {})


# ------------------------------------------------------------------ RNG state
def capture_rng_state() -> dict[str, Any]:
    """Snapshot python ``random``, numpy (if importable), torch CPU and CUDA (if available) RNGs."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        state["numpy"] = np.random.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore RNG states captured by :func:`capture_rng_state` (missing entries are skipped; CUDA
    states are restored for as many devices as both the snapshot and this machine have)."""
    if "python" in state:
        random.setstate(state["python"])
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            pass
        else:
            np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])[: torch.cuda.device_count()]
        for i, s in enumerate(cuda_states):
            torch.cuda.set_rng_state(s.cpu(), device=i)


# ------------------------------------------------------------------ export
def export_hf(
    model: Any,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    merge: bool = False,
    inplace: bool = False,
) -> Path:
    """Export ``model`` (and ``tokenizer``, if not ``None``) with their ``save_pretrained``.

    Works with any object exposing ``save_pretrained`` (transformers models, PEFT models,
    tokenizers). A PEFT model writes its adapter directory; with ``merge=True`` its
    ``merge_and_unload()`` result (a plain model with LoRA folded in) is saved instead. Merging
    mutates the model, so unless ``inplace=True`` a deep copy is merged (costs one model of memory).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} has no save_pretrained(); cannot export to HF")
    if merge:
        if not hasattr(model, "merge_and_unload"):
            raise TypeError(
                f"merge=True needs a PEFT model with merge_and_unload(); got {type(model).__name__}"
            )
        model = (model if inplace else copy.deepcopy(model)).merge_and_unload()
    model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def fault_injection(step: int) -> None:
    """Test hook: ``RLKIT_KILL_AT_STEP=N`` SIGKILLs this process in the middle of step N (after
    its rollout, before its update), to test that a resumed run loses and repeats nothing."""
    import signal

    at = os.environ.get("RLKIT_KILL_AT_STEP")
    if at and int(at) == step:
        os.kill(os.getpid(), signal.SIGKILL)
