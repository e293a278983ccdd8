"""StopRequests: the first SIGTERM / SIGINT is recorded, the second SIGINT aborts, handlers restored."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from nemo_rl.utils.signals import StopRequests


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_first_signal_is_recorded_and_announced(sig, capfd):
    with StopRequests(then="saving a checkpoint and exiting") as stop:
        assert stop.reason is None
        os.kill(os.getpid(), sig)
        assert stop.reason == signal.Signals(sig).name
    err = capfd.readouterr().err
    assert f"{signal.Signals(sig).name} received: finishing the current step, then saving a checkpoint" in err


def test_a_second_sigint_aborts_and_further_sigterms_are_ignored():
    with StopRequests(same_keypress_s=0.0) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # ignored: the save goes on
        assert stop.reason == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_one_ctrl_c_delivered_twice_does_not_abort():
    # The terminal signals the process group and `uv run` forwards the same SIGINT.
    with StopRequests(same_keypress_s=0.5) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.reason == "SIGINT"
        time.sleep(0.6)
        with pytest.raises(KeyboardInterrupt):  # a real second Ctrl-C, later
            os.kill(os.getpid(), signal.SIGINT)


def test_previous_handlers_are_restored():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with StopRequests():
        assert signal.getsignal(signal.SIGTERM) != before[signal.SIGTERM]
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_outside_the_main_thread_it_does_nothing():
    result = {}

    def body():
        with StopRequests() as stop:
            result["handler"] = signal.getsignal(signal.SIGTERM)
            result["reason"] = stop.reason

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert result == {"handler": before, "reason": None}
