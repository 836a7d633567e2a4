"""The twin's wait for a release in any process (a futex on the wake-up sequence): mixed
into ``_shared_py.SharedTable``, as ``_shared_wake.pxi`` is included in the compiled one."""

from __future__ import annotations

import ctypes
import platform

from tritonmesh._core import _segment
from tritonmesh._core._shared_words_py import (
    _FUTEX_WAIT,
    _LOW,
    _P_WAITING,
    _SYS_FUTEX,
    _U32,
    SharedWords,
    _libc,
    _Timespec,
)


class _Wake(SharedWords):
    """Waiting for a release in any process: a futex on the wake-up sequence."""

    def begin_wait(self) -> int:
        """Register as a waiter; returns the wake-up sequence to pass to wait_for_release.
        Read it *before* checking the condition (try_acquire), then wait if that failed."""
        if not _SYS_FUTEX:
            raise NotImplementedError(f"no futex syscall number for {platform.machine()}")
        if not self._waiting:
            # Count first, flag second: a death between leaves one waiter too many.
            self._add(_segment.H_WAITERS, _U32, 1, _LOW)
            self._store(self._procs + self._pi * 64 + _P_WAITING, _U32, 1)
            self._waiting = True
        return self._load32(_segment.H_WAKE_SEQ)

    def wait_for_release(self, seen: int, timeout: float) -> int:
        """Block until a release in any process moves the wake-up sequence off ``seen``, or
        ``timeout`` seconds; returns the sequence now (``seen``: timed out)."""
        if not self._waiting:
            raise ValueError("begin_wait() first")
        timeout = max(timeout, 0.0)
        ts = _Timespec(int(timeout), int((timeout - int(timeout)) * 1e9))
        _libc.syscall(_SYS_FUTEX, ctypes.byref(self._futex()), _FUTEX_WAIT, seen,
                      ctypes.byref(ts), None, 0)
        return self._load32(_segment.H_WAKE_SEQ)

    def end_wait(self) -> None:
        """Stop being a waiter (releases stop paying for the wake-up)."""
        if self._waiting and self._mm is not None:
            self._store(self._procs + self._pi * 64 + _P_WAITING, _U32, 0)
            self._add(_segment.H_WAITERS, _U32, -1, _LOW)
        self._waiting = False
