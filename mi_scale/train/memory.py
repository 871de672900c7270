"""DeepSpeed's memory knobs, sized from the model and the memory it runs in.

DeepSpeed's defaults are sized for GPUs: a 5e8-element reduce bucket is 2 GB
of fp32 host RAM on a CPU rank, 1e9 live parameters is 4 GB, and a 1e9-element
optimizer sub-group turns a whole fp32 partition into a transient copy. Here
every knob follows the model's largest tensor (a bucket must hold one) and is
capped by a small share of the memory each rank has.

`mi-scale plan` (mi_scale/plan/) predicts peaks from these same numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# DeepSpeed's own defaults (elements): the upper bound we never exceed.
DS_DEFAULT_BUCKET = 500_000_000
# A bucket never needs to be smaller than this: below ~1M elements the
# per-collective overhead dominates.
MIN_BUCKET = 1 << 20
# Share of a rank's memory one bucket may take (there are ~3 live at once).
BUCKET_MEMORY_SHARE = 0.02
# Parameters smaller than this stay whole on every rank at ZeRO-3 (DeepSpeed:
# stage3_param_persistence_threshold); gathering them costs more than it saves.
MAX_PERSISTENCE = 100_000


def param_numel(p: torch.Tensor) -> int:
    """Elements of a parameter; a ZeRO-3 partitioned one keeps its full size in ds_numel."""
    return int(getattr(p, "ds_numel", p.numel()))


@dataclass(frozen=True)
class ModelShape:
    params: int  # distinct parameters (a tied tensor once)
    largest_param: int  # elements of the largest single tensor

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelShape":
        """Works on a meta-device model and on a ZeRO-3 partitioned one."""
        sizes = [param_numel(p) for p in model.parameters()]
        return cls(params=sum(sizes), largest_param=max(sizes, default=0))


def host_memory_bytes() -> int:
    """Memory this machine (or its cgroup) gives all ranks together."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            total = min(total, int(limit))
    except (OSError, ValueError):
        pass
    return total


def bucket_elements(shape: ModelShape, rank_memory_bytes: int, bytes_per_value: int = 4) -> int:
    """One communication bucket: twice the largest tensor (so two layers
    overlap), at most BUCKET_MEMORY_SHARE of the rank's memory, never below
    the largest tensor itself, never above DeepSpeed's GPU default."""
    by_memory = int(rank_memory_bytes * BUCKET_MEMORY_SHARE / bytes_per_value)
    size = min(2 * shape.largest_param, by_memory, DS_DEFAULT_BUCKET)
    return max(size, shape.largest_param, MIN_BUCKET)


def persistence_threshold(shape: ModelShape) -> int:
    """Tensors below this stay unpartitioned: 1e5 (DeepSpeed's default) for
    large models, less for small ones so that at most ~0.1% of the model is
    kept whole on every rank."""
    return max(1, min(MAX_PERSISTENCE, shape.params // 1000))


def zero_settings(shape: ModelShape, stage: int, rank_memory_bytes: int,
                  bucket: int | None = None) -> dict:
    """The `zero_optimization` keys that size DeepSpeed's buffers."""
    b = bucket or bucket_elements(shape, rank_memory_bytes)
    if stage in (1, 2):
        return {"reduce_bucket_size": b, "allgather_bucket_size": b}
    if stage == 3:
        return {"reduce_bucket_size": b,
                "stage3_prefetch_bucket_size": b,
                "stage3_param_persistence_threshold": persistence_threshold(shape),
                # gathered parameters alive at once: the layer running plus one prefetched
                "stage3_max_live_parameters": 2 * b,
                "stage3_max_reuse_distance": 2 * b,
                # the optimizer steps (and, offloaded, swaps) one sub-group at a time
                "sub_group_size": b}
    return {}


def return_freed_memory_to_os(threshold_bytes: int = 1 << 20) -> None:
    """Make glibc serve every allocation >= 1 MiB with its own mmap, so a
    freed tensor goes back to the OS at once.

    By default glibc raises its mmap threshold (up to 32 MiB) each time a
    large block is freed; later layer-sized tensors then come from the heap,
    where short-lived ones (a layer drawn in full, then sharded; a gathered
    parameter) leave holes that the heap cannot return. On a host that holds
    a large model that fragmentation measured as +30% of resident memory.
    Linux/glibc only; a no-op elsewhere."""
    import ctypes
    import ctypes.util

    M_MMAP_THRESHOLD = -3
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, int(threshold_bytes))
    except (OSError, AttributeError):
        pass


def peak_rss_bytes() -> int:
    """This process's peak resident memory: Linux's VmHWM. Not ru_maxrss: through
    fork + exec it keeps the parent's peak, so a rank started from a 1.4 GB
    process (pytest, a notebook, a launcher) reported 1.4 GB whatever it used."""
    try:
        with open("/proc/self/status") as f:
            kib = [int(line.split()[1]) for line in f if line.startswith("VmHWM:")]
        if kib:
            return kib[0] * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
