"""Ray orchestration: one TorchTrainer whose workers run the training worker.

Without an address an embedded local Ray is started for the run (sized to
the machine, temp dir short and private) and shut down at the end; with
`--address auto` or `ray://host:port` the same job runs on that cluster.

Checkpoints: the run dir's own atomic checkpoints are the source of truth
for resuming (they work under every launcher and are validated before use).
Each one is also reported to Ray Train, which copies it to
cluster.storage_path (a local folder or s3:// / gs:// URI) and keeps the last
train.keep_last. When a worker dies and cluster.max_failures allows,
Ray restarts the worker group and the workers resume from the latest complete
run-dir checkpoint, or from Ray's copy if the run dir has none (a fresh node).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import time
from pathlib import Path

from mi_scale.config import Config, ConfigError, from_dict
from mi_scale.errors import user_errors


def _check_address(address: str) -> None:
    """Fail in seconds, not minutes, when a cluster address does not answer."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"cluster.address: invalid value {address!r}: use 'auto' or 'ray://HOST:PORT'")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as e:
        raise ConfigError(f"cluster.address: cannot reach {address!r} ({e}); check the head node is up and "
                          f"the port is open, or leave cluster.address unset for an embedded local Ray") from None


def _temp_dir(cfg: Config) -> str:
    # AF_UNIX socket paths are limited to ~107 bytes, so Ray's session dir must
    # stay short; one dir per run dir keeps concurrent runs apart.
    if cfg.cluster.ray_temp_dir:
        return cfg.cluster.ray_temp_dir
    key = hashlib.sha1(str(cfg.run_dir().resolve()).encode()).hexdigest()[:8]
    return f"/tmp/ray-mi-{key}"


def start_ray(cfg: Config):
    import ray

    c = cfg.cluster
    if ray.is_initialized():
        return False
    if c.address:
        _check_address(c.address)
        ray.init(address=c.address, logging_level="WARNING", log_to_driver=True)
        return True
    cpus = os.cpu_count() or 1
    need = c.num_workers * c.cpus_per_worker
    if need > cpus:
        raise ConfigError(f"cluster.num_workers={c.num_workers} x cluster.cpus_per_worker={c.cpus_per_worker} needs "
                          f"{need} CPUs but this machine has {cpus}: lower them, or pass --address of a Ray cluster")
    if c.use_gpu:
        import torch
        gpus = torch.cuda.device_count()
        if gpus < c.num_workers:
            raise ConfigError(f"cluster.use_gpu=true with cluster.num_workers={c.num_workers} needs "
                              f"{c.num_workers} GPUs but this machine has {gpus}")
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=True,
             _temp_dir=_temp_dir(cfg), runtime_env={"env_vars": _worker_env()})
    return True


def _worker_env() -> dict:
    keep = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_SILENT", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE",
            "MI_SCALE_CACHE", "PYTHONPATH")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    # Ray Train routes print() through its logger; our progress lines are
    # plain prints meant for the console.
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    return env


def _train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train

    from mi_scale.train.checkpoint import complete_checkpoints
    from mi_scale.train.worker import run_worker

    import logging
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # keep the console for progress lines
    cfg = from_dict(loop_config["cfg"])
    restored = ray.train.get_checkpoint()
    resume = loop_config["resume"] or restored is not None
    if restored is not None and not complete_checkpoints(cfg.run_dir()):
        # The run dir lost its checkpoints (e.g. a new node): copy Ray's in.
        with restored.as_directory() as d:
            src = Path(d)
            dst = cfg.run_dir() / "checkpoints" / src.name
            if not dst.exists():
                shutil.copytree(src, dst, dirs_exist_ok=True)

    def on_checkpoint(path: Path, step: int, metrics: dict) -> None:
        from ray.train import Checkpoint
        is_rank0 = ray.train.get_context().get_world_rank() == 0
        # Every worker reports (Ray Train synchronizes reports); rank 0 attaches the checkpoint.
        # A few headline numbers only: Ray echoes every report to the console,
        # and the full per-step record is in metrics.jsonl and wandb.
        headline = {k: metrics[k] for k in ("loss", "task_loss", "mi_mean", "eval_loss", "eval_accuracy")
                    if k in metrics}
        ray.train.report({"step": step, **headline},
                         checkpoint=Checkpoint.from_directory(str(path)) if is_rank0 else None)

    run_worker(cfg, resume=resume, on_checkpoint=on_checkpoint)


def run(cfg: Config, resume: bool = False) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t0 = time.perf_counter()
    started = start_ray(cfg)
    print(f"[mi-scale] Ray ready in {time.perf_counter() - t0:.1f} s "
          f"({'embedded local cluster' if not cfg.cluster.address else cfg.cluster.address})", flush=True)
    run_dir = cfg.run_dir().resolve()
    cfg.run.output_dir = str(run_dir.parent)  # workers may start in another cwd
    run_dir.mkdir(parents=True, exist_ok=True)
    c = cfg.cluster
    try:
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={"cfg": cfg.to_dict(), "resume": resume},
            scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu,
                                         resources_per_worker={"CPU": c.cpus_per_worker}),
            torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
            run_config=RunConfig(
                name="ray_train" if not c.storage_path else cfg.run.name,
                storage_path=c.storage_path or str(run_dir),
                # controller_failure_limit: Ray 2.60 otherwise retries a worker group
                # that cannot start (too few resources) forever, silently
                failure_config=FailureConfig(max_failures=c.max_failures,
                                             controller_failure_limit=c.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_last)),
        )
        result = trainer.fit()
    except Exception as e:  # surface the user's error, not Ray's wrapper
        cause = _root_cause(e)
        if isinstance(cause, user_errors()):
            raise cause from None
        startup = getattr(cause, "controller_failure", cause)  # ray.train.v2 ControllerError
        if type(startup).__name__ == "WorkerGroupStartupTimeoutError":  # too few resources
            raise _workers_unavailable(cfg, startup) from None
        raise
    finally:
        if started:
            ray.shutdown()
    if result.error is not None:
        raise result.error
    return _summary_from_run_dir(run_dir)


def _workers_unavailable(cfg: Config, cause: BaseException):
    """cluster.num_workers cannot be met (e.g. after a node was lost): say what to do."""
    from mi_scale.errors import UserError

    c = cfg.cluster
    wait = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60))  # Ray's default
    return UserError(
        f"cluster.num_workers={c.num_workers}: Ray could not start {c.num_workers} workers of "
        f"{c.cpus_per_worker} CPU{' + 1 GPU' if c.use_gpu else ''} each within {wait:g} s, "
        f"{c.max_failures + 1} time(s) (cluster.max_failures + 1): the cluster "
        f"has fewer free resources (a node lost?). Fix: resume on the workers there are, "
        f"`mi-scale resume {cfg.run_dir()} --set cluster.num_workers=M` (the global batch is kept), add nodes, "
        f"or wait longer with RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S")


def _root_cause(e: BaseException) -> BaseException:
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        nxt = getattr(e, "cause", None) or e.__cause__
        if nxt is None:
            errs = getattr(e, "worker_failures", None) or {}
            nxt = next(iter(errs.values()), None) if isinstance(errs, dict) else None
        if nxt is None:
            return e
        e = nxt
    return e


def _summary_from_run_dir(run_dir: Path) -> dict:
    """The final eval and MI values, read back from metrics.jsonl."""
    import json

    last_train, last_eval = {}, {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["split"] == "train":
            last_train = row
        else:
            last_eval = row
    mi = {k: v for k, v in last_train.items() if k.startswith("mi/")}
    return {"run_dir": str(run_dir), "steps": last_train.get("step"),
            **{k: v for k, v in last_eval.items() if k not in ("split", "step")}, **mi}
