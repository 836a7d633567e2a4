"""Late binding across router processes: a release in one process wakes the requests
waiting in the others.

Each router process keeps its own wait queue per variant (``Variant.wait``); the
concurrency limit itself is in the shared table (every pick is a compare-and-swap that
never takes a slot past it, in any process). What a process cannot see is capacity freed
by another one. So, while a variant of this process has waiting requests, this process is
registered as a waiter on the variant's table (``begin_wait``, on the event loop) and a
thread sleeps on the table's futex; every release, in any process, moves the wake-up
sequence and wakes it, and it hands ``Variant.dispatch`` to the event loop
(``call_soon_threadsafe``), which gives the freed capacity to the queue's head if its
pick wins the slot. No wake-up is lost: the thread reads the sequence, then asks for a
dispatch, then sleeps only while the sequence has not moved, so a release either comes
before the sequence was read (the dispatch sees it) or wakes the sleep. With no request
waiting, nothing is registered and a release costs one load. The thread only sleeps on
the futex and reads the sequence, which take no lock: everything else, registering
included, stays on the event loop (the twin's flock is per open file, not per thread).

Order: FIFO (or the queue's order) within a process. Across processes every registered
process is woken and their head waiters race for the slot, so a request can be overtaken
by requests that arrived later at another router process; each release is taken by one
of the heads, never by a request that is not at the head of its queue.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Final

from tritonmesh.sharedcounts import SharedCounts
from tritonmesh.variant import Variant

__all__ = ["ReleaseWaker"]

# How long the thread sleeps on the futex before it looks again whether requests still
# wait here (or the process stops); a release wakes it at once.
RECHECK_S: Final = 0.5


class ReleaseWaker:
    """One variant's cross-process wake-ups in this router process."""

    def __init__(self, variant: Variant, counts: SharedCounts,
                 loop: asyncio.AbstractEventLoop):
        self.variant = variant
        self.counts = counts
        self.loop = loop
        self._wanted = threading.Event()  # set while requests wait here (and registered)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"tritonmesh-wake-{variant.name}")
        variant.on_wait = self._waiting
        self._thread.start()

    def _waiting(self) -> None:
        """On the event loop: a request started to wait here."""
        if not self._wanted.is_set():
            self.counts.shared.begin_wait()
            self._wanted.set()

    def _run(self) -> None:
        table = self.counts.shared
        while True:
            self._wanted.wait()
            if self._stopped:
                return
            try:
                seen = table.wait_for_release(0, 0.0)  # the sequence now
                self.loop.call_soon_threadsafe(self._dispatch)
                table.wait_for_release(seen, RECHECK_S)
            except ValueError:  # unregistered meanwhile: nobody waits here any more
                continue

    def _dispatch(self) -> None:
        """On the event loop: hand freed capacity to the queue; unregister once it is empty."""
        variant = self.variant
        variant.dispatch()
        if not variant.waiters and self._wanted.is_set() and not self._stopped:
            self._wanted.clear()
            self.counts.shared.end_wait()

    def stop(self) -> None:
        """On the event loop, before the table closes."""
        self.variant.on_wait = None
        self._stopped = True
        self._wanted.set()
        self._thread.join()
        self.counts.shared.end_wait()
