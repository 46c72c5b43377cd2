"""Graceful stop on SIGTERM / SIGINT (preemption, Ctrl-C): finish the step, save a checkpoint, exit."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time


class StopOnSignal:
    """While active, SIGTERM and SIGINT set `signum` instead of killing the process; a second signal does.

    The same signal again within `SAME_EVENT_S` seconds counts as the first one: under a launcher (`ftune train
    --nproc`, torchrun) a Ctrl-C reaches every process from the terminal and, a moment later, from the launcher,
    which forwards what it receives."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    SAME_EVENT_S = 2.0

    def __init__(self):
        self.signum: int | None = None
        self._at = 0.0
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            if signum == self.signum and time.monotonic() - self._at < self.SAME_EVENT_S:
                return
            # Asked twice: stop now, without Python's KeyboardInterrupt traceback (under a launcher, the launcher
            # says it once for every rank).
            if "LOCAL_RANK" not in os.environ:
                print(f"ftune: stopped by signal {signum} again, without finishing the step (an unfinished checkpoint "
                      f"is never used: resume takes the newest complete one).", file=sys.stderr, flush=True)
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.signum, self._at = signum, time.monotonic()

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
