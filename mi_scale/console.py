"""The run's console: our own lines, each printed once, by one process.

Our lines (start-up phases, progress, eval, checkpoints, recovery, summary)
go through `say`. Everything else a process prints (Ray, DeepSpeed, torch,
gloo, warnings) goes to its log file in RUN_DIR/logs/; `--verbose` leaves it
on the console.

- In the driver and under `--launcher local`, `say` writes to the console.
- In a Ray worker or the Ray Train controller, `say` puts the line on a Ray
  queue that the driver drains and prints (`Relay`). Ray's own log streaming
  (log_to_driver) is off: on an existing cluster it printed each worker line
  several times, and it carries all the library chatter.

Events (dicts) let the driver merge what several processes know into one line:
a worker failure (seen by the controller) and the step the restarted group
resumed from (seen by rank 0) become one recovery line.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path

# Seconds since the command started: the start-up phases are measured from here.
T0 = time.time()

_sink = None  # a ray.util.queue.Queue in Ray workers and the controller; None: print here
_out = None   # the console's stream when fds 1/2 point at a log file
_verbose = False


def set_sink(queue) -> None:
    global _sink
    _sink = queue


def say(line: str) -> None:
    """One of our console lines."""
    if _sink is not None:
        _sink.put({"line": line})
    else:
        _print(line)


def event(kind: str, **fields) -> None:
    """A structured event for the driver (see Relay)."""
    if _sink is not None:
        _sink.put({"event": kind, **fields})
    else:
        _print(_format_event(kind, fields, None))


def _print(line: str, err: bool = False) -> None:
    stream = _out or (sys.stderr if err else sys.stdout)
    print(line, file=stream, flush=True)


def error(line: str) -> None:
    _print(f"error: {line}", err=True)


def phase(name: str, at: float | None = None, detail: str = "") -> None:
    """A start-up phase: `name` reached `at` (wall clock) seconds after the command started."""
    at = time.time() if at is None else at
    event("phase", name=name, at=at, detail=detail)


def _format_event(kind: str, f: dict, t0: float | None) -> str:
    if kind == "phase":
        t = f["at"] - (t0 if t0 is not None else T0)
        return f"[mi-scale] {f['name']:<24} {t:6.1f} s" + (f"  ({f['detail']})" if f.get("detail") else "")
    if kind == "resumed":
        return f["line"]
    if kind == "failure":
        return (f"[mi-scale] worker rank {f['rank']} {f['cause']}; restarting the group "
                f"({f['attempt']} of {f['retries']} retries)")
    return f"[mi-scale] {kind}: {f}"


# ---------------------------------------------------------------------------
# Log files and library switches


def quiet_libraries(verbose: bool) -> None:
    """Library switches for a quiet console, set before the libraries load.
    Env vars reach Ray workers through the runtime_env (orchestrate.py)."""
    global _verbose
    _verbose = verbose
    if verbose:
        return
    for name, level in (("ray", logging.ERROR), ("ray.train", logging.ERROR), ("ray.data", logging.ERROR),
                        ("DeepSpeed", logging.WARNING), ("torch.distributed", logging.ERROR)):
        logging.getLogger(name).setLevel(level)
    # torch deprecates all_gather_into_tensor's old spelling inside DeepSpeed's
    # ZeRO code, once per rank; nothing a user can change.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*", category=FutureWarning)


def library_env(use_gpu: bool) -> dict:
    """Environment for worker processes that keeps libraries quiet."""
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}  # print() in workers stays a plain print
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # else DeepSpeed warns on every rank that it fell back to CPU
    return env


class LogCapture:
    """Points this process's fds 1 and 2 at `path` (everything: Python,
    C++ and gloo output), keeping the console for `say` when this process
    prints its own lines. Undone by `close`."""

    def __init__(self, path: Path, keep_console: bool):
        global _out
        path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = (os.dup(1), os.dup(2))
        self.keep_console = keep_console
        if keep_console:
            _out = os.fdopen(os.dup(1), "w", buffering=1)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        self.path = path

    def close(self) -> None:
        global _out
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in self.saved:
            os.close(fd)
        if self.keep_console and _out is not None:
            _out.close()
            _out = None


def log_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "logs"


# ---------------------------------------------------------------------------
# The driver's side


class Relay:
    """Drains the queue in a thread of the driver and prints each line once."""

    def __init__(self, queue, retries: int):
        self.queue, self.retries = queue, retries
        self.failure: dict | None = None
        self.interrupted: dict | None = None  # rank 0's stop (train/stop.py): the driver prints it last
        self.placement: list | None = None  # [node id, ip] of each rank (network.py; node_loss.py)
        self.recoveries: list[str] = []
        self.phases: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mi-scale-console", daemon=True)
        if queue is not None:
            self._thread.start()

    def _run(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                item = self.queue.get(block=True, timeout=0.5)
            except Empty:
                if self._stop.is_set():
                    return
                continue
            except Exception:  # the queue actor went away with Ray
                return
            self.handle(item)

    def handle(self, item: dict) -> None:
        if "event" not in item:
            _print(item["line"])
            return
        kind = item["event"]
        if kind == "phase":
            if item["name"] in self.phases:
                return  # a restarted group: its recovery line says enough
            self.phases[item["name"]] = item["at"] - T0
        elif kind == "placement":
            self.placement = item["ranks"]
            return
        elif kind == "interrupted":
            self.interrupted = item
            return
        elif kind == "failure":
            self.failure = item  # printed with the step the group resumes from
            return
        elif kind == "resumed" and self.failure is not None:
            f, self.failure = self.failure, None
            line = (f"[mi-scale] worker rank {f['rank']} {f['cause']}; restarted the group "
                    f"({f['attempt']} of {_retries(f['retries'])} retries); resumed from step {item['step']}")
            self.recoveries.append(line)
            _print(line)
            return
        _print(_format_event(kind, item, T0))

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)


def _retries(n: int) -> str:
    return "unlimited" if n < 0 else str(n)
