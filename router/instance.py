"""One Triton server inside a variant: its membership state, the flags that take it out of
the pick set, and what the router has seen of its requests.

Two detectors judge an instance, each on a flag of its own (Envoy's split): the health
checker sets ``healthy`` from active probes, the outlier detector sets ``ejected`` from
failed requests. Neither writes the other's flag; an instance is picked only while both
let it, and while its membership ``state`` is ACTIVE (:attr:`Instance.pickable`).
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from typing import TYPE_CHECKING, Final

from tritonmesh.workers.upstream import Upstream

if TYPE_CHECKING:
    from tritonmesh.variant import Variant

__all__ = ["LATENCY_BUCKETS", "Instance", "InstanceState"]

# Bucket upper bounds (seconds) for the per-instance latency histogram.
LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
)


class InstanceState(enum.StrEnum):
    """Membership: ACTIVE takes new requests (when its detectors let it); DRAINING finishes
    the ones it has; REMOVED is out of the table, its slot freed once its last request ends."""

    ACTIVE = "ACTIVE"
    DRAINING = "DRAINING"
    REMOVED = "REMOVED"


class Instance:
    """One Triton server inside a variant, with what the router has seen of it."""

    __slots__ = (
        "absorbed", "address", "drained", "ejected", "ejected_until", "ejections", "errors",
        "failures", "healthy", "latency_buckets", "latency_sum", "requests", "sent_ahead", "slot",
        "state", "upstream", "variant", "weight",
    )

    def __init__(self, variant: Variant, slot: int, upstream: Upstream, weight: float = 1.0):
        self.variant = variant
        self.slot = slot
        self.weight = weight
        self.upstream = upstream
        self.address = upstream.address
        self.state = InstanceState.ACTIVE
        self.healthy = True  # the health checker's flag
        # The outlier detector's (tritonmesh.outlier): ejected, until when at the earliest,
        # how many times, and failures in a row.
        self.ejected = False
        self.ejected_until = 0.0
        self.ejections = 0
        self.failures = 0
        # Set while draining; released once the last outstanding request ends.
        self.drained: asyncio.Event | None = None
        self.requests = 0
        self.errors = 0
        self.sent_ahead = 0  # requests handed over while the one before still ran
        self.absorbed = 0  # calls whose client left, left to finish (upstream_cancellation)
        self.latency_sum = 0.0
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)

    @property
    def pickable(self) -> bool:
        """Whether new requests may come here: a member, passing health checks, not ejected."""
        return self.state is InstanceState.ACTIVE and self.healthy and not self.ejected

    @property
    def removed(self) -> bool:
        return self.state is InstanceState.REMOVED

    @property
    def outstanding(self) -> int:
        if self.state is InstanceState.REMOVED and not self.variant.holds(self):
            # Once its last request ends, a removed instance's slot is freed (and may be
            # reused by a newer instance): nothing of it is outstanding any more.
            return 0
        return self.variant.table.outstanding(self.slot)

    def work_ahead(self) -> float:
        """LEAST_OUTSTANDING_WORK: the work outstanding here, a just-picked request's own
        included, and other replicas' (load reports): what it will wait behind; 0.0 for
        other strategies."""
        work = self.variant.work
        return 0.0 if work is None else work.work(self.slot) + work.external_work(self.slot)

    def learn(self, seconds: float, ok: bool, ahead: float, cost: float) -> None:
        """LEAST_OUTSTANDING_WORK: what one finished request teaches (its release calls
        this; :meth:`tritonmesh.lease.Lease.release` counts every request here itself).

        ``ahead``: the work it found here when picked (:meth:`work_ahead`); a success
        teaches this instance's seconds per unit of work. ``cost``: what it was picked
        with (dispatch ahead learns service time from it).
        """
        variant = self.variant
        work = variant.work
        if work is not None and ok and seconds > 0.0 and self.state is not InstanceState.REMOVED:
            # The service-time line (dispatch ahead's, and what hint quality is learned
            # against): alone on its instance (limit 1) a request's time is its own cost's;
            # otherwise it waited behind the work it found there. Timed from when it was
            # sent, a request sent ahead included (its few milliseconds in Triton's queue
            # count): the line errs long, the safe side.
            work.observe_service(self.slot, cost if variant.limit == 1 else ahead, seconds)
            if variant.ahead is not None:
                rate = seconds / cost if cost > 0.0 else math.inf
            else:
                rate = seconds / ahead if ahead > 0.0 else math.inf
            if rate < math.inf:
                work.observe(self.slot, rate, time.monotonic())

    def __repr__(self) -> str:
        return f"<Instance {self.variant.name}/{self.slot} {self.address} {self.state.name}>"
