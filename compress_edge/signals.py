"""The one handler of the stop signals (SIGINT, SIGTERM): standard library only, importable without torch.

:class:`StopRequest` serves every job that a scheduler, ``docker stop`` or Ctrl-C may stop, the
differences given as parameters:

* a training run or the teacher cache (the defaults): the first signal sets ``signal``, which the job
  checks at its next safe point (``then``: what happens there, for the log); a second one stops at once
  (KeyboardInterrupt);
* the demo (``at_once=True, watch=True``) and a change to an index (``signals=(SIGTERM,), at_once=True``):
  the first signal raises :class:`Interrupted` where the program is, and later ones are ignored so that
  nothing interrupts the way out. ``watch`` also keeps a wakeup fd, whose :meth:`StopRequest.seen` tells
  about a signal that a nested handler (a training stage's own) took.

Signals reach the main thread only: elsewhere the handler installs nothing. A forked data-loader worker
that has not yet ignored the signals (:func:`compress_edge.data.loaders.ignore_stop_signals`) leaves
them to the main process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A stop signal, raised where the program was (``at_once``); a BaseException, like KeyboardInterrupt,
    so that no handler on the way out takes it for an error of its own."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class StopRequest:
    """Handle ``signals`` while the ``with`` block runs; the previous handlers (and wakeup fd) come back
    after it. See the module docstring for the two ways a signal is taken."""

    def __init__(self, then: str = "saving a checkpoint after this step", *,
                 signals: tuple[int, ...] = STOP_SIGNALS, at_once: bool = False, watch: bool = False) -> None:
        self.signal: int | None = None
        self.then = then
        self.signals = tuple(signals)
        self.at_once = at_once
        self.watch = watch
        self._old: dict[int, Any] = {}
        self._pid = os.getpid()
        self._read = self._write = -1
        self._old_fd: int | None = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach the main thread only: nothing to handle here
        if self.watch:
            self._read, self._write = os.pipe()
            os.set_blocking(self._read, False)
            os.set_blocking(self._write, False)
            self._old_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for sig in self.signals:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if os.getpid() != self._pid:  # a forked loader worker before it ignores stop signals
            return
        if self.at_once:
            for sig in self.signals:  # a second signal must not interrupt the way out
                signal.signal(sig, signal.SIG_IGN)
            self.signal = signum
            raise Interrupted(signum)
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        logger.warning("stop requested (%s): %s", signal.Signals(signum).name, self.then)

    def seen(self) -> int | None:
        """With ``watch``: a stop signal that arrived since the last call (also one a nested handler
        took; Python writes every signal's number to the wakeup fd, whichever handler takes it), or None."""
        found = None
        with contextlib.suppress(OSError):
            while self._read >= 0 and (data := os.read(self._read, 512)):
                found = next((n for n in data if n in self.signals), found)
        if found is not None:
            self.signal = found
        return found

    def __exit__(self, *exc) -> None:
        if exc[0] is not None and self.watch:
            self.seen()  # which signal stopped a job that raised, for the message
        for sig, old in self._old.items():
            signal.signal(sig, old)
        if self._old_fd is not None:
            signal.set_wakeup_fd(self._old_fd)
        for fd in (self._read, self._write):
            if fd >= 0:
                os.close(fd)
        self._read = self._write = -1
