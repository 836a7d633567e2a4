"""A pick is a lease: what one request holds on one instance, from
:meth:`tritonmesh.balancer.Balancer.acquire` until :meth:`Lease.release`.

The data paths do ``lease = await balancer.acquire(...)``, then ``try: ... finally:
lease.release(ok)``. Release does everything an ending request owes, exactly once however
often it is called: the count goes down, a waiting request may take the freed capacity, a
draining instance may be done, and the latency and outcome are recorded (with what
LEAST_OUTSTANDING_WORK and dispatch ahead learn from them). A request that was never sent
(its deadline went by in the queue) is :meth:`abandon`-ed: its count goes down, and
nothing is learned from it.

What the request told about the instance goes to the lease's outlier detector
(:func:`tritonmesh.forwarding.judge` for a failed call).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import TYPE_CHECKING

from tritonmesh.instance import LATENCY_BUCKETS, Instance

if TYPE_CHECKING:
    from tritonmesh.outlier import OutlierDetector
    from tritonmesh.request_metrics import ModelStats

__all__ = ["Lease"]


class Lease:
    __slots__ = ("_held", "ahead", "code", "cost", "instance", "last", "outliers", "queued",
                 "sent", "started", "stats")

    def __init__(self, instance: Instance, cost: float, outliers: OutlierDetector,
                 stats: ModelStats, queued_s: float = 0.0):
        self.instance = instance
        self.cost = cost  # what it was counted with, and is given back with
        # LEAST_OUTSTANDING_WORK: the work it found there (0.0 for other strategies)
        self.ahead = 0.0 if instance.variant.work is None else instance.work_ahead()
        self.outliers = outliers
        self.started = time.perf_counter()
        self._held = True
        # Request metrics (tritonmesh.request_metrics): its variant's and model's stats,
        # seconds in the late-binding queue, when it went upstream, when its last response
        # came (0.0: none yet), and the gRPC status it ends with when not answered
        # (data paths set it when they know; otherwise the client or the router ended it).
        self.stats = stats
        self.queued = queued_s
        self.sent = self.started
        self.last = 0.0
        self.code = "CANCELLED"

    @property
    def held(self) -> bool:
        return self._held

    def release(self, ok: bool) -> None:
        """The request ended, answered (``ok``) or not; only the first call counts."""
        if not self._held:
            return
        self._held = False
        instance = self.instance
        variant = instance.variant
        variant.give_back(instance, self.cost)
        now = time.perf_counter()
        seconds = now - self.started
        if variant.work is not None:
            instance.learn(seconds, ok, self.ahead, self.cost)
        # What the router has seen of the instance (tritonmesh.metrics reads it), here
        # rather than in a method of Instance: one frame fewer on every request.
        instance.requests += 1
        if not ok:
            instance.errors += 1
        instance.latency_sum += seconds
        instance.latency_buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        sent = self.sent
        self.stats.finished("OK" if ok else self.code, now - sent,
                            sent - self.started + self.queued, self.queued)

    def abandon(self, code_name: str = "DEADLINE_EXCEEDED") -> None:
        """The request was never sent (its deadline went by first): give its capacity back
        and learn nothing from it; the metrics count it as answered ``code_name`` here."""
        if self._held:
            self._held = False
            self.instance.variant.give_back(self.instance, self.cost)
            self.stats.finished(code_name, 0.0,
                                time.perf_counter() - self.started + self.queued, self.queued)

    def sending(self) -> None:
        """It goes upstream now: the time before this was the router's, after it Triton's."""
        self.sent = time.perf_counter()

    def responded(self) -> None:
        """A response for it came (streams): time to the first, or since the one before."""
        now = time.perf_counter()
        if self.last:
            self.stats.time_between_responses.observe(now - self.last)
        else:
            self.stats.time_to_first_response.observe(now - self.sent)
        self.last = now

    # What the request's outcome says about the instance (tritonmesh.outlier).

    def succeeded(self) -> None:
        self.outliers.success(self.instance)

    def stream_error(self, message: str) -> None:
        self.outliers.stream_error(self.instance, message)

    def __repr__(self) -> str:
        return f"<Lease {self.instance!r} cost={self.cost:g}{'' if self._held else ' released'}>"
