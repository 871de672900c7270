"""`mi-scale bench mi-overhead | peak | scale | startup`.

mi-overhead: step time with the MI term / without (below). peak: matmul
FLOP/s of this CPU, cached for MFU (`peak`). scale: a ladder of GPT sizes
trained for a few steps through the real worker at ZeRO-2 and ZeRO-3
(`scale`). startup: command to first step of the main job next to Ray's own
floor (`startup`).

mi-overhead: both variants run in the same process(es), interleaved step by step so that
drift of the machine hits both equally, on identical models and batches. A
step is forward + backward + AdamW step; at W > 1 ranks (gloo, spawned
processes) gradients are averaged with DDP, as in real data-parallel training.
Defaults: gaussian, k=64, P=8 tokens per sample, all adjacent pairs, every step.
Reported: median ratio, and bytes each rank receives in the sketch all-gather
versus gathering the same sampled activations raw.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CASES = {
    # name: (builder, per-rank batch, tokens per sample in the data)
    "mlp": "DeepMLP depth 8 width 128 on 40-dim input, batch 256/rank",
    "gpt-5m": "GPT preset gpt-5m, vocab 256, seq 64, batch 32/rank",
    "main": "the main job's embedded config (mi-scale train, no --config): its model, per-rank batch and "
            "mi section (sketch_dim, tokens, weight, estimator); random inputs of its data's shape",
}


def _main_job():
    """The embedded default config, and the MIRegularizer arguments it implies."""
    from mi_scale import config as config_mod

    cfg = config_mod.load(None, [])
    m = cfg.mi
    return cfg, {"layers": m.layers, "estimator": m.estimator, "sketch": m.sketch, "sketch_dim": m.sketch_dim,
                 "tokens_per_sample": m.tokens_per_sample, "weight": m.weight, "pair_weights": m.pair_weights,
                 "estimator_kwargs": m.estimator_kwargs}


def _build(case: str):
    from mi_scale.models import DeepMLP, build_gpt, build_model

    g = torch.Generator().manual_seed(0)
    if case == "main":
        from mi_scale.data import build_data

        cfg, _ = _main_job()
        bundle = build_data(cfg.data, cfg.run.seed)
        model = build_model(cfg.model, input_dim=bundle.input_dim, num_classes=bundle.num_classes,
                            vocab_size=bundle.vocab_size, seq_len=bundle.seq_len)
        x_shape = tuple(bundle.train[:1]["x"].shape[1:])
        x = torch.randn(cfg.data.batch_size, *x_shape, generator=g)
        return model, x, torch.randint(0, bundle.num_classes, (cfg.data.batch_size,), generator=g)
    if case == "mlp":
        model = DeepMLP(40, 10, depth=8, width=128)
        x = torch.randn(256, 40, generator=g)
        y = torch.randint(0, 10, (256,), generator=g)
        return model, x, y
    model = build_gpt("gpt-5m", vocab_size=256, seq_len=64)
    x = torch.randint(0, 256, (32, 64), generator=g)
    return model, x, torch.roll(x, -1, 1)


def _measure(rank: int, world: int, case: str, steps: int, k: int, p: int) -> dict:
    from mi_scale.mi import MIRegularizer
    from mi_scale.mi.sketch import as_tokens

    torch.manual_seed(0)
    variants = {}
    mi_args = _main_job()[1] if case == "main" else {
        "layers": ["blocks.*"], "sketch_dim": k, "tokens_per_sample": p, "weight": 0.1}
    k, p = mi_args["sketch_dim"], mi_args["tokens_per_sample"]
    for name in ("without", "with"):
        model, x, y = _build(case)
        reg = MIRegularizer(model, **mi_args) if name == "with" else None
        net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        variants[name] = (net, reg, opt, x, y)

    def step(name: str, i: int) -> float:
        net, reg, opt, x, y = variants[name]
        t0 = time.perf_counter()
        logits = net(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        if reg is not None:
            reg_loss, _ = reg.loss(i)
            loss = loss + reg_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    times = {"with": [], "without": []}
    for i in range(steps + 3):
        for name in (("with", "without") if i % 2 else ("without", "with")):
            dt = step(name, i)
            if i >= 3:  # warm-up steps are not timed
                times[name].append(dt)
    # Communication per step: what each rank receives.
    model, x, _ = _build(case)
    widths, rows_per_sample = [], None
    hooks = []
    for n, m in model.named_modules():
        if n.startswith("blocks.") and n.count(".") == 1:
            hooks.append(m.register_forward_hook(lambda mod, a, out: widths.append(as_tokens(out).shape)))
    with torch.no_grad():
        model(x[:1])
    for h in hooks:
        h.remove()
    tokens = widths[0][1]
    rows_global = len(x) * world * (1 if tokens == 1 else p)
    n_layers = len(widths)
    sketch_bytes = rows_global * k * n_layers * 4
    raw_bytes = rows_global * sum(w[2] for w in widths) * 4
    return {"with": times["with"], "without": times["without"], "sketch_bytes": sketch_bytes,
            "raw_bytes": raw_bytes, "layers": n_layers}


def _rank_entry(rank, world, port, case, steps, k, p, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    res = _measure(rank, world, case, steps, k, p)
    if rank == 0:
        torch.save(res, out)
    dist.destroy_process_group()


def _run(case: str, world: int, steps: int, k: int, p: int) -> dict:
    if world == 1:
        torch.set_num_threads(1)
        return _measure(0, 1, case, steps, k, p)
    import tempfile

    import torch.multiprocessing as mp

    from mi_scale.train.dist_env import free_port

    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res.pt")
        mp.start_processes(_rank_entry, args=(world, port, case, steps, k, p, out), nprocs=world,
                           start_method="spawn")
        return torch.load(out, weights_only=True)


def mi_overhead(steps: int = 20, ranks: list[int] = (1, 2), out_dir: str = "runs/bench",
                k: int = 64, p: int = 8, cases: list[str] | None = None, log=print) -> list[dict]:
    if cases is not None and not set(cases) <= set(CASES):
        from mi_scale.errors import UserError
        raise UserError(f"--cases: {sorted(set(cases) - set(CASES))} unknown; choose from {', '.join(CASES)}")
    rows = []
    _, main_mi = _main_job()
    log(f"mi-overhead: gaussian, k={k}, P={p} (main: its config's k={main_mi['sketch_dim']}, "
        f"P={main_mi['tokens_per_sample']}), all adjacent pairs, every step; {steps} timed steps per "
        f"variant, interleaved; 1 thread per rank")
    log(f"{'case':<8} {'ranks':>5} {'without ms':>11} {'with ms':>9} {'ratio':>7} "
        f"{'gather/step':>12} {'raw/step':>10} {'raw/sketch':>10}")
    for case in cases or CASES:
        for world in ranks:
            res = _run(case, world, steps, k, p)
            w, wo = statistics.median(res["with"]), statistics.median(res["without"])
            ratios = [a / b for a, b in zip(res["with"], res["without"])]
            row = {"case": case, "ranks": world, "median_ms_without": wo * 1e3, "median_ms_with": w * 1e3,
                   "ratio_of_medians": w / wo, "median_of_paired_ratios": statistics.median(ratios),
                   "step_ms_without": [t * 1e3 for t in res["without"]],  # the raw timed steps
                   "step_ms_with": [t * 1e3 for t in res["with"]],
                   "sketch_bytes_per_step": res["sketch_bytes"], "raw_bytes_per_step": res["raw_bytes"],
                   "layers": res["layers"], "description": CASES[case]}
            rows.append(row)
            log(f"{case:<8} {world:>5} {wo * 1e3:11.1f} {w * 1e3:9.1f} {w / wo:7.3f} "
                f"{_kib(res['sketch_bytes']):>12} {_kib(res['raw_bytes']):>10} "
                f"{res['raw_bytes'] / res['sketch_bytes']:10.1f}")
    return _write_rows(rows, Path(out_dir) / "bench.json", log)


def _write_rows(rows: list[dict], path: Path, log) -> list[dict]:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))
    log(f"wrote {path}")
    return rows


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


# -- bench peak --------------------------------------------------------------------


def peak(seconds: float = 2.0, log=print) -> list[dict]:
    """Matmul FLOP/s of this CPU in fp32 and bf16, with 1 thread and with all
    cores; each value goes into the cache that MFU reads (throughput.py)."""
    from mi_scale.train import throughput

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    log(f"matmul peak of {throughput.cpu_model_name()}: best of repeated 1024x1024 matmuls over "
        f"{seconds:g} s per row")
    log(f"{'dtype':<9} {'threads':>7} {'GFLOP/s':>9}")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for threads in sorted({1, cores}):
            flops = throughput.measure_matmul_flops(dtype, threads, seconds)
            throughput.write_cache_entry(dtype, threads, flops)
            rows.append({"cpu": throughput.cpu_model_name(), "dtype": str(dtype).removeprefix("torch."),
                         "threads": threads, "flops_per_s": flops})
            log(f"{rows[-1]['dtype']:<9} {threads:>7} {flops / 1e9:9.1f}")
    log(f"cached in {throughput.cache_path()}")
    return rows


# -- bench scale -------------------------------------------------------------------

# (preset, seq_len, per-rank micro-batch, timed steps, seconds cap per run).
# Sized so that the whole ladder (8 runs) ends within 15 minutes on 2 cores:
# the seconds caps add up to 2 x 435 s, and a run stops at whichever cap
# comes first (it keeps the steps done by then).
SCALE_LADDER = [
    ("gpt-1m", 128, 8, 10, 60),
    ("gpt-5m", 128, 8, 8, 75),
    ("gpt-125m", 128, 4, 4, 150),
    ("gpt-350m", 128, 2, 3, 150),
]
SCALE_VOCAB = 256  # byte tokens, as the bundled `text` data uses


def _mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def estimate_run_bytes(n_params: int, world: int, batch: int, seq_len: int, d_model: int, n_layer: int) -> int:
    """Memory of one fp32 training run, all ranks together, on the safe side:
    each rank as if it held everything (16 bytes/param: params, grads, Adam m
    and v), plus 64 bytes per token, width and layer of activations, plus
    1 GiB of runtime (torch, DeepSpeed) per rank."""
    per_rank = 16 * n_params + 64 * batch * seq_len * d_model * n_layer + 2**30
    return world * per_rank


def _scale_run(preset: str, stage: int, seq_len: int, batch: int, steps: int, cap_s: float,
               world: int, work: Path) -> dict:
    """One real training run: `world` worker processes (gloo), stopped once
    steps + 1 train rows are logged (the first step is not timed) or at cap_s.

    The ranks are our direct children so that os.wait4 gives each rank's max
    RSS. They are stopped, not run to train.steps, so that no final eval or
    checkpoint (gigabytes at 0.3B) is written."""
    import signal
    import subprocess
    import sys

    from mi_scale import config as config_mod
    from mi_scale.train.dist_env import free_port

    run_dir = work / f"{preset}-zero{stage}"
    cfg = config_mod.load(None, [
        f"run.output_dir={work}", f"run.name={run_dir.name}", "model.kind=gpt", f"model.preset={preset}",
        "data.name=text", f"data.seq_len={seq_len}", f"data.batch_size={batch}", "mi.estimator=gaussian",
        "mi.weight=0.001", "mi.sketch_dim=16", "mi.tokens_per_sample=8", "train.steps=100000",
        "train.warmup_steps=0", "train.eval_every=100000", "train.checkpoint_every=100000",
        "train.log_every=100000", f"deepspeed.zero_stage={stage}", "tracking.wandb=disabled"])
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / f"{run_dir.name}.yaml"
    config_mod.save(cfg, config_path)
    env = {**os.environ, "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    procs, logs = [], []
    t0 = time.perf_counter()
    for r in range(world):
        logs.append(open(work / f"{run_dir.name}.rank{r}.log", "w"))
        procs.append(subprocess.Popen([sys.executable, "-m", "mi_scale.train.worker", str(config_path)],
                                      env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                      stdout=logs[-1], stderr=subprocess.STDOUT))
    metrics, rows = run_dir / "metrics.jsonl", []
    maxrss_kib: dict[int, int] = {}
    status: dict[int, int] = {}
    try:
        # Until enough rows, the cap, or any rank exiting (a crash: train.steps is never reached).
        while not status and len(rows) < steps + 1 and time.perf_counter() - t0 < cap_s:
            time.sleep(0.2)
            for r, p in enumerate(procs):
                if r not in status:
                    pid, st, ru = os.wait4(p.pid, os.WNOHANG)
                    if pid:
                        status[r], maxrss_kib[r] = os.waitstatus_to_exitcode(st), ru.ru_maxrss
            if metrics.exists():
                rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.endswith("}")]
                rows = [row for row in rows if row["split"] == "train"]
    finally:
        for r, p in enumerate(procs):
            if r not in status:
                p.send_signal(signal.SIGKILL)
                _, st, ru = os.wait4(p.pid, 0)
                status[r], maxrss_kib[r] = os.waitstatus_to_exitcode(st), ru.ru_maxrss
            p.returncode = status[r]  # reaped by wait4: keep Popen from waiting again
        for f in logs:
            f.close()
    wall = time.perf_counter() - t0
    out = {"preset": preset, "zero_stage": stage, "ranks": world, "seq_len": seq_len, "micro_batch": batch,
           "wall_s": wall, "steps_logged": len(rows),
           "peak_rss_mb_per_rank": [maxrss_kib[r] / 1024 for r in range(world)]}
    if len(rows) < 2:
        crashed = [r for r, code in status.items() if code not in (0, -signal.SIGKILL)]
        tail = (work / f"{run_dir.name}.rank{crashed[0] if crashed else 0}.log").read_text()[-1500:]
        out["error"] = (f"rank(s) {crashed} exited early" if crashed else
                        f"fewer than 2 steps within the {cap_s:g} s cap") + f"; log tail:\n{tail}"
        return out
    timed = [row["step_time_s"] for row in rows[1:steps + 1]]  # the first step warms up: not timed
    step_s = statistics.median(timed)
    flops = rows[0]["flops_per_step"]
    out.update(timed_steps=len(timed), step_time_s=step_s, tokens_per_s=batch * world * seq_len / step_s,
               flops_per_step=flops, peak_flops_per_s=rows[0].get("peak_flops_per_s"))
    if out["peak_flops_per_s"]:
        out["mfu"] = flops / step_s / (out["peak_flops_per_s"] * world)
    return out


def scale(out_dir: str = "runs/bench", sizes: list[str] | None = None, stages: tuple[int, ...] = (2, 3),
          world: int = 2, log=print) -> list[dict]:
    """The GPT ladder at ZeRO-2 and ZeRO-3 on `world` gloo ranks, MI term on."""
    import tempfile

    from mi_scale.models import build_gpt, count_params
    from mi_scale.train import throughput

    known = [c[0] for c in SCALE_LADDER]
    if sizes is not None and not set(sizes) <= set(known):
        from mi_scale.errors import UserError
        raise UserError(f"--sizes: {sorted(set(sizes) - set(known))} not in the ladder; choose from {known}")
    ladder = [c for c in SCALE_LADDER if sizes is None or c[0] in sizes]
    # The ranks run 1 thread each: have the peak cached now, so no run measures it.
    throughput.cpu_peak_flops_per_s(torch.float32, 1)
    log(f"scale: GPT presets, byte vocab {SCALE_VOCAB}, bundled text, fp32, {world} ranks x 1 thread (gloo), "
        f"MI term on (gaussian, k=16, P=8); step time = median of the timed steps (first step excluded); "
        f"peak RSS = max over ranks")
    log(f"{'size':<9} {'zero':>4} {'params':>7} {'seq x batch':>11} {'steps':>5} {'step s':>7} "
        f"{'tokens/s':>9} {'MFU':>6} {'peak RSS/rank':>13} {'wall s':>6}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="mi-scale-bench-") as tmp:
        for preset, seq_len, batch, steps, cap_s in ladder:
            model = build_gpt(preset, vocab_size=SCALE_VOCAB, seq_len=seq_len, device="meta")
            n_params = count_params(model)
            c = model.cfg
            for stage in stages:
                need = estimate_run_bytes(n_params, world, batch, seq_len, c.d_model, c.n_layer)
                have = _mem_available_bytes()
                head = f"{preset:<9} {stage:>4} {n_params / 1e6:6.1f}M {f'{seq_len} x {batch}':>11}"
                if need > have:
                    rows.append({"preset": preset, "zero_stage": stage, "params": n_params,
                                 "skipped": f"needs ~{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available"})
                    log(f"{head} skipped: {rows[-1]['skipped']}")
                    continue
                res = {"params": n_params, **_scale_run(preset, stage, seq_len, batch, steps, cap_s, world,
                                                        Path(tmp))}
                rows.append(res)
                if "error" in res:
                    log(f"{head} failed: {res['error']}")
                    continue
                mfu = f"{100 * res['mfu']:5.1f}%" if "mfu" in res else "     -"
                log(f"{head} {res['timed_steps']:>5} {res['step_time_s']:7.2f} {res['tokens_per_s']:9.0f} {mfu} "
                    f"{max(res['peak_rss_mb_per_rank']) / 1024:9.2f} GiB {res['wall_s']:6.0f}")
    return _write_rows(rows, Path(out_dir) / "bench_scale.json", log)


# -- bench startup -----------------------------------------------------------------

def _startup_command(variant: str, run_dir: Path, steps: int) -> list[str]:
    import sys

    if variant == "ray floor":
        return [sys.executable, "-m", "mi_scale.bench", "startup-floor", str(run_dir)]
    return [sys.executable, "-m", "mi_scale.cli", "train", "--set", f"run.output_dir={run_dir.parent}",
            "--set", f"run.name={run_dir.name}", "--set", f"train.steps={steps}",
            "--set", f"train.eval_every={steps}", "--set", f"train.checkpoint_every={steps}"]


def _parse_startup(stdout: str) -> dict | None:
    """The command's own `start-up: X s to the first step (phase +dt, ...)` line."""
    import re

    m = re.search(r"start-up: ([\d.]+) s to the first step \((.*)\)", stdout)
    if m is None:
        return None
    steps = {name.strip(): float(dt) for name, dt in re.findall(r"([a-z ]+) \+([\d.]+)", m.group(2))}
    return {"first_step_s": float(m.group(1)), "phases_s": steps}


def startup(repeats: int = 2, steps: int = 50, out_dir: str = "runs/bench", log=print) -> list[dict]:
    """Command to first step of the main job, side by side with Ray's floor:
    the same command's Ray start, controller and worker group, whose workers
    only join torch's process group (orchestrate._empty_loop). The two
    alternate, `repeats` times each, so that drift hits both alike."""
    import subprocess
    import tempfile

    log(f"startup: command to first step on an embedded Ray, main job (its config, train.steps={steps}) vs "
        f"Ray's floor (same command, workers that only join the process group); {repeats} runs each, "
        f"alternated; phase times from each command's own start-up line")
    rows = []
    with tempfile.TemporaryDirectory(prefix="mi-scale-startup-") as tmp:
        for i in range(repeats):
            for variant in ("ray floor", "main job"):
                run_dir = Path(tmp) / f"{variant.replace(' ', '-')}-{i}"
                t0 = time.time()
                proc = subprocess.run(_startup_command(variant, run_dir, steps), capture_output=True, text=True)
                parsed = _parse_startup(proc.stdout)
                if proc.returncode != 0 or parsed is None:
                    raise RuntimeError(f"startup bench: {variant} exited {proc.returncode}:\n"
                                       f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
                rows.append({"variant": variant, "repeat": i, "wall_s": time.time() - t0, **parsed})
                log(f"{variant:<10} run {i + 1}: {parsed['first_step_s']:5.1f} s to the first step  (" +
                    ", ".join(f"{k} +{v:.1f}" for k, v in parsed["phases_s"].items()) + ")")
    floor = statistics.median(r["first_step_s"] for r in rows if r["variant"] == "ray floor")
    main = statistics.median(r["first_step_s"] for r in rows if r["variant"] == "main job")
    log(f"median: ray floor {floor:.1f} s, main job {main:.1f} s; ours on top of the floor {main - floor:+.1f} s "
        f"(ratio {main / floor:.2f})")
    return _write_rows(rows, Path(out_dir) / "bench_startup.json", log)


def _startup_floor(run_dir: str) -> None:
    """`python -m mi_scale.bench startup-floor RUN_DIR`: the floor's command."""
    from mi_scale import config as config_mod
    from mi_scale import orchestrate

    path = Path(run_dir)
    cfg = config_mod.load(None, [f"run.output_dir={path.parent}", f"run.name={path.name}"])
    orchestrate.run(cfg, empty_loop=True)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] != ["startup-floor"] or len(sys.argv) != 3:
        sys.exit("usage: python -m mi_scale.bench startup-floor RUN_DIR")
    _startup_floor(sys.argv[2])
