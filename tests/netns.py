"""Several network hosts on this machine: Linux network namespaces joined by a bridge.

Each host is a namespace with its own loopback, one veth into a private bridge and an address of
the test's own subnet (``10.213.K.i/24``, K from the test process id). The Ray nodes are started in
them with the commands of ``recipes/launch/README.md`` (so the docs are what is tested), with the
test's addresses and resources put in. Everything made here is removed by :meth:`Hosts.close`,
which kills every process left in the namespaces first (``ip netns pids``), even after a failure.

Needs root and iproute2; :func:`unavailable` says what is missing (the tests skip with it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_README = ROOT / "recipes/launch/README.md"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable() -> str | None:
    """Why namespaced hosts cannot be built here (None when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (the multi-host tests run as root in CI)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    name = f"rlkprobe{os.getpid() % 100000}"
    r = _ip("netns", "add", name, check=False)
    if r.returncode:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    r = _ip("link", "add", name[:15], "type", "bridge", check=False)
    if r.returncode:
        return f"cannot create a bridge: {r.stderr.strip()}"
    _ip("link", "del", name[:15], check=False)
    return None


def readme_commands() -> list[str]:
    """The shell lines of the README's multi-node block (comments stripped)."""
    text = LAUNCH_README.read_text()
    block = text.split("<!-- multi-node-commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [ln.split("#", 1)[0].strip() for ln in block.splitlines() if ln.split("#", 1)[0].strip()]


_NOT_INHERITED = ("RAY_", "RLKIT_", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                  "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
OWNERS = Path("/tmp/rlkit-netns")  # one file per live set of hosts: "<owner pid> <hosts>"


def _remove_orphans() -> None:
    """Remove the hosts of test processes that died without cleaning up (killed by a timeout)."""
    for f in OWNERS.glob("rlk*") if OWNERS.is_dir() else []:
        pid, n = (int(x) for x in f.read_text().split())
        if Path(f"/proc/{pid}").exists():
            continue
        tag = f.name
        for i in range(1, n + 1):
            pids = _ip("netns", "pids", f"{tag}h{i}", check=False).stdout.split()
            for p in pids:
                try:
                    os.kill(int(p), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _ip("netns", "del", f"{tag}h{i}", check=False)
            shutil.rmtree(Path("/etc/netns") / f"{tag}h{i}", ignore_errors=True)
        _ip("link", "del", f"{tag}br", check=False)
        f.unlink(missing_ok=True)


class Hosts:
    """``n`` namespaced hosts on a private bridge; host ``i`` (1-based) has address ``ip(i)``."""

    def __init__(self, n: int, workdir: Path):
        self.n, self.k = n, 20 + os.getpid() % 200
        self.tag = f"rlk{self.k}"
        self.bridge = f"{self.tag}br"
        self.workdir = Path(workdir)
        self.home = self.workdir / "home"  # the token file of README's `ray get-auth-token --generate`
        self.home.mkdir(parents=True, exist_ok=True)
        self.made: list[tuple[str, str]] = []
        _remove_orphans()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def ns(self, i: int) -> str:
        return f"{self.tag}h{i}"

    def ip(self, i: int) -> str:
        return f"10.213.{self.k}.{i}"

    def veth(self, i: int) -> str:
        """The bridge side of host ``i``'s link (``ip link set ... down`` cuts the host off)."""
        return f"{self.tag}v{i}"

    def _build(self) -> None:
        OWNERS.mkdir(parents=True, exist_ok=True)
        (OWNERS / self.tag).write_text(f"{os.getpid()} {self.n}")
        _ip("link", "add", self.bridge, "type", "bridge")
        self.made.append(("link", self.bridge))
        _ip("addr", "add", f"10.213.{self.k}.254/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i in range(1, self.n + 1):
            ns = self.ns(i)
            _ip("netns", "add", ns)
            self.made.append(("netns", ns))
            # `ip netns exec` mounts this over /etc/resolv.conf: the hosts have no DNS server, and
            # lookups that fail at once (loopback refuses) instead of timing out (torch's store
            # resolves peer names: 5 s per lookup with an unreachable server)
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
            _ip("link", "add", self.veth(i), "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", self.veth(i), "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "default", "via", f"10.213.{self.k}.254")

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of every process on the hosts: this Python first on PATH, the token's
        home, token auth (README), no usage stats, no inherited Ray address."""
        # nothing that earlier in-process tests set for themselves: Ray's single-machine mode and auth
        # settings (RAY_*), test hooks (RLKIT_*), a rendezvous (MASTER_*, RANK, ...), gloo's interface
        env = {k: v for k, v in os.environ.items() if not k.startswith(_NOT_INHERITED)}
        env.update(HOME=str(self.home), RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0",
                   PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", PYTHONUNBUFFERED="1",
                   TOKENIZERS_PARALLELISM="false")
        env.update(extra)
        return env

    def run(self, i: int, cmd: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run a shell command on host ``i`` (from the repo root) and wait."""
        return subprocess.run(["ip", "netns", "exec", self.ns(i), "bash", "-c", cmd], cwd=ROOT,
                              env=env or self.env(), capture_output=True, text=True, timeout=timeout)

    def popen(self, i: int, args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        """Start ``args`` on host ``i`` in the background, stdout+stderr into ``log``."""
        fh = open(log, "w")  # noqa: SIM115  (the child owns it)
        return subprocess.Popen(["ip", "netns", "exec", self.ns(i), *args], cwd=ROOT, env=env or self.env(),
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)

    def pids(self, i: int) -> list[int]:
        r = _ip("netns", "pids", self.ns(i), check=False)
        return [int(p) for p in r.stdout.split()]

    def kill_host(self, i: int, wait_s: float = 15) -> None:
        """SIGKILL every process of host ``i`` (a node lost at once) and wait until none is left."""
        deadline = time.time() + wait_s
        while (pids := self.pids(i)) and time.time() < deadline:
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)

    def link(self, i: int, up: bool) -> None:
        _ip("link", "set", self.veth(i), "up" if up else "down")

    def close(self) -> None:
        (OWNERS / self.tag).unlink(missing_ok=True)
        for kind, name in reversed(self.made):
            if kind == "netns":
                self.kill_host(int(name.rsplit("h", 1)[1]))
                _ip("netns", "del", name, check=False)
                shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
            else:
                _ip("link", "del", name, check=False)
        self.made = []


class RayCluster:
    """A Ray head on host 1 and a worker on each other host, started with the README's commands.

    ``resources[i]``: host i's custom resources (put in place of the README's ``--resources``);
    every host gets ``cpus`` logical CPUs and no GPU (in place of ``--num-gpus=8``).
    """

    def __init__(self, hosts: Hosts, resources: dict[int, dict[str, float]], cpus: int = 2,
                 node_env: dict[int, dict[str, str]] | None = None):
        self.hosts, self.resources, self.cpus = hosts, resources, cpus
        self.node_env = node_env or {}  # extra environment of host i's Ray node (its actors inherit it)
        cmds = readme_commands()
        self.token_cmd = next(c for c in cmds if c.startswith("ray get-auth-token"))
        self.head_cmd = next(c for c in cmds if c.startswith("ray start --head"))
        self.worker_cmd = next(c for c in cmds if c.startswith("ray start --address"))
        self.status_cmd = next(c for c in cmds if c.startswith("ray status"))
        for c in cmds:
            if c.startswith("export "):  # README's environment (RAY_AUTH_MODE=token) must be what env() sets
                key, val = c.split(None, 1)[1].split("=", 1)
                assert hosts.env().get(key) == val, (key, val)
        self.address = f"{hosts.ip(1)}:6379"
        r = hosts.run(1, self.token_cmd)
        assert r.returncode == 0, r.stderr
        self.start(1)
        for i in range(2, hosts.n + 1):
            self.start(i)
        self.wait_nodes(hosts.n)

    def _cmd(self, template: str, i: int) -> str:
        cmd = template.replace("10.0.0.1", self.hosts.ip(1))
        cmd = cmd.replace("--num-gpus=8", f"--num-gpus=0 --num-cpus={self.cpus}")
        res = json.dumps(self.resources.get(i, {}))
        return re.sub(r"--resources='[^']*'", f"--resources='{res}'", cmd)

    def start(self, i: int) -> None:
        """Start host ``i``'s Ray node (head on host 1) with the README's command."""
        r = self.hosts.run(i, self._cmd(self.head_cmd if i == 1 else self.worker_cmd, i), timeout=120,
                           env=self.hosts.env(**self.node_env.get(i, {})))
        assert r.returncode == 0, f"ray start on host {i} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"

    def alive_nodes(self) -> list[str]:
        """Addresses of the nodes Ray counts alive."""
        code = (f"import ray, json; ray.init(address='{self.address}', logging_level='ERROR'); "
                "print(json.dumps([n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']]))")
        r = self.hosts.run(1, f"{sys.executable} -c \"{code}\"", timeout=60)
        return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else []

    def leftovers(self) -> dict[str, int]:
        """What runs left on the cluster: placement groups not removed, actors alive."""
        code = (f"import ray, json; ray.init(address='{self.address}', logging_level='ERROR'); "
                "from ray.util.state import list_actors; "
                "pgs = [p for p in ray.util.placement_group_table().values() if p['state'] != 'REMOVED']; "
                "acts = [a for a in list_actors() if a.state == 'ALIVE']; "
                "print(json.dumps({'placement_groups': len(pgs), 'actors': len(acts)}))")
        r = self.hosts.run(1, f"{sys.executable} -c \"{code}\"", timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    def wait_nodes(self, n: int, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = self.hosts.run(1, self._cmd(self.status_cmd, 1), timeout=60)
            if r.returncode == 0 and r.stdout.count("node_") >= n and "Pending:\n (no pending nodes)" in r.stdout:
                active = r.stdout.split("Active:", 1)[1].split("Pending:", 1)[0]
                if active.count("node_") >= n:
                    return
            time.sleep(1)
        raise TimeoutError(f"Ray cluster did not reach {n} nodes in {timeout:g}s:\n{r.stdout}\n{r.stderr}")
