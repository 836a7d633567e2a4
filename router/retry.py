"""A fleet-wide retry budget: retries as a share of recent requests, plus a floor.

The router retries a ModelInfer only when it provably never reached Triton (the
connection could not be made). Per request that is bounded by ``max_per_request`` and
the deadline; this budget bounds it across the endpoint, so that when many instances
fail at once retries cannot multiply the load on the survivors (a retry storm). The
rule is Finagle's ``RetryBudget`` and Linkerd's ``retryBudget``: over the last
``ttl_s`` seconds, retries may not exceed ``ratio`` x requests + ``min_per_s`` x ``ttl_s``.
The floor lets a quiet endpoint retry at all; the ratio caps a busy one. With several
router processes the budget is the fleet's: ``others`` holds the other processes'
sums (:mod:`tritonmesh.fleetbudget`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

__all__ = ["RetryBudget"]

_BUCKETS: Final = 10  # the window slides in tenths of ttl_s


class RetryBudget:
    """Counts of requests and retries over a sliding window of ``ttl_s`` seconds."""

    def __init__(self, *, max_per_request: int = 2, ratio: float = 0.2,
                 min_per_s: float = 10.0, ttl_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.max_per_request = max_per_request
        self.ratio = ratio
        self.floor = min_per_s * ttl_s
        self._clock = clock
        self._width = ttl_s / _BUCKETS
        self._requests = [0] * _BUCKETS
        self._retries = [0] * _BUCKETS
        self._request_sum = 0
        self._retry_sum = 0
        self._now = int(clock() / self._width)
        # The other router processes' (requests, retries) in their windows, as last read.
        self.others: tuple[int, int] = (0, 0)
        # Totals for the metrics endpoint: retries sent, and retries refused per reason.
        self.retried = 0
        self.refused: dict[str, int] = {"budget": 0, "per_request": 0, "deadline": 0}

    def _advance(self) -> int:
        now = int(self._clock() / self._width)
        if now != self._now:
            self._slide(now)
        return now % _BUCKETS

    def _slide(self, now: int) -> None:
        """Empty the buckets the window left behind on its way to ``now``."""
        for step in range(1, min(now - self._now, _BUCKETS) + 1):
            i = (self._now + step) % _BUCKETS
            self._request_sum -= self._requests[i]
            self._retry_sum -= self._retries[i]
            self._requests[i] = self._retries[i] = 0
        self._now = now

    def deposit(self) -> None:
        """Count one request (its first attempt)."""
        # _advance, inlined: this runs once per request.
        now = int(self._clock() / self._width)
        if now != self._now:
            self._slide(now)
        self._requests[now % _BUCKETS] += 1
        self._request_sum += 1

    def withdraw(self, attempt: int, time_left: float | None) -> str | None:
        """Take one retry for a request's ``attempt``-th retry (1-based); None if allowed,
        else why not: ``per_request``, ``deadline`` or ``budget``."""
        reason = None
        if attempt > self.max_per_request:
            reason = "per_request"
        elif time_left is not None and time_left <= 0:
            reason = "deadline"
        else:
            i = self._advance()
            requests, retries = self.others
            if self._retry_sum + retries + 1 > \
                    self.floor + self.ratio * (self._request_sum + requests):
                reason = "budget"
            else:
                self._retries[i] += 1
                self._retry_sum += 1
                self.retried += 1
                return None
        self.refused[reason] += 1
        return reason

    def available(self) -> float:
        """Retries the budget would allow now. It moves the window, so call it on the
        event loop only (the metrics endpoint, on its own thread, reads the totals)."""
        self._advance()
        requests, retries = self.others
        return max(0.0, self.floor + self.ratio * (self._request_sum + requests)
                   - self._retry_sum - retries)

    def window(self) -> tuple[int, int]:
        """This process's (requests, retries) in the window now; on the event loop only."""
        self._advance()
        return self._request_sum, self._retry_sum
