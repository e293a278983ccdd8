"""SIGTERM / SIGINT as a request to stop cleanly at the end of the current step.

    with StopRequests() as stop:
        for batch in loader:
            train(batch)
            if stop.reason:          # "SIGTERM" or "SIGINT"
                save_checkpoint()
                break

Slurm sends SIGTERM before a job's time limit (and on `scancel`); Ctrl-C sends SIGINT. The
first one is only recorded (and announced on stderr), so the step in flight finishes and the
loop saves and exits with status 0. A second SIGINT aborts at once with KeyboardInterrupt, for
when the save itself is not wanted; further SIGTERMs are ignored, as Slurm's SIGKILL follows
anyway after `KillWait`.

Handlers can only be installed from the main thread; elsewhere StopRequests does nothing (and
the default behaviour stays). The previous handlers are restored on exit.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    def __init__(self, *, then: str = "saving a checkpoint and exiting"):
        """`then`: what the loop does after the step, for the message printed on the signal."""
        self.reason: str | None = None
        self._then = then
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.reason is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.reason = name
        # os.write, not print: a handler may run in the middle of another write to stderr.
        message = (
            f"\n{name} received: finishing the current step, then {self._then} "
            "(Ctrl-C again aborts without saving)\n"
        )
        os.write(2, message.encode())
