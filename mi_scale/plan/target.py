"""Where the plan runs: nodes, ranks per node, and the memory of each (GPU and
host), from the command line's flags, the config and this machine."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from mi_scale.config import Config
from mi_scale.errors import UserError
from mi_scale.plan.units import GiB, fmt_bytes

# Assumed when planning for GPUs without --gpu-memory-gb on a machine without one.
DEFAULT_GPU_MEMORY_GB = 80


@dataclass
class Target:
    device: str  # "cpu" | "gpu"
    nodes: int
    ranks_per_node: int
    world_size: int
    gpu_memory: Optional[int]  # bytes per GPU
    host_memory: int  # bytes per node
    notes: list = field(default_factory=list)

    @property
    def memory_per_rank(self) -> int:
        if self.device == "gpu":
            return int(self.gpu_memory)
        return self.host_memory // self.ranks_per_node

    def describe(self) -> str:
        ranks = f"{self.world_size} {'GPU' if self.device == 'gpu' else 'CPU'} rank{'s' * (self.world_size != 1)}"
        nodes = f"{self.nodes} node{'s' * (self.nodes != 1)}"
        if self.device == "gpu":
            return f"{ranks} ({nodes} x {self.ranks_per_node} GPU{'s' * (self.ranks_per_node != 1)})"
        return f"{ranks} ({nodes}, {self.ranks_per_node} per node)"


def _positive(name: str, value, kind=int):
    if value is None:
        return None
    if not isinstance(value, (int, float)) or value <= 0 or (kind is int and int(value) != value):
        raise UserError(f"{name}: invalid value {value!r}: use a positive {'integer' if kind is int else 'number'}")
    return kind(value)


def resolve_target(cfg: Config, nodes: Optional[int] = None, gpus_per_node: Optional[int] = None,
                   gpu_memory_gb: Optional[float] = None, host_memory_gb: Optional[float] = None) -> Target:
    """The cluster the plan is for: GPUs when --gpus-per-node/--gpu-memory-gb is
    given or cluster.use_gpu is set, else CPU ranks (cluster.num_workers)."""
    import torch

    from mi_scale.train.memory import host_memory_bytes

    nodes = _positive("--nodes", nodes) or 1
    gpus_per_node = _positive("--gpus-per-node", gpus_per_node)
    gpu_memory_gb = _positive("--gpu-memory-gb", gpu_memory_gb, float)
    host_memory_gb = _positive("--host-memory-gb", host_memory_gb, float)
    notes = []
    if host_memory_gb is not None:
        host = int(host_memory_gb * GiB)
    else:
        host = host_memory_bytes()
        notes.append(f"host memory per node: this machine's {fmt_bytes(host)} (--host-memory-gb to change)")
    gpu = gpus_per_node is not None or gpu_memory_gb is not None or cfg.cluster.use_gpu
    if gpu:
        if gpus_per_node is not None:
            world, per_node = nodes * gpus_per_node, gpus_per_node
        else:
            world = cfg.cluster.num_workers
            per_node = math.ceil(world / nodes)
        if gpu_memory_gb is not None:
            gpu_mem = int(gpu_memory_gb * GiB)
        elif torch.cuda.is_available():
            gpu_mem = torch.cuda.get_device_properties(0).total_memory
            notes.append(f"GPU memory: this machine's {fmt_bytes(gpu_mem)} (--gpu-memory-gb to change)")
        else:
            gpu_mem = DEFAULT_GPU_MEMORY_GB * GiB
            notes.append(f"GPU memory: assumed {DEFAULT_GPU_MEMORY_GB} GiB per GPU (--gpu-memory-gb to change)")
        return Target("gpu", nodes, per_node, world, gpu_mem, host, notes)
    world = cfg.cluster.num_workers
    return Target("cpu", nodes, math.ceil(world / nodes), world, None, host, notes)
