"""Quieter logs, opted into by the scripts (never by a library constructor): the one-line messages of
lightjax's own errors are what a user should read first.

`quiet_orbax_errors()`: a failed asynchronous checkpoint save is reported once, in one line, by the
train loop (train/checkpoint.py, `Checkpointer.check`); Orbax's threads and asyncio loops would also log
it, and its follow-on errors, as a few dozen tracebacks.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any


def _about_orbax(exc_info: Any, text: str) -> bool:
    """Whether an error log or unraisable error is Orbax's own account of a failed save: its message or
    its traceback names Orbax, or it is its asyncio loop's follow-on 'Event loop is closed'."""
    frames = traceback.extract_tb(exc_info[2]) if exc_info and exc_info[2] else []
    return "orbax" in text or "Event loop is closed" in text or any("orbax" in f.filename for f in frames)


class _OrbaxErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and _about_orbax(record.exc_info, record.getMessage()))


def quiet_orbax_errors() -> None:
    """Drop Orbax's error logs and unraisable errors from this process's output (once; idempotent)."""
    if any(isinstance(f, _OrbaxErrors) for f in logging.getLogger("absl").filters):
        return
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_OrbaxErrors())
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        exc_info = (unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback)
        if not _about_orbax(exc_info, str(unraisable.exc_value)):
            previous(unraisable)

    sys.unraisablehook = hook
