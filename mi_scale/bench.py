"""`mi-scale bench mi-overhead`: step time with the MI term / without.

Both variants run in the same process(es), interleaved step by step so that
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
}


def _build(case: str):
    from mi_scale.models import DeepMLP, build_gpt

    g = torch.Generator().manual_seed(0)
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
    for name in ("without", "with"):
        model, x, y = _build(case)
        reg = MIRegularizer(model, ["blocks.*"], sketch_dim=k, tokens_per_sample=p, weight=0.1) if name == "with" else None
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
        return torch.load(out, weights_only=False)


def mi_overhead(steps: int = 20, ranks: list[int] = (1, 2), out_dir: str = "runs/bench",
                k: int = 64, p: int = 8, log=print) -> list[dict]:
    rows = []
    log(f"mi-overhead: gaussian, k={k}, P={p}, all adjacent pairs, every step; {steps} timed steps per "
        f"variant, interleaved; 1 thread per rank")
    log(f"{'case':<8} {'ranks':>5} {'without ms':>11} {'with ms':>9} {'ratio':>7} "
        f"{'gather/step':>12} {'raw/step':>10} {'raw/sketch':>10}")
    for case in CASES:
        for world in ranks:
            res = _run(case, world, steps, k, p)
            w, wo = statistics.median(res["with"]), statistics.median(res["without"])
            ratios = [a / b for a, b in zip(res["with"], res["without"])]
            row = {"case": case, "ranks": world, "median_ms_without": wo * 1e3, "median_ms_with": w * 1e3,
                   "ratio_of_medians": w / wo, "median_of_paired_ratios": statistics.median(ratios),
                   "sketch_bytes_per_step": res["sketch_bytes"], "raw_bytes_per_step": res["raw_bytes"],
                   "layers": res["layers"], "description": CASES[case]}
            rows.append(row)
            log(f"{case:<8} {world:>5} {wo * 1e3:11.1f} {w * 1e3:9.1f} {w / wo:7.3f} "
                f"{_kib(res['sketch_bytes']):>12} {_kib(res['raw_bytes']):>10} "
                f"{res['raw_bytes'] / res['sketch_bytes']:10.1f}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(rows, indent=1))
    log(f"wrote {out / 'bench.json'}")
    return rows


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"
