"""kt_kernel's native chatter (`CPUInfer[0x...]: Hello`, `TP MOE layer 1 ...`, `Goodbye`) kept off the terminal.

kt_kernel's C++ code prints with printf / std::cout straight to file descriptor 1, past Python's sys.stdout, so
replacing sys.stdout (contextlib.redirect_stdout) cannot catch it: in `ktchat chat` those lines landed in the
conversation. `captured(what)` points fds 1 and 2 at a temporary file around the native calls that print, flushes
Python's and C's buffers on both sides of the switch (C's stdout is block-buffered on a pipe), and logs what it
caught on this module's logger: at debug level, or as a warning when the call raised (it may say why).

The switch is process-wide, so one lock serialises it and callers keep it to the native calls. While it lasts, the
logging handlers that write to fds 1 and 2 write to saved copies of them instead: other threads' log lines still
reach the terminal, in order. A bare print from another thread in that window goes to the debug log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading

logger = logging.getLogger(__name__)

_FDS = (1, 2)
_lock = threading.RLock()
_depth = 0  # windows open on the thread holding _lock: a nested one is part of the outer one
_fflush = None


def _flush() -> None:
    """Python's buffered text and C stdio's (every FILE*, as fflush(NULL) does) out to the current fds."""
    global _fflush
    for stream in {id(s): s for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if s}.values():
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed stream has nothing to flush
            pass
    if _fflush is None:
        import ctypes

        try:
            _fflush = ctypes.CDLL(None).fflush
        except (OSError, AttributeError):
            _fflush = lambda _: 0  # noqa: E731 - no C library to flush: nothing of C's is buffered either
    _fflush(None)


def _console_handlers() -> list:
    """(handler, fd) for each logging StreamHandler that writes to fd 1 or 2."""
    loggers = [logging.getLogger(), *list(logging.Logger.manager.loggerDict.values())]
    found = {}
    for handler in (h for lg in loggers for h in getattr(lg, "handlers", ())):
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            try:
                fd = handler.stream.fileno()
            except (AttributeError, OSError, ValueError):  # StringIO and other streams without a descriptor
                continue
            if fd in _FDS:
                found[id(handler)] = (handler, fd)
    return list(found.values())


def _redirect(target: int):
    """Points fds 1 and 2 at `target`; console log handlers move to copies of the old fds first."""
    _flush()
    saved = {}
    for fd in _FDS:
        try:
            saved[fd] = os.dup(fd)
        except OSError:  # closed: nothing there to keep clean
            pass
    moved = []
    for handler, fd in _console_handlers():
        if fd in saved:
            old = handler.stream
            new = open(saved[fd], "w", buffering=1, encoding=getattr(old, "encoding", None) or "utf-8",
                       errors=getattr(old, "errors", None) or "backslashreplace", closefd=False)
            try:
                handler.setStream(new)
            except AttributeError:  # a handler whose stream is a property (logging.lastResort's kind) stays put
                new.close()
                continue
            moved.append((handler, old, new))
    for fd in saved:
        os.dup2(target, fd)
    return saved, moved


def _restore(state) -> None:
    saved, moved = state
    _flush()  # what the native code left in C's buffers goes to the file, not to the terminal
    for fd, copy in saved.items():
        os.dup2(copy, fd)
    for handler, old, new in moved:
        handler.setStream(old)  # flushes `new`
        new.close()
    for copy in saved.values():
        os.close(copy)


def _log(what: str, data: bytes, failed: bool) -> None:
    level = logging.WARNING if failed else logging.DEBUG
    for line in data.decode("utf-8", "replace").splitlines():
        if line.strip():
            logger.log(level, "%s: %s", what, line.rstrip())


@contextlib.contextmanager
def captured(what: str):
    """Native output to fds 1 and 2 inside the block goes to the debug log, each line prefixed with `what`."""
    global _depth
    with _lock:
        _depth += 1
        try:
            if _depth > 1:
                yield
                return
            with tempfile.TemporaryFile() as sink:
                state, failed = _redirect(sink.fileno()), True
                try:
                    yield
                    failed = False
                finally:
                    _restore(state)
                    sink.seek(0)
                    _log(what, sink.read(), failed)
        finally:
            _depth -= 1
