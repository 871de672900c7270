"""Ctrl-C and SIGTERM to the driver during a Ray run.

The first SIGINT or SIGTERM sets the run's StopFlag (a Ray actor the workers
poll, train/stop.py): all ranks stop at the next step boundary and write a
checkpoint. The driver waits up to cluster.stop_grace_s for that, then stops
at once; a second Ctrl-C stops at once too (KeyboardInterrupt, exit 130).
"""

from __future__ import annotations

import _thread
import signal
import threading

from mi_scale import console

NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


class DriverSignals:
    """A context manager around trainer.fit(); `flag` is the StopFlag actor."""

    def __init__(self, flag, grace_s: float):
        self.flag, self.grace_s = flag, grace_s
        self.signum = 0
        self.expired = False
        self._timer: threading.Timer | None = None
        self._old: dict = {}

    def __enter__(self) -> "DriverSignals":
        if threading.current_thread() is threading.main_thread():
            for s in NAMES:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for s, old in self._old.items():
            signal.signal(s, old)

    def _handle(self, signum, frame) -> None:
        if self.signum:  # a second signal, or the grace period ran out
            raise KeyboardInterrupt
        self.signum = signum
        self.flag.set.remote(signum)
        console.say(f"[mi-scale] {NAMES[signum]}: stopping all ranks at the next step boundary with a checkpoint "
                    f"(up to cluster.stop_grace_s={self.grace_s:g} s); Ctrl-C again stops at once")
        self._timer = threading.Timer(self.grace_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        self.expired = True
        _thread.interrupt_main()
