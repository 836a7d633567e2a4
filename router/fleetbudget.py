"""The retry budget of the whole fleet of router processes (``processes`` >= 2).

The budget (:class:`~tritonmesh.retry.RetryBudget`) bounds retries by the endpoint's
recent requests: ``ratio`` x requests + the floor, over ``ttl_s``. With K router
processes each one counts what it sees; left alone, each would allow the floor and its
ratio on its own, K floors in all, which is the retry storm the budget exists to stop.

Each process publishes its window's sums (requests, retries) in its own row of one
segment (``tritonmesh-<supervisor pid>-retries``: a 64-byte row per process index, two
u64 words), every ``members.POLL_S``, and reads the other rows into its budget
(``RetryBudget.others``): a retry is allowed when the fleet's retries stay within the
fleet's budget. Counted, not decided, in one place: a request pays nothing for it (a
deposit stays a local add), and the decision stays where the retry is. The rows are
read and written without a lock (each has one writer); the price is that the others'
figures are up to one poll old, so within one poll the fleet can overrun its budget by
what the other processes retry in that time. The supervisor zeroes a dead process's row
when it reclaims the process's share of the tables.
"""

from __future__ import annotations

import mmap
import os
from typing import Final

from tritonmesh._core import _segment
from tritonmesh.retry import RetryBudget

__all__ = ["SharedRetryCounts"]

MAGIC: Final = _segment.RETRIES_MAGIC
HEADER: Final = 64
H_PROCESSES: Final = 12
ROW: Final = 64


class SharedRetryCounts:
    """Each router process's recent requests and retries, one row per process index."""

    def __init__(self, name: str, fd: int, index: int):
        self.name = name
        self.index = index
        self._fd = fd
        self._map = mmap.mmap(fd, 0)
        if int.from_bytes(self._map[:8], "little") != MAGIC:
            self._map.close()
            os.close(fd)
            raise ValueError(f"shared-memory segment {name!r} is not a tritonmesh retry table")
        self.processes = int.from_bytes(self._map[H_PROCESSES:H_PROCESSES + 4], "little")
        self._words = memoryview(self._map)[HEADER:HEADER + ROW * self.processes].cast("Q")

    @classmethod
    def create(cls, processes: int, tag: str = "retries") -> SharedRetryCounts:
        name = _segment.segment_name(tag)
        fd = _segment.create_owned(name, HEADER + ROW * processes, MAGIC,
                                   {H_PROCESSES: processes.to_bytes(4, "little")})
        return cls(name, fd, 0)

    @classmethod
    def attach(cls, name: str, index: int) -> SharedRetryCounts:
        return cls(name, _segment.open_file(name), index)

    def close(self) -> None:
        if not self._map.closed:
            self._words.release()
            self._map.close()
            os.close(self._fd)

    def unlink(self) -> None:
        _segment.unlink(self.name)

    def row(self, index: int) -> tuple[int, int]:
        """Process ``index``'s last published (requests, retries)."""
        step = ROW // 8
        return int(self._words[index * step]), int(self._words[index * step + 1])

    def clear(self, index: int) -> None:
        """Process ``index`` exited: its counts leave the fleet's."""
        step = ROW // 8
        self._words[index * step] = self._words[index * step + 1] = 0

    def exchange(self, budget: RetryBudget) -> None:
        """Publish this process's window sums, and give ``budget`` the others'."""
        requests, retries = budget.window()
        step = ROW // 8
        words = self._words
        words[self.index * step], words[self.index * step + 1] = requests, retries
        other_requests = other_retries = 0
        for index in range(self.processes):
            if index != self.index:
                other_requests += words[index * step]
                other_retries += words[index * step + 1]
        budget.others = (other_requests, other_retries)
