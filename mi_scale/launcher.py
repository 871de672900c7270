"""Where `mi-scale train` and `mi-scale resume` go: Ray (default) or local.

local: run the worker in this process: a world of 1, or one rank when a
launcher (torchrun, deepspeed) has set RANK/WORLD_SIZE.
ray: mi_scale.orchestrate runs cluster.num_workers workers through Ray Train.
"""

from __future__ import annotations

import os
from pathlib import Path

from mi_scale import config as config_mod
from mi_scale import console
from mi_scale.config import Config, ConfigError

# Settings that may change when a run resumes; everything else must match.
RESUMABLE = ("train.steps", "train.eval_every", "train.log_every", "train.checkpoint_every",
             "train.keep_last", "train.eval_batches", "tracking.", "cluster.", "fault.", "mi.log_every",
             "data.prepared_dir", "data.num_proc")


def launch(cfg: Config, launcher: str = "ray", address: str | None = None, resume: bool = False,
           verbose: bool = False) -> int:
    if address is not None:
        cfg.cluster.address = address
    if os.environ.get("RANK", "0") == "0":  # one process per launch; ranks then only open it
        from mi_scale.data.prepare import prepare_for_run
        prepare_for_run(cfg.data, say=console.say)
    if launcher == "local":
        summary = _run_local(cfg, resume, verbose)
    else:
        from mi_scale import orchestrate
        summary = orchestrate.run(cfg, resume=resume, verbose=verbose)
    _print_summary(summary)
    return 0


def _run_local(cfg: Config, resume: bool, verbose: bool) -> dict:
    """The worker in this process; its library output goes to logs/rank-R.log
    unless verbose, our lines (rank 0) to the console."""
    console.quiet_libraries(verbose)
    if not verbose:
        for k, v in console.library_env(cfg.cluster.use_gpu).items():
            os.environ.setdefault(k, v)
    rank = int(os.environ.get("RANK", "0"))
    capture = None if verbose else console.LogCapture(
        console.log_dir(cfg.run_dir()) / f"rank-{rank}.log", keep_console=rank == 0)
    from mi_scale.train.worker import run_worker
    try:
        summary = run_worker(cfg, resume=resume)
    finally:
        if capture is not None:
            capture.close()
    if "interrupted" in summary:  # a signal: all ranks stopped at one step boundary (train/stop.py)
        from mi_scale.errors import Interrupted
        from mi_scale.train.stop import interrupted_line
        stopped = summary["interrupted"]
        raise Interrupted(interrupted_line(stopped["step"], stopped["checkpoint"], cfg.run_dir()), stopped["signal"])
    return summary


def resume(run_dir: str, overrides: list[str], launcher: str = "ray", address: str | None = None,
           verbose: bool = False) -> int:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"run dir {run_dir!r} has no config.yaml: pass the folder of an existing run "
                          f"(runs/<run.name>)")
    check_resume_overrides(overrides)
    cfg = config_mod.load(path, overrides)
    # The run dir is where it is now, even if the run was moved.
    cfg.run.output_dir = str(Path(run_dir).resolve().parent)
    cfg.run.name = Path(run_dir).resolve().name
    return launch(cfg, launcher=launcher, address=address, resume=True, verbose=verbose)


def check_resume_overrides(overrides: list[str]) -> None:
    """`resume --set KEY=VALUE` may only touch the RESUMABLE settings."""
    for item in overrides:
        key = item.split("=", 1)[0]
        if not key.startswith(RESUMABLE):
            raise ConfigError(f"--set {key}: cannot change on resume (it changes what the checkpoint means); "
                              f"start a new run with another run.name instead")


def _print_summary(summary: dict) -> None:
    if not summary:
        return
    run_dir = Path(summary["run_dir"])
    console.say("\n== mi-scale run summary ==")
    for key in ("eval_accuracy", "eval_loss", "eval_ppl"):
        if key in summary:
            console.say(f"  final {key:<14} {summary[key]:.4f}")
    mi = {k[3:]: v for k, v in summary.items() if k.startswith("mi/")}
    if mi:
        console.say("  sketched MI per adjacent pair (nats):")
        for pair, v in mi.items():
            console.say(f"    {pair:<28} {v:8.3f}")
    console.say(f"  config       {run_dir / 'config.yaml'}")
    console.say(f"  metrics      {run_dir / 'metrics.jsonl'}")
    console.say(f"  checkpoints  {run_dir / 'checkpoints'}")
    console.say(f"  wandb files  {run_dir / 'wandb'}")
    console.say(f"  plots        {run_dir / 'plots'}")
