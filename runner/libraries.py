"""The libraries set up for a command that computes: JAX's persistent
compilation cache on, and their chatter (TF-style logs, transformers'
warnings, orbax's logged tracebacks) off the terminal, so that what goes
wrong reaches the user as one message naming the file or field."""

from __future__ import annotations

import logging
import os
import sys

from runner import xla_cache


def set_up() -> None:
    """Turn on the compilation cache (`runner.xla_cache`) and quiet the libraries."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import transformers

    transformers.logging.set_verbosity_error()
    xla_cache.enable()
    # orbax logs a failed write (with its traceback) through absl before raising
    # it; the run reports it as one message
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    # After a failed checkpoint write, tensorstore's remaining write callbacks
    # find orbax's event loop closed and report that as unraisable.
    default_hook = sys.unraisablehook

    def hook(unraisable):
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            default_hook(unraisable)

    sys.unraisablehook = hook
