"""Name-keyed registries for the axes researchers vary.

Each registry maps a name (e.g. ``"grpo"``) to a :class:`RegistryEntry` holding the function and
the small hyper-parameter dataclass that function reads. The trainer never branches on a method's
name: it looks the entry up, builds its params from the config block, and calls ``entry.fn``.

    entry = ADVANTAGES.get("grpo")
    params = ADVANTAGES.build_params("grpo", {"eps": 1e-6})
    advantages_BT = entry.fn(inputs, params)

A duplicate name raises ``ValueError``; an unknown name raises ``KeyError`` listing the valid names
and the nearest one; an unknown hyper-parameter raises ``ValueError`` naming the key and the
nearest valid field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from rlkit.common import build_dataclass, nearest

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class NoParams:
    """Hyper-parameters of a registered function that has none."""


@dataclass(frozen=True)
class RegistryEntry:
    """One registered function and the dataclass type of its hyper-parameters."""

    name: str
    fn: Callable[..., Any]
    params: type
    aliases: tuple[str, ...] = ()




def _attribute_docs(doc: str) -> dict[str, str]:
    """``{field: text}`` from a Google-style ``Attributes:`` section (``a, b: text`` documents both)."""
    out: dict[str, str] = {}
    lines = doc.expandtabs().splitlines()
    if not any(x.strip() == "Attributes:" for x in lines):
        return out
    body = lines[[x.strip() for x in lines].index("Attributes:") + 1:]
    indent, names = None, []
    for line in body:
        if not line.strip():
            break
        ind = len(line) - len(line.lstrip())
        indent = ind if indent is None else indent
        if ind < indent:
            break
        head, sep, text = line.strip().partition(":")
        if ind == indent and sep:
            names = [n.strip() for n in head.split(",")]
            for n in names:
                out[n] = text.strip()
        else:
            for n in names:
                out[n] += " " + line.strip()
    return out


class Registry:
    """A name -> (fn, params dataclass) map with helpful errors.

    Args:
        kind: human-readable name of what is registered, used in error messages
            (e.g. ``"advantage estimator"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, RegistryEntry] = {}
        self._aliases: dict[str, str] = {}

    def register(
        self,
        name: str,
        params: type | None = None,
        *,
        aliases: tuple[str, ...] | list[str] = (),
    ) -> Callable[[F], F]:
        """Decorator registering ``fn`` under ``name`` (and ``aliases``); returns ``fn`` unchanged.

        ``params`` must be a dataclass type (default: :class:`NoParams`).
        """
        params_cls = NoParams if params is None else params
        if not (isinstance(params_cls, type) and dataclasses.is_dataclass(params_cls)):
            raise TypeError(f"params for {self.kind} {name!r} must be a dataclass type, got {params_cls!r}")
        aliases = tuple(aliases)

        def decorator(fn: F) -> F:
            for key in (name, *aliases):
                if key in self._entries or key in self._aliases:
                    raise ValueError(f"{self.kind} {key!r} is already registered")
            self._entries[name] = RegistryEntry(name=name, fn=fn, params=params_cls, aliases=aliases)
            for alias in aliases:
                self._aliases[alias] = name
            return fn

        return decorator

    def names(self) -> list[str]:
        """Sorted canonical names (aliases excluded)."""
        return sorted(self._entries)

    def _all_keys(self) -> list[str]:
        return sorted([*self._entries, *self._aliases])

    def resolve(self, name: str) -> str:
        """Canonical name for ``name`` or an alias of it; ``KeyError`` if unknown."""
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        keys = self._all_keys()
        hint = nearest(name, keys)
        did_you_mean = f" Did you mean {hint!r}?" if hint else ""
        raise KeyError(f"unknown {self.kind} {name!r}.{did_you_mean} Valid names: {', '.join(keys)}")

    def get(self, name: str) -> RegistryEntry:
        """The entry registered under ``name`` (or one of its aliases)."""
        return self._entries[self.resolve(name)]

    def build_params(self, name: str, kwargs: Mapping[str, Any] | None = None) -> Any:
        """Instantiate the params dataclass of ``name`` from ``kwargs``.

        Unknown keys raise ``ValueError`` naming the key, the nearest valid field and all fields.
        """
        entry = self.get(name)
        return build_dataclass(entry.params, kwargs, f"{self.kind} {entry.name!r}")

    def describe_params(self) -> list[tuple[str, str, str, str]]:
        """``(name, field, default, description)`` of every registered params field, the description
        taken from the ``Attributes:`` sections of the params class docstrings (for the config reference)."""
        rows = []
        for name in self.names():
            params = self._entries[name].params
            docs: dict[str, str] = {}
            for klass in reversed(params.__mro__):
                docs.update(_attribute_docs(klass.__doc__ or ""))
            for f in dataclasses.fields(params):
                if f.init:
                    default = f.default if f.default is not dataclasses.MISSING else (
                        f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
                    rows.append((name, f.name, repr(default), docs.get(f.name, "")))
        return rows

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"


ADVANTAGES = Registry("advantage estimator")
POLICY_LOSSES = Registry("policy loss")
AGGREGATIONS = Registry("loss aggregation mode")
KL_ESTIMATORS = Registry("KL estimator")


def register_advantage(
    name: str, params: type | None = None, *, aliases: tuple[str, ...] = ()
) -> Callable[[F], F]:
    """Register ``fn(inp: AdvantageInputs, p: Params) -> advantages_BT``."""
    return ADVANTAGES.register(name, params, aliases=aliases)


def register_policy_loss(
    name: str, params: type | None = None, *, aliases: tuple[str, ...] = ()
) -> Callable[[F], F]:
    """Register ``fn(inp: PolicyLossInputs, p: Params) -> (loss_BT, metrics)``."""
    return POLICY_LOSSES.register(name, params, aliases=aliases)


def register_aggregation(name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Register ``fn(loss_BT, mask_BT, *, num_tokens, num_seqs, norm_length) -> scalar``."""
    return AGGREGATIONS.register(name, None, aliases=aliases)


def register_kl_estimator(name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Register ``fn(logprobs_BT, ref_logprobs_BT) -> kl_BT``."""
    return KL_ESTIMATORS.register(name, None, aliases=aliases)
