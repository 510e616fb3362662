"""SIGTERM and Ctrl-C (SIGINT) as a request to stop cleanly.

Preemptible machines (TPU VMs, spot GPUs) send SIGTERM shortly before they go
away. During training the request is *deferred*: the step in flight finishes,
a checkpoint is written, and the run ends with `Interrupted`. Anywhere else
(data preparation, evaluation) it ends the run at once with `Interrupted`. A
second signal while a deferred one is pending stops at once too: a user
pressing Ctrl-C twice means it.

With several processes (`join_processes`) a stop must be agreed, or the
others would wait for the one that left: JAX's preemption service owns
SIGTERM (a notice to every process), a first Ctrl-C is passed on to it as a
SIGTERM, and training stops at the step boundary it agrees (see
`jaxlora.runtime.agreed_stop`; without the service, a signal is recorded and
the processes vote at each boundary); before training the notice waits for
the first boundary, after it the run finishes. The service takes SIGTERM
even from a single process that called `jax.distributed.initialize()`: such
a process is joined too, with itself.

Where the stop is raised. A handler that raises can fire between any two
bytecodes, so `Interrupted` is a `BaseException` (as `KeyboardInterrupt` is):
no `except Exception` that reads a file (a config, a checkpoint) can mistake
a stop for a broken file. Two places must not see it raised at all:

    guarded()   writes that must end whole, such as a checkpoint: a stop that
                comes during one is raised when it ends (a failed write is
                reported as itself)
    finalizers  `__del__` and weakref callbacks, where Python only prints an
                exception ("Exception ignored in ...") and goes on: the
                signal is sent again a moment later, until it lands elsewhere

Once a stop is raised, further signals change nothing: it is on its way out.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The run was stopped by a signal; `exit_code` is the shell's 128 + signal number.
    A BaseException, like KeyboardInterrupt: never taken for a failure (see the
    module doc)."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self._said = bool(message)

    @property
    def plain(self) -> bool:
        """Whether the stop says only its signal ("interrupted by SIGTERM"): no
        message was given, and the command it ends may say what goes on."""
        return not self._said

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def stop_signal(code: int) -> int | None:
    """The signal a process's exit code says it stopped for (the inverse of
    `Interrupted.exit_code`: 128 + N; or -N, killed by it), if it is a stop's."""
    for signum in SIGNALS:
        if code in (128 + signum, -signum):
            return signum
    return None


class StopSignals:
    """Installs the handlers for the `with` block and restores the old ones after."""

    def __init__(self) -> None:
        self.signum: int | None = None  # a deferred signal, recorded
        self._stopping: int | None = None  # a signal that stops at once, once it may be raised
        self._raised = False  # the stop is on its way out
        self._guards = 0  # depth of `guarded` blocks
        self._deferring = False
        self._previous: dict[int, object] = {}
        self._agreed: Callable[[], bool] | None = None
        self._notify = True

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self._raised:
            return
        if self._stopping is None:
            if self.signum is None and (self._deferring or self._agreed is not None):
                self.signum = signum
                if self._agreed is not None and self._notify:  # a notice to every process
                    os.kill(os.getpid(), signal.SIGTERM)
                return
            self._stopping = signum
        if self._guards:  # raised as the guarded block ends
            return
        if _in_finalizer(frame):  # raised here, it would be printed and lost
            self._send_again()
            return
        raise self.interrupted()

    def _send_again(self) -> None:
        """SIGINT to this process in a moment, while the handlers are still
        installed: the handler runs again, by then (most likely) outside the
        finalizer, and raises the stop it holds."""
        def again() -> None:
            if self._previous and not self._raised:
                os.kill(os.getpid(), signal.SIGINT)
        timer = threading.Timer(REDELIVERY_SECONDS, again)
        timer.daemon = True
        timer.start()

    def interrupted(self) -> Interrupted:
        """The stop to raise now (a signal's, or SIGTERM); further signals
        change nothing."""
        self._raised = True
        return Interrupted(self._stopping or self.signum or signal.SIGTERM)

    def ended(self) -> None:
        """The command has ended (its message is being printed): from now on
        signals change nothing."""
        self._raised = True

    @contextlib.contextmanager
    def guarded(self) -> Iterator[None]:
        """A block that must end whole (a checkpoint write): a signal that would
        stop at once is raised when the block ends, unless the block failed
        of itself."""
        self._guards += 1
        try:
            yield
        finally:
            self._guards -= 1
        if not self._guards and self._stopping is not None and not self._raised:
            raise self.interrupted()

    def join_processes(self, agreed: Callable[[], bool], notify: bool = True) -> None:
        """From now on the stop is `agreed()` (asked at every step boundary),
        and a first signal is a notice to every process (see the module doc):
        passed on as a SIGTERM to JAX's preemption service (`notify`), or
        only recorded, for `agreed` to put to the vote."""
        self._agreed = agreed
        self._notify = notify

    @property
    def joined(self) -> bool:
        return self._agreed is not None

    def requested(self) -> bool:
        """True once a deferred signal has arrived."""
        return self.signum is not None

    def at_step_boundary(self) -> bool:
        """Whether training stops here: this process's signal, or the stop
        every process agreed."""
        return self._agreed() if self._agreed is not None else self.requested()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Within the block a first signal is only recorded (see `requested`)."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False


# How soon a signal that landed in a finalizer is sent again.
REDELIVERY_SECONDS = 0.02
# Where Python runs weakref callbacks (WeakKeyDictionary's `remove`, `finalize`).
_WEAKREF_FILES = ("weakref.py", "_weakrefset.py")


def _in_finalizer(frame) -> bool:
    """Whether `frame` runs inside a `__del__` or a weakref callback, where an
    exception raised is printed as "Exception ignored in ..." and dropped."""
    while frame is not None:
        code = frame.f_code
        if code.co_name == "__del__" or os.path.basename(code.co_filename) in _WEAKREF_FILES:
            return True
        frame = frame.f_back
    return False
