"""SIGINT and SIGTERM for the long-running commands (``up``, ``serve``, ``workers``).

Starting can take a while (Triton workers load their models): a signal then cancels the
start, whose cleanup stops whatever had started, and the command exits with 128 + the
signal's number. Once serving, a signal asks for a graceful stop instead.
"""

from __future__ import annotations

import asyncio
import signal
from types import TracebackType

__all__ = ["Interrupted", "StopSignals"]


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived before the command was serving; what had started is stopped."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} received while starting; "
                         "stopped what had started")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """A ``with`` block, entered in the task that starts and then serves.

    Until :meth:`serving` a signal cancels that task (once: a second signal lets the
    cleanup finish), and leaving the block turns that cancellation into
    :class:`Interrupted`. After :meth:`serving`, a signal sets :attr:`stop`.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self.stop = asyncio.Event()
        self.received: int | None = None
        self._serving = False
        self._cancelled = False

    def __enter__(self) -> StopSignals:
        for sig in self.SIGNALS:
            self._loop.add_signal_handler(sig, self._on_signal, sig)
        return self

    def _on_signal(self, sig: int) -> None:
        if self.received is None:
            self.received = sig
        if self._serving:
            self.stop.set()
        elif not self._cancelled:
            self._cancelled = True
            self._task.cancel()

    def serving(self) -> None:
        """Started: from now on a signal means a graceful stop."""
        self._serving = True

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # While the loop runs: uvloop cannot remove them once it has stopped, and they
        # would swallow SIGINT/SIGTERM for the rest of the process's life.
        for sig in self.SIGNALS:
            self._loop.remove_signal_handler(sig)
        if self._cancelled and exc_type is not None and issubclass(
                exc_type, asyncio.CancelledError):
            self._task.uncancel()
            assert self.received is not None
            raise Interrupted(self.received) from None
