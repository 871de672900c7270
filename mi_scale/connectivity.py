"""Whether the ranks can connect, said in one line with the fix.

When one rank cannot reach another (GLOO_SOCKET_IFNAME names the wrong
interface, a firewall between nodes), gloo waits out the whole process-group
timeout (Ray's TorchConfig.timeout_s, 30 min) and then fails with a generic
error. So before the process group starts, every rank listens on the address
gloo will use, and the lowest rank on each node dials the lowest rank of every
other node there: nodes^2 connections, not ranks^2, and no accept() needed
(the kernel completes the handshake in the listen backlog). The first that
fails is refused as a UserError. A failure of gloo's own start-up after that
(an interface that does not exist) becomes one line too.

Runs in the Ray Train controller (check_reachable, process_group_error, called
by network.py's backend) and on the workers (open_listeners, dial, close_listeners).
"""

from __future__ import annotations

import os
import re
import socket

from mi_scale.errors import UserError

CONNECT_TIMEOUT_S = 10.0
FIX = ("set GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME on GPUs) to the interface that carries each node's Ray "
       "address, or unset it and leave cluster.bind_interface at true (that picks the interface), and check "
       "that the nodes accept TCP connections from each other on all ports")

# This worker's listeners, open from open_listeners to close_listeners. Actor
# tasks run one at a time, so they live in between as a module global.
_listeners: list[socket.socket] = []


# -- on the workers ----------------------------------------------------------
def hostname_address() -> str:
    """The address gloo binds to when no interface is named: the hostname's."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"  # gloo's own fallback


def gloo_addresses() -> list[tuple[str | None, str]]:
    """(interface, IPv4 address) that gloo binds to in this process: one per name in
    GLOO_SOCKET_IFNAME (a comma-separated list), else the hostname's address. Gloo takes
    an interface's first address; one that is IPv6 or missing is left to gloo, which
    fails at once where it cannot bind (process_group_error)."""
    names = os.environ.get("GLOO_SOCKET_IFNAME")
    if not names:
        return [(None, hostname_address())]
    import psutil

    found = psutil.net_if_addrs()
    out = []
    for name in names.split(","):
        first = next((a for a in found.get(name, []) if a.family in (socket.AF_INET, socket.AF_INET6)), None)
        if first is not None and first.family == socket.AF_INET:
            out.append((name, first.address))
    return out


def open_listeners() -> list[tuple[str | None, str, int]]:
    """Listen on each address gloo will use; (interface, address, port) of each."""
    close_listeners()
    out = []
    for iface, addr in gloo_addresses():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((addr, 0))
        s.listen(socket.SOMAXCONN)
        _listeners.append(s)
        out.append((iface, addr, s.getsockname()[1]))
    return out


def dial(targets: list[tuple[int, str, int]]) -> dict | None:
    """Connect to each (rank, address, port); the first failure, or None."""
    for rank, addr, port in targets:
        try:
            socket.create_connection((addr, port), timeout=CONNECT_TIMEOUT_S).close()
        except TimeoutError:
            return {"to": rank, "addr": addr, "port": port, "error": f"no answer in {CONNECT_TIMEOUT_S:g} s"}
        except OSError as e:
            return {"to": rank, "addr": addr, "port": port, "error": str(e)}
    return None


def close_listeners() -> None:
    while _listeners:
        _listeners.pop().close()


# -- in the controller -------------------------------------------------------
def check_reachable(worker_group, infos: list[dict]) -> None:
    """Refuse a group that spans nodes whose lowest ranks cannot reach each other
    at gloo's addresses. infos: network.bind_worker's, by rank."""
    import ray

    if len({i["node_ip"] for i in infos}) < 2:
        return
    leaders: dict[str, int] = {}  # node IP -> its lowest rank
    for rank, i in enumerate(infos):
        leaders.setdefault(i["node_ip"], rank)
    try:
        listening = worker_group.execute(open_listeners)
        futures = {src: worker_group.execute_single_async(
            src, dial, targets=[(dst, addr, port) for dst in leaders.values() if dst != src
                                for _, addr, port in listening[dst]])
            for src in leaders.values()}
        failures = [{**f, "from": src} for src, f in zip(futures, ray.get(list(futures.values()))) if f]
    finally:
        worker_group.execute(close_listeners)
    if failures:  # the lowest rank that could not be reached, dialled by the lowest rank that tried
        f = min(failures, key=lambda f: (f["to"], f["from"]))
        iface = next(i for i, a, p in listening[f["to"]] if (a, p) == (f["addr"], f["port"]))
        raise UserError(
            f"gloo could not connect rank {f['from']} ({infos[f['from']]['node_ip']}) to rank {f['to']} "
            f"({infos[f['to']]['node_ip']}) at {f['addr']}:{f['port']} ({_where(infos[f['to']], iface)}): "
            f"{f['error']}; {FIX}")


def _where(info: dict, iface: str | None) -> str:
    """How that rank came to listen at its address."""
    if info["how"] == "user":
        return f"interface {iface} of your GLOO_SOCKET_IFNAME"
    if info["how"] == "bound":
        return f"interface {iface}, which carries its Ray address"
    return "its hostname's address"


def process_group_error(e: BaseException, infos: list[dict]) -> UserError | None:
    """Gloo's own failure to start the process group (after the pre-flight passed) as
    one line naming the rank, with gloo's first line and the fix; None for anything else."""
    from ray.exceptions import RayTaskError

    cause = getattr(e, "cause", None)
    text = str(e)  # Ray's rendering: "ray::...() (pid=N, ip=A, ...)", then the worker's traceback
    if not (isinstance(e, RayTaskError) and isinstance(cause, RuntimeError) and "_setup_torch_process_group" in text):
        return None
    where = re.search(r"\(pid=(\d+), ip=([^,)]+)", text)
    pid, ip = (int(where[1]), where[2]) if where else (None, None)
    rank = next((r for r, i in enumerate(infos) if (i["pid"], i["node_ip"]) == (pid, ip)), None)
    who = f"rank {rank} ({ip})" if rank is not None else "a rank"
    lines = str(cause).strip().splitlines()
    # "[enforce fail at .../device.cc:84] ifa != nullptr. Unable to ...": drop gloo's source location
    first = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]) if lines else type(cause).__name__
    return UserError(f"gloo could not start the process group on {who}: {first}; {FIX}")
