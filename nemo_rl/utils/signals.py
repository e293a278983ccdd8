"""SIGTERM / SIGINT as a request to stop cleanly at the end of the current step.

    with StopRequests() as stop:
        for batch in loader:
            train(batch)
            if stop.reason:          # "SIGTERM" or "SIGINT"
                save_checkpoint()
                break

SIGTERM is what Slurm sends (to the batch script alone and early with `--signal=B:TERM@N`;
to every process of the job at the limit, see docs/resume.md); Ctrl-C sends SIGINT. The
first one is only recorded (and announced on stderr), so the step in flight finishes and the
loop saves and exits with status 0. A second SIGINT aborts at once with KeyboardInterrupt, for
when the save itself is not wanted; further SIGTERMs are ignored, as Slurm's SIGKILL follows
anyway after `KillWait`.

One Ctrl-C can arrive twice: the terminal signals the whole foreground process group, and
`uv run` forwards the signal it got to the driver as well. A repeat within
`SAME_KEYPRESS_S` of the first is therefore taken as the same request, not as the second
Ctrl-C that aborts.

Handlers can only be installed from the main thread; elsewhere StopRequests does nothing (and
the default behaviour stays). The previous handlers are restored on exit.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SAME_KEYPRESS_S = 1.0  # a repeat within this of the first signal is the same request


class StopRequests:
    def __init__(self, *, then: str = "saving a checkpoint and exiting", same_keypress_s: float = SAME_KEYPRESS_S):
        """`then`: what the loop does after the step, for the message printed on the signal."""
        self.reason: str | None = None
        self._then = then
        self._same_keypress_s = same_keypress_s
        self._first_at = 0.0
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
            repeat_of_the_first = time.monotonic() - self._first_at < self._same_keypress_s
            if signum == signal.SIGINT and not repeat_of_the_first:
                raise KeyboardInterrupt
            return
        self.reason, self._first_at = name, time.monotonic()
        # os.write, not print: a handler may run in the middle of another write to stderr.
        message = (
            f"\n{name} received: finishing the current step, then {self._then} "
            "(Ctrl-C again aborts without saving)\n"
        )
        os.write(2, message.encode())
