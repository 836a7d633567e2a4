"""The twin's membership (adding, removing, taking slots in and out of the pick set):
mixed into ``_shared_py.SharedTable``, as ``_shared_members.pxi`` is included in the
compiled one."""

from __future__ import annotations

import fcntl

from tritonmesh._core import _segment
from tritonmesh._core._segment import ACTIVE, CLAIMED, FREE, REMOVED, UNAVAILABLE
from tritonmesh._core._shared_words_py import (
    _F64,
    _LOW,
    _STATE_MASK,
    _U32,
    _U64,
    SharedWords,
    _status,
)


class _Members(SharedWords):
    """Membership: adding, removing and taking slots in and out of the pick set."""

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
