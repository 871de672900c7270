"""Stopping when told to: every rank stops at the same step boundary, after a checkpoint.

A stop request reaches a rank in one of two ways:
- a signal to the rank's own process (SIGTERM: a preempted node, SLURM's or
  Kubernetes' warning; SIGINT), caught by the handler installed here;
- the driver's StopFlag (a tiny Ray actor) that the driver sets on Ctrl-C or
  SIGTERM (mi_scale/stopping.py); each rank polls it at most every 0.5 s.

At each step boundary the ranks all-reduce (MAX) the signal number they know
of, so all agree on the same step even when only one was told. The worker then
writes a checkpoint of that step and ends; the driver prints one line and
exits 128 + signal.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

_received = 0  # the signal this process received (0: none)


def _on_signal(signum, frame) -> None:
    global _received
    _received = _received or signum


def install_handlers() -> bool:
    """Catch SIGTERM and SIGINT in this process (from its main thread, e.g. a
    Ray actor task). Returns whether they were installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    return True


class StopFlag:
    """The driver's stop request, shared with the workers (run as a Ray actor)."""

    def __init__(self):
        self.signum = 0

    def set(self, signum: int) -> None:
        self.signum = self.signum or signum

    def get(self) -> int:
        return self.signum


class StopAgreement:
    """Asks, at each step boundary, whether all ranks should stop now."""

    POLL_S = 0.5

    def __init__(self, flag=None):
        self.flag = flag  # a Ray actor handle of StopFlag, or None (no driver: torchrun, local)
        self._remote = 0
        self._polled = 0.0

    def local(self) -> int:
        """The signal this rank knows of (0: none)."""
        if self.flag is not None and not self._remote and time.monotonic() - self._polled >= self.POLL_S:
            import ray
            self._polled = time.monotonic()
            self._remote = ray.get(self.flag.get.remote())
        return _received or self._remote

    def agreed(self, device: torch.device) -> int:
        """The signal to stop on, the same on every rank (0: go on). A collective."""
        mine = torch.tensor([self.local()], dtype=torch.int64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        return int(mine.item())

    def wait_here(self, marker: Path) -> None:
        """Test-only (fault.wait_for_stop_at_step): write `marker` (this
        process id), then wait until this rank is told to stop, so that a
        test's signal lands at a known step however busy the machine is."""
        marker.write_text(str(os.getpid()))
        while not self.local():
            time.sleep(0.05)


def interrupted_line(step: int, tag: str, run_dir: Path) -> str:
    return f"interrupted at step {step}: checkpoint {tag} written; resume with mi-scale resume {run_dir}"
