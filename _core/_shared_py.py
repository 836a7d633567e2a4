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

import mmap
import os
from typing import Any

from tritonmesh._core import _segment
from tritonmesh._core._segment import ACTIVE
from tritonmesh._core._shared_ledger_py import _Ledger
from tritonmesh._core._shared_members_py import _Members
from tritonmesh._core._shared_pick_py import _Picks
from tritonmesh._core._shared_wake_py import _Wake
from tritonmesh._core._shared_words_py import (
    _F64,
    _LOW,
    _U32,
)


class SharedTable(_Ledger, _Members, _Picks, _Wake):
    """Outstanding-request counts per upstream slot, shared by every attached process.

    Full API docs: _shared_c.pyi. One table object per process (and thread).
    """

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

    def set_view(self, generations: Any, ejected: Any = None) -> None:
        """Picks in this process skip a slot unless ``generations[slot]`` is its generation
        and ``ejected[slot]`` is 0."""
        if len(generations) < self._capacity or (
                ejected is not None and len(ejected) < self._capacity):
            raise ValueError(f"a view needs {self._capacity} slots")
        self._view_gen, self._view_ejected = generations, ejected

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

    # -- the update protocol (_shared_c's module docstring) -----------------------------

    # -- argument checks ---------------------------------------------------------------

    # -- membership ------------------------------------------------------------------

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

    # -- accounting --------------------------------------------------------------------

    def release(self, slot: int) -> None:
        """One request of this process on ``slot`` ended: count one fewer."""
        if self._mm is None or not 0 <= slot < self._capacity:
            raise IndexError(f"slot {slot} is not in the table")
        if self._load(self._cell(self._pi, slot)) & _LOW == 0:
            raise ValueError(f"release of slot {slot}, on which this process holds no requests")
        self._drop(slot)
        self._wake()

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

    # -- waiting for a release in any process -------------------------------------------

    # -- inspection ----------------------------------------------------------------------
