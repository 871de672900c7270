"""Scale: partitioned (ZeRO-3) model builds, memory-sized DeepSpeed buffers,
and the MI contract with partitioned parameters, on real gloo ranks."""

from __future__ import annotations

import json
import resource

import pytest
import torch
import torch.nn.functional as F

from distributed_helpers import run_world
from mi_scale import config as config_mod
from mi_scale.models import build_gpt
from mi_scale.train.memory import ModelShape, bucket_elements, persistence_threshold, zero_settings

pytestmark = pytest.mark.slow


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _ds_conf(stage: int, shape: ModelShape, world: int) -> dict:
    from mi_scale.train.engine import deepspeed_config
    cfg = config_mod.load(None, [f"deepspeed.zero_stage={stage}", "data.batch_size=2"])
    return deepspeed_config(cfg, world, shape)


# -- buffer sizing (pure) ------------------------------------------------------


def test_buckets_follow_the_model_not_gpu_defaults():
    gib = 1 << 30
    big = ModelShape(params=1_007_000_000, largest_param=2048 * 8192)
    # two of the largest tensors, under 2% of a 12 GiB rank
    assert bucket_elements(big, 12 * gib) == 2 * 2048 * 8192
    # a small rank caps the bucket by memory, but never below one whole tensor
    assert bucket_elements(big, 1 * gib) == 2048 * 8192
    small = ModelShape(params=800_000, largest_param=128 * 512)
    assert bucket_elements(small, 12 * gib) == 1 << 20  # the floor
    assert persistence_threshold(big) == 100_000 and persistence_threshold(small) == 800
    z3 = zero_settings(big, 3, 12 * gib)
    assert z3["stage3_max_live_parameters"] == 4 * 2048 * 8192
    assert z3["sub_group_size"] == z3["reduce_bucket_size"] == 2 * 2048 * 8192
    assert zero_settings(big, 2, 12 * gib) == {"reduce_bucket_size": 2 * 2048 * 8192,
                                              "allgather_bucket_size": 2 * 2048 * 8192}
    assert all(v < 5e8 for v in z3.values())  # DeepSpeed's GPU default is 5e8 elements


def test_explicit_bucket_and_offload_reach_the_deepspeed_json(tmp_path):
    from mi_scale.train.engine import deepspeed_config
    cfg = config_mod.load(None, ["deepspeed.zero_stage=3", "deepspeed.bucket_elements=3000000",
                                 "deepspeed.offload_optimizer=nvme", f"run.output_dir={tmp_path}"])
    conf = deepspeed_config(cfg, 2, ModelShape(params=10**8, largest_param=10**6))
    z = conf["zero_optimization"]
    assert z["reduce_bucket_size"] == z["stage3_prefetch_bucket_size"] == 3_000_000
    assert z["offload_optimizer"]["device"] == "nvme"
    assert z["offload_optimizer"]["nvme_path"] == str(tmp_path / "mnist1d-mlp" / "offload")
    assert conf["bf16"] == {"enabled": False}  # precision auto on a CPU is fp32
    old = config_mod.load(None, ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true"])
    assert old.deepspeed.offload_optimizer == "cpu"  # booleans of earlier configs still mean cpu


# -- partitioned builds on 2 ranks ----------------------------------------------


def _partitioned_equals_full(rank, world):
    import deepspeed

    from mi_scale.models import DeepMLP
    from mi_scale.train.dist_env import init_process_group
    init_process_group()  # DeepSpeed's comm layer over the group, as every worker sets it up
    out = {}
    for name, make in {"gpt": lambda: build_gpt("gpt-1m", vocab_size=64, seq_len=16),
                       "mlp": lambda: DeepMLP(12, 5, depth=3, width=24)}.items():
        torch.manual_seed(5)
        full = make()
        torch.manual_seed(5)
        shape = ModelShape.of(full)
        with deepspeed.zero.Init(config_dict_or_path=_ds_conf(3, shape, world)):
            part = make()
        n_partitioned = sum(1 for p in part.parameters() if p.numel() < p.ds_numel)
        same = []
        for (n, p), (_, q) in zip(part.named_parameters(), full.named_parameters()):
            with deepspeed.zero.GatheredParameters([p]):
                same.append((n, torch.equal(p.data, q.data)))
        out[name] = (n_partitioned, same)
    return out


def test_partitioned_build_equals_full_build_for_the_same_seed():
    for res in run_world(2, _partitioned_equals_full):
        for name, (n_partitioned, same) in res.items():
            assert n_partitioned > 0, name  # the build really was sharded
            assert [n for n, ok in same if not ok] == [], name


def _build_gpt125m_partitioned(rank, world):
    import deepspeed

    from mi_scale.train.dist_env import init_process_group
    init_process_group()  # as every worker does, freed memory returned to the OS included
    shape = ModelShape.of(build_gpt("gpt-125m", device="meta"))
    conf = _ds_conf(3, shape, world)
    torch.manual_seed(0)
    before, peak_before = _rss_bytes(), _peak_rss_bytes()
    with deepspeed.zero.Init(config_dict_or_path=conf):
        model = build_gpt("gpt-125m")  # GPT-2 small: 50304 vocab, 1024 positions
    grown = _peak_rss_bytes() - max(before, peak_before) if _peak_rss_bytes() > peak_before else 0
    held = sum(p.ds_tensor.numel() for p in model.parameters()) * 4
    return {"full_bytes": shape.params * 4, "peak_growth": max(grown, _rss_bytes() - before), "held": held}


def test_zero3_build_of_gpt125m_never_holds_the_whole_model():
    for r in run_world(2, _build_gpt125m_partitioned):
        assert r["full_bytes"] > 480e6  # 124M fp32 parameters
        assert r["held"] == pytest.approx(r["full_bytes"] / 2, rel=0.01)  # this rank's half
        assert r["peak_growth"] < 0.6 * r["full_bytes"], (r["peak_growth"] / 2**20, r["full_bytes"] / 2**20)


# -- the MI contract with partitioned parameters --------------------------------


def _cfg(*extra):
    return config_mod.load(None, ["model.kind=gpt", "model.preset=gpt-1m", "data.name=text", "data.seq_len=16",
                                  "data.batch_size=4", "mi.sketch_dim=4", "mi.tokens_per_sample=3",
                                  "mi.weight=0.5", "train.grad_clip=0", "train.warmup_steps=0",
                                  "train.eval_batches=2", "tracking.wandb=disabled", *extra])


def _global_batch(n):
    g = torch.Generator().manual_seed(123)
    x = torch.randint(0, 256, (n, 16), generator=g)
    return x, torch.roll(x, -1, dims=1)


def _zero3_grads(rank, world, extra):
    """One forward/backward through a real ZeRO-3 engine built partitioned;
    returns the MI values and the full (rank-averaged) gradients."""
    from deepspeed.utils import safe_get_full_grad

    from mi_scale.data import build_data
    from mi_scale.train.dist_env import init_process_group
    from mi_scale.train.engine import build_engine
    from mi_scale.train.worker import build_objective, seed_everything

    init_process_group()
    cfg = _cfg("deepspeed.zero_stage=3", *extra)
    seed_everything(cfg.run.seed)
    objective, conf = build_objective(cfg, build_data(cfg.data, cfg.run.seed), world)
    assert any(p.numel() < p.ds_numel for p in objective.model.parameters())  # built partitioned
    engine = build_engine(cfg, objective, conf)
    x, y = _global_batch(4 * world)
    loss, _, _, mi = engine(x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4], 3)
    engine.backward(loss)
    grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
    return {"mi": mi, "grads": grads}


def _reference(extra):
    """The same objective in one process on the concatenated batch, no DeepSpeed."""
    from mi_scale.data import build_data
    from mi_scale.train.worker import build_objective, seed_everything

    cfg = _cfg("deepspeed.zero_stage=0", *extra)
    seed_everything(cfg.run.seed)
    objective, _ = build_objective(cfg, build_data(cfg.data, cfg.run.seed), 1)
    x, y = _global_batch(8)
    loss, _, _, mi = objective(x, y, 3)
    loss.backward()
    return {"mi": mi, "grads": {n: p.grad for n, p in objective.named_parameters()}}


@pytest.mark.parametrize("extra", [(), ("train.activation_checkpointing=true", "mi.sketch=learned")],
                         ids=["plain", "checkpointing+learned"])
def test_zero3_partitioned_mi_values_and_grads_equal_single_process(extra):
    ref = _reference(list(extra))
    for res in run_world(2, _zero3_grads, list(extra)):
        assert res["mi"].keys() == ref["mi"].keys() and len(ref["mi"]) == 3
        for pair, v in ref["mi"].items():
            assert res["mi"][pair] == pytest.approx(v, rel=1e-5, abs=1e-6), pair
        assert res["grads"].keys() == ref["grads"].keys()
        for name, g in ref["grads"].items():
            atol = 1e-4 * float(g.abs().max()) + 1e-9
            torch.testing.assert_close(res["grads"][name], g, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")


def test_hooks_keep_only_sampled_tokens_and_recompute_agrees():
    from mi_scale.mi import MIRegularizer

    torch.manual_seed(0)
    model = build_gpt("gpt-1m", vocab_size=64, seq_len=32)
    model.activation_checkpointing = True
    reg = MIRegularizer(model, ["blocks.*"], sketch_dim=4, tokens_per_sample=3, weight=0.5)
    block_calls = []
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: block_calls.append(i))
    x = torch.randint(0, 64, (5, 32))
    reg.set_step(7)
    # early stop off: the recompute runs each block to its end, so the block hooks fire again
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        logits = model(x)
        assert {tuple(s.shape) for s in reg._sketches.values()} == {(5 * 3, 4)}  # n x P rows, k dims
        loss, mi = reg.loss(7)
        (F.cross_entropy(logits.reshape(-1, 64), x.reshape(-1)) + loss).backward()  # recompute: same tokens
    assert block_calls == [0, 1, 2, 3, 3, 2, 1, 0]  # forward, then the recompute in backward
    assert reg._sketches == {} and reg._fired == []  # the recompute's hooks stored nothing
    # the same values as selecting after projecting all 32 tokens
    reg2 = MIRegularizer(model, ["blocks.*"], sketch_dim=4, tokens_per_sample=3, weight=0.5)
    reg.remove()
    model(x)
    _, mi2 = reg2.loss(7)
    assert mi == pytest.approx(mi2, rel=1e-5)
    reg2.set_step(8)
    model(x)
    with pytest.raises(ValueError, match=r"loss\(step=9\) after set_step\(8\)"):
        reg2.loss(9)


# -- ZeRO-Infinity: optimizer state in files ------------------------------------


def _libaio_ok() -> bool:
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder
        return AsyncIOBuilder().is_compatible(verbose=False)
    except Exception:  # noqa: BLE001 - no deepspeed op builder: no NVMe offload
        return False


def _nvme_runs(tmp_path):
    """An uninterrupted NVMe-offloaded run and one that fails after its
    step-3 checkpoint and resumes; returns both runs' train losses."""
    from mi_scale.train.worker import InjectedFault, run_worker

    def cfg(name, *extra):
        return _cfg("deepspeed.zero_stage=3", "deepspeed.offload_optimizer=nvme", "train.steps=6",
                    "train.checkpoint_every=3", "train.eval_every=6", "train.lr=0.01",
                    f"run.output_dir={tmp_path}", f"run.name={name}", *extra)

    full = cfg("full")
    run_worker(full)
    assert any((full.run_dir() / "offload").rglob("*.swp"))  # the optimizer state lived in files
    part = cfg("part", "fault.fail_at_step=3")
    with pytest.raises(InjectedFault):
        run_worker(part)
    run_worker(part, resume=True)
    losses = []
    for c in (full, part):
        rows = [json.loads(x) for x in (c.run_dir() / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if r["split"] == "train"]
        assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]  # each step once
        losses.append([r["task_loss"] for r in train])
    return losses


@pytest.mark.skipif(not _libaio_ok(), reason="NVMe offload needs libaio (make setup installs it as root)")
def test_nvme_offload_trains_and_resumes(tmp_path):
    a, b = _nvme_runs(tmp_path)
    assert a[-1] < a[0] - 0.5  # it learns
    # The resumed run continues exactly: DeepSpeed restores the swapped Adam
    # moments from its offload files, checkpoint.py the state that stayed
    # resident (each sub-group's Adam step, too-small sub-groups).
    assert b == a


def _resume(rank, world, cfg_dict):
    from mi_scale.train.worker import run_worker
    run_worker(config_mod.from_dict(cfg_dict), resume=True)


@pytest.mark.skipif(not _libaio_ok(), reason="NVMe offload needs libaio (make setup installs it as root)")
def test_nvme_offload_refuses_to_resume_at_another_world_size(tmp_path):
    from mi_scale.train.worker import run_worker

    cfg = _cfg("deepspeed.zero_stage=3", "deepspeed.offload_optimizer=nvme", "train.steps=2",
               "train.checkpoint_every=2", "train.eval_every=2", f"run.output_dir={tmp_path}", "run.name=nvme")
    run_worker(cfg)
    before = (cfg.run_dir() / "metrics.jsonl").read_text()
    with pytest.raises(AssertionError) as e:
        run_world(2, _resume, cfg.to_dict())
    ckpt = cfg.run_dir() / "checkpoints" / "step-00000002"
    assert (f"UserError: cluster.num_workers: invalid value 2: checkpoint {ckpt} was written by 1 ranks with NVMe "
            f"offload, whose optimizer state DeepSpeed cannot reshard; resume with cluster.num_workers=1") \
        in str(e.value)
    assert (cfg.run_dir() / "metrics.jsonl").read_text() == before
    assert not (ckpt / "universal").exists()


def test_nvme_offload_without_libaio_is_a_clear_error(tmp_path, monkeypatch):
    from deepspeed.ops.op_builder import AsyncIOBuilder

    from mi_scale.errors import UserError
    from mi_scale.train.engine import check_nvme_offload

    # the one way to see this machine without libaio: the builder's own check says no
    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: False)
    cfg = config_mod.load(None, ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=nvme"])
    with pytest.raises(UserError) as e:
        check_nvme_offload(cfg)
    assert str(e.value) == ("deepspeed.offload_optimizer: invalid value 'nvme': DeepSpeed's async I/O op needs "
                            "libaio, which is not installed; install it (apt-get install libaio-dev; `make setup` "
                            "does as root) or offload to 'cpu'")


def test_stale_op_build_lock_is_named_fresh_one_is_not(tmp_path, monkeypatch, capsys):
    """torch's JIT build waits forever on a lock a killed build left behind."""
    import os

    from mi_scale.train.engine import warn_if_stale_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "async_io" / "lock"
    lock.parent.mkdir()
    lock.touch()
    warn_if_stale_build_lock("async_io")  # a build may be running right now: no warning
    assert capsys.readouterr().out == ""
    os.utime(lock, (lock.stat().st_atime, lock.stat().st_mtime - 3600))
    warn_if_stale_build_lock("async_io")
    assert capsys.readouterr().out == (
        f"[mi-scale] warning: {lock} is 60 min old and DeepSpeed's async_io op build waits on it; if no build "
        f"is running, a build killed midway left it: delete it\n")


def _zero3_checkpointed_run(rank, world, cfg_dict):
    from mi_scale.train.worker import run_worker
    cfg = config_mod.from_dict(cfg_dict)
    run_worker(cfg)
    return [json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()] if rank == 0 else None


def test_zero3_checkpointing_with_measure_only_and_skipped_mi_steps(tmp_path):
    """Steps without the term's gradient (mi.every=2: measured on odd steps
    here, skipped in the second run) used to leave a sketch branch off each
    block's output that broke ZeRO-3's recompute in backward."""
    for log_every in (1, 2):
        cfg = _cfg("deepspeed.zero_stage=3", "train.activation_checkpointing=true", "mi.every=2",
                   f"mi.log_every={log_every}", "train.steps=4", "train.eval_every=4", "train.checkpoint_every=4",
                   f"run.output_dir={tmp_path}", f"run.name=log{log_every}")
        rows = run_world(2, _zero3_checkpointed_run, cfg.to_dict())[0]
        train = [r for r in rows if r["split"] == "train"]
        assert [r["step"] for r in train] == [1, 2, 3, 4]
        with_term = [r["step"] for r in train if r["mi_loss"] != 0]
        measured = [r["step"] for r in train if "mi_mean" in r]
        assert with_term == [2, 4]
        assert measured == ([1, 2, 3, 4] if log_every == 1 else [2, 4])
