"""Ray orchestration: one TorchTrainer whose workers run the training worker.

Without an address an embedded local Ray is started for the run (sized to
the machine, temp dir short and private) and shut down at the end; with
`--address auto` or `ray://host:port` the same job runs on that cluster.

Checkpoints: each one is also reported to Ray Train, which copies it to
cluster.storage_path and keeps the last train.keep_last (ckpt_storage.py:
the run dir's copy is the truth when every rank shares it, storage's when
each node keeps its own). When a worker dies and cluster.max_failures allows,
Ray restarts the worker group and the workers resume from the latest complete
checkpoint.

Console: workers and the controller send our lines to the driver through a
Ray queue (mi_scale/console.py); Ray's log streaming is off unless --verbose.
A callback on the Ray Train controller reports the start-up phases and each
restart of the worker group; the driver prints the restart as one line with
the step the group resumed from.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import traceback
from pathlib import Path

from mi_scale import console
from mi_scale.config import Config, ConfigError, from_dict
from mi_scale.errors import Interrupted, RunFailed, UserFixableError


def _check_address(address: str) -> None:
    """Fail in seconds, not minutes, when a cluster address does not answer."""
    if address == "auto":
        _check_one_cluster_in_sight()
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


def _check_one_cluster_in_sight() -> None:
    """`auto` without RAY_ADDRESS: Ray would pick one of several clusters on
    this machine (the latest started) with only a warning; refuse instead."""
    if os.environ.get("RAY_ADDRESS"):
        return
    from ray._private.services import find_gcs_addresses

    found = sorted(set(find_gcs_addresses()))
    if len(found) > 1:
        raise ConfigError(f"cluster.address: 'auto' sees {len(found)} Ray clusters on this machine "
                          f"({', '.join(found)}): pass --address HOST:PORT (or set RAY_ADDRESS) to pick one")


def _temp_dir(cfg: Config) -> str:
    # AF_UNIX socket paths are limited to ~107 bytes, so Ray's session dir must
    # stay short; one dir per run dir keeps concurrent runs apart.
    if cfg.cluster.ray_temp_dir:
        return cfg.cluster.ray_temp_dir
    key = hashlib.sha1(str(cfg.run_dir().resolve()).encode()).hexdigest()[:8]
    return f"/tmp/ray-mi-{key}"


def check_cluster(cfg: Config) -> None:
    """Errors a user can fix, before anything is started or written."""
    c = cfg.cluster
    if c.address:
        _check_address(c.address)
        return
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


def start_ray(cfg: Config, verbose: bool = False):
    """Connect to cluster.address, or start an embedded Ray (after check_cluster)."""
    import ray

    c = cfg.cluster
    if ray.is_initialized():
        return False
    # Worker output reaches the console through our queue (mi_scale/console.py),
    # not Ray's log streaming, which repeats lines on an existing cluster and
    # carries every library's chatter; --verbose turns the streaming back on.
    logging_config = ray.LoggingConfig(log_level="INFO" if verbose else "WARNING")
    if c.address:
        # The nodes bring their own environment; only the library switches travel.
        from mi_scale.network import forwarded_env
        ray.init(address=c.address, logging_level="WARNING", log_to_driver=verbose, logging_config=logging_config,
                 runtime_env={"env_vars": {**forwarded_env(), **console.library_env(c.use_gpu)}})
        return True
    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=verbose,
             logging_config=logging_config, _temp_dir=_temp_dir(cfg), runtime_env={"env_vars": _worker_env(cfg)})
    return True


def _worker_env(cfg: Config) -> dict:
    from mi_scale.network import forwarded_env

    keep = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_SILENT", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE",
            "MI_SCALE_CACHE", "PYTHONPATH", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(forwarded_env())
    env.update(console.library_env(cfg.cluster.use_gpu))
    return env


def _train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train

    cfg = from_dict(loop_config["cfg"])
    verbose = loop_config["verbose"]
    rank = ray.train.get_context().get_world_rank()
    if cfg.fault.fail_node is not None:  # test-only: fault the rank on that host, no other
        cfg.fault.fail_rank = rank if cfg.fault.fail_node == ray.util.get_node_ip_address() else -1
    console.set_sink(loop_config["queue"])
    capture = None if verbose else console.LogCapture(console.log_dir(cfg.run_dir()) / f"rank-{rank}.log",
                                                      keep_console=False)
    console.quiet_libraries(verbose)
    try:
        if rank == 0:
            console.phase("worker group ready")
        _train_on_worker(cfg, loop_config, rank)
    except BaseException:
        traceback.print_exc()  # the full trace, in this rank's log file
        raise
    finally:
        if capture is not None:
            capture.close()


def _empty_loop(loop_config: dict) -> None:
    """Ray's start-up floor (`mi-scale bench startup`): the same workers,
    reaching their first step with nothing of ours done: torch's process
    group joined, no data, model, engine or tracking."""
    import ray.train
    import torch.distributed as dist

    console.set_sink(loop_config["queue"])
    if ray.train.get_context().get_world_rank() == 0:
        console.phase("worker group ready")
    dist.barrier()
    if ray.train.get_context().get_world_rank() == 0:
        console.phase("first step", detail="empty loop")


def _train_on_worker(cfg: Config, loop_config: dict, rank: int) -> None:
    import ray.train

    from mi_scale import ckpt_storage
    from mi_scale.train.shared_dir import check_shared
    from mi_scale.train.worker import run_worker

    run_dir = cfg.run_dir()
    view = check_shared(run_dir, rank, ray.train.get_context().get_world_size(), loop_config["run_token"],
                        cfg.cluster.storage_path)
    if not view.shared and cfg.tracking.log_model:
        from mi_scale.errors import UserError
        raise UserError("tracking.log_model=true exports the final checkpoint from rank 0's run dir, which holds "
                        "only its node's files when run.output_dir is not shared between nodes: set it to "
                        f"false and run `mi-scale export {run_dir}` on the driver's host after the run (the "
                        "driver copies the final checkpoint there from cluster.storage_path)")

    # Ray restarts the group after a failure by calling this function again:
    # a marker per rank and per `mi-scale train` command says this rank
    # started before, so it resumes from the run dir's checkpoints. (Ray's
    # get_checkpoint() alone misses a failure before the first report.)
    marker = console.log_dir(run_dir) / f".started-{loop_config['run_token']}-rank{rank}"
    restarted = marker.exists()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("")
    restored = ckpt_storage.restore(run_dir, rank, view)  # Ray's stored copy, where the run dir lacks one
    resume = loop_config["resume"] or restarted or restored

    def on_checkpoint(path: Path, step: int, metrics: dict) -> None:
        ckpt_storage.report(path, run_dir, step, metrics, rank, view)

    summary = run_worker(cfg, resume=resume, on_checkpoint=on_checkpoint, stop_flag=loop_config["stop_flag"],
                         run_dir_view=view)
    if rank == 0 and "interrupted" in summary:
        console.event("interrupted", **summary["interrupted"])


def _callbacks(queue, retries: int) -> list:
    """Controller-side hooks (Ray Train's callback classes): the recovery
    line when the controller restarts the worker group, and the resource and
    worker-group start-up phases."""
    try:
        from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
        from ray.train.v2._internal.execution.controller.state import RestartingState
    except ImportError:  # another Ray version: no recovery line or phases, the run is unchanged
        return []

    class RunEvents(ControllerCallback, WorkerGroupCallback):
        def __init__(self):
            self.restarts = 0

        def after_controller_state_update(self, previous_state, current_state):
            if not isinstance(current_state, RestartingState):
                return
            self.restarts += 1
            errors = getattr(current_state.training_failed_error, "worker_failures", None) or {}
            rank, cause = _first_failure(errors) if errors else ("?", "failed")
            queue.put({"event": "failure", "rank": rank, "cause": cause, "attempt": self.restarts,
                       "retries": retries})

        def before_worker_group_start(self, worker_group_context):
            queue.put({"event": "phase", "name": "resources requested", "at": time.time(),
                       "detail": f"{worker_group_context.num_workers} workers"})

        def after_worker_group_start(self, worker_group):
            queue.put({"event": "phase", "name": "worker group started", "at": time.time(), "detail": ""})

    return [RunEvents()]


def _first_failure(worker_exceptions: dict) -> tuple[int, str]:
    """The rank that failed first and how: a worker whose process is gone
    (the others then fail on the broken connection), else the lowest rank."""
    lost = [r for r, e in worker_exceptions.items() if _process_lost(e)]
    rank = min(lost or worker_exceptions)
    return rank, _describe(worker_exceptions[rank])


def _process_lost(exc: BaseException) -> bool:
    from ray.exceptions import ActorDiedError

    return isinstance(getattr(exc, "health_check_failure", None), ActorDiedError) or isinstance(exc, ActorDiedError)


def _describe(exc: BaseException) -> str:
    if _process_lost(exc):
        return _memory_kill(exc) or "died (its process was killed or crashed)"
    cause = _root_cause(exc)
    text = str(cause).strip().splitlines()
    return f"failed: {type(cause).__name__}: {text[0] if text else ''}"


def _memory_kill(exc: BaseException) -> str | None:
    """Ray's memory monitor kills a worker when the node runs low and puts its
    figures in the actor's death cause; say so, with them. (The kernel's OOM
    killer leaves only a SIGKILL: "died" is all that is known then.)"""
    import re

    text = " ".join(str(e) for e in (exc, getattr(exc, "health_check_failure", None)) if e is not None)
    if "low on memory" not in text and "OutOfMemoryError" not in text:
        return None
    m = re.search(r"Memory on the node \(IP: ([\d.]+)[^)]*\) was ([\d.]+)GB used / ([\d.]+)GB limit", text)
    figures = f" ({m[2]} of {m[3]} GB in use on node {m[1]})" if m else ""
    return (f"was killed by Ray for low memory{figures}, above Ray's RAY_memory_usage_threshold (default "
            f"0.95). Fix: see what each rank "
            f"holds with `mi-scale plan CONFIG`, then lower data.batch_size, use fewer workers per node "
            f"(cluster.num_workers) or a higher ZeRO stage")


def run(cfg: Config, resume: bool = False, verbose: bool = False, empty_loop: bool = False) -> dict:
    """Train cfg on Ray; returns the run's summary. empty_loop: the workers
    only join the process group (Ray's start-up floor, for the bench)."""
    import sys
    import uuid

    if not cfg.cluster.address and "ray" not in sys.modules:
        # Ray 2.60 turns token authentication on for a new local cluster and
        # warns that it did; saying so explicitly keeps it on, without the
        # warning. Ray reads the mode once, at import.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray
    from ray.util.queue import Queue
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from mi_scale import node_loss
    from mi_scale.network import BoundTorchConfig
    from mi_scale.stopping import DriverSignals
    from mi_scale.train.stop import StopFlag

    _Trainer = _trainer_class()
    check_cluster(cfg)
    run_dir = cfg.run_dir().resolve()
    cfg.run.output_dir = str(run_dir.parent)  # workers may start in another cwd
    logs = console.log_dir(run_dir)
    driver_log = _log_driver(logs / "driver.log", verbose)
    if cfg.cluster.storage_path and not (run_dir / "config.yaml").exists():
        # rank 0 may write the run dir on another node: `mi-scale resume` here needs the config
        from mi_scale import config as config_mod
        config_mod.save(cfg, run_dir / "config.yaml")
    started = start_ray(cfg, verbose)
    t_ray = time.time()
    c = cfg.cluster
    queue = Queue(actor_options={"num_cpus": 0})
    relay = console.Relay(queue, c.max_failures)
    stop_flag = ray.remote(num_cpus=0)(StopFlag).remote()
    signals = DriverSignals(stop_flag, c.stop_grace_s)
    watch = node_loss.NodeWatch(relay)
    continue_on = None  # cluster.elastic: the world size to carry on with after a lost node
    relay.handle({"event": "phase", "name": "ray ready", "at": t_ray,
                  "detail": "embedded local cluster" if not c.address else c.address})
    try:
        trainer = _Trainer(
            _empty_loop if empty_loop else _train_loop,
            train_loop_config={"cfg": cfg.to_dict(), "resume": resume, "verbose": verbose, "queue": queue,
                               "run_token": uuid.uuid4().hex[:12], "stop_flag": stop_flag},
            scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu,
                                         resources_per_worker={"CPU": c.cpus_per_worker}),
            torch_config=BoundTorchConfig(backend="nccl" if c.use_gpu else "gloo", bind_interface=c.bind_interface,
                                          use_gpu=c.use_gpu, queue=queue),
            run_config=RunConfig(
                name="ray_train" if not c.storage_path else cfg.run.name,
                storage_path=c.storage_path or str(run_dir),
                # controller_failure_limit: Ray 2.60 otherwise retries a worker group
                # that cannot start (too few resources) forever, silently
                failure_config=FailureConfig(max_failures=c.max_failures,
                                             controller_failure_limit=c.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_last),
                callbacks=_callbacks(queue, c.max_failures)),
        )
        with signals:
            result = trainer.fit()
        if result.error is not None:
            raise result.error
        if c.storage_path:
            from mi_scale.ckpt_storage import bring_home
            bring_home(result.checkpoint, run_dir)
    except KeyboardInterrupt:
        if not signals.signum:
            raise
        why = f"cluster.stop_grace_s={c.stop_grace_s:g} s ran out" if signals.expired else "a second Ctrl-C"
        raise Interrupted(f"stopped at once ({why}): the steps since the latest checkpoint are lost; resume with "
                          f"mi-scale resume {run_dir}", signals.signum) from None
    except Exception as e:  # surface the user's error, not Ray's wrapper
        # Every failure, start-up ones included, keeps its full trace in driver.log.
        logging.getLogger("mi_scale").error("training failed", exc_info=e)
        cause = _root_cause(e)
        if isinstance(cause, UserFixableError):
            raise cause from None
        if type(cause).__name__ == "WorkerGroupStartupTimeoutError":  # too few resources
            raise _workers_unavailable(cfg, cause) from None
        errors = getattr(e, "worker_failures", None) or {}
        gone = any(_process_lost(x) or type(x).__name__ == "WorkerHealthCheckFailedError" for x in errors.values())
        continue_on = node_loss.after_failure(cfg, run_dir, watch, e, gone)
        if continue_on is None:
            raise RunFailed(f"training failed: {_describe_final(e)}, after {len(relay.recoveries)} of "
                            f"cluster.max_failures={c.max_failures} restarts; full trace in "
                            f"{_trace_files(driver_log, logs)}") from e
    finally:
        watch.close()
        relay.close()
        if started and continue_on is None:
            ray.shutdown()
    if continue_on is not None:
        try:
            return run(node_loss.elastic_config(cfg, run_dir, continue_on), resume=True, verbose=verbose)
        finally:
            if started:
                ray.shutdown()
    _print_phases(relay.phases)
    if relay.interrupted is not None:
        from mi_scale.train.stop import interrupted_line
        stopped = relay.interrupted
        raise Interrupted(interrupted_line(stopped["step"], stopped["checkpoint"], run_dir), stopped["signal"])
    return {} if empty_loop else _summary_from_run_dir(run_dir)


def _trainer_class():
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        def _register_sigint_handler(self, controller):
            """Ray Train's own Ctrl-C handler aborts the run without a checkpoint;
            ours (mi_scale/stopping.py) stays in place instead."""

    return Trainer


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


def _trace_files(driver_log: Path, logs: Path) -> str:
    """The log files that hold the trace: rank logs exist only once a worker ran our code."""
    if any(logs.glob("rank-*.log")):
        return f"{driver_log} and {logs}/rank-*.log"
    return str(driver_log)


def _describe_final(e: BaseException) -> str:
    errs = getattr(e, "worker_failures", None)
    if isinstance(errs, dict) and errs:
        rank, cause = _first_failure(errs)
        return f"worker rank {rank} {cause}"
    cause = _root_cause(e)
    memory = _memory_kill(cause)  # Ray's memory monitor may kill the controller or a helper actor too
    if memory:
        return f"a Ray process {memory}"
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"


def _log_driver(path: Path, verbose: bool) -> Path:
    """Ray's driver-side logger writes to driver.log (and the console with --verbose)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("ray", "mi_scale"):
        logger = logging.getLogger(name)
        if not verbose:
            for h in list(logger.handlers):
                logger.removeHandler(h)
        logger.addHandler(handler)
        logger.propagate = False
    return path


def _print_phases(phases: dict[str, float]) -> None:
    order = ["ray ready", "resources requested", "worker group started", "worker group ready",
             "workers set up", "first step"]
    seen = [(n, phases[n]) for n in order if n in phases]
    if len(seen) < 2:
        return
    steps, prev = [], 0.0
    for name, t in seen:
        steps.append(f"{name} +{t - prev:.1f}")
        prev = t
    console.say(f"[mi-scale] start-up: {prev:.1f} s to the first step ({', '.join(steps)})")


def _root_cause(e: BaseException) -> BaseException:
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        # ray.train.v2 wraps start-up errors in ControllerError.controller_failure
        nxt = getattr(e, "controller_failure", None) or getattr(e, "cause", None) or e.__cause__
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
