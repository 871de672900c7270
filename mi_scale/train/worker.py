"""The per-rank training worker.

Runs unchanged under torchrun, the deepspeed launcher, a Ray Train worker,
or a plain process (which becomes a world of 1):

    python -m mi_scale.train.worker RUN_DIR/config.yaml [--resume]

run_worker = build_parts (process group, data, model + MI objective, engine,
resume, tracker) then train_loop. Per step: grad_accum micro-batches, each a
forward of model + MI term inside the DeepSpeed engine, engine.backward,
engine.step. Rank 0 logs; all ranks checkpoint together.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from mi_scale import __version__, console
from mi_scale import config as config_mod
from mi_scale.config import Config
from mi_scale.train import checkpoint, stop, throughput
from mi_scale.train.dist_env import barrier, device, init_process_group
from mi_scale.train.shared_dir import RunDirView
from mi_scale.train.tracking import Tracker, truncate_metrics


class InjectedFault(RuntimeError):
    """Raised by the test-only fault knob (fault.fail_at_step)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_objective(cfg: Config, bundle, world: int):
    """Model + MI regularizer for the data in `bundle`, and the DeepSpeed
    JSON sized for that model.

    A meta-device twin of the model (no memory) gives the shapes that size
    DeepSpeed's buffers and the hooked layers' order and widths; the real
    model is built partitioned at ZeRO-3 (train/engine.py), so it is never
    whole on any rank."""
    from mi_scale.mi import MIRegularizer
    from mi_scale.models import build_model, default_hook_patterns
    from mi_scale.train.engine import deepspeed_config, partitioned_init
    from mi_scale.train.memory import ModelShape
    from mi_scale.train.objective import Objective

    def build(device=None):
        return build_model(cfg.model, input_dim=bundle.input_dim, num_classes=bundle.num_classes,
                           vocab_size=bundle.vocab_size, seq_len=bundle.seq_len, device=device)

    twin = build("meta")
    ds_conf = deepspeed_config(cfg, world, ModelShape.of(twin))
    with partitioned_init(cfg, ds_conf):
        model = build()
    if cfg.model.init_from:
        from mi_scale.train import init_from
        model.init_report = init_from.load(model, cfg.model.kind, cfg.model.init_from)
        if model.init_report["sha256"]:  # rank 0
            r = model.init_report
            console.say(f"[mi-scale] init_from {r['path']}: {r['tensors']} tensors, {r['values'] / 1e6:.2f}M values "
                        f"in {r['seconds']:.1f} s, sha256 {r['sha256']}")
    model.activation_checkpointing = cfg.train.activation_checkpointing
    layers = cfg.mi.layers
    if cfg.model.kind == "hf" and layers == ["blocks.*"]:
        layers = default_hook_patterns(cfg.model, model)
    m = cfg.mi
    reg = MIRegularizer(model, layers, estimator=m.estimator, sketch=m.sketch, sketch_dim=m.sketch_dim,
                        tokens_per_sample=m.tokens_per_sample, weight=m.weight, seed=cfg.run.seed,
                        every=m.every, log_every=m.log_every, warmup_steps=m.warmup_steps,
                        pair_weights=m.pair_weights, estimator_kwargs=m.estimator_kwargs,
                        on_nonfinite=m.on_nonfinite)
    # creates learned sketches / critics before the optimizer exists
    reg.discover(bundle.train[:2]["x"].to("meta"), shape_model=twin)
    control = None
    if m.control == "deep_supervision":
        from mi_scale.train.control import DeepSupervision
        widths = DeepSupervision.widths(twin, reg.layer_names, bundle.train[:2]["x"].to("meta"))
        control = DeepSupervision(widths, bundle.num_classes or bundle.vocab_size)
        control.attach(model)
    return Objective(model, reg, bundle.task, control), ds_conf


@torch.no_grad()
def evaluate(engine, test_set, cfg: Config, rank: int, world: int) -> dict:
    """Held-out loss and accuracy (classification) or perplexity (LM), over
    the whole test split (or eval_batches global batches), sharded by rank."""
    from mi_scale.data import ShardedBatches

    batches = ShardedBatches(test_set, cfg.data.batch_size, rank, world, seed=0, shuffle=False, drop_last=False)
    n_batches = batches.batches_per_epoch
    if cfg.train.eval_batches:
        n_batches = min(n_batches, cfg.train.eval_batches)
    was_training = engine.module.training
    engine.module.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device())
    for _ in range(n_batches):
        b = batches.next_batch()  # may be empty on some ranks at the end: still run the
        # forward, because ZeRO-3 gathers parameters collectively inside it
        loss, correct, count = engine.module.evaluate_batch(b["x"].to(device()), b["y"].to(device()))
        totals += torch.tensor([loss, correct, count], dtype=torch.float64, device=device())
    engine.module.train(was_training)
    if world > 1:
        dist.all_reduce(totals)
    loss_sum, correct, count = totals.tolist()
    out = {"split": "eval", "eval_loss": loss_sum / max(count, 1)}
    if engine.module.task == "classify":
        out["eval_accuracy"] = correct / max(count, 1)
    else:
        out["eval_ppl"] = float(np.exp(min(out["eval_loss"], 50)))
    return out


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    from mi_scale.train.memory import peak_rss_bytes
    return peak_rss_bytes() / 2**20


def run_worker(cfg: Config, resume: bool = False, on_checkpoint=None, stop_flag=None,
               run_dir_view: RunDirView = RunDirView(leader=0, shared=True)) -> dict:
    """Train on this rank. `on_checkpoint(path, step, metrics)` is the
    orchestrator's hook (Ray reports the checkpoint), called on every rank
    after each checkpoint; `stop_flag` the driver's stop request (train/stop.py);
    `run_dir_view` which ranks share this rank's run dir (checkpoint.save).
    Returns the final summary (same on every rank); after a stop request it
    holds "interrupted": {"step", "signal", "checkpoint"}."""
    return train_loop(build_parts(cfg, resume), on_checkpoint, stop_flag, run_dir_view)


@dataclass
class Parts:
    """What the step loop uses, built once by build_parts: building the parts
    apart from the loop that uses them (as torchtitan's trainer does)."""
    cfg: Config
    rank: int
    world: int
    run_dir: Path
    dev: torch.device
    bundle: Any  # data.DataBundle
    objective: Any  # train.objective.Objective
    engine: Any  # the DeepSpeed engine wrapping the objective
    batches: Any  # data.ShardedBatches, at the resumed position
    tracker: Optional[Tracker]  # rank 0 only
    start_step: int
    samples_seen: int
    tokens_per_sample: int
    flops_per_step: float
    peak: Optional[float]  # peak FLOP/s per rank that all ranks agree on; None when unknown


def build_parts(cfg: Config, resume: bool = False) -> Parts:
    """Process group, data, model + MI objective, DeepSpeed engine, the resumed
    checkpoint (another world size resharded), tracker and throughput
    constants; ends with the `workers set up` line."""
    from mi_scale.data import ShardedBatches, build_data
    from mi_scale.train.engine import build_engine, check_nvme_offload

    t_setup = t_mark = time.perf_counter()
    parts: list[str] = []  # "what seconds": the breakdown of the `workers set up` line

    def mark(what: str) -> None:
        nonlocal t_mark
        now = time.perf_counter()
        parts.append(f"{what} {now - t_mark:.1f}")
        t_mark = now

    check_nvme_offload(cfg)
    rank, world = init_process_group()
    mark("process group")
    run_dir = cfg.run_dir()
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()

    reshard = None
    if resume:  # another world size than the checkpoint's: keep the global batch (train/reshard.py)
        from mi_scale.train import reshard as reshard_mod
        reshard = reshard_mod.plan(cfg, world)
    seed_everything(cfg.run.seed)  # identical model init on every rank
    bundle = build_data(cfg.data, cfg.run.seed)
    mark("data")
    objective, ds_conf = build_objective(cfg, bundle, world)
    mark("model")
    if reshard is not None:
        ds_conf = reshard_mod.deepspeed_config(ds_conf, cfg)
    engine = build_engine(cfg, objective, ds_conf)
    mark("engine")
    batches = ShardedBatches(bundle.train, cfg.data.batch_size, rank, world, cfg.run.seed, cfg.data.shuffle)
    seed_everything(cfg.run.seed * 1000 + rank + 1)  # per-rank streams (dropout)

    start_step, samples_seen = 0, 0
    if resume:
        t_load = time.perf_counter()
        meta, rank_state = checkpoint.load_latest(engine, run_dir, world, cfg.training_keys(),
                                                   elastic=reshard is not None)
        t_load = time.perf_counter() - t_load
        if meta is not None:
            start_step, samples_seen = meta["step"], meta["samples_seen"]
            batches.load_state_dict(rank_state["data"])
            if meta["world_size"] == world:
                checkpoint.set_rng_state(rank_state["rng"])
            else:
                reshard_mod.reseed(cfg.run.seed, rank, start_step)
            if rank == 0:
                if reshard is not None:
                    console.say(reshard.message())
                console.event("resumed", step=start_step, line=(
                    f"[mi-scale] resumed from {run_dir / 'checkpoints' / meta['tag']} at step {start_step} "
                    f"(loaded in {t_load:.1f} s)"))
        elif rank == 0:
            console.event("resumed", step=0, line=(
                f"[mi-scale] no valid checkpoint in {run_dir / 'checkpoints'}: starting at step 0"))
    tracker = None
    if rank == 0:  # only now, after the checkpoint proved compatible, touch the run dir's files
        config_mod.save(cfg, run_dir / "config.yaml")
        truncate_metrics(run_dir, start_step)
        tracker = Tracker(run_dir, cfg.to_dict(), cfg.train.steps, start_step, cfg.tracking.wandb,
                          cfg.tracking.project, cfg.run.group, cfg.tracking.heatmap_every)
    mark("checkpoint and tracking")

    t, dev = cfg.train, device()
    tokens_per_sample = bundle.seq_len or 1
    # Throughput: model FLOPs of one optimizer step (module docstring of
    # throughput.py) and one peak FLOP/s that all ranks agree on; mfu is
    # left out of the rows when the peak is unknown (a GPU not in the table).
    flops_per_step = throughput.flops_per_step(
        throughput.model_flops_per_token(objective.model, seq_len=bundle.seq_len),
        cfg.data.batch_size, t.grad_accum, world, tokens_per_sample)
    peak = throughput.agreed_peak_flops_per_s(dev, torch.bfloat16 if engine.bfloat16_enabled() else torch.float32)
    if rank == 0 and peak is None:
        console.say("[mi-scale] no peak FLOP/s known for this device: set MI_SCALE_PEAK_FLOPS (per rank) "
                    "to log mfu")
    mark("peak FLOP/s")
    if rank == 0:
        console.phase("workers set up", detail=f"{t_mark - t_setup:.1f} s: " + ", ".join(parts))
    return Parts(cfg, rank, world, run_dir, dev, bundle, objective, engine, batches, tracker, start_step,
                 samples_seen, tokens_per_sample, flops_per_step, peak)


def train_loop(p: Parts, on_checkpoint=None, stop_flag=None,
               run_dir_view: RunDirView = RunDirView(leader=0, shared=True)) -> dict:
    """The step loop: train, log, evaluate and checkpoint until train.steps or
    an agreed stop; returns the summary (run_worker's)."""
    cfg, rank, world, run_dir, dev = p.cfg, p.rank, p.world, p.run_dir, p.dev
    bundle, objective, engine, batches, tracker = p.bundle, p.objective, p.engine, p.batches, p.tracker
    start_step, samples_seen, tokens_per_sample = p.start_step, p.samples_seen, p.tokens_per_sample
    flops_per_step, peak = p.flops_per_step, p.peak
    t = cfg.train
    last_eval: dict = {}
    if cfg.model.init_from and start_step == 0:  # where the loaded weights start
        last_eval = evaluate(engine, bundle.test, cfg, rank, world)
        if tracker is not None:
            tracker.log(0, last_eval)
            console.say("eval  init   | " + " | ".join(f"{k} {v:.4f}" for k, v in last_eval.items() if k != "split"))
    stop.install_handlers()  # a no-op off the main thread (Ray installs them: network.py's backend)
    stopping = stop.StopAgreement(stop_flag)
    interrupted = None
    try:
        for step in range(start_step, t.steps):
            _maybe_inject_fault(cfg, run_dir, rank, step)
            if step == cfg.fault.wait_for_stop_at_step and rank == cfg.fault.fail_rank:
                stopping.wait_here(run_dir / f".fault-waiting-step{step}-rank{rank}")
            t0 = time.perf_counter()
            pos = batches.state_dict()
            data_batch = pos["epoch"] * batches.batches_per_epoch + pos["batch_in_epoch"]
            sums = torch.zeros(3, dtype=torch.float64, device=dev)
            mi_values: dict[str, float] = {}
            for _ in range(t.grad_accum):
                b = batches.next_batch()
                # The regularizer sees the logged (1-based) step number, so its
                # mi.every / mi.log_every steps line up with train.log_every.
                loss, task_loss, reg_loss, mi = engine(b["x"].to(dev), b["y"].to(dev), step + 1)
                engine.backward(loss)
                engine.step()
                sums += torch.stack([loss.detach(), task_loss, reg_loss]).double()
                for k, v in mi.items():  # MI of each micro-batch; logged as their mean
                    mi_values[k] = mi_values.get(k, 0.0) + v / t.grad_accum
            mem_mb = torch.tensor([_peak_memory_mb()], dtype=torch.float64, device=dev)
            if world > 1:
                dist.all_reduce(sums)
                dist.all_reduce(mem_mb, op=dist.ReduceOp.MAX)
            sums /= world * t.grad_accum
            step_time = time.perf_counter() - t0
            done = step + 1
            samples_seen += cfg.data.batch_size * t.grad_accum * world
            row = {"split": "train", "loss": sums[0].item(), "task_loss": sums[1].item(), "mi_loss": sums[2].item(),
                   "lr": engine.get_lr()[0], "step_time_s": step_time,
                   "samples_per_s": cfg.data.batch_size * t.grad_accum * world / step_time,
                   "tokens_per_s": cfg.data.batch_size * t.grad_accum * world * tokens_per_sample / step_time,
                   "samples_seen": samples_seen, "data_batch": data_batch, "peak_mem_mb": _peak_memory_mb(),
                   "peak_mem_mb_max_rank": mem_mb.item(), "flops_per_step": flops_per_step}
            if peak is not None:  # on every row, so each row stands alone
                row.update(peak_flops_per_s=peak, mfu=throughput.mfu(flops_per_step, step_time, peak, world))
            gn = engine.get_global_grad_norm()
            if gn is not None:
                row["grad_norm"] = float(gn)
            if cfg.mi.on_nonfinite == "skip":  # MI terms dropped for NaN/Inf so far in this process
                row["mi_skipped_nonfinite"] = objective.regularizer.skipped_nonfinite
            row.update(engine.module.extras)  # mi.control's matched gradient norms
            if mi_values:
                row.update({f"mi/{k}": v for k, v in mi_values.items()})
                row["mi_mean"] = sum(mi_values.values()) / len(mi_values)
            if tracker is not None:
                if step == start_step:
                    console.phase("first step", detail=f"step {done}")
                tracker.log(done, row)
                if done % t.log_every == 0 or done == t.steps:
                    tracker.progress(done, row)
                tracker.heatmap(done)
            signum = stopping.agreed(dev)  # every rank stops at this step boundary, or none
            if done % t.eval_every == 0 or done == t.steps:
                last_eval = evaluate(engine, bundle.test, cfg, rank, world)
                if tracker is not None:
                    tracker.log(done, last_eval)
                    console.say(f"eval  {done:>6}/{t.steps} | " + " | ".join(
                        f"{k} {v:.4f}" for k, v in last_eval.items() if k != "split"))
            if done % t.checkpoint_every == 0 or done == t.steps or signum:
                meta = {"samples_seen": samples_seen, "world_size": world, "config_hash": cfg.training_hash(),
                        "training_keys": cfg.training_keys(), "wandb_id": tracker.wandb_id if tracker else None,
                        "version": __version__}  # data position and RNG: per rank, in rank-XXXX.pt
                t_save = time.perf_counter()
                path = checkpoint.save(engine, run_dir, done, meta,
                                       {"rng": checkpoint.rng_state(), "data": batches.state_dict()}, t.keep_last,
                                       kill_at=cfg.fault.kill_during_checkpoint, view=run_dir_view)
                if rank == 0:
                    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                    console.say(f"[mi-scale] checkpoint {path.name}: {size / 2**30:.2f} GiB, saved in "
                                f"{time.perf_counter() - t_save:.1f} s")
                if on_checkpoint is not None:
                    on_checkpoint(path, done, {**row, **last_eval})
            if signum:
                interrupted = {"step": done, "signal": signum, "checkpoint": path.name}
                break
        if cfg.tracking.log_model and tracker is not None and t.steps > start_step and interrupted is None:
            from mi_scale.export import log_model
            log_model(tracker, run_dir)  # the final checkpoint, just written by every rank
    finally:
        if tracker is not None:
            tracker.heatmap(t.steps, force=True)
            tracker.close()
    final_mi = {k: v for k, v in row.items() if k.startswith("mi/")} if t.steps > start_step else {}
    summary = {"run_dir": str(run_dir), "steps": t.steps, "world_size": world, **last_eval, **final_mi}
    if interrupted is not None:
        summary["interrupted"] = interrupted
    return summary


def _maybe_inject_fault(cfg: Config, run_dir: Path, rank: int, step: int) -> None:
    """Test-only: rank fault.fail_rank raises once when reaching fault.fail_at_step,
    kills its own process with SIGKILL once at fault.kill_at_step, or stalls
    once at fault.stall_at_step."""
    f = cfg.fault

    def first_time(kind: str, at: int) -> bool:  # each fault fires once per run dir
        marker = run_dir / f".fault-{kind}-step{at}-rank{f.fail_rank}"
        if marker.exists():
            return False
        marker.write_text("1")
        return True

    if rank != f.fail_rank:
        return
    if step == f.stall_at_step and first_time("stalled", step):
        while True:
            time.sleep(1)
    if step == f.kill_at_step and first_time("killed", step):
        os.kill(os.getpid(), signal.SIGKILL)
    if step != f.fail_at_step or not first_time("injected", step):
        return
    raise InjectedFault(f"injected fault on rank {rank} at step {step} (fault.fail_at_step)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="mi-scale per-rank worker (torchrun / deepspeed / plain)")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--resume", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by the deepspeed launcher; LOCAL_RANK env is used
    args = p.parse_args(argv)
    cfg = config_mod.load(args.config, args.overrides)
    summary = run_worker(cfg, resume=args.resume)
    if dist.is_initialized():
        if dist.get_rank() == 0:
            print(json.dumps({"summary": summary}), flush=True)
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
