"""Control-plane chores on a timer, never on the request path.

* Sequences: a client that starts sequences and never ends them would grow the pin map
  for good; pins idle past ``limits.sequence_idle_timeout_s`` are forgotten.
* Memory: glibc keeps freed heap in its arenas (gRPC's threads each get one), so after
  a burst of large messages the router's RSS stays near its peak. ``malloc_trim(0)``
  hands the free pages back; docs/BENCHMARKS.md has the figures.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

from tritonmesh.balancer import Balancer
from tritonmesh.chore import Chore
from tritonmesh.config import LimitsConfig

__all__ = ["Housekeeper", "malloc_trim"]

log = logging.getLogger("tritonmesh.housekeeping")


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def malloc_trim() -> bool:
    """Return free heap pages to the OS; False where the C library cannot."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


class Housekeeper(Chore):
    """Every ``sequence_idle_timeout_s / 2`` (or ``memory_trim_interval_s`` if sooner):
    forget idle sequences; and trim the heap when that is due."""

    def __init__(self, balancer: Balancer, limits: LimitsConfig):
        self.balancer = balancer
        self.limits = limits

    def tick(self, now: float, trimmed_at: float) -> float:
        """One round; returns when the heap was last trimmed."""
        expired = self.balancer.expire_sequences(self.limits.sequence_idle_timeout_s)
        if expired:
            log.debug("forgot %d idle sequences", expired)
        every = self.limits.memory_trim_interval_s
        if every > 0 and now - trimmed_at >= every:
            malloc_trim()
            return now
        return trimmed_at

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        limits = self.limits
        period = max(0.05, limits.sequence_idle_timeout_s / 2)
        if limits.memory_trim_interval_s > 0:
            period = min(period, limits.memory_trim_interval_s)
        trimmed_at = loop.time()
        while True:
            await asyncio.sleep(period)
            try:
                trimmed_at = self.tick(loop.time(), trimmed_at)
            except Exception:  # a bug here must not end the chores
                log.exception("housekeeping round failed")

