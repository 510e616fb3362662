"""A stop is a stop everywhere: the signal handler's rules."""

import os
import signal
import sys
import time

import pytest

from runner.signals import Interrupted, StopSignals


# -- the handler itself, in process ---------------------------------------------


def _send_and_settle(signum: int) -> None:
    os.kill(os.getpid(), signum)
    for _ in range(100):  # the handler runs within these bytecodes
        pass


def test_a_stop_during_a_guarded_write_is_raised_when_it_ends():
    with StopSignals() as stop:
        written = []
        with pytest.raises(Interrupted) as stopped:
            with stop.guarded():
                _send_and_settle(signal.SIGTERM)
                written.append("whole")
        assert written == ["whole"] and stopped.value.exit_code == 143
        _send_and_settle(signal.SIGINT)  # a stop on its way: further signals change nothing


def test_a_write_that_fails_during_a_stop_is_reported_as_itself():
    with StopSignals() as stop:
        with pytest.raises(OSError):
            with stop.guarded():
                _send_and_settle(signal.SIGINT)
                raise OSError(28, "No space left on device")


def test_a_second_signal_stops_at_once_while_the_first_is_deferred():
    with StopSignals() as stop, stop.deferred():
        _send_and_settle(signal.SIGINT)
        assert stop.requested()
        with pytest.raises(Interrupted):
            _send_and_settle(signal.SIGINT)


def test_a_signal_that_lands_in_a_finalizer_is_raised_after_it(monkeypatch):
    """Raised inside `__del__` (or a weakref callback), the stop would be
    printed as "Exception ignored in ..." and lost: it is raised after."""
    ignored = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)

    class Dropped:
        def __del__(self):
            _send_and_settle(signal.SIGINT)

    with StopSignals(), pytest.raises(Interrupted):
        Dropped()  # dropped at once: the signal lands in its __del__
        end = time.monotonic() + 5
        while time.monotonic() < end:
            time.sleep(0.01)
    assert ignored == []


def test_interrupted_is_no_exception_that_a_broad_except_swallows():
    try:
        raise Interrupted(signal.SIGINT)
    except Exception:  # noqa: BLE001 - what a file reader's broad except does
        pytest.fail("a stop was taken for an error")
    except Interrupted as e:
        assert e.exit_code == 130
