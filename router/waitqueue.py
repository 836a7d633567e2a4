"""The wait queue of late binding: requests past every instance's concurrency limit.

``FIFO`` serves the oldest request first. ``LEAST_SLACK`` serves first the request that must
start soonest to finish by its deadline: the lowest ``deadline - expected service time``
(earliest-deadline-first on the latest start time, also called least laxity first). With
the same deadline budget for everyone this is ``arrival - expected service``: a long
generation starts ahead of short requests that arrived shortly before it, because its
own length leaves it less time to spare, and no request waits forever, since every
request's key is fixed when it starts waiting and later arrivals' keys grow with the clock.

Priorities (Triton's request ``priority``, 1 first) shift a key by ``(priority - 1) x
aging_s``: a request of priority 2 is served as if it had arrived ``aging_s`` later than it
did. Within a class the order above holds; across classes a waiting request goes ahead of
every newer arrival of the class above once it has waited ``aging_s`` per class between
them, so no class starves. When the queue is full, the request of the lowest class (the
newest of it) makes room for one of a higher class.

One binary heap serves every order: the key, then the arrival sequence.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tritonmesh.instance import Instance

__all__ = ["WaitQueue", "Waiter"]

# (key, arrival sequence, the waiting request's future, its cost, its priority)
Waiter = tuple[float, int, "asyncio.Future[Instance]", float, int]


class WaitQueue:
    """Waiting requests, served lowest key first (arrival order among equal keys)."""

    def __init__(self) -> None:
        # Non-empty while a request waits: a release reads it directly (no call).
        self.heap: list[Waiter] = []
        self._sequence = itertools.count()

    def __len__(self) -> int:
        return len(self.heap)

    def push(self, future: asyncio.Future[Instance], cost: float, key: float = 0.0,
             priority: int = 1) -> Waiter:
        """Add a waiting request; returns its entry, for :meth:`discard`."""
        entry = (key, next(self._sequence), future, cost, priority)
        heapq.heappush(self.heap, entry)
        return entry

    def head(self) -> Waiter:
        """The entry served next (the queue must not be empty)."""
        return self.heap[0]

    def pop(self) -> Waiter:
        return heapq.heappop(self.heap)

    def lowest(self) -> Waiter:
        """The entry to shed first: of the lowest class (highest priority number), the
        newest. O(n); only a full queue asks."""
        return max(self.heap, key=lambda entry: (entry[4], entry[1]))

    def discard(self, entry: Waiter) -> None:
        """Remove a request that stopped waiting (deadline, cancel, shed); O(n), rare."""
        try:
            self.heap.remove(entry)
        except ValueError:
            return
        heapq.heapify(self.heap)
