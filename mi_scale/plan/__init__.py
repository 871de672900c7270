"""`mi-scale plan`: the peak memory of one rank, predicted before anything runs.

    mi-scale plan CONFIG [--set k=v ...] [--nodes N --gpus-per-node G --gpu-memory-gb M]
                         [--host-memory-gb H] [--json] [--measure]

The byte model per phase (what a rank holds, the table README's "Memory
planning" quotes) is in byte_model.py; facts.py and target.py read the model,
data and cluster; planner.py applies the model and searches for advice;
render.py prints; measure.py checks a plan against a real run.
"""

from __future__ import annotations

import json

from mi_scale import config as config_mod
from mi_scale.errors import UserError
from mi_scale.plan.byte_model import KEYS, PHASE_NAMES, PHASES, RUNTIME_CPU, data_bytes
from mi_scale.plan.facts import model_facts
from mi_scale.plan.measure import VALIDATION, measure, validate
from mi_scale.plan.planner import Plan, plan
from mi_scale.plan.render import render
from mi_scale.plan.units import fmt_bytes

__all__ = ["KEYS", "PHASE_NAMES", "PHASES", "RUNTIME_CPU", "VALIDATION", "Plan", "data_bytes", "measure",
           "model_facts", "plan", "render", "run_cli", "validate"]


def run_cli(args) -> int:
    """`mi-scale plan` (cli.py parses; this prints). Exit 0 whether or not it fits."""
    cfg = config_mod.load(args.config, args.overrides)
    meta = {"config_path": args.config, "overrides": list(args.overrides)}
    pl = plan(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_memory_gb=args.gpu_memory_gb,
              host_memory_gb=args.host_memory_gb, meta=meta)
    measured = None
    if args.measure:
        if pl.target.device != "cpu":
            raise UserError("--measure: runs the config on this machine's CPU ranks; drop --gpus-per-node/"
                            "--gpu-memory-gb and set cluster.use_gpu=false")
        measured = measure(cfg)
    if args.json:
        out = pl.to_json()
        if measured is not None:
            out["measured_peak_bytes"] = measured["peak_bytes"]
            out["measured_error"] = pl.per_rank_peak_bytes / measured["peak_bytes"] - 1
        print(json.dumps(out))
        return 0
    print(render(pl))
    if measured is not None:
        err = pl.per_rank_peak_bytes / measured["peak_bytes"] - 1
        print(f"measured  {fmt_bytes(measured['peak_bytes'])} peak RSS of the largest of {measured['world_size']} "
              f"ranks ({measured['wall_s']:.0f} s run): plan {100 * err:+.1f}%")
    return 0
