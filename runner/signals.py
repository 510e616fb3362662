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
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The run was stopped by a signal; `exit_code` is the shell's 128 + signal number."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class StopSignals:
    """Installs the handlers for the `with` block and restores the old ones after."""

    def __init__(self) -> None:
        self.signum: int | None = None
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
        if self.signum is None and (self._deferring or self._agreed is not None):
            self.signum = signum
            if self._agreed is not None and self._notify:  # a notice to every process
                os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Interrupted(signum)

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
