"""Process-group set-up that works under every launcher.

torchrun and the deepspeed launcher set RANK/WORLD_SIZE/MASTER_*; Ray Train
creates the process group itself; a plain process gets a world of 1 here
(without these variables DeepSpeed would try mpi4py).
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group() -> tuple[int, int]:
    """Initialize (or reuse) the default process group; returns (rank, world_size)."""
    import deepspeed

    from mi_scale.train.memory import return_freed_memory_to_os

    return_freed_memory_to_os()  # before the model exists: see its docstring
    if not dist.is_initialized() and "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if not torch.cuda.is_available():
        _skip_shm_comm_op()
    # Also when torch's group exists (Ray Train made it): DeepSpeed's own comm
    # layer must wrap it before zero.Init reads the world size.
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _skip_shm_comm_op() -> None:
    """On CPU, DeepSpeed's comm layer JIT-compiles its shared-memory all-reduce
    op (40-60 s on 2 cores, once per machine and venv path; a compile killed
    midway leaves a lock that hangs every later run). Only inference's
    `inference_all_reduce` uses it; training's collectives are gloo's. Marking
    the op incompatible, the flag DeepSpeed itself checks, skips the build."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
