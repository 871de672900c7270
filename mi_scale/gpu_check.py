"""`mi-scale bench gpu` (what scripts/gpu-check.sh runs): checks that need a CUDA GPU.

(a) bf16 training of GPT presets (default gpt-350m and gpt-1.3b; byte vocab
    256, the bundled text, seq 1024, activation checkpointing, one rank,
    ZeRO-0) with the MI term off, then on, back to back in one process:
    step time (median of the timed steps), tokens/s, MFU against the GPU's
    datasheet bf16 peak (train/throughput.py), peak GPU memory
    (torch.cuda.max_memory_allocated) and the MI overhead ratio
    (median step time on / off). "Off" has the regularizer's hooks removed:
    no sketching, no estimator.
(b) every estimator on the same synthetic data (correlated Gaussians) on
    CUDA and on CPU: both values and their difference.

It also prints a measured bf16 matmul rate next to the datasheet peak, as a
check of the table. On a machine without CUDA it stops with one error line.
"""

from __future__ import annotations

import copy
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from mi_scale.errors import UserError

ESTIMATORS = ("gaussian", "renyi2", "hsic", "ksg", "infonce")
DEFAULT_SIZES = ("gpt-350m", "gpt-1.3b")


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise UserError(
            f"the GPU check needs a CUDA GPU, and torch {torch.__version__} sees none "
            f"(torch.version.cuda={torch.version.cuda}): run scripts/gpu-check.sh on a machine with an "
            f"NVIDIA GPU; it installs a CUDA torch with MI_SCALE_TORCH=gpu bash scripts/setup.sh")


# -- (b) estimators: CUDA vs CPU --------------------------------------------------------


def estimator_agreement(device: str = "cuda", n: int = 1024, d: int = 8, total_mi: float = 1.0) -> list[dict]:
    """Each estimator on the same (x, y) on CPU and on `device`; infonce with
    the same critic weights on both."""
    from mi_scale.mi import estimators
    from mi_scale.mi.synthetic import correlated_gaussians

    x_ND, y_ND = correlated_gaussians(n, d, total_mi, seed=0)
    rows = []
    for name in ESTIMATORS:
        torch.manual_seed(0)
        est = estimators.build(name, x_dim=d) if name == "infonce" else estimators.build(name)
        est_dev = copy.deepcopy(est).to(device)
        with torch.no_grad():
            cpu = float(est(x_ND, y_ND))
            dev = float(est_dev(x_ND.to(device), y_ND.to(device)))
        rows.append({"estimator": name, "cpu": cpu, device: dev, "abs_diff": abs(dev - cpu), "true_mi": total_mi})
    return rows


# -- (a) bf16 GPT training, MI off / on ---------------------------------------------------


def _config(preset: str, seq_len: int, batch: int, mi_on: bool, zero_stage: int, precision: str, ckpt: bool,
            out: Path):
    from mi_scale import config as config_mod

    return config_mod.load(None, [
        f"run.output_dir={out}", f"run.name=gpu-{preset}", "model.kind=gpt", f"model.preset={preset}",
        "data.name=text", f"data.seq_len={seq_len}", f"data.batch_size={batch}", f"train.precision={precision}",
        f"train.activation_checkpointing={str(ckpt).lower()}", "train.warmup_steps=0",
        f"deepspeed.zero_stage={zero_stage}", "mi.estimator=gaussian", "mi.sketch_dim=16", "mi.tokens_per_sample=8",
        f"mi.weight={0.001 if mi_on else 0.0}", f"mi.log_every={1 if mi_on else 10**9}",
        "tracking.wandb=disabled"])


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_variant(preset: str, mi_on: bool, seq_len: int = 1024, batch: int = 8, steps: int = 8,
                  warmup: int = 2, zero_stage: int = 0, precision: str = "bf16", activation_checkpointing: bool = True,
                  out: Path = Path("runs/bench/gpu")) -> dict:
    """`warmup` + `steps` training steps of one GPT through our objective and
    DeepSpeed engine on this process's device (a world of 1)."""
    from mi_scale.data import ShardedBatches, build_data
    from mi_scale.train import throughput
    from mi_scale.train.dist_env import device, init_process_group
    from mi_scale.train.engine import build_engine
    from mi_scale.train.memory import ModelShape
    from mi_scale.train.worker import build_objective, seed_everything

    cfg = _config(preset, seq_len, batch, mi_on, zero_stage, precision, activation_checkpointing, out)
    _, world = init_process_group()
    dev = device()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    seed_everything(cfg.run.seed)
    bundle = build_data(cfg.data, cfg.run.seed)
    objective, ds_conf = build_objective(cfg, bundle, world)
    if not mi_on:
        objective.regularizer.remove()  # no hooks: the model runs as if there were no MI term
    engine = build_engine(cfg, objective, ds_conf)
    batches = ShardedBatches(bundle.train, batch, 0, 1, cfg.run.seed)
    times, losses, mis = [], [], []
    for i in range(warmup + steps):
        b = batches.next_batch()
        x, y = b["x"].to(dev), b["y"].to(dev)
        _sync()
        t0 = time.perf_counter()
        loss, task_loss, _, mi = engine(x, y, i + 1)
        engine.backward(loss)
        engine.step()
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(task_loss))
        mis.append(sum(mi.values()) / len(mi) if mi else float("nan"))
    n_params = ModelShape.of(objective.model).params
    flops = throughput.flops_per_step(throughput.model_flops_per_token(objective.model, seq_len), batch, 1, world,
                                      seq_len)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    peak = throughput.peak_flops_per_s(dev, dtype)
    step_s = statistics.median(times)
    out_row = {"preset": preset, "mi": mi_on, "params": n_params, "seq_len": seq_len, "batch": batch,
               "dtype": str(dtype).removeprefix("torch."), "zero_stage": zero_stage, "timed_steps": len(times),
               "step_time_s": step_s, "tokens_per_s": batch * seq_len / step_s, "flops_per_step": flops,
               "peak_flops_per_s": peak, "mfu": throughput.mfu(flops, step_s, peak, world) if peak else None,
               "peak_mem_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
               "first_loss": losses[0], "last_loss": losses[-1], "last_mi_mean": mis[-1]}
    del engine, objective
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out_row


def run(out_dir: str = "runs/bench", sizes: list[str] | None = None, seq_len: int = 1024, batch: int = 8,
        steps: int = 8, log=print) -> dict:
    require_cuda()
    from mi_scale.train import throughput

    name = torch.cuda.get_device_name()
    out = Path(out_dir)
    table = throughput.gpu_peak_flops_per_s(name, torch.bfloat16)
    measured = throughput.measure_matmul_flops(torch.bfloat16, seconds=1.0, n=8192, device="cuda")
    log(f"GPU: {name}; bf16 8192^2 matmul measured {measured / 1e12:.0f} TFLOP/s, datasheet dense peak "
        + (f"{table / 1e12:.0f} TFLOP/s" if table else "unknown (set MI_SCALE_PEAK_FLOPS)"))

    log(f"\n(a) bf16 GPT training, byte vocab, seq {seq_len} x batch {batch}, activation checkpointing, "
        f"1 rank ZeRO-0; median of {steps} steps after 2 warm-up; MI gaussian k=16 P=8")
    log(f"{'size':<9} {'params':>7} {'MI':>3} {'step ms':>8} {'tokens/s':>9} {'MFU':>6} {'peak GiB':>8} "
        f"{'loss 1st→last':>15} {'MI mean':>8}")
    training = []
    for preset in sizes or DEFAULT_SIZES:
        pair = {}
        for mi_on in (False, True):
            r = train_variant(preset, mi_on, seq_len, batch, steps, out=out / "gpu")
            pair[mi_on] = r
            training.append(r)
            mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "     -"
            log(f"{preset:<9} {r['params'] / 1e6:6.0f}M {'on' if mi_on else 'off':>3} {1e3 * r['step_time_s']:8.1f} "
                f"{r['tokens_per_s']:9.0f} {mfu} {r['peak_mem_gib']:8.2f} "
                f"{r['first_loss']:6.3f}→{r['last_loss']:6.3f} {r['last_mi_mean']:8.3f}")
        ratio = pair[True]["step_time_s"] / pair[False]["step_time_s"]
        pair[True]["mi_overhead_ratio"] = ratio
        log(f"{preset:<9} MI overhead ratio (step time on / off, back to back): {ratio:.3f}")

    log("\n(b) estimators on CUDA vs CPU, correlated Gaussians n=1024 d=8 (true MI 1.0 nats)")
    log(f"{'estimator':<9} {'cpu':>10} {'cuda':>10} {'|diff|':>9}")
    agreement = estimator_agreement("cuda")
    for r in agreement:
        log(f"{r['estimator']:<9} {r['cpu']:10.5f} {r['cuda']:10.5f} {r['abs_diff']:9.2e}")

    result = {"gpu": name, "bf16_matmul_measured": measured, "bf16_peak_datasheet": table,
              "training": training, "estimators": agreement}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gpu.json").write_text(json.dumps(result, indent=1))
    log(f"wrote {out / 'bench_gpu.json'}")
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=",".join(DEFAULT_SIZES), help="GPT presets, comma-separated")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant (after 2 warm-up)")
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args(argv)
    try:
        run(args.out, args.sizes.split(","), args.seq_len, args.batch, args.steps)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
