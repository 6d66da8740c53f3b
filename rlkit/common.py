"""Helpers shared by every package (``rlkit``, ``rollout``, ``rewards``); standard library only.

One implementation each of: the nearest valid name for a did-you-mean, building a params
dataclass from a config dict, a stable seed from a tuple of parts, and a name -> object registry.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def nearest(word: str, candidates: Sequence[str], cutoff: float = 0.5) -> str | None:
    """The candidate closest to ``word`` (a typo's likely meaning), or None."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=cutoff)
    return close[0] if close else None


def did_you_mean(word: str, candidates: Sequence[str]) -> str:
    """`` Did you mean 'x'?`` (with a leading space) or an empty string."""
    hint = nearest(word, candidates)
    return f" Did you mean {hint!r}?" if hint else ""


def build_dataclass(cls: type, kwargs: Mapping[str, Any] | None, what: str) -> Any:
    """``cls(**kwargs)`` with unknown keys reported with the nearest valid field.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class P:
    ...     alpha: float = 1.0
    >>> build_dataclass(P, {"alpah": 2.0}, "shaper 'x'")
    Traceback (most recent call last):
    ...
    ValueError: unknown parameter 'alpah' for shaper 'x'. Did you mean 'alpha'? Valid parameters: alpha
    """
    kwargs = dict(kwargs or {})
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in kwargs:
        if key not in fields:
            raise ValueError(f"unknown parameter {key!r} for {what}.{did_you_mean(key, fields)} "
                             f"Valid parameters: {', '.join(fields) or '(none)'}")
    return cls(**kwargs)


def hash_seed(*parts: Any, bits: int = 31, algo: str = "sha256") -> int:
    """A ``bits``-bit seed that depends only on ``parts`` (their ``repr``), the same in every
    process and every run: sampling seeds derived from (run seed, step, ...) make a resumed run
    sample the same tokens. ``algo``: ``sha256`` or ``blake2b`` (8-byte digest); the two give
    different, equally good streams (each caller keeps the one its recorded runs used).

    >>> hash_seed(0, 1) == hash_seed(0, 1) != hash_seed(0, 2)
    True
    """
    data = repr(parts).encode()
    digest = hashlib.blake2b(data, digest_size=8).digest() if algo == "blake2b" else hashlib.sha256(data).digest()[:8]
    return int.from_bytes(digest, "little") & ((1 << bits) - 1)


def stable_seed(*parts: Any) -> int:
    """The run-level 31-bit seed of (run seed, step, ...): :func:`hash_seed` with sha256."""
    return hash_seed(*parts)


class Registry(Generic[T]):
    """Name -> object, in registration order; a duplicate raises, an unknown name suggests the nearest.

    >>> r = Registry("stage"); r.add("segments", 1); r.get("segment")
    Traceback (most recent call last):
    ...
    KeyError: "unknown stage 'segment'. Did you mean 'segments'? Valid names: segments"
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, obj: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        if name not in self._items:
            names = list(self._items)
            raise KeyError(f"unknown {self.kind} {name!r}.{did_you_mean(name, names)} "
                           f"Valid names: {', '.join(names) or '(none)'}")
        return self._items[name]

    def names(self) -> list[str]:
        return list(self._items)

    def values(self) -> list[T]:
        return list(self._items.values())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
