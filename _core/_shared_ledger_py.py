"""The twin's update protocol (``_shared_c``'s module docstring), ledgers, reclaim and
checks: mixed into ``_shared_py.SharedTable``, as ``_shared_ledger.pxi`` is included in the
compiled one."""

from __future__ import annotations

import fcntl

from tritonmesh._core import _segment
from tritonmesh._core._segment import ACTIVE, CLAIMED, FREE, REMOVED, UNAVAILABLE
from tritonmesh._core._shared_words_py import (
    _HIGH,
    _LOW,
    _P_WAITING,
    _SEQ_MASK,
    _STAMP_NEG,
    _STATE_MASK,
    _U32,
    _U64,
    SharedWords,
    _status,
)


class _Ledger(SharedWords):
    """The update protocol (``_shared_c``'s module docstring), ledgers, reclaim and checks."""

    def _confirm(self, slot: int, st: int) -> None:
        now = self._load(self._statusp(slot))
        if now >> 32 == st >> 32 and now & _LOW in (ACTIVE, UNAVAILABLE):
            return
        self._drop(slot)
        raise ValueError(f"slot {slot} was removed")

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

    def snapshot(self) -> list[tuple[int, int, float, str, int]]:
        """``(slot, outstanding, weight, state, limit)`` for every slot in use, by id."""
        buf = self._buf()
        out = []
        for s in range(self._high()):
            st = self._load(self._statusp(s)) & _LOW
            if st != FREE:
                out.append((s, self._load(self._word(s)) & _LOW,
                            self._weight(buf, s),
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

    def pid(self, process_index: int) -> int:
        """The pid attached at ``process_index`` (0: none)."""
        self._check_process(process_index)
        return self._load(self._procs + process_index * 64)
