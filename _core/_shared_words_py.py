"""The twin's words: the masks, stamp bits and packers of ``_segment``'s layout, and the
futex through ``ctypes`` (the compiled table's ``atomics.h``)."""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import platform
import struct
from typing import Any, Final

from tritonmesh._core import _segment
from tritonmesh._core._outstanding_py import splitmix64
from tritonmesh._core._segment import CLAIMED, FREE, REMOVED

_MASK: Final = 0xFFFFFFFFFFFFFFFF
_LOW: Final = 0xFFFFFFFF
_HIGH: Final = _MASK ^ _LOW
_SEQ_MASK: Final = 0xFFFFFF
_STAMP_NEG: Final = 1 << 24
_PICK_ATTEMPTS: Final = 64
_RANDOM_TRIES: Final = 32  # a pick_random's draws before it falls back to the weighted scan
# The compiled index's draws by rejection before its snapshot, on rows of that many words
# whose first non-empty word has that many slots (_shared_index.pxi).
_DRAW_TRIES: Final = 8
_DRAW_MIN_WORDS: Final = 4
_DRAW_MIN_BITS: Final = 8
# The compiled table's weight classes (_shared_weights.pxi: CLASSES, CLASS_MIN).
_CLASSES: Final = 4
_CLASS_MIN: Final = 4
_ODD_MAX: Final = 32
_STATE_MASK: Final = 0xFF  # the state; CLAIMED's next byte is the claiming process index + 1
_P_WAITING: Final = 8
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_F64 = struct.Struct("<d")
_SYS_FUTEX: Final = {"x86_64": 202, "aarch64": 98}.get(platform.machine(), 0)
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True)


def _status(state: int, gen: int) -> int:
    return ((gen & _LOW) << 32) | state


class SharedWords:
    """The twin table's mapping, its words (each compare-and-swap and store under the
    segment's flock), the update protocol on them, and argument checks: what every part
    of ``_shared_py.SharedTable`` builds on."""

    def __init__(self, name: str, process_index: int, seed: int | None = None) -> None:
        """Attach to the segment ``name`` as ``process_index``; use ``attach``/``create``."""
        fd = _segment.open_file(name)
        try:
            mm = mmap.mmap(fd, 0)
            try:
                capacity, max_processes = _segment.read_sizes(name, memoryview(mm))
                if not 0 <= process_index < max_processes:
                    raise ValueError(
                        f"process_index must be in [0, {max_processes}), got {process_index}")
            except BaseException:
                mm.close()
                raise
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._mm: mmap.mmap | None = mm
        self.name = name
        self._capacity = capacity
        self._max_processes = max_processes
        self._pi = process_index
        self._procs, self._slots, self._ledgers, _ = _segment.offsets(capacity, max_processes)
        self._row = _segment.ledger_row(capacity)
        self._waiting = False
        self._futex_word: Any = None
        # This process's view (set_view); None: every pickable slot.
        self._view_gen: Any = None
        self._view_ejected: Any = None
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self._rng = splitmix64(seed & _MASK) or 1
        self._scanned = 0
        self.scans = 0  # every least-outstanding pick: the twin keeps no pick index
        # pick_random's picture of the weights (_shared_pick_py._read_weights).
        self._weights_gen = -1
        self._even = True
        self._top_weight = 0.0
        self._classes: tuple[float, ...] = ()
        self._common: float | None = None
        ok, holder = self._cas(self._procs + process_index * 64, 0, os.getpid())
        if not ok:
            self._unmap()
            raise ValueError(f"process index {process_index} of {name!r} is held by pid "
                             f"{holder} (reclaim it first if that process has exited)")
        self._store(self._procs + process_index * 64 + _segment.P_START, _U64,
                    _segment.start_time(os.getpid()))

    def _unmap(self) -> None:
        self._futex_word = None
        self._view_gen = self._view_ejected = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None
            os.close(self._fd)

    def _buf(self) -> mmap.mmap:
        if self._mm is None:
            raise ValueError("the table is closed")
        return self._mm

    def _load(self, off: int) -> int:
        return int(_U64.unpack_from(self._buf(), off)[0])

    def _load32(self, off: int) -> int:
        return int(_U32.unpack_from(self._buf(), off)[0])

    def _cas(self, off: int, expected: int, new: int) -> tuple[bool, int]:
        """Compare-and-swap the u64 at ``off``: ``(swapped, value found)``."""
        buf = self._buf()
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            cur = int(_U64.unpack_from(buf, off)[0])
            if cur == expected:
                _U64.pack_into(buf, off, new)
                return True, cur
            return False, cur
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _store(self, off: int, packer: struct.Struct, value: float | int) -> None:
        buf = self._buf()
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            packer.pack_into(buf, off, value)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _add(self, off: int, packer: struct.Struct, delta: int, mask: int) -> int:
        buf = self._buf()
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            value = (int(packer.unpack_from(buf, off)[0]) + delta) & mask
            packer.pack_into(buf, off, value)
            return value
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _word(self, s: int) -> int:
        return self._slots + s * _segment.SLOT_SIZE

    def _statusp(self, s: int) -> int:
        return self._slots + s * _segment.SLOT_SIZE + _segment.S_STATUS

    def _limitp(self, s: int) -> int:
        return self._slots + s * _segment.SLOT_SIZE + _segment.S_LIMIT

    def _weightp(self, s: int) -> int:
        return self._slots + s * _segment.SLOT_SIZE + _segment.S_WEIGHT

    def _weight(self, buf: mmap.mmap, s: int) -> float:
        """Slot ``s``'s weight, read from ``buf`` (``_buf()``: one call per pass)."""
        return float(_F64.unpack_from(buf, self._weightp(s))[0])

    def _cell(self, pi: int, s: int) -> int:
        return self._ledgers + pi * self._row + s * 8

    def _high(self) -> int:
        return self._load32(_segment.H_HIGH)

    def _bump_generation(self) -> None:
        self._add(_segment.H_GENERATION, _U64, 1, _MASK)

    def _next(self) -> int:
        x = self._rng
        x ^= x >> 12
        x ^= (x << 25) & _MASK
        x ^= x >> 27
        self._rng = x
        return (x * 0x2545F4914F6CDD1D) & _MASK

    def _below(self, k: int) -> int:
        return (self._next() * k) >> 64  # the compiled table's tm_below

    # -- the update protocol (_shared_c's module docstring) -----------------------------

    def _help(self, s: int, g: int) -> None:
        stamp = g >> 32
        if stamp == 0:
            return
        cell = self._cell((stamp >> 25) - 1, s)
        cur = self._load(cell)
        seq = ((cur >> 32) + 1) & _LOW
        if seq & _SEQ_MASK != stamp & _SEQ_MASK:
            return
        held = ((cur & _LOW) + (-1 if stamp & _STAMP_NEG else 1)) & _LOW
        self._cas(cell, cur, (seq << 32) | held)

    def _update(self, s: int, up: bool, limit: int) -> bool:
        cell = self._cell(self._pi, s)
        word = self._word(s)
        cur = self._load(cell)
        seq = ((cur >> 32) + 1) & _LOW
        stamp = ((self._pi + 1) << 25) | (seq & _SEQ_MASK) | (0 if up else _STAMP_NEG)
        g = self._load(word)
        while True:
            self._help(s, g)
            count = g & _LOW
            if up and limit and count >= limit:
                return False
            count = (count + (1 if up else -1)) & _LOW
            ok, g = self._cas(word, g, (stamp << 32) | count)
            if ok:
                break
        held = ((cur & _LOW) + (1 if up else -1)) & _LOW
        self._cas(cell, cur, (seq << 32) | held)  # fails only when a helper applied it
        return True

    def _drop(self, s: int) -> None:
        self._update(s, False, 0)
        if self._load(self._word(s)) & _LOW == 0:
            st = self._load(self._statusp(s))
            if st & _LOW == REMOVED and self._cas(self._statusp(s), st,
                                                  _status(FREE, st >> 32))[0]:
                self._bump_generation()

    def _futex(self) -> Any:
        if self._futex_word is None:
            self._futex_word = ctypes.c_uint32.from_buffer(self._buf(), _segment.H_WAKE_SEQ)
        return self._futex_word

    def _wake(self) -> None:
        if self._load32(_segment.H_WAITERS) != 0:
            self._add(_segment.H_WAKE_SEQ, _U32, 1, _LOW)
            _libc.syscall(_SYS_FUTEX, ctypes.byref(self._futex()), _FUTEX_WAKE, 0x7FFFFFFF,
                          None, None, 0)

    # -- argument checks ---------------------------------------------------------------

    def _live(self, slot: int) -> int:
        self._buf()
        if not 0 <= slot < self._capacity:
            raise IndexError(f"slot {slot} is not in the table")
        state = self._load(self._statusp(slot)) & _LOW
        if state == FREE or state & _STATE_MASK == CLAIMED:
            raise IndexError(f"slot {slot} is not in the table")
        return state

    @staticmethod
    def _check_weight(weight: float) -> float:
        w = float(weight)
        if not w > 0 or w == float("inf"):
            raise ValueError(f"weight must be a positive finite number, got {w!r}")
        return w

    @staticmethod
    def _check_limit(limit: int) -> int:
        if not isinstance(limit, int) or not 0 <= limit <= _segment.MAX_COUNT:
            raise ValueError(f"limit must be an integer in [0, {_segment.MAX_COUNT}] "
                             f"(0: none), got {limit!r}")
        return limit

    def _check_process(self, process_index: int) -> None:
        if not 0 <= process_index < self._max_processes:
            raise ValueError(f"process_index must be in [0, {self._max_processes}), "
                             f"got {process_index}")
