"""What a sandboxed run may see of the filesystem (parent side of :mod:`rewards.sandbox`).

The view is a short list of host paths the run gets **read-only**: the system directories the
interpreter needs (``/usr`` and the ``/bin``, ``/lib*`` links or directories), a few harmless
files of ``/etc``, the interpreter's own prefixes (a venv and its base installation), its
site-packages, and, for sandboxed verifiers, the ``rewards`` package, the verifier's own module
and the plugins. The run's scratch directory is the only writable path, and the only other
things it sees are ``/dev/{null,zero,full,random,urandom}``, a small ``/dev/shm``, and generated
``/etc/{passwd,group,hosts}``. The child enforces this view with a mount namespace (only these
paths exist) or, where it cannot create one, with Landlock (only these paths are accessible):
``rewards/_sandbox_fs.py``.

A project checkout, a home directory, run directories and checkpoints are never part of the
view unless one of them *is* one of the paths above: a venv inside the checkout is bound, the
rest of the checkout is not.
"""

from __future__ import annotations

import functools
import importlib.machinery
import os
import site
import stat
import sys
from collections.abc import Iterable, Sequence

REWARDS_DIR = os.path.dirname(os.path.abspath(__file__))
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime", "/etc/alternatives", "/etc/mime.types")


def interpreter_paths(python: str | None) -> list[str]:
    """Prefixes (and site-packages) an interpreter needs: the venv, its base, their libraries."""
    same = python is None or os.path.realpath(python) == os.path.realpath(sys.executable)
    if same:
        found = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
        found += [p for p in site.getsitepackages() if os.path.isdir(p)]
    else:  # another interpreter: its bin/.. prefix, and that of the file its link points to
        found = [os.path.dirname(os.path.dirname(os.path.abspath(python))),
                 os.path.dirname(os.path.dirname(os.path.realpath(python)))]  # fmt: skip
    return found


def module_roots(names: Iterable[str], search: Sequence[str]) -> dict[str, str]:
    """Where the modules behind ``names`` live, found on ``search`` without importing anything:
    ``{top-level module name: package directory or module file}``, and ``{path: path}`` for
    ``file.py`` paths. ``names`` are module names (``pkg.mod``), ``file.py`` paths, or
    ``target:attr`` verifier specs of either kind; unknown modules are skipped."""
    roots = {}
    for name in names:
        target = name.rpartition(":")[0] if ":" in name else name
        if target.endswith(".py") or os.sep in target:
            if os.path.exists(target):
                roots[os.path.abspath(target)] = os.path.abspath(target)
            continue
        top = target.split(".")[0]
        if not top.isidentifier() or top in sys.builtin_module_names:
            continue
        spec = importlib.machinery.PathFinder.find_spec(top, list(search))
        if spec is None:
            continue
        if spec.submodule_search_locations:
            roots[top] = list(spec.submodule_search_locations)[0]
        elif spec.origin and os.path.exists(spec.origin):
            roots[top] = spec.origin
    return roots


def registered_module_names(specs: Iterable[str]) -> list[str]:
    """Module names behind registered verifier names (``code_tests`` -> ``rewards.code``), so a
    sandboxed run can import where they are defined (e.g. a plugin package)."""
    from rewards.registry import list_rewards, lookup

    registered, found = set(list_rewards()), []
    for spec in specs:
        module = getattr(lookup(spec), "__module__", None) if spec in registered else None
        if module and module in sys.modules:
            found.append(module)
    return found


def read_only_view(python: str | None, extra: Iterable[str] = ()) -> list[str]:
    """Sorted, de-duplicated host paths a run sees read-only (system, ``/etc`` files, interpreter,
    ``extra``); a path under another one in the list is dropped."""
    return _read_only_view(python, tuple(extra))


@functools.lru_cache(maxsize=64)
def _read_only_view(python: str | None, extra: tuple[str, ...]) -> list[str]:
    wanted = [*SYSTEM_PATHS, *ETC_FILES, *interpreter_paths(python), *extra]
    paths = []
    for p in wanted:
        p = os.path.abspath(p)
        if os.path.lexists(p):
            paths.append(p)  # bound from its real path (system links like /lib -> usr/lib stay links)
            paths.append(os.path.realpath(p))  # and reachable by its real name too
    return _outermost(paths)


def _outermost(paths: Iterable[str]) -> list[str]:
    kept: list[str] = []
    for p in sorted(set(paths)):
        if not any(p == k or p.startswith(k.rstrip(os.sep) + os.sep) for k in kept):
            kept.append(p)
    return kept


def privilege_plan(python: str, needed: Sequence[str], view: Sequence[str] | None) -> str:
    """``unprivileged`` when an unprivileged uid can run ``python`` and read ``needed``, else
    ``capless-root`` (change only the real uid, which RLIMIT_NPROC counts, and drop every
    capability). With ``view`` (a mount-namespace run), directories above the view's paths are the
    sandbox's own world-traversable ones, so only the modes from each view path down count."""
    return _plan(python, tuple(needed), None if view is None else tuple(view))


@functools.lru_cache(maxsize=64)
def _plan(python: str, needed: tuple[str, ...], view: tuple[str, ...] | None) -> str:
    exe = os.path.realpath(python)
    prefix = os.path.dirname(os.path.dirname(exe))
    paths = [exe, os.path.join(prefix, "lib"), *needed]
    return "unprivileged" if all(_world_readable(p, view) for p in paths) else "capless-root"


def _world_readable(path: str, view: tuple[str, ...] | None) -> bool:
    path = os.path.realpath(path)
    if not os.path.exists(path):
        return True  # nothing there to be denied
    parts = path.split(os.sep)
    start = 2
    if view is not None:
        roots = [v for v in view if path == v or path.startswith(v.rstrip(os.sep) + os.sep)]
        start = max((len(r.rstrip(os.sep).split(os.sep)) for r in roots), default=2)
    for i in range(start, len(parts)):
        if not os.stat(os.sep.join(parts[:i]) or os.sep).st_mode & stat.S_IXOTH:
            return False
    mode = os.stat(path).st_mode
    need = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(mode) else 0)
    return mode & need == need
