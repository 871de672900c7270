"""Two hosts made of network namespaces on this machine, joined by a veth pair:
host A at 10.250.0.1, host B at 10.250.0.2. Each host's hostname resolves
to 127.0.0.1 (this machine's /etc/hosts, shared by both), as on many images.
The Ray cluster is formed with launch/slurm.sbatch's own `ray start` lines.

Everything a Hosts makes (namespaces, the veth pair, every process inside the
namespaces, Ray's temp dir) is removed by close().
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
A, B = "10.250.0.1", "10.250.0.2"
PORT = 6379


def can_make_namespaces() -> str | None:
    """None, or why this machine cannot run the test (for pytest.skip)."""
    if os.geteuid() != 0:
        return "needs root to make network namespaces"
    if shutil.which("ip") is None:
        return "needs the `ip` command (iproute2)"
    name = f"mi-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot make a network namespace: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def sbatch_ray_start_lines() -> tuple[str, str]:
    """The head's and the workers' `ray start` commands in launch/slurm.sbatch."""
    text = (REPO / "launch" / "slurm.sbatch").read_text().replace("\\\n", " ")
    lines = [re.sub(r"\s+", " ", m.group(0)).strip().rstrip("&").strip()
             for m in re.finditer(r"ray start [^\n]*", text)]
    head = [line for line in lines if "--head" in line]
    workers = [line for line in lines if "--head" not in line]
    assert len(head) == 1 and len(workers) == 1, lines
    return head[0], workers[0]


class Hosts:
    def __init__(self, tmp: Path):
        tag = f"{os.getpid() % 100000}"
        self.ns = {A: f"mi-a{tag}", B: f"mi-b{tag}"}
        self.veth = (f"mva{tag}", f"mvb{tag}")
        self.ray_tmp = f"/tmp/r20-{tag}"  # short: AF_UNIX socket paths
        self.tmp = tmp
        self.env = {**os.environ, "RAY_TMPDIR": self.ray_tmp, "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_ADDRESS": f"{A}:{PORT}",
                    "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": "0.01",
                    "PATH": f"{Path(PY).parent}:{os.environ['PATH']}",
                    "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_DATASETS_OFFLINE": "1",
                    "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        for k in [k for k in self.env if k.startswith(("GLOO_", "NCCL_"))]:
            del self.env[k]
        self.nodes: dict[str, subprocess.Popen] = {}

    # -- network ---------------------------------------------------------
    def up(self) -> "Hosts":
        a, b = self.veth
        cmds = [["netns", "add", self.ns[A]], ["netns", "add", self.ns[B]],
                ["link", "add", a, "type", "veth", "peer", "name", b],
                ["link", "set", a, "netns", self.ns[A]], ["link", "set", b, "netns", self.ns[B]],
                ["-n", self.ns[A], "addr", "add", f"{A}/24", "dev", a],
                ["-n", self.ns[B], "addr", "add", f"{B}/24", "dev", b]]
        for ns, dev in ((self.ns[A], a), (self.ns[B], b)):
            cmds += [["-n", ns, "link", "set", dev, "up"], ["-n", ns, "link", "set", "lo", "up"]]
        for c in cmds:
            subprocess.run(["ip", *c], check=True, capture_output=True)
        return self

    def cmd(self, host: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host], *argv]

    # -- Ray -------------------------------------------------------------
    def start_ray(self, cpus: int = 1) -> None:
        self.cpus = cpus
        for host in (A, B):
            self.start_node(host)

    def start_node(self, host: str, private_dir: str | None = None) -> None:
        """Host A: the head's line; host B: the workers' line (of launch/slurm.sbatch).
        private_dir: a tmpfs only this host sees there (its own disk, not shared)."""
        head, worker = sbatch_ray_start_lines()
        env = {**self.env, "RAY_HEAD_IP": A, "RAY_PORT": str(PORT), "CPUS_PER_NODE": str(self.cpus),
               "GPUS_PER_NODE": "0"}
        log = open(self.tmp / f"ray-node-{host}.log", "a")
        line = head if host == A else worker
        if private_dir:  # `ip netns exec` gives the host its own mount namespace
            line = f"mount -t tmpfs tmpfs {private_dir} && exec {line}"
        self.nodes[host] = subprocess.Popen(self.cmd(host, ["bash", "-c", line if private_dir else f"exec {line}"]), env=env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_for_nodes(1 if host == A else 2)

    def restart_b(self, private_dir: str | None = None) -> None:
        """Host B back after it was lost: a new Ray node joins at the same address."""
        self.kill_host(B)
        deadline = time.time() + 120
        while B in self.alive_nodes():  # Ray must see the old node dead first, or it schedules onto it
            assert time.time() < deadline, "Ray did not mark host B's old node dead"
            time.sleep(1)
        self.start_node(B, private_dir)

    def python(self, host: str, code: str, timeout: float = 120, as_node: bool = False) -> str:
        """`code`'s output, run on the host; as_node: with the files its Ray node sees
        (each `ip netns exec` gets its own mount namespace, so a private_dir is seen only there)."""
        argv = (["nsenter", "-t", str(self.nodes[host].pid), "-m", "-n", PY, "-c", code] if as_node
                else self.cmd(host, [PY, "-c", code]))
        r = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    def alive_nodes(self) -> list[str]:
        out = self.python(A, "import ray; ray.init(address='auto', logging_level='ERROR', log_to_driver=False)\n"
                             "print(' '.join(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))")
        return out.split()

    def wait_for_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while True:
            for host, p in self.nodes.items():
                assert p.poll() is None, (self.tmp / f"ray-node-{host}.log").read_text()[-3000:]
            try:
                if len(self.alive_nodes()) >= n:
                    return
            except AssertionError:
                pass  # the head is not up yet
            assert time.time() < deadline, f"Ray did not reach {n} nodes"
            time.sleep(1)

    def worker_ips(self) -> list[str]:
        """Where Ray placed the training workers (its actor table), one IP per worker ever started."""
        out = self.python(A, "import ray; ray.init(address='auto', logging_level='ERROR', log_to_driver=False)\n"
                             "from ray._private import state\n"
                             "print(' '.join(sorted(a['Address']['IPAddress'] for a in state.actors().values() "
                             "if a['ActorClassName'].endswith('RayTrainWorker'))))")
        return out.split()

    # -- clean-up --------------------------------------------------------
    def kill_host(self, host: str) -> None:
        """Every process in the host's namespace, at once (a host that died)."""
        for _ in range(20):
            pids = subprocess.run(["ip", "netns", "pids", self.ns[host]], capture_output=True,
                                  text=True).stdout.split()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        if host in self.nodes:
            self.nodes[host].wait(timeout=10)

    @staticmethod
    def kill_matching(text: str) -> None:
        """Every process whose command line holds `text` (a Ray temp dir of ours)."""
        import psutil

        for p in psutil.process_iter(["pid", "cmdline"]):
            if any(text in part for part in p.info["cmdline"] or []):
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass

    def close(self) -> None:
        for host in (A, B):
            self.kill_host(host)
        for ns in self.ns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
