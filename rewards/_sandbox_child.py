"""Child side of :mod:`rewards.sandbox`: run by path as ``python -I -B [-S] _sandbox_child.py JOB``.

It imports only cheap built-in modules (every sandboxed run pays for them), reads its job (written
by the trusted parent with ``marshal``), then: enters new user/network/PID namespaces where it
can, confines the filesystem (``_sandbox_fs``: a mount namespace, else Landlock; if neither
works and unconfined runs are not allowed, it exits without running anything), leaves uid 0 (or
drops the user namespace's capabilities), sets the rlimits, and forks twice. The first child is PID 1 of the new PID
namespace, whose exit kills everything left in it; the second runs the program, one level down
because a namespace's PID 1 ignores its own default-action signals (``SIGXCPU`` from
``RLIMIT_CPU``, a program's ``os.kill(os.getpid(), SIGTERM)``). Status goes back to the parent
as JSON lines on the inherited result fd: isolation first, the program's exit status last.
"""

import marshal
import os
import signal
import sys

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
_PR_SET_PDEATHSIG, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS, _PR_CAP_AMBIENT = 1, 24, 38, 47
_REFUSED = 112
_libc = None


def main(job_path):
    with open(job_path, "rb") as f:
        cfg = marshal.load(f)
    payload = None
    if cfg["job"]["kind"] == "verifier":
        import pickle

        with open(os.path.join(cfg["ctl"], "payload.pkl"), "rb") as f:
            payload = pickle.load(f)  # written by the trusted parent
    rfd = cfg["result_fd"]
    isolation = isolate(cfg)
    os.write(rfd, (to_json(isolation) + "\n").encode())
    if not isolation["fs"] and not cfg["limits"]["allow_unconfined"]:
        os._exit(_REFUSED)  # fail closed: the parent reports what is missing
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # armed after the uid change, which clears it
    if os.getppid() != cfg["ppid"]:
        os._exit(111)  # the parent died before PDEATHSIG was armed
    init = os.fork()
    if init == 0:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        leaf = os.fork()
        if leaf == 0:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            return run_job(cfg, payload, rfd)
        stdin_to_devnull()  # only the program keeps its stdin (a harness may hide data there)
        code = reap_until(leaf)
        os.write(rfd, (to_json({"exit": code}) + "\n").encode())
        os._exit(code & 0xFF if code >= 0 else 128 - code)
    stdin_to_devnull()
    os._exit(reap_until(init) & 0xFF)


def stdin_to_devnull():
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)


def reap_until(target):
    """Reap children (orphans re-parent to a namespace's PID 1) until ``target`` exits."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 1
        except InterruptedError:
            continue
        if pid == target:
            return os.waitstatus_to_exitcode(status)


def run_job(cfg, payload, rfd):
    job = cfg["job"]
    os.chdir(cfg["work"])
    if job["kind"] == "script":
        os.close(rfd)
        path = os.path.join(cfg["work"], job["main"])
        sys.argv = [path]
        sys.path[:0] = [cfg["work"]]
        sys.path.extend(p for p in job["site_paths"] if p not in sys.path)
        with open(path, "rb") as f:
            code = compile(f.read(), path, "exec")
        module = type(sys)("__main__")
        module.__file__ = path
        sys.modules["__main__"] = module
        exec(code, module.__dict__)
        return 0
    import json

    sys.path[:0] = [p for p in job["sys_path"] if p not in sys.path]
    sys.meta_path.insert(0, RootFinder(job["roots"]))
    from rewards.registry import load_plugins, resolve

    load_plugins(job["plugins"])
    fn = resolve(job["spec"], job["params"])
    texts, columns = payload
    out = fn(texts, **columns)
    if not isinstance(out, (list, tuple)) and hasattr(out, "tolist"):
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise TypeError(f"verifier returned {type(out).__name__}, expected a list of rewards")
    os.write(rfd, (json.dumps({"rewards": [jsonable(v) for v in out]}) + "\n").encode())
    return 0


class RootFinder:
    """Finds the run's own top-level modules (``rewards``, the verifier's, the plugins') at the
    paths the parent gave, without listing their parent directory, which the view may hide."""

    def __init__(self, roots):
        self.roots = roots

    def find_spec(self, name, path=None, target=None):
        root = self.roots.get(name)
        if root is None or "." in name:
            return None
        import importlib.util

        if os.path.isdir(root):
            init = os.path.join(root, "__init__.py")
            if not os.path.exists(init):
                return None  # a namespace package: leave it to the path finders
            return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[root])
        return importlib.util.spec_from_file_location(name, root)


def jsonable(value):
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if hasattr(value, "item"):
        try:
            return jsonable(value.item())
        except Exception:
            pass
    return f"<{type(value).__name__}>"  # the parent turns non-numbers into failures


def to_json(d):
    """Tiny JSON encoder for flat dicts of bool/int/None/str (``json`` costs ~20 ms to import)."""

    def enc(v):
        if v is None or isinstance(v, bool):
            return {None: "null", True: "true", False: "false"}[v]
        if isinstance(v, int):
            return str(v)
        s = str(v).replace("\\", "\\\\").replace('"', '\\"')
        return '"' + "".join(c if " " <= c < "\x7f" else "?" for c in s) + '"'

    return "{" + ", ".join(f"{enc(k)}: {enc(v)}" for k, v in d.items()) + "}"


def isolate(cfg):
    lim = cfg["limits"]
    iso = {"net": None, "net_error": None, "pid": None, "pid_error": None, "fs": False, "fs_error": None,
           "user": "same"}
    root = os.geteuid() == 0
    userns = False
    if not root:  # unprivileged: a user namespace grants the right to create the others
        uid, gid = os.geteuid(), os.getegid()  # before: inside, they read as the overflow id until mapped
        userns = unshare(_CLONE_NEWUSER) is None
        if userns:
            write("/proc/self/setgroups", "deny")
            write("/proc/self/uid_map", f"{uid} {uid} 1")
            write("/proc/self/gid_map", f"{gid} {gid} 1")
    if not lim["network"]:
        err = unshare(_CLONE_NEWNET)
        iso["net"], iso["net_error"] = err is None, err
        if err is None:
            loopback_up()
    err = unshare(_CLONE_NEWPID)
    iso["pid"], iso["pid_error"] = err is None, err
    # Read what needs the host's /proc before the filesystem view replaces it.
    extra_procs = 0 if root or (userns and kernel_at_least(5, 14)) else tasks_of_uid(os.getuid())
    last_cap = last_capability()
    import resource  # noqa: F401  (loaded now: the view has it too, but this is cheaper)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _sandbox_fs as fs

    del sys.path[0]  # rewards/ must never shadow the stdlib (rewards/math.py)
    errors = []
    if lim["confine"] in ("auto", "namespace"):
        err = unshare(_CLONE_NEWNS) if root or userns else "no user namespace"
        try:
            if err is not None:
                raise OSError(f"mount namespace: {err}")
            fs.mount_namespace(cfg["view"], cfg["work"], cfg["newroot"], cfg["uid"] or os.getuid(),
                               lim["shm_mb"])  # fmt: skip
            iso["fs"] = "namespace"
        except OSError as e:
            errors.append(str(e))
    if root:
        iso["user"] = drop_root(cfg, cfg["privs_ns"] if iso["fs"] else cfg["privs"], last_cap)
    elif userns:
        drop_caps(last_cap)  # the user namespace's capabilities could undo the read-only mounts
    set_rlimits(lim, extra_procs)
    if not iso["fs"] and lim["confine"] in ("auto", "landlock"):
        try:
            deny_tcp = not iso["net"] and not lim["network"]
            iso.update(fs.landlock(cfg["view"], cfg["work"], deny_tcp))
            iso["fs"] = "landlock"
        except OSError as e:
            errors.append(str(e))
    if not iso["fs"]:
        iso["fs_error"] = "; ".join(errors) or "filesystem confinement is off (confine: none)"
    return iso


def libc():
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def unshare(flag):
    if libc().unshare(flag) == 0:
        return None
    import ctypes

    return os.strerror(ctypes.get_errno())


def prctl(option, arg):
    libc().prctl(option, arg, 0, 0, 0)


def write(path, text):
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError:
        pass


def loopback_up():
    """Bring ``lo`` up in the fresh network namespace: localhost works, nothing else exists.
    Raw libc calls: importing ``socket`` (and with it ``enum``) would cost more than the rest."""
    fd = libc().socket(2, 2, 0)  # AF_INET, SOCK_DGRAM
    if fd < 0:
        return
    flags = (0x1 | 0x8 | 0x40).to_bytes(2, sys.byteorder)  # IFF_UP | IFF_LOOPBACK | IFF_RUNNING
    ifreq = b"lo".ljust(16, b"\0") + flags + bytes(22)
    libc().ioctl(fd, 0x8914, ifreq)  # SIOCSIFFLAGS
    os.close(fd)


def drop_root(cfg, privs, last_cap):
    """Leave uid 0 for the run's own uid (see rewards.sandbox); returns the mode used."""
    uid = cfg["uid"]
    os.setgroups([])
    if privs == "unprivileged":
        for dirpath, dirnames, filenames in os.walk(cfg["work"]):
            for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                os.chown(name, uid, uid)
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # clears every capability
        prctl(_PR_SET_NO_NEW_PRIVS, 1)
        return "unprivileged"
    os.setresuid(uid, 0, 0)  # RLIMIT_NPROC counts the real uid; it exempts only uid 0 and CAP_SYS_*
    drop_caps(last_cap)
    return "capless-root"


def last_capability():
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def drop_caps(last_cap):
    """Drop every capability for good: bounding set, ambient set, then the process's own sets."""
    for cap in range(last_cap + 1):
        prctl(_PR_CAPBSET_DROP, cap)  # programs it execs cannot regain them
    prctl(_PR_CAP_AMBIENT, 4)  # PR_CAP_AMBIENT_CLEAR_ALL
    prctl(_PR_SET_NO_NEW_PRIVS, 1)
    import ctypes

    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable (two words each): none
    if libc().capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset: cannot drop capabilities")


def set_rlimits(lim, extra_procs):
    import resource

    def setl(which, soft, hard=None):
        hard = soft if hard is None else hard
        cur_hard = resource.getrlimit(which)[1]
        if cur_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        resource.setrlimit(which, (soft, hard))

    cpu = lim["cpu_s"] if lim["cpu_s"] is not None else lim["wall_s"]
    cpu = int(cpu) + (cpu > int(cpu))
    setl(resource.RLIMIT_CPU, cpu, cpu + 1)
    setl(resource.RLIMIT_AS, int(lim["memory_mb"]) << 20)
    setl(resource.RLIMIT_FSIZE, int(lim["max_output_bytes"]))
    setl(resource.RLIMIT_NOFILE, int(lim["max_open_files"]))
    setl(resource.RLIMIT_CORE, 0)
    # Own uid (root) or own user namespace (Linux >= 5.14 counts per namespace): the count is the
    # run's alone. Otherwise it includes every process of this user (extra_procs).
    setl(resource.RLIMIT_NPROC, int(lim["max_procs"]) + extra_procs)


def tasks_of_uid(uid):
    total = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    total += len(os.listdir(f"/proc/{name}/task"))
            except OSError:
                continue
    return total


def kernel_at_least(major, minor):
    try:
        parts = os.uname().release.split(".")
        return (int(parts[0]), int(parts[1].split("-")[0])) >= (major, minor)
    except (ValueError, IndexError):
        return False


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
