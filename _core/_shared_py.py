"""The pure-Python twin of ``_shared_c``: the same segment layout and the same protocol.

Python has no atomic compare-and-swap on shared memory, so here every compare-and-swap
and every store to a shared word is made under an exclusive ``fcntl.flock`` on the
segment's file, taken and dropped around that one word. The kernel drops a dead process's
flock, so a process killed while holding it does not wedge the others, and the protocol
itself (stamps, ledgers, helping: ``_shared_c``'s module docstring) is what keeps counts
exact after such a death, exactly as in the C build. Loads are unlocked aligned 8-byte
reads. The wake-up is the same futex, called through ``ctypes``.

Do not attach the twin and the compiled table to one segment at once: the compiled
table's compare-and-swap does not take the twin's lock.
"""

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
from tritonmesh._core._segment import ACTIVE, CLAIMED, FREE, REMOVED, UNAVAILABLE

_MASK: Final = 0xFFFFFFFFFFFFFFFF
_LOW: Final = 0xFFFFFFFF
_HIGH: Final = _MASK ^ _LOW
_SEQ_MASK: Final = 0xFFFFFF
_STAMP_NEG: Final = 1 << 24
_PICK_ATTEMPTS: Final = 64
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


class SharedTable:
    """Outstanding-request counts per upstream slot, shared by every attached process.

    Full API docs: _shared_c.pyi. One table object per process (and thread).
    """

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
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self._rng = splitmix64(seed & _MASK) or 1
        self._scanned = 0
        ok, holder = self._cas(self._procs + process_index * 64, 0, os.getpid())
        if not ok:
            self._unmap()
            raise ValueError(f"process index {process_index} of {name!r} is held by pid "
                             f"{holder} (reclaim it first if that process has exited)")
        self._store(self._procs + process_index * 64 + _segment.P_START, _U64,
                    _segment.start_time(os.getpid()))

    @classmethod
    def create(cls, capacity: int, max_processes: int, *, tag: str = "table",
               seed: int | None = None, unlink_stale: bool = True) -> SharedTable:
        """Create a segment owned by this process and attach to it as process index 0."""
        _segment.check_sizes(capacity, max_processes)
        if unlink_stale:
            _segment.unlink_stale()
        name = _segment.segment_name(tag)
        fd = _segment.create_file(name, _segment.offsets(capacity, max_processes)[3])
        try:
            with mmap.mmap(fd, 0) as mm:
                _segment.initialise(memoryview(mm), capacity, max_processes)
        except BaseException:
            _segment.unlink(name)
            raise
        finally:
            os.close(fd)
        return cls(name, 0, seed)

    @classmethod
    def attach(cls, name: str, process_index: int, *, seed: int | None = None) -> SharedTable:
        """Attach to an existing segment as ``process_index``."""
        return cls(name, process_index, seed)

    def _unmap(self) -> None:
        self._futex_word = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None
            os.close(self._fd)

    def close(self) -> None:
        """Release what this process still holds, give up its index, and unmap."""
        if self._mm is None:
            return
        self._reclaim(self._pi)
        self._waiting = False
        self._unmap()

    def unlink(self) -> None:
        """Remove the segment's name (the owner does, when it is done)."""
        _segment.unlink(self.name)

    def __enter__(self) -> SharedTable:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def process_index(self) -> int:
        return self._pi

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def max_processes(self) -> int:
        return self._max_processes

    # -- words -------------------------------------------------------------------------

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
        return self._next() % k

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

    # -- membership ------------------------------------------------------------------

    def add(self, weight: float = 1.0, limit: int = 0) -> int:
        """Add a pickable slot; returns its id (the lowest free one)."""
        w = self._check_weight(weight)
        lim = self._check_limit(limit)
        self._buf()
        for s in range(self._capacity):
            st = self._load(self._statusp(s))
            if st & _LOW != FREE:
                continue
            gen = ((st >> 32) + 1) & _LOW
            if self._cas(self._statusp(s), st, _status(CLAIMED | (self._pi + 1) << 8, gen))[0]:
                break
        else:
            raise ValueError(f"the shared table is full (capacity {self._capacity})")
        self._store(self._weightp(s), _F64, w)
        self._store(self._limitp(s), _U32, lim)
        buf = self._buf()
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            if int(_U32.unpack_from(buf, _segment.H_HIGH)[0]) < s + 1:
                _U32.pack_into(buf, _segment.H_HIGH, s + 1)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._store(self._statusp(s), _U64, _status(ACTIVE, gen))
        self._bump_generation()
        return s

    def remove(self, slot: int) -> None:
        """Never pick ``slot`` again; it is freed after its last release, in any process."""
        self._live(slot)
        st = self._load(self._statusp(slot))
        while True:
            if st & _LOW == REMOVED:
                return
            if st & _LOW == FREE or st & _STATE_MASK == CLAIMED:
                raise IndexError(f"slot {slot} is not in the table")
            ok, st = self._cas(self._statusp(slot), st, _status(REMOVED, st >> 32))
            if ok:
                break
        st = _status(REMOVED, st >> 32)
        if self._load(self._word(slot)) & _LOW == 0:
            self._cas(self._statusp(slot), st, _status(FREE, st >> 32))
        self._bump_generation()

    def set_available(self, slot: int, available: bool) -> None:
        """Put ``slot`` back in the pick set, or take it out (draining, unhealthy)."""
        self._live(slot)
        st = self._load(self._statusp(slot))
        want = ACTIVE if available else UNAVAILABLE
        while st & _LOW != want:
            if st & _LOW == REMOVED:
                raise ValueError(f"slot {slot} was removed")
            if st & _LOW not in (ACTIVE, UNAVAILABLE):
                raise IndexError(f"slot {slot} is not in the table")
            ok, st = self._cas(self._statusp(slot), st, _status(want, st >> 32))
            if ok:
                self._bump_generation()
                break

    def is_available(self, slot: int) -> bool:
        """Whether ``slot`` can be picked."""
        return self._live(slot) == ACTIVE

    def set_weight(self, slot: int, weight: float) -> None:
        """Change ``slot``'s weight; its count is kept."""
        self._live(slot)
        self._store(self._weightp(slot), _F64, self._check_weight(weight))
        self._bump_generation()

    def weight(self, slot: int) -> float:
        """``slot``'s weight."""
        self._live(slot)
        return float(_F64.unpack_from(self._buf(), self._weightp(slot))[0])

    def set_limit(self, slot: int, limit: int) -> None:
        """``slot``'s concurrency limit (0: none), which picks and try_acquire honour."""
        self._live(slot)
        self._store(self._limitp(slot), _U32, self._check_limit(limit))

    def limit(self, slot: int) -> int:
        """``slot``'s concurrency limit (0: none)."""
        self._live(slot)
        return self._load32(self._limitp(slot))

    def generation(self, slot: int) -> int:
        """``slot``'s generation: it changes when the id is reused for another instance."""
        self._live(slot)
        return self._load(self._statusp(slot)) >> 32

    def membership_generation(self) -> int:
        """Bumped by every add, remove, weight or availability change, in any process."""
        return self._load(_segment.H_GENERATION)

    # -- picks -------------------------------------------------------------------------

    def _pickable(self, s: int) -> tuple[int, int] | None:
        """``(status, count)`` of a pickable slot, or None."""
        status = self._load(self._statusp(s))
        if status & _LOW != ACTIVE:
            return None
        count = self._load(self._word(s)) & _LOW
        lim = self._load32(self._limitp(s))
        return (status, count) if lim == 0 or count < lim else None

    def _take(self, s: int, status: int) -> bool:
        if not self._update(s, True, self._load32(self._limitp(s))):
            return False
        if self._load(self._statusp(s)) == status:
            return True
        self._drop(s)
        return False

    def _scan_least(self) -> int:
        """The pickable slot with the lowest (count + 1) / weight, uniform among ties: the
        same two passes, and random draws, as the compiled table."""
        best, best_count, best_w, best_status, ties = -1, 0, 0.0, 0, 0
        buf = self._buf()
        high = self._high()
        for s in range(high):
            found = self._pickable(s)
            if found is None:
                continue
            status, count = found
            w = float(_F64.unpack_from(buf, self._weightp(s))[0])
            lhs = (count + 1) * best_w
            rhs = (best_count + 1) * w
            if lhs < rhs or best < 0:
                best, best_count, best_w, best_status, ties = s, count, w, status, 1
            else:
                ties += lhs == rhs
        self._scanned = best_status
        if ties <= 1:
            return best
        r = self._below(ties)
        for s in range(best, high):
            found = self._pickable(s)
            if found is None:
                continue
            status, count = found
            w = float(_F64.unpack_from(buf, self._weightp(s))[0])
            r -= (count + 1) * best_w == (best_count + 1) * w
            if r < 0:
                self._scanned = status
                return s
        return best

    def pick(self) -> int:
        """LEAST_OUTSTANDING_REQUESTS on the fleet-wide counts; -1 when nothing is pickable."""
        for _ in range(_PICK_ATTEMPTS):
            s = self._scan_least()
            if s < 0:
                return -1
            if self._take(s, self._scanned):
                return s
        return -1

    def _scan_random(self) -> int:
        chosen, total = -1, 0.0
        buf = self._buf()
        for s in range(self._high()):
            found = self._pickable(s)
            if found is None:
                continue
            w = float(_F64.unpack_from(buf, self._weightp(s))[0])
            total += w
            if (self._next() >> 11) * (1.0 / 9007199254740992.0) * total < w:
                chosen, self._scanned = s, found[0]
        return chosen

    def pick_random(self) -> int:
        """RANDOM: a pickable slot with probability proportional to its weight."""
        for _ in range(_PICK_ATTEMPTS):
            s = self._scan_random()
            if s < 0:
                return -1
            if self._take(s, self._scanned):
                return s
        return -1

    def _sample(self, high: int, skip: int) -> tuple[int, int, int]:
        for _ in range(high + 8):
            s = self._below(high)
            if s != skip:
                found = self._pickable(s)
                if found is not None:
                    return s, found[0], found[1]
        return -1, 0, 0

    def pick_two(self) -> int:
        """POWER_OF_TWO_CHOICES on the fleet-wide counts; -1 when nothing is pickable."""
        buf = self._buf()
        for _ in range(_PICK_ATTEMPTS):
            high = self._high()
            if high == 0:
                return -1
            a, sa, ca = self._sample(high, -1)
            if a < 0:
                a = self._scan_random()
                if a < 0:
                    return -1
                sa, ca = self._scanned, self._load(self._word(a)) & _LOW
            b, sb, cb = self._sample(high, a)
            s, self._scanned = a, sa
            if b >= 0:
                lhs = (ca + 1) * float(_F64.unpack_from(buf, self._weightp(b))[0])
                rhs = (cb + 1) * float(_F64.unpack_from(buf, self._weightp(a))[0])
                if rhs < lhs or (rhs == lhs and self._next() & 1):
                    s, self._scanned = b, sb
            if self._take(s, self._scanned):
                return s
        return -1

    # -- accounting --------------------------------------------------------------------

    def acquire(self, slot: int, generation: int = -1) -> None:
        """Count one more request on ``slot`` (a pinned sequence); ignores the limit."""
        state = self._live(slot)
        st = self._load(self._statusp(slot))
        if state == REMOVED:
            raise ValueError(f"slot {slot} was removed")
        if generation >= 0 and st >> 32 != generation:
            raise ValueError(f"slot {slot} was reused (generation {st >> 32}, not {generation})")
        self._update(slot, True, 0)
        self._confirm(slot, st)

    def _confirm(self, slot: int, st: int) -> None:
        now = self._load(self._statusp(slot))
        if now >> 32 == st >> 32 and now & _LOW in (ACTIVE, UNAVAILABLE):
            return
        self._drop(slot)
        raise ValueError(f"slot {slot} was removed")

    def try_acquire(self, slot: int, limit: int = 0) -> bool:
        """One more request on ``slot`` if its count is below ``limit`` (0: the slot's own
        limit, if any); a compare-and-swap, so the count never exceeds the limit."""
        lim = self._check_limit(limit)
        state = self._live(slot)
        st = self._load(self._statusp(slot))
        if state == REMOVED:
            raise ValueError(f"slot {slot} was removed")
        if lim == 0:
            lim = self._load32(self._limitp(slot))
        if not self._update(slot, True, lim):
            return False
        self._confirm(slot, st)
        return True

    def release(self, slot: int) -> None:
        """One request of this process on ``slot`` ended: count one fewer."""
        if self._mm is None or not 0 <= slot < self._capacity:
            raise IndexError(f"slot {slot} is not in the table")
        if self._load(self._cell(self._pi, slot)) & _LOW == 0:
            raise ValueError(f"release of slot {slot}, on which this process holds no requests")
        self._drop(slot)
        self._wake()

    def _wake(self) -> None:
        if self._load32(_segment.H_WAITERS) != 0:
            self._add(_segment.H_WAKE_SEQ, _U32, 1, _LOW)
            _libc.syscall(_SYS_FUTEX, ctypes.byref(self._futex()), _FUTEX_WAKE, 0x7FFFFFFF,
                          None, None, 0)

    def outstanding(self, slot: int) -> int:
        """``slot``'s fleet-wide outstanding count."""
        self._live(slot)
        return self._load(self._word(slot)) & _LOW

    def held(self, slot: int, process_index: int = -1) -> int:
        """What process ``process_index`` (default: this one) holds on ``slot``."""
        if self._mm is None or not 0 <= slot < self._capacity:
            raise IndexError(f"slot {slot} is not in the table")
        if process_index == -1:
            process_index = self._pi
        self._check_process(process_index)
        self._help(slot, self._load(self._word(slot)))
        return self._load(self._cell(process_index, slot)) & _LOW

    def pid(self, process_index: int) -> int:
        """The pid attached at ``process_index`` (0: none)."""
        self._check_process(process_index)
        return self._load(self._procs + process_index * 64)

    def reclaim(self, process_index: int) -> int:
        """Subtract everything process ``process_index`` held from the global counts, zero
        its ledger, and free its index. Call it after that process exited (and was reaped);
        returns the number of requests reclaimed."""
        self._buf()
        self._check_process(process_index)
        if process_index == self._pi:
            raise ValueError("a process cannot reclaim its own index; close() the table")
        pid = self.pid(process_index)
        if pid != 0 and _segment.still_attached(
                pid, self._load(self._procs + process_index * 64 + _segment.P_START)):
            raise ValueError(f"process index {process_index} is held by pid {pid}, "
                             "which is still running")
        return self._reclaim(process_index)

    def _reclaim(self, process_index: int) -> int:
        total = 0
        claimed = CLAIMED | (process_index + 1) << 8
        # The whole capacity: a process may die between claiming a slot and raising the mark.
        for s in range(self._capacity):
            st = self._load(self._statusp(s))
            if st & _LOW == claimed:  # it died inside add()
                self._cas(self._statusp(s), st, _status(FREE, st >> 32))
            self._help(s, self._load(self._word(s)))
            cell = self._cell(process_index, s)
            cur = self._load(cell)
            held = cur & _LOW
            if held:
                g = self._load(self._word(s))
                while True:  # keep the stamp: it may be another process's pending update
                    ok, g = self._cas(self._word(s), g, (g & _HIGH) | ((g - held) & _LOW))
                    if ok:
                        break
                self._store(cell, _U64, cur & _HIGH)
                total += held
            # Also when it held nothing here: it may have died between its last release's
            # count update and freeing the removed slot, or inside remove().
            if self._load(self._word(s)) & _LOW == 0:
                st = self._load(self._statusp(s))
                if st & _LOW == REMOVED:
                    self._cas(self._statusp(s), st, _status(FREE, st >> 32))
        waiting = self._procs + process_index * 64 + _P_WAITING
        if self._load32(waiting):
            self._store(waiting, _U32, 0)
            self._add(_segment.H_WAITERS, _U32, -1, _LOW)
        self._store(self._procs + process_index * 64, _U64, 0)
        if total:
            self._wake()
        return total

    # -- waiting for a release in any process -------------------------------------------

    def _futex(self) -> Any:
        if self._futex_word is None:
            self._futex_word = ctypes.c_uint32.from_buffer(self._buf(), _segment.H_WAKE_SEQ)
        return self._futex_word

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

    # -- inspection ----------------------------------------------------------------------

    def snapshot(self) -> list[tuple[int, int, float, str, int]]:
        """``(slot, outstanding, weight, state, limit)`` for every slot in use, by id."""
        buf = self._buf()
        out = []
        for s in range(self._high()):
            st = self._load(self._statusp(s)) & _LOW
            if st != FREE:
                out.append((s, self._load(self._word(s)) & _LOW,
                            float(_F64.unpack_from(buf, self._weightp(s))[0]),
                            _segment.STATE_NAMES[st & _STATE_MASK],
                            self._load32(self._limitp(s))))
        return out

    def _check_slot_live(self, s: int, tries: int) -> bool:
        # Under the lock every store takes: this build's loads are byte by byte, so an
        # unlocked read can see half of a store (a pick only reads a stale count from it;
        # a check would report a mismatch that is not there).
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        try:
            return self._check_slot_snapshot(s, tries)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _check_slot_snapshot(self, s: int, tries: int) -> bool:
        for _ in range(tries):
            g = self._load(self._word(s))
            stamp = g >> 32
            owner = (stamp >> 25) - 1 if stamp else -1
            total = 0
            for p in range(self._max_processes):
                cur = self._load(self._cell(p, s))
                held = cur & _LOW
                if p == owner and ((cur >> 32) + 1) & _SEQ_MASK == stamp & _SEQ_MASK:
                    held += -1 if stamp & _STAMP_NEG else 1
                total += held
            if self._load(self._word(s)) != g:
                continue
            if total != g & _LOW:
                raise AssertionError(f"slot {s}: global count {g & _LOW} != sum of ledgers "
                                     f"{total} (with the pending update)")
            return True
        return False

    def check_live(self, tries: int = 100) -> int:
        """Under load, for every slot: global count == sum of the ledgers, counting the one
        update whose count step is done and ledger step not yet. Not during a reclaim.
        Returns the number of slots verified; raises AssertionError on a mismatch."""
        self._buf()
        return sum(self._check_slot_live(s, tries) for s in range(self._high()))

    def check(self) -> None:
        """At quiescence: every global count is the sum of the ledgers, every free slot and
        every unattached process's ledger is zero. Raises AssertionError naming the first
        broken invariant."""
        for s in range(self._capacity):
            self._help(s, self._load(self._word(s)))
            count = self._load(self._word(s)) & _LOW
            state = self._load(self._statusp(s)) & _LOW
            total = 0
            for p in range(self._max_processes):
                held = self._load(self._cell(p, s)) & _LOW
                if held and self._load(self._procs + p * 64) == 0:
                    raise AssertionError(f"slot {s}: unattached process {p} holds {held}")
                total += held
            if total != count:
                raise AssertionError(f"slot {s}: global count {count} != sum of ledgers {total}")
            if state == FREE and count != 0:
                raise AssertionError(f"free slot {s} has count {count}")
            if state == REMOVED and count == 0:
                raise AssertionError(f"removed slot {s} with no requests should be free")
