"""The sharding contract (DESIGN section 2) on real gloo process groups.

Each scenario runs the same objective once in a single process on the
concatenated global batch and once on W spawned ranks, then compares per-pair
MI values and the rank-averaged parameter gradients (what DeepSpeed/DDP apply).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distributed_helpers import run_world
from mi_scale.mi import MIRegularizer
from mi_scale.models import DeepMLP, build_gpt

pytestmark = pytest.mark.slow

STEP = 3
DIFFERENTIABLE = ["gaussian", "renyi2", "infonce", "hsic"]


def make_mlp(depth=4):
    return DeepMLP(12, 5, depth=depth, width=24, activation="tanh")


def make_gpt():
    return build_gpt("gpt-1m", vocab_size=32, seq_len=8)


def global_batch(kind: str, n: int):
    g = torch.Generator().manual_seed(123)
    if kind == "mlp":
        return torch.randn(n, 12, generator=g), torch.randint(0, 5, (n,), generator=g)
    x = torch.randint(0, 32, (n, 8), generator=g)
    return x, torch.roll(x, -1, dims=1)


def objective(kind: str, estimator: str, sizes: list[int], rank: int, world: int,
              sketch: str = "random", depth: int = 4, checkpointing: bool = False, task_weight: float = 1.0):
    """Gradients of task + MI term on rank `rank`'s slice of the global batch.

    The task loss is a sum over local samples / global count * W, so that the
    rank average equals the global mean even when local sizes differ."""
    torch.manual_seed(0)
    model = make_mlp(depth) if kind == "mlp" else make_gpt()
    model.activation_checkpointing = checkpointing
    block_calls = []  # a recompute calls each block again in backward
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, a: block_calls.append(1))
    reg = MIRegularizer(model, ["blocks.*"], estimator=estimator, sketch=sketch, sketch_dim=4,
                        tokens_per_sample=3, weight=0.5, seed=7)
    x_all, y_all = global_batch(kind, sum(sizes))
    torch.manual_seed(1)
    reg.discover(x_all[:2])
    block_calls.clear()  # count from the training forward on
    lo = sum(sizes[:rank])
    x, y = x_all[lo:lo + sizes[rank]], y_all[lo:lo + sizes[rank]]
    # early stop off: the recompute runs each block to its end, so the MI hooks fire again
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        logits = model(x)
        task = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        task = task / (sum(sizes) * (1 if kind == "mlp" else x.shape[1])) * world * task_weight
        reg_loss, mi = reg.loss(STEP)
        (task + reg_loss).backward()
    named = list(model.named_parameters()) + [("reg." + n, p) for n, p in reg.named_parameters()]
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in named}
    if world > 1:  # what DeepSpeed does: average gradients over data-parallel ranks
        for g in grads.values():
            dist.all_reduce(g)
            g /= world
    return {"mi": mi, "grads": grads, "task": task.item(), "block_calls": len(block_calls),
            "sketches_left": len(reg._sketches) + len(reg._fired)}


def scenario_rank(rank, world, cases):
    return [objective(*c[:2], c[2], rank, world, **c[3]) for c in cases]


def single(cases):
    """The reference: one process, the concatenated global batch."""
    return [objective(c[0], c[1], [sum(c[2])], 0, 1, **c[3]) for c in cases]


def assert_same(dist_res, single_res, rtol_mi=1e-5, rtol_grad=1e-4):
    for r, res in enumerate(dist_res):
        assert res["mi"].keys() == single_res["mi"].keys()
        for pair, v in single_res["mi"].items():
            assert res["mi"][pair] == dist_res[0]["mi"][pair], f"rank {r} differs on {pair}"
            assert res["mi"][pair] == pytest.approx(v, rel=rtol_mi, abs=1e-6), pair
        for name, g in single_res["grads"].items():
            # fp32 sums over different batch splits differ in the last bits;
            # the float64 test below shows the contract itself is exact.
            atol = rtol_grad * float(g.abs().max()) + 1e-9
            torch.testing.assert_close(res["grads"][name], g, rtol=rtol_grad, atol=atol,
                                       msg=lambda m: f"rank {r} grad {name}: {m}")


def test_two_ranks_every_estimator_mlp_and_gpt():
    cases = [("mlp", est, [10, 10], {}) for est in DIFFERENTIABLE]
    cases += [("mlp", "gaussian", [10, 10], {"sketch": "learned"}),
              ("gpt", "gaussian", [4, 4], {}),
              ("gpt", "infonce", [4, 4], {"sketch": "learned"})]
    mi_only = [("mlp", est, [10, 10], {"task_weight": 0.0}) for est in DIFFERENTIABLE]
    results = run_world(2, scenario_rank, cases + mi_only)
    for i, case in enumerate(cases + mi_only):
        ref = single([case])[0]
        assert_same([results[0][i], results[1][i]], ref)
        assert any(v != 0 for v in ref["mi"].values())
        if case in mi_only:
            # the MI term alone: its gradient reaches every hooked block (a
            # detached estimate would leave them at zero) and nothing else
            for b in range(4):
                assert ref["grads"][f"blocks.{b}.fc.weight"].abs().max() > 1e-6, (case[1], b)
            assert not ref["grads"]["head.weight"].any(), case[1]


def test_unequal_local_batches_and_three_ranks_two_pairs():
    cases = [("mlp", "gaussian", [9, 5], {}),                   # 2 ranks, 9 + 5 rows
             ("mlp", "gaussian", [6, 3, 5], {"depth": 3}),            # 3 ranks, 2 pairs: rank 2 owns none
             ("mlp", "hsic", [6, 3, 5], {"depth": 3})]
    two = run_world(2, scenario_rank, cases[:1])
    assert_same([two[0][0], two[1][0]], single(cases[:1])[0])
    three = run_world(3, scenario_rank, cases[1:])
    for i, case in enumerate(cases[1:]):
        ref = single([case])[0]
        assert len(ref["mi"]) == 2
        assert_same([three[r][i] for r in range(3)], ref)


def test_world_scaling_is_exact_for_mi_only_gradients():
    """No task loss at all: the averaged gradient is the MI gradient alone,
    so an off-by-W scaling would show as a factor 2 here."""
    case = ("mlp", "gaussian", [10, 10], {"task_weight": 0.0})
    res = run_world(2, scenario_rank, [case])
    ref = single([case])[0]
    assert_same([res[0][0], res[1][0]], ref)
    assert max(g.abs().max().item() for g in ref["grads"].values()) > 1e-4


@pytest.mark.parametrize("kind", ["mlp", "gpt"])
def test_activation_checkpointing_changes_nothing(kind):
    sizes = [12]
    off = objective(kind, "gaussian", sizes, 0, 1)
    on = objective(kind, "gaussian", sizes, 0, 1, checkpointing=True)
    assert (off["block_calls"], on["block_calls"]) == (4, 8)  # the recompute ran every block again
    assert off["sketches_left"] == on["sketches_left"] == 0  # and stored no sketch
    assert on["mi"] == off["mi"]
    for name, g in off["grads"].items():
        torch.testing.assert_close(on["grads"][name], g, rtol=1e-6, atol=1e-7)


def test_activation_checkpointing_two_ranks():
    case = ("gpt", "gaussian", [4, 4], {"checkpointing": True})
    res = run_world(2, scenario_rank, [case])
    assert_same([res[0][0], res[1][0]], single([("gpt", "gaussian", [4, 4], {})])[0])


def scenario_rank_float64(rank, world, cases):
    torch.set_default_dtype(torch.float64)
    return scenario_rank(rank, world, cases)


def test_contract_is_exact_in_float64():
    """In float64 the rank-averaged gradient equals the single-process one to
    ~1e-15 relative: any residual fp32 difference is rounding, not the contract."""
    cases = [("gpt", "gaussian", [4, 4], {}), ("mlp", "renyi2", [10, 10], {}),
             ("mlp", "gaussian", [9, 5], {"task_weight": 0.0})]
    res = run_world(2, scenario_rank_float64, cases)
    torch.set_default_dtype(torch.float64)
    try:
        refs = single(cases)
    finally:
        torch.set_default_dtype(torch.float32)
    for i, ref in enumerate(refs):
        assert_same([res[0][i], res[1][i]], ref, rtol_mi=1e-12, rtol_grad=1e-10)


def accumulated(rank: int, world: int, sizes: list[int], micro: int = 2):
    """Gradient accumulation as DeepSpeed does it: each micro-batch's
    (task + MI term) / micro, gradients summed, then averaged over ranks.
    The MI term of a micro-batch is estimated on that micro-batch gathered
    over all ranks."""
    torch.manual_seed(0)
    model = make_mlp()
    reg = MIRegularizer(model, ["blocks.*"], sketch_dim=4, weight=0.5, seed=7)
    x_all, y_all = global_batch("mlp", sum(sizes) * micro)
    for m in range(micro):
        lo = m * sum(sizes) + sum(sizes[:rank])
        x, y = x_all[lo:lo + sizes[rank]], y_all[lo:lo + sizes[rank]]
        task = F.cross_entropy(model(x), y, reduction="sum") / sum(sizes) * world
        reg_loss, _ = reg.loss(STEP)
        ((task + reg_loss) / micro).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if world > 1:
        for g in grads.values():
            dist.all_reduce(g)
            g /= world
    return grads


def test_gradient_accumulation_semantics():
    res = run_world(2, accumulated, [10, 10])
    ref = accumulated(0, 1, [20])
    for name, g in ref.items():
        for r in range(2):
            torch.testing.assert_close(res[r][name], g, rtol=1e-4, atol=1e-4 * float(g.abs().max()))
    # and it is not the same as one big batch of 40 (the MI term is per micro-batch)
    big = accumulated(0, 1, [40], micro=1)
    assert any(not torch.allclose(big[n], ref[n], rtol=1e-3) for n in ref)


# -- GaussianMI.chain (batched pairs) against the per-pair estimator -------------------


class ChainNet(torch.nn.Module):
    """Five hooked blocks; `degenerate` makes block 1 a copy of block 0
    (identical layers) and block 3 constant (so block 4 is constant too)."""

    def __init__(self, degenerate: bool):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(12 if i == 0 else 16, 16), torch.nn.Tanh()) for i in range(5))
        if degenerate:
            self.blocks[1] = torch.nn.Identity()
            with torch.no_grad():
                self.blocks[3][0].weight.zero_()
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def chain_vs_per_pair(rank: int, world: int, degenerate: bool, sizes: list[int]):
    """MI-only gradients through MIRegularizer (GaussianMI.chain over the
    pairs this rank owns, rank-averaged) and, on one process, the same term
    written as a sum of per-pair GaussianMI.forward calls on the hooked
    layers' sketches. float64 throughout."""
    from mi_scale.mi.estimators import GaussianMI
    from mi_scale.mi.regularizer import TRAINING_ESTIMATOR_DEFAULTS
    from mi_scale.mi.sketch import random_projection

    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    model = ChainNet(degenerate)
    x_all, _ = global_batch("mlp", sum(sizes))
    weights = [1.0, 0.5, 2.0, 1.5]
    out = {}
    if world == 1:  # the reference, per pair
        acts = []
        hooks = [b.register_forward_hook(lambda m, a, o: acts.append(o)) for b in model.blocks]
        model(x_all)
        for h in hooks:
            h.remove()
        r = random_projection(7, 16, 4, dtype=torch.float64)
        est = GaussianMI(**TRAINING_ESTIMATOR_DEFAULTS["gaussian"])
        mi = [est(acts[p] @ r, acts[p + 1] @ r) for p in range(4)]
        (-0.5 * sum(w * m for w, m in zip(weights, mi))).backward()
        out["ref_mi"] = [m.item() for m in mi]
        out["ref_grads"] = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                            for n, p in model.named_parameters()}
        model.zero_grad()
    reg = MIRegularizer(model, ["blocks.*"], sketch_dim=4, weight=0.5, seed=7, pair_weights=weights)
    lo = sum(sizes[:rank])
    model(x_all[lo:lo + sizes[rank]])
    reg_loss, mi = reg.loss(STEP)
    reg_loss.backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    if world > 1:
        for g in grads.values():
            dist.all_reduce(g)
            g /= world
    out.update(mi=list(mi.values()), grads=grads)
    return out


@pytest.mark.parametrize("degenerate", [False, True])
def test_batched_gaussian_equals_per_pair_at_one_and_three_ranks(degenerate):
    ref = chain_vs_per_pair(0, 1, degenerate, [18])
    try:
        three = run_world(3, chain_vs_per_pair, degenerate, [7, 6, 5])
    finally:
        torch.set_default_dtype(torch.float32)
    for res in (ref, *three):  # 1 rank, then each of the 3 ranks (all see the global values)
        assert max(abs(a - b) for a, b in zip(res["mi"], ref["ref_mi"])) < 1e-6
    if degenerate:
        assert ref["ref_mi"][0] > 1.0 and abs(ref["ref_mi"][3]) < 1e-6  # identical pair; constant pair
    for res in (ref, three[0]):  # rank-averaged gradients are the same on every rank
        for name, g in ref["ref_grads"].items():
            scale = float(g.abs().max())
            assert float((res["grads"][name] - g).abs().max()) <= 1e-6 * scale + 1e-12, name
