"""Filesystem confinement for a sandboxed run (child side; see ``rewards/_sandbox_view.py``).

Two kernel mechanisms, tried in this order under ``confine: auto``:

- **mount namespace** (``namespace``): a fresh tmpfs becomes the root (``pivot_root``; the old
  root is detached, so no path leads back to it). The view's paths are bind-mounted into it
  read-only (``mount_setattr`` with ``AT_RECURSIVE``, so submounts too), the run's scratch
  directory read-write, a few device nodes and a small ``/dev/shm``; then the tmpfs itself is made
  read-only. Needs root, or an unprivileged user namespace (created by the caller).
- **Landlock** (``landlock``, Linux >= 5.13 with the LSM enabled): the host tree stays visible in
  names but every access outside the view is denied (read-only rights on the view, all rights on
  the scratch directory). From ABI 4 it also denies TCP bind/connect when no network namespace
  could be made, and from ABI 6 it stops signals and abstract unix sockets leaving the sandbox.

Imports only ``os`` and ``ctypes``: every sandboxed run pays for what this module imports.
"""

import ctypes
import os

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
# statvfs f_flag bits a read-only remount must keep inside a user namespace (locked flags)
_ST_KEEP = ((2, MS_NOSUID), (4, MS_NODEV), (8, MS_NOEXEC), (1024, 1024), (2048, 2048), (4096, 1 << 21))
_MNT_DETACH, _AT_FDCWD, _AT_RECURSIVE = 2, -100, 0x8000
_ATTR_RDONLY, _ATTR_NOSUID, _ATTR_NODEV = 1, 2, 4
_SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added in Linux 5.12)
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "ppc64": 203,
                   "s390x": 217, "loongarch64": 41}  # fmt: skip
_SYS_LANDLOCK = (444, 445, 446)  # create_ruleset, add_rule, restrict_self (every architecture)
_FILE_RIGHTS = 1 | 2 | 4 | (1 << 14) | (1 << 15)  # EXECUTE, WRITE_FILE, READ_FILE, TRUNCATE, IOCTL_DEV
DEVICES = ("null", "zero", "full", "random", "urandom")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class ConfineError(OSError):
    pass


def _check(ret, what):
    if ret < 0:
        err = ctypes.get_errno()
        raise ConfineError(err, f"{what}: {os.strerror(err)}")
    return ret


def _mount(src, target, fstype, flags, data=None):
    enc = [None if x is None else x.encode() for x in (src, target, fstype, data)]
    _check(_libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {src} on {target}")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]  # fmt: skip


def _restrict(target, attrs, recursive=True):
    """Add mount attributes (read-only, nosuid, nodev) to ``target`` and, recursively, its submounts."""
    attr = _MountAttr(attrs, 0, 0, 0)
    ret = _libc.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, target.encode(), _AT_RECURSIVE if recursive else 0,
                        ctypes.byref(attr), ctypes.sizeof(attr))  # fmt: skip
    if ret == 0:
        return
    if ctypes.get_errno() != 38:  # ENOSYS: kernel < 5.12, remount the top mount instead
        _check(ret, f"mount_setattr {target}")
    kept = os.statvfs(target).f_flag
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV * bool(attrs & _ATTR_NODEV)
    flags |= MS_RDONLY * bool(attrs & _ATTR_RDONLY)
    for st, ms in _ST_KEEP:
        flags |= ms if kept & st else 0
    _mount(None, target, None, flags)


def _make_target(target, is_dir):
    if is_dir:
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.lexists(target):
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))


def mount_namespace(view, work, newroot, uid, shm_mb):
    """Build the new root at ``newroot`` and switch to it. The caller has unshared the mount
    namespace (and, when not root, the user namespace). Raises ConfineError."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    _mount("rlkit-sandbox", newroot, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m,nr_inodes=4096")
    for kind, path, link in view:
        target = newroot + path
        if kind == "link":
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(link, target)
            continue
        real = os.path.realpath(path)
        _make_target(target, os.path.isdir(real))
        _mount(real, target, None, MS_BIND | MS_REC)
        _restrict(target, _ATTR_RDONLY | _ATTR_NOSUID | _ATTR_NODEV)
    _make_target(newroot + work, True)
    _mount(work, newroot + work, None, MS_BIND | MS_REC)
    _restrict(newroot + work, _ATTR_NOSUID | _ATTR_NODEV)
    for name in DEVICES:
        if os.path.exists("/dev/" + name):
            _make_target(f"{newroot}/dev/{name}", False)
            _mount("/dev/" + name, f"{newroot}/dev/{name}", None, MS_BIND)
    os.makedirs(newroot + "/dev/shm")
    _mount("rlkit-shm", newroot + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={shm_mb}m")
    os.makedirs(newroot + "/etc", exist_ok=True)
    for name, text in (("passwd", f"root:x:0:0::/:/bin/sh\nsandbox:x:{uid}:{uid}::{work}:/bin/sh\n"),
                       ("group", f"root:x:0:\nsandbox:x:{uid}:\n"),
                       ("hosts", "127.0.0.1 localhost\n::1 localhost\n")):  # fmt: skip
        if not os.path.lexists(f"{newroot}/etc/{name}"):
            with open(f"{newroot}/etc/{name}", "w") as f:
                f.write(text)
    os.chdir(newroot)
    number = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise ConfineError(38, f"pivot_root: unknown syscall number on {os.uname().machine}")
    _check(_libc.syscall(number, b".", b"."), "pivot_root")  # the old root now sits on top of "."
    _check(_libc.umount2(b".", _MNT_DETACH), "detach the old root")
    os.chdir("/")
    _restrict("/", _ATTR_RDONLY | _ATTR_NOSUID | _ATTR_NODEV, recursive=False)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi():
    """Landlock ABI version (0: unavailable)."""
    v = _libc.syscall(_SYS_LANDLOCK[0], None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    return max(int(v), 0)


def landlock(view, work, deny_tcp):
    """Deny every filesystem access outside the view (read-only) and ``work`` (read-write); returns
    what else it restricted. Call after privileges are final: it sets no_new_privs."""
    abi = landlock_abi()
    if abi < 1:
        raise ConfineError(ctypes.get_errno() or 95, "landlock unavailable")
    all_fs = (1 << 13) - 1 | (1 << 13) * (abi >= 2) | (1 << 14) * (abi >= 3) | (1 << 15) * (abi >= 5)
    read_only = 1 | 4 | 8  # EXECUTE | READ_FILE | READ_DIR
    dev = 2 | 4 | (1 << 14) * (abi >= 3)  # WRITE_FILE | READ_FILE | TRUNCATE
    attr = _RulesetAttr(all_fs, 3 if (deny_tcp and abi >= 4) else 0, 3 if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    fd = _check(_libc.syscall(_SYS_LANDLOCK[0], ctypes.byref(attr), size, 0), "landlock_create_ruleset")
    try:
        rules = [(path, read_only) for kind, path, _ in view if kind != "link"]
        rules += [(work, all_fs)] + [("/dev/" + n, dev) for n in DEVICES]
        for path, rights in rules:
            try:
                pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # not there: nothing to allow
            try:
                if not os.path.isdir(path):
                    rights &= _FILE_RIGHTS  # a rule on a file may carry only file rights
                beneath = _PathBeneath(rights, pfd)
                _check(_libc.syscall(_SYS_LANDLOCK[1], fd, 1, ctypes.byref(beneath), 0), f"landlock rule {path}")
            finally:
                os.close(pfd)
        _libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        _check(_libc.syscall(_SYS_LANDLOCK[2], fd, 0), "landlock_restrict_self")
    finally:
        os.close(fd)
    return {"landlock_abi": abi, "tcp_denied": bool(attr.net), "signals_scoped": bool(attr.scoped)}
