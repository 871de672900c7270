"""Which network interface the collectives use on each node.

Without GLOO_SOCKET_IFNAME, gloo binds each rank to the address its hostname
resolves to. Many images resolve the hostname to 127.0.0.1 (/etc/hosts), so
on several hosts rank 1 dials rank 0 at 127.0.0.1 and the group never forms.
Ray already knows an address that every node reaches: the node's Ray IP. So
before torch's process group starts, each worker binds gloo (and NCCL) to the
interface carrying that IP, unless the user set *_SOCKET_IFNAME
(cluster.bind_interface: false turns this off). Then connectivity.py checks
that the nodes reach each other at those addresses, and says so in one line
where they do not, or where gloo itself fails to start.

Runs in the Ray Train controller (BoundTorchConfig's backend) and on the
workers (bind_worker); the driver forwards its own network settings
(forwarded_env).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

from mi_scale.connectivity import check_reachable, hostname_address, process_group_error

# The driver's settings that decide how the collectives connect; they reach
# the workers through the runtime env, on an existing cluster too.
FORWARDED_PREFIXES = ("GLOO_", "NCCL_", "TP_SOCKET_IFNAME", "MASTER_ADDR", "MASTER_PORT")


def forwarded_env() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES)}


def interface_of(ip: str) -> str | None:
    """The name of the interface holding `ip` on this host, if any."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    return None


def bind_worker(bind: bool, use_gpu: bool) -> dict:
    """On a worker, before the process group: name the interface of the
    node's Ray IP to gloo/NCCL. Returns what the node uses, for the log line."""
    import ray

    node_ip = ray.util.get_node_ip_address()
    names = ["GLOO_SOCKET_IFNAME"] + (["NCCL_SOCKET_IFNAME"] if use_gpu else [])
    user = os.environ.get("GLOO_SOCKET_IFNAME")
    info = {"node_ip": node_ip, "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": socket.gethostname(), "pid": os.getpid(), "interface": user, "how": "user"}
    if user:
        return info
    iface = interface_of(node_ip) if bind else None
    if iface is None:
        info.update(interface=None, how="hostname", address=hostname_address())
        return info
    for name in names:
        os.environ.setdefault(name, iface)
    info.update(interface=iface, how="bound")
    return info


def check_bindings(infos: list[dict]) -> None:
    """Refuse a group whose ranks span nodes while one would bind to loopback:
    gloo could never connect it (it would wait out the whole timeout)."""
    from mi_scale.errors import UserError

    if len({i["node_ip"] for i in infos}) < 2:
        return
    for rank, i in enumerate(infos):
        addr = i.get("address")
        if i["how"] == "hostname" and addr is not None and addr.startswith("127."):
            raise UserError(
                f"gloo would bind rank {rank} ({i['node_ip']}) to {addr}: its hostname {i['hostname']!r} "
                f"resolves to loopback, so the other nodes cannot reach it; set GLOO_SOCKET_IFNAME "
                f"(NCCL_SOCKET_IFNAME on GPUs) to the interface of each node's Ray address in the "
                f"driver's environment, make the hostname resolve to that address, or leave "
                f"cluster.bind_interface at true")


def node_lines(infos: list[dict]) -> list[str]:
    """One console line per node: the interface its collectives use."""
    seen, lines = set(), []
    for i in infos:
        if i["node_ip"] in seen:
            continue
        seen.add(i["node_ip"])
        if i["how"] == "bound":
            how = f"interface {i['interface']} (carries its Ray address; GLOO_SOCKET_IFNAME)"
        elif i["how"] == "user":
            how = f"interface {i['interface']} (GLOO_SOCKET_IFNAME set by you)"
        else:
            how = f"{i['address']} (its hostname's address; cluster.bind_interface is false)"
        lines.append(f"[mi-scale] node {i['node_ip']}: collectives on {how}")
    return lines


class _BoundTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: "BoundTorchConfig"):
        infos = worker_group.execute(bind_worker, bind=backend_config.bind_interface,
                                     use_gpu=backend_config.use_gpu)
        if backend_config.queue is not None:
            for line in node_lines(infos):
                backend_config.queue.put({"line": line})
            backend_config.queue.put({"event": "placement", "ranks": [[i["node_id"], i["node_ip"]] for i in infos]})
        check_bindings(infos)
        # Ctrl-C / SIGTERM to a worker: stop at the next step boundary (train/stop.py). Actor
        # tasks run on the worker's main thread, the only one that may set signal handlers.
        from mi_scale.train.stop import install_handlers
        worker_group.execute(install_handlers)
        check_reachable(worker_group, infos)  # a wrong interface or a firewall: say so now, not after 30 min
        try:
            super().on_start(worker_group, backend_config)
        except Exception as e:
            error = process_group_error(e, infos)
            if error is None:
                raise
            raise error  # not `from e`: the driver prints the root of the __cause__ chain


@dataclass
class BoundTorchConfig(TorchConfig):
    """Ray's TorchConfig, whose workers bind the collectives first (module docstring)."""
    bind_interface: bool = True
    use_gpu: bool = False
    queue: Any = field(default=None, repr=False)

    @property
    def backend_cls(self):
        return _BoundTorchBackend
