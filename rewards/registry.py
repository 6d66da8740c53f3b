"""Verifier registry: ``@reward("name")`` and spec strings that resolve to reward callables.

A verifier follows TRL's reward-function signature::

    fn(completions: list[str], **columns) -> list[float | None]

where every dataset column arrives as a list aligned with ``completions`` (``answer=[...]``) and
``None`` means "this verifier does not apply to that sample". A verifier may be a function, an
``async def`` function, or a class whose instances are callable; classes are instantiated once per
``resolve`` and their optional ``setup()`` runs first (load a model, compile regexes, warm caches).

Spec strings, as they appear in YAML configs:

- ``"math"``: a name registered with ``@reward``;
- ``"pkg.module:function"``: an importable attribute;
- ``"path/to/file.py:function"``: a file loaded by path (relative paths resolve against the cwd);
- a name exported through the ``rlkit.rewards`` entry-point group of an installed distribution.

Departure from TRL: the callable returned by :func:`resolve` normalises TRL's conversational
completions (lists of ``{"role", "content"}`` messages) to the text of the last message, drops
columns the verifier's signature cannot accept, and runs coroutines to completion.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any, TypeVar

RewardFn = Callable[..., Any]
"""``(completions: list[str], **columns) -> list[float | None]``."""

ENTRY_POINT_GROUP = "rlkit.rewards"

_T = TypeVar("_T")
_REGISTRY: dict[str, Any] = {}
_FILE_MODULES: dict[str, ModuleType] = {}
_LOCK = threading.RLock()


class UnknownRewardError(KeyError):
    """Raised by :func:`resolve` for a name that is neither registered nor a valid spec."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable.
        return str(self.args[0]) if self.args else ""


def reward(name: str) -> Callable[[_T], _T]:
    """Register a verifier (function or class) under ``name``.

    Registering a *different* object under a taken name raises ``ValueError``; re-registering the
    same definition (same module and qualified name, e.g. after ``importlib.reload``) replaces it.

    >>> @reward("doc_always_one")
    ... def always_one(completions, **columns):
    ...     return [1.0] * len(completions)
    >>> resolve("doc_always_one")(["a", "b"])
    [1.0, 1.0]
    """
    if not isinstance(name, str) or not name.strip() or ":" in name:
        raise ValueError(f"reward name must be a non-empty string without ':', got {name!r}")

    def decorator(obj: _T) -> _T:
        if not callable(obj):
            raise TypeError(f"@reward({name!r}) needs a function or a class, got {type(obj).__name__}")
        with _LOCK:
            prev = _REGISTRY.get(name)
            if prev is not None and prev is not obj and _describe(prev) != _describe(obj):
                raise ValueError(
                    f"reward {name!r} is already registered by {_describe(prev)}; "
                    f"cannot register {_describe(obj)} under the same name"
                )
            _REGISTRY[name] = obj
        return obj

    return decorator


def list_rewards() -> list[str]:
    """Sorted names registered with :func:`reward` (entry points are loaded lazily, not listed)."""
    with _LOCK:
        return sorted(_REGISTRY)


def load_plugins(modules: Iterable[str]) -> list[ModuleType]:
    """Import plugin modules (dotted names or ``.py`` paths) so their ``@reward`` decorators run."""
    loaded = []
    for mod in modules:
        loaded.append(_load_file(mod) if _looks_like_path(mod) else importlib.import_module(mod))
    return loaded


def _nearest(word: str, candidates: list[str]) -> str | None:
    """The did-you-mean hint (:func:`rlkit.common.nearest`). Imported here, not at the top: importing
    ``rewards`` stays free of ``rlkit``, and a sandboxed run, which sees only the ``rewards``
    package, gets the error without a hint instead of an import error."""
    try:
        from rlkit.common import nearest
    except ImportError:
        return None
    return nearest(word, candidates, cutoff=0.6)


def lookup(spec: str) -> Any:
    """Return the raw object ``spec`` names (function, class or instance) without instantiating it."""
    if not isinstance(spec, str) or not spec.strip():
        raise TypeError(f"reward spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    with _LOCK:
        if spec in _REGISTRY:
            return _REGISTRY[spec]
    if ":" in spec:
        target, _, attr = spec.rpartition(":")
        if not target or not attr:
            raise UnknownRewardError(f"malformed reward spec {spec!r}: expected 'module:function'")
        module = _load_file(target) if _looks_like_path(target) else importlib.import_module(target)
        obj: Any = module
        for part in attr.split("."):
            if not hasattr(obj, part):
                public = [n for n in dir(module) if not n.startswith("_")]
                near = _nearest(attr, public)
                hint = f"; did you mean {near!r}?" if near else ""
                raise UnknownRewardError(f"{target!r} has no attribute {attr!r}{hint}")
            obj = getattr(obj, part)
        return obj
    ep = _entry_point(spec)
    if ep is not None:
        return ep
    names = list_rewards()
    near = _nearest(spec, names)
    hint = f" Did you mean {near!r}?" if near else ""
    raise UnknownRewardError(
        f"unknown reward {spec!r}.{hint} Registered: {', '.join(names) or '(none)'}. "
        "Use 'pkg.module:function' or 'path/to/file.py:function' for your own verifiers."
    )


def check_exists(spec: str) -> None:
    """Raise like :func:`lookup` if ``spec`` names nothing, without running the verifier's module
    (for sandboxed verifiers: a file must exist, a module must be findable)."""
    with _LOCK:
        if spec in _REGISTRY:
            return
    if spec in entry_point_names():
        return
    if ":" not in spec:
        lookup(spec)  # raises the usual "unknown reward ... did you mean" error
        return
    target = spec.rpartition(":")[0]
    if _looks_like_path(target):
        if not os.path.isfile(target):
            raise FileNotFoundError(f"verifier file {target!r} not found (relative to {os.getcwd()})")
    elif importlib.util.find_spec(target) is None:
        raise ModuleNotFoundError(f"verifier module {target!r} not found")


def resolve(spec: str, params: Mapping[str, Any] | None = None) -> RewardFn:
    """Turn a spec string into a ready-to-call verifier.

    Classes are instantiated with ``params`` as keyword arguments and ``setup()`` is called if
    present; for functions, ``params`` are passed as extra keyword arguments on every call (after
    the dataset columns, so a param wins over a column of the same name). Coroutine results are
    awaited with ``asyncio.run`` (in a helper thread when the caller already runs an event loop).

    >>> fn = resolve("format")
    >>> fn(["so \\\\boxed{4}", [{"role": "assistant", "content": "no box"}]])
    [1.0, 0.0]
    """
    params = dict(params or {})
    obj = lookup(spec)
    if inspect.isclass(obj):
        try:
            instance = obj(**params)
        except TypeError as exc:
            raise TypeError(f"reward {spec!r}: cannot build {obj.__name__}(**{params!r}): {exc}") from None
        setup = getattr(instance, "setup", None)
        if callable(setup):
            result = setup()
            if inspect.isawaitable(result):
                _run_awaitable(result)
        if not callable(instance):
            raise TypeError(f"reward {spec!r}: class {obj.__name__} must define __call__")
        return _wrap(instance, spec, {})
    if not callable(obj):
        raise TypeError(f"reward {spec!r} resolved to a non-callable {type(obj).__name__}")
    unknown = unknown_params(obj, params)
    if unknown:
        raise TypeError(f"reward {spec!r} does not accept params {unknown} (its keyword arguments: "
                        f"{sorted(_accepted_columns(obj) or ())}; add them, or **kwargs)")  # fmt: skip
    return _wrap(obj, spec, params)


def absolute_spec(spec: str) -> str:
    """Make a ``file.py:function`` spec's path absolute (so other processes/cwds resolve it)."""
    if spec in _REGISTRY or ":" not in spec:
        return spec
    target, _, attr = spec.rpartition(":")
    if _looks_like_path(target):
        return f"{os.path.abspath(target)}:{attr}"
    return spec


def completion_text(completion: Any) -> str:
    """Text of one completion: a string, or TRL's conversational form (last message's content).

    >>> completion_text([{"role": "assistant", "content": "hi"}])
    'hi'
    >>> completion_text(None)
    ''
    """
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        return completion_text(completion[-1]) if completion else ""
    return str(completion)


def _content_text(content: Any) -> str:
    # Content may also be a list of parts ({"type": "text", "text": ...}) in multimodal chats.
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") if isinstance(p, dict) else str(p) for p in content]
        return "".join(p for p in parts if isinstance(p, str))
    return str(content)


def _wrap(fn: Callable[..., Any], spec: str, params: dict[str, Any]) -> RewardFn:
    by_keyword, accepted = _signature_info(fn)

    def verifier(completions: list[Any], **columns: Any) -> Any:
        texts = [completion_text(c) for c in completions]
        if accepted is not None:
            columns = {k: v for k, v in columns.items() if k in accepted}
        kwargs = {**columns, **params}
        # TRL calls reward functions by keyword (prompts=..., completions=...), so a parameter
        # named `completions` may sit anywhere; otherwise the first positional one gets them.
        out = fn(completions=texts, **kwargs) if by_keyword else fn(texts, **kwargs)
        return _run_awaitable(out) if inspect.isawaitable(out) else out

    verifier.__name__ = getattr(fn, "__name__", type(fn).__name__)
    verifier.__qualname__ = verifier.__name__
    verifier.__doc__ = getattr(fn, "__doc__", None)
    verifier.__wrapped__ = fn  # type: ignore[attr-defined]
    verifier.spec = spec  # type: ignore[attr-defined]
    return verifier


def unknown_params(fn: Callable[..., Any], params: Mapping[str, Any] | None) -> list[str]:
    """The ``params`` a verifier *function* cannot take as keyword arguments (sorted; none when it
    takes ``**kwargs``, which also receives the dataset columns)."""
    if not params:
        return []
    accepted = _accepted_columns(fn)
    return sorted(set(params) - accepted) if accepted is not None else []


def _accepted_columns(fn: Callable[..., Any]) -> set[str] | None:
    """Keyword names ``fn`` accepts, or None when it takes ``**kwargs`` (or is unintrospectable)."""
    return _signature_info(fn)[1]


def _signature_info(fn: Callable[..., Any]) -> tuple[bool, set[str] | None]:
    """(completions passed by keyword?, column names accepted or None for ``**kwargs``)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False, None
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    by_keyword = any(p.name == "completions" for p in named)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return by_keyword, None
    receiver = "completions" if by_keyword else (params[0].name if params else None)
    return by_keyword, {p.name for p in named if p.name != receiver}


def _run_awaitable(awaitable: Any) -> Any:
    import asyncio  # lazily: ~50 ms, and every sandboxed verifier call imports this module

    async def _await() -> Any:
        return await awaitable

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_await())
    # A loop already runs in this thread (e.g. an async caller): finish ours on a helper thread.
    box: dict[str, Any] = {}

    def _target() -> None:
        try:
            box["value"] = asyncio.run(_await())
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=_target, name="rewards-async")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _looks_like_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _load_file(path: str) -> ModuleType:
    abspath = os.path.realpath(os.path.abspath(path))
    if not os.path.isfile(abspath):
        raise FileNotFoundError(
            f"verifier file {path!r} not found (looked at {abspath}; relative paths resolve "
            f"against the current directory {os.getcwd()})"
        )
    with _LOCK:
        if abspath in _FILE_MODULES:
            return _FILE_MODULES[abspath]
        # The same file may already be imported normally (e.g. by pytest): reuse that module so
        # its @reward decorators do not run twice.
        for module in list(sys.modules.values()):
            file = getattr(module, "__file__", None)
            if file and file.endswith(os.path.basename(abspath)) and os.path.realpath(file) == abspath:
                _FILE_MODULES[abspath] = module
                return module
        stem = os.path.splitext(os.path.basename(abspath))[0]
        name = f"_rewards_file_{stem}_{hashlib.sha1(abspath.encode()).hexdigest()[:8]}"
        spec = importlib.util.spec_from_file_location(name, abspath)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load verifier file {abspath}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # needed for pickling classes/dataclasses defined there
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        _FILE_MODULES[abspath] = module
        return module


def entry_point_names() -> list[str]:
    """Sorted names that installed distributions export in the ``rlkit.rewards`` entry-point group
    (without importing them)."""
    return sorted({ep.name for ep in _entry_points()})


def _entry_points() -> list[Any]:
    import importlib.metadata  # lazily, like asyncio above

    try:
        return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    except Exception:  # broken metadata must not hide the real "unknown reward" error
        return []


def entry_point_target(name: str) -> str | None:
    """``module:attr`` that the entry point ``name`` of the ``rlkit.rewards`` group points to,
    without importing it (a sandboxed run imports the module itself); None if there is none."""
    for ep in _entry_points():
        if ep.name == name:
            return ep.value
    return None


def _entry_point(name: str) -> Any:
    for ep in _entry_points():
        if ep.name == name:
            return ep.load()
    return None


def _describe(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
