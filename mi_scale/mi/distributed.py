"""The collectives the sharded MI estimate needs (torch.distributed only).

Shape legend: n local rows, N global rows, C columns.

Works unchanged when torch.distributed is not initialized (world of 1).
Every function here is a collective: all ranks of the group must call it in
the same order, in forward and (for `gather_rows` with gradients) backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


# torch >= 2.12 renamed all_gather_into_tensor; keep working on older releases.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def world(group=None) -> tuple[int, int]:
    """(rank, world_size) of the group, (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


class _GatherRows(torch.autograd.Function):
    """All-gather of equally padded (n_max, C) blocks, autograd-aware.

    Backward: the gradient of this rank's block is the SUM over ranks of the
    gradients flowing into that block of the gathered tensor (each rank's
    loss used every block). With NCCL that is a reduce-scatter; other
    backends (gloo has no reduce-scatter) all-reduce the whole gradient and
    keep their own block. Every rank must run this backward, which
    `MIRegularizer` guarantees by always making its loss depend on the
    gathered tensor.
    """

    @staticmethod
    def forward(ctx, block_nC: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.rank, ctx.world = world(group)
        block_nC = block_nC.contiguous()
        out = torch.empty((ctx.world * block_nC.shape[0], *block_nC.shape[1:]),
                          dtype=block_nC.dtype, device=block_nC.device)
        _all_gather_single(out, block_nC, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_NC: torch.Tensor):
        grad_NC = grad_NC.contiguous()
        n = grad_NC.shape[0] // ctx.world
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            mine = torch.empty((n, *grad_NC.shape[1:]), dtype=grad_NC.dtype, device=grad_NC.device)
            dist.reduce_scatter_tensor(mine, grad_NC, op=dist.ReduceOp.SUM, group=ctx.group)
            return mine, None
        dist.all_reduce(grad_NC, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad_NC[ctx.rank * n:(ctx.rank + 1) * n].clone(), None


def gather_rows(x_nC: torch.Tensor, group=None, differentiable: bool = True) -> torch.Tensor:
    """Concatenate every rank's rows in rank order: (N, C), N = sum of n.

    Ranks may hold different numbers of rows (even zero): the sizes are
    gathered first and every block is padded to the largest, so no rank hangs
    and the result is the exact concatenation."""
    rank, size = world(group)
    if size == 1:
        return x_nC
    n_local = torch.tensor([x_nC.shape[0]], dtype=torch.int64, device=x_nC.device)
    sizes = torch.empty(size, dtype=torch.int64, device=x_nC.device)
    _all_gather_single(sizes, n_local, group=group)
    sizes = sizes.tolist()
    n_max = max(sizes)
    padded = torch.nn.functional.pad(x_nC, (0, 0, 0, n_max - x_nC.shape[0]))
    if differentiable and torch.is_grad_enabled():
        gathered = _GatherRows.apply(padded, group)
    else:
        gathered = torch.empty((size * n_max, x_nC.shape[1]), dtype=x_nC.dtype, device=x_nC.device)
        _all_gather_single(gathered, padded.detach().contiguous(), group=group)
    return torch.cat([gathered[r * n_max: r * n_max + s] for r, s in enumerate(sizes)])


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over ranks (no gradient); identity without a process group."""
    if world(group)[1] > 1:
        x = x.detach().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def assign_pairs(num_pairs: int, world_size: int) -> list[int]:
    """Owner rank of each adjacent pair: contiguous blocks whose sizes differ
    by at most one (pairs cost the same for a fixed estimator and sketch
    size). Contiguous, so that a rank's pairs share layers and
    GaussianMI.chain computes each shared layer's terms once."""
    return [p * world_size // num_pairs for p in range(num_pairs)]
