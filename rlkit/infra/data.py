"""Prompt sources: load, validate and iterate the rows the trainer turns into rollout requests.

A row is a dict with `prompt` (a string, or a list of chat messages `{"role", "content"}`) and
`answer` (the gold answer as a string); every other column is kept and reaches verifiers as a
keyword list (TRL's convention). Sources are registered by name — `jsonl`, `parquet`, `hf`
(local `save_to_disk` directories or local data files; never the Hub), `arithmetic` and
`reasoning_gym` — and users add their own with `@register_source("name")`.

Departures from peers: bad rows fail loudly with file and row number (`on_bad_row="error"`) or
are skipped and counted, never silently dropped; numeric answers become strings. Epoch order
comes from `PromptCursor`, whose whole state is a few integers, so resuming a run replays
exactly the prompts an uninterrupted run would have seen (a torch DataLoader sampler would need
its RNG state checkpointed).
"""

from __future__ import annotations

import glob
import json
import math
import os
import random
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from rlkit.common import Registry
from rlkit.infra.generators import generate_arithmetic, generate_reasoning_gym

__all__ = [
    "DataError", "load_rows", "register_source", "split_rows", "PromptCursor", "format_prompt",
    "generate_arithmetic", "generate_reasoning_gym",
]

Row = dict[str, Any]
# A source yields (1-based row number, raw row); a raw row that is a `_BadRow` failed to parse.
SourceFn = Callable[..., Iterable[tuple[int, Any]]]


class DataError(ValueError):
    """A prompt source or one of its rows is unusable; the message names the file and row."""


@dataclass
class _BadRow:
    """A row that could not even be parsed (e.g. invalid JSON); carries the reason."""

    reason: str


_SOURCES: Registry[SourceFn] = Registry("prompt source")


def register_source(name: str) -> Callable[[SourceFn], SourceFn]:
    """Register `fn(*, path, split, seed, limit, **generator_kwargs) -> Iterable[(row_no, row)]`.

    Row numbers are 1-based and appear in error messages. A duplicate name raises."""

    def deco(fn: SourceFn) -> SourceFn:
        return _SOURCES.add(name, fn)

    return deco


def _require_path(source: str, path: str | None) -> str:
    if not path or not os.path.exists(path):
        raise DataError(f"source {source!r} needs path=<existing file>, got {path!r}")
    return path


@register_source("jsonl")
def _jsonl_rows(*, path: str | None, **_: Any) -> Iterator[tuple[int, Any]]:
    """One JSON object per line; blank lines are ignored; row numbers are line numbers."""
    path = _require_path("jsonl", path)
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                yield line_no, _BadRow(f"invalid JSON ({e.msg} at column {e.colno})")


@register_source("parquet")
def _parquet_rows(*, path: str | None, **_: Any) -> Iterator[tuple[int, Any]]:
    """A parquet file read with pyarrow; row numbers count from 1."""
    import pyarrow.parquet as pq

    path = _require_path("parquet", path)
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read parquet: {e}") from e
    yield from enumerate(table.to_pylist(), 1)


# Extension -> `datasets` packaged builder for local data files.
_HF_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv",
                ".arrow": "arrow", ".txt": "text"}


@register_source("hf")
def _hf_rows(*, path: str | None, split: str | None, **_: Any) -> Iterator[tuple[int, Any]]:
    """A local HF `datasets` directory (`save_to_disk`) or local data files (path may be a glob).

    Only local paths are accepted, so nothing is ever fetched from the Hub."""
    import datasets

    if not path:
        raise DataError("source 'hf' needs path=<save_to_disk directory or data files>")
    if os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")
    ):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            name = split or ("train" if "train" in ds else None)
            if name not in ds:
                raise DataError(f"{path}: split {split!r} not found; available: {list(ds)}")
            ds = ds[name]
    else:
        pattern = os.path.join(path, "*") if os.path.isdir(path) else path
        files = sorted(f for f in glob.glob(pattern) if os.path.splitext(f)[1] in _HF_BUILDERS)
        if not files:
            raise DataError(
                f"{path}: no local dataset directory or data files ({', '.join(_HF_BUILDERS)}); "
                "rlkit never downloads from the Hub"
            )
        builders = {_HF_BUILDERS[os.path.splitext(f)[1]] for f in files}
        if len(builders) > 1:
            raise DataError(f"{path}: mixed data file types {sorted(builders)}; use one")
        name = split or "train"
        try:
            ds = datasets.load_dataset(builders.pop(), data_files={name: files}, split=name)
        except Exception as e:  # datasets wraps parse errors in many types
            raise DataError(f"{path}: cannot load data files: {e}") from e
    yield from enumerate(ds, 1)


def _generator_size(options: dict[str, Any], limit: int | None) -> int:
    size = options.pop("size", options.pop("n", None))
    return int(size) if size is not None else (limit if limit is not None else 1000)


@register_source("arithmetic")
def _arithmetic_rows(
    *, seed: int, limit: int | None, path: str | None = None, split: str | None = None,
    **options: Any,
) -> Iterator[tuple[int, Any]]:
    """`generate_arithmetic` rows; `size` (default: limit or 1000) and its keyword options."""
    size = _generator_size(options, limit)
    try:
        rows = generate_arithmetic(size, seed=seed, **options)
    except TypeError as e:
        raise DataError(f"source 'arithmetic': bad generator_kwargs: {e}") from e
    yield from enumerate(rows, 1)


@register_source("reasoning_gym")
def _reasoning_gym_rows(
    *, seed: int, limit: int | None, path: str | None = None, split: str | None = None,
    **options: Any,
) -> Iterator[tuple[int, Any]]:
    """`reasoning_gym.create_dataset(task, size=..., seed=..., **params)` rows."""
    task = options.pop("task", None)
    if not task:
        raise DataError("source 'reasoning_gym' needs generator_kwargs={'task': <name>, ...}")
    size = _generator_size(options, limit)
    yield from enumerate(generate_reasoning_gym(task, size, seed=seed, **options), 1)


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in value)


def _answer_str(value: Any) -> str:
    """Gold answer as a string; numbers are converted (3.0 -> "3"), anything else is bad."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"answer must be a string or a number, got {type(value).__name__}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"answer is {value}")
        if value.is_integer():
            return str(int(value))
    return str(value)


def _normalize(raw: Any, prompt_key: str, answer_key: str) -> Row:
    """Validate one raw row and rename its prompt/answer columns; raises ValueError(reason)."""
    if isinstance(raw, _BadRow):
        raise ValueError(raw.reason)
    if not isinstance(raw, dict):
        raise ValueError(f"expected an object with columns, got {type(raw).__name__}")
    for key in (prompt_key, answer_key):
        if key not in raw:
            raise ValueError(f"missing key {key!r} (have: {', '.join(map(str, raw))})")
    prompt = raw[prompt_key]
    if prompt is None or prompt == [] or (isinstance(prompt, str) and not prompt.strip()):
        raise ValueError(f"empty prompt in {prompt_key!r}")
    if not isinstance(prompt, str) and not _is_messages(prompt):
        raise ValueError(
            f"{prompt_key!r} must be a string or a list of {{'role', 'content'}} messages, "
            f"got {type(prompt).__name__}"
        )
    if raw[answer_key] is None:
        raise ValueError(f"answer {answer_key!r} is null")
    row: Row = {"prompt": prompt, "answer": _answer_str(raw[answer_key])}
    row.update((k, v) for k, v in raw.items() if k not in (prompt_key, answer_key, *row))
    return row


def load_rows(
    source: str,
    *,
    path: str | None = None,
    split: str | None = None,
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    on_bad_row: str = "error",
    generator_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    limit: int | None = None,
) -> tuple[list[Row], dict[str, Any]]:
    """Load, validate and normalize prompt rows from a registered source.

    Returns `(rows, stats)`; each row has `prompt` and `answer` (renamed from `prompt_key` /
    `answer_key`) plus its other columns. `stats` holds `rows` (returned), `skipped`,
    `skipped_rows` (1-based row numbers) and `first_error` (the first skip's message or None).
    With `on_bad_row="error"` the first bad row raises `DataError("<file> row <n>: <reason>")`;
    with `"skip"` bad rows are counted and left out. `limit` keeps the first `limit` good rows.
    `seed` and `generator_kwargs` drive generator sources (`arithmetic`, `reasoning_gym`).
    """
    if source not in _SOURCES:
        raise DataError(f"unknown prompt source {source!r}; valid: {', '.join(sorted(_SOURCES))}")
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    options = dict(generator_kwargs or {})
    if reserved := sorted(set(options) & {"path", "split", "seed", "limit"}):
        raise DataError(f"generator_kwargs may not set {reserved}; pass them to load_rows")
    where = path or source
    raw_rows = _SOURCES.get(source)(path=path, split=split, seed=seed, limit=limit, **options)
    rows: list[Row] = []
    skipped: list[int] = []
    first_error: str | None = None
    for row_no, raw in raw_rows:
        if limit is not None and len(rows) >= limit:
            break
        try:
            rows.append(_normalize(raw, prompt_key, answer_key))
        except ValueError as e:
            message = f"{where} row {row_no}: {e}"
            if on_bad_row == "error":
                raise DataError(message) from None
            skipped.append(row_no)
            first_error = first_error or message
    if not rows and not skipped and limit != 0:
        warnings.warn(f"{where}: prompt source {source!r} produced no rows", stacklevel=2)
    return rows, {"rows": len(rows), "skipped": len(skipped), "skipped_rows": skipped,
                  "first_error": first_error}


def _prompt_text(prompt: str | list[dict[str, str]]) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def recipe_rows(cfg: Any) -> tuple[list[Row], list[Row]]:
    """``(train_rows, eval_rows)`` of a config's data section, split as the trainer splits them."""
    d = cfg.data
    rows, _ = load_rows(d.source, path=d.path, split=d.split, prompt_key=d.prompt_key, answer_key=d.answer_key,
                        on_bad_row=d.on_bad_row, generator_kwargs=d.generator, seed=cfg.seed, limit=d.limit)
    return split_rows(rows, d.eval_size, cfg.seed)


def split_rows(rows: list[Row], eval_size: int | float, seed: int) -> tuple[list[Row], list[Row]]:
    """Deterministically split rows into `(train, eval)`, disjoint by prompt text.

    `eval_size` is a row count (int) or a fraction in [0, 1) (float). Rows sharing a prompt go
    to the same side, so eval may exceed the requested size by the duplicates of its last prompt.
    Which prompts go to eval depends only on `seed` and the prompts; both sides keep input order.
    """
    if isinstance(eval_size, bool) or not isinstance(eval_size, int | float):
        raise TypeError(f"eval_size must be an int or float, got {type(eval_size).__name__}")
    if isinstance(eval_size, float):
        if not 0.0 <= eval_size < 1.0:
            raise ValueError(f"eval_size as a fraction must be in [0, 1), got {eval_size}")
        target = round(eval_size * len(rows))
    else:
        target = eval_size
    if target < 0 or (target and target >= len(rows)):
        raise ValueError(f"eval_size {eval_size} must leave 0 <= eval < {len(rows)} rows")
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(_prompt_text(row["prompt"]), []).append(i)
    order = list(groups)
    random.Random(seed).shuffle(order)
    eval_idx: set[int] = set()
    for text in order:
        if len(eval_idx) >= target:
            break
        eval_idx.update(groups[text])
    if target and len(eval_idx) == len(rows):
        raise ValueError(f"eval_size {eval_size} takes every distinct prompt; use a smaller one")
    train = [r for i, r in enumerate(rows) if i not in eval_idx]
    evals = [r for i, r in enumerate(rows) if i in eval_idx]
    return train, evals


class PromptCursor:
    """Deterministic, resumable walk over `n_rows` row indices in epochs.

    Epoch `e` visits a permutation seeded by `(seed, e)` (or `range(n_rows)` with
    `shuffle=False`); `next_indices(k)` crosses epoch boundaries seamlessly. The state is
    `{"epoch", "pos", "seed", "n_rows"}`: restoring it continues exactly where it left off.

    >>> c = PromptCursor(3, seed=0, shuffle=False)
    >>> c.next_indices(4), c.state_dict()["epoch"]
    ([0, 1, 2, 0], 1)
    """

    def __init__(self, n_rows: int, seed: int = 0, shuffle: bool = True) -> None:
        if n_rows < 1:
            raise ValueError(f"PromptCursor needs at least one row, got n_rows={n_rows}")
        self.n_rows, self.seed, self.shuffle, self.epoch, self.pos = n_rows, seed, shuffle, 0, 0
        self._perm_epoch: int | None = None
        self._perm: list[int] = []

    def _permutation(self) -> list[int]:
        if self._perm_epoch != self.epoch:
            perm = list(range(self.n_rows))
            if self.shuffle:
                # A str seed hashes with sha512: stable across runs and PYTHONHASHSEED.
                random.Random(f"rlkit.PromptCursor:{self.seed}:{self.epoch}").shuffle(perm)
            self._perm, self._perm_epoch = perm, self.epoch
        return self._perm

    def next_indices(self, k: int) -> list[int]:
        """The next `k` row indices, rolling into the next epoch's permutation as needed."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        out: list[int] = []
        while len(out) < k:
            perm = self._permutation()
            take = min(k - len(out), self.n_rows - self.pos)
            out.extend(perm[self.pos:self.pos + take])
            self.pos += take
            if self.pos == self.n_rows:
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        """`{"epoch", "pos", "seed", "n_rows"}`: plain ints, safe for JSON checkpoints."""
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "n_rows": self.n_rows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a `state_dict()`; warns (and restarts the epoch) if the row count changed."""
        self.epoch, self.pos, self.seed = int(state["epoch"]), int(state["pos"]), int(state["seed"])
        saved_rows = state.get("n_rows", self.n_rows)
        if saved_rows != self.n_rows:
            warnings.warn(
                f"PromptCursor state was saved for {saved_rows} rows but the data now has "
                f"{self.n_rows}; the order will differ from the original run", stacklevel=2
            )
        if self.epoch < 0 or self.pos < 0:
            raise ValueError(f"invalid PromptCursor state {dict(state)}")
        if self.pos >= self.n_rows:  # only after a row-count change: start the next epoch
            self.epoch, self.pos = self.epoch + 1, 0
        self._perm_epoch = None


def format_prompt(
    row: Row, system_prompt: str | None = None, prompt_template: str | None = None
) -> list[dict[str, str]]:
    """Chat messages for a row.

    A string prompt goes through `prompt_template.format(prompt=..., **row)` if given (columns
    are available as fields; literal braces are doubled: `"\\\\boxed{{}}"`) and becomes the user
    message. A message-list prompt is used as is (the template does not apply). `system_prompt`
    is prepended unless the messages already contain a system message.

    >>> format_prompt({"prompt": "1+1?", "answer": "2"}, "Be brief.", "{prompt} Answer:")
    [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': '1+1? Answer:'}]
    """
    prompt = row["prompt"]
    if isinstance(prompt, str):
        text = prompt
        if prompt_template is not None:
            try:
                text = prompt_template.format(**{**row, "prompt": prompt})
            except (KeyError, IndexError) as e:
                raise DataError(
                    f"prompt_template refers to {e} which is not a row column "
                    f"(have: {', '.join(row)}); write literal braces as {{{{ }}}}"
                ) from e
        messages = [{"role": "user", "content": text}]
    else:
        messages = [dict(m) for m in prompt]
    if system_prompt is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def load_run_rows(cfg: Any) -> tuple[list[Row], list[Row], Any]:
    """``(train rows, held-out rows, load stats)`` of a run's ``data`` section."""
    d = cfg.data
    rows, stats = load_rows(
        d.source, path=d.path, split=d.split, prompt_key=d.prompt_key, answer_key=d.answer_key,
        on_bad_row=d.on_bad_row, generator_kwargs=d.generator, seed=cfg.seed, limit=d.limit,
    )
    train, held_out = split_rows(rows, d.eval_size, cfg.seed)
    if not train:
        raise ValueError("no training rows left after the eval split; lower data.eval_size")
    return train, held_out, stats
