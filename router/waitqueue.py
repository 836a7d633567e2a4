"""The wait queue of late binding: requests past every instance's concurrency limit.

``FIFO`` serves the oldest request first. ``LEAST_SLACK`` serves first the request that must
start soonest to finish by its deadline: the lowest ``deadline - expected service time``
(earliest-deadline-first on the latest start time, also called least laxity first). With
the same deadline budget for everyone this is ``arrival - expected service``: a long
generation starts ahead of short requests that arrived shortly before it, because its
own length leaves it less time to spare, and no request waits forever, since every
request's key is fixed when it starts waiting and later arrivals' keys grow with the clock.

One binary heap serves both orders: under FIFO every key is equal and the arrival sequence
breaks the tie.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tritonmesh.balancer import Instance

__all__ = ["WaitQueue", "Waiter"]

# (key, arrival sequence, the waiting request's future, its cost)
Waiter = tuple[float, int, "asyncio.Future[Instance]", float]


class WaitQueue:
    """Waiting requests, served lowest key first (arrival order among equal keys)."""

    def __init__(self) -> None:
        self._heap: list[Waiter] = []
        self._sequence = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, future: asyncio.Future[Instance], cost: float, key: float = 0.0) -> Waiter:
        """Add a waiting request; returns its entry, for :meth:`discard`."""
        entry = (key, next(self._sequence), future, cost)
        heapq.heappush(self._heap, entry)
        return entry

    def head(self) -> Waiter:
        """The entry served next (the queue must not be empty)."""
        return self._heap[0]

    def pop(self) -> Waiter:
        return heapq.heappop(self._heap)

    def discard(self, entry: Waiter) -> None:
        """Remove a request that stopped waiting (deadline, cancel); O(n), rare."""
        try:
            self._heap.remove(entry)
        except ValueError:
            return
        heapq.heapify(self._heap)
