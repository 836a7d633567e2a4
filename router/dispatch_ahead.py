"""Dispatch ahead: hand an instance its next waiting request shortly before its running
one is expected to end, so Triton's queue is never empty between the two.

It needs to know when the running request will end: it reads each instance's service-time
line in the request's cost (``WorkTable.service_time``, learned from finished requests) and
keeps, per instance with one request running, when that request is expected to end; only
while the hints are known to predict service time (``WorkTable.residual_sd`` at most
``AHEAD_MAX_RESIDUAL_SD``), else a request waits for the running one to end. A timer fires
``lead_s`` before then and hands over the oldest (or least-slack) waiting request, one over
the instance's concurrency limit. An instance whose moment came while nobody waited is
kept as *due*, and the next request that has to wait goes to it at once.

Owned by a :class:`~tritonmesh.variant.Variant` with ``dispatch_ahead_s`` > 0 (which
requires LEAST_OUTSTANDING_WORK); other variants hold none and pay nothing.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final

from tritonmesh._core import WorkTable
from tritonmesh.instance import Instance, InstanceState

if TYPE_CHECKING:
    from tritonmesh.variant import Variant

__all__ = ["AHEAD_MAX_RESIDUAL_SD", "DispatchAhead", "Plan"]

# Dispatch ahead sends early only while the spread of log(service time / predicted) is at
# most this: bench/queue_sim.py --hints found it keeps an exact hint's gain and loses
# nothing with noisy or absent hints (docs/strategies.md).
AHEAD_MAX_RESIDUAL_SD: Final = 0.2


class Plan:
    """When the last request sent to one instance is expected to end (loop time; 0.0 when
    unknown or idle), how long it is expected to take, and the timer that hands over."""

    __slots__ = ("free_at", "next_s", "timer")

    def __init__(self) -> None:
        self.free_at = 0.0
        self.next_s = 0.0
        self.timer: asyncio.TimerHandle | None = None


class DispatchAhead:
    def __init__(self, variant: Variant, lead_s: float):
        self.variant = variant
        self.lead_s = lead_s
        self._plans: dict[Instance, Plan] = {}
        self._due: set[Instance] = set()

    def plan(self, instance: Instance) -> Plan | None:
        """What is expected of ``instance``; None while it has nothing running."""
        return self._plans.get(instance)

    def booked(self, instance: Instance, cost: float) -> None:
        """A request of ``cost`` was sent to ``instance``: when is it expected to end?"""
        work = self._work()
        expected = work.service_time(instance.slot, cost)
        if not 0.0 <= work.residual_sd() <= AHEAD_MAX_RESIDUAL_SD:
            expected = -1.0  # hints not known to predict the end: wait for it
        self._due.discard(instance)
        plan = self._plans.get(instance)
        if plan is None:
            plan = self._plans[instance] = Plan()
        if expected < 0.0:  # not learned yet: never hand over ahead on a guess
            plan.free_at = 0.0
        else:
            now = asyncio.get_running_loop().time()
            # Alone, it starts now; handed over ahead, when the running one ends.
            alone = self.variant.table.outstanding(instance.slot) <= 1
            plan.free_at = (now if alone else max(now, plan.free_at)) + expected
            plan.next_s = expected
        self._arm(instance, plan)

    def released(self, instance: Instance) -> None:
        """A request on ``instance`` ended (its count is already down)."""
        if instance.state is InstanceState.REMOVED:
            # Its slot may be free now, and the table no longer answers for it.
            self.stop(instance)
            return
        left = self.variant.table.outstanding(instance.slot)
        plan = self._plans.get(instance)
        if left == 0 or plan is None:
            self.stop(instance)
            return
        if left == 1 and plan.free_at > 0.0:
            # The request sent ahead starts now. Anchor its end here, on the observed end of
            # the one before it, not on that one's prediction: chained predictions would
            # drift by their errors' sum.
            # A release does not say which request ended. If it was the one sent ahead (its
            # client left within those few milliseconds), the running one was due anyway,
            # and this anchor makes the next hand-over late, never early: the worst case is
            # one ordinary late-binding hand-over when the running one ends. Assuming the
            # other way round would send a second request ahead after every normal end.
            plan.free_at = asyncio.get_running_loop().time() + plan.next_s
        self._arm(instance, plan)

    def stop(self, instance: Instance) -> None:
        self._due.discard(instance)
        plan = self._plans.pop(instance, None)
        if plan is not None and plan.timer is not None:
            plan.timer.cancel()

    def close(self) -> None:
        for instance in list(self._plans):
            self.stop(instance)

    def waiting(self) -> None:
        """A request has to wait: an instance already due takes it now, the one expected
        to free first. One whose request has run past its expected end is left alone:
        nobody knows how much longer it runs."""
        due = self._due
        if not due:
            return
        now = asyncio.get_running_loop().time()
        plans = self._plans
        while due and self.variant.waiters:
            instance = min(due, key=lambda i: plans[i].free_at if i in plans else 0.0)
            due.discard(instance)
            plan = plans.get(instance)
            if plan is not None and self._can_take(instance) and now <= plan.free_at:
                self._hand_over(instance)

    def _work(self) -> WorkTable:
        work = self.variant.work
        assert work is not None  # dispatch ahead needs LEAST_OUTSTANDING_WORK
        return work

    def _arm(self, instance: Instance, plan: Plan) -> None:
        """(Re)set the timer: due ``lead_s`` before the instance's one request ends."""
        if plan.timer is not None:
            plan.timer.cancel()
            plan.timer = None
        if plan.free_at > 0.0 and instance.state is InstanceState.ACTIVE \
                and self.variant.table.outstanding(instance.slot) == 1:
            plan.timer = asyncio.get_running_loop().call_at(
                plan.free_at - self.lead_s, self._due_now, instance)

    def _can_take(self, instance: Instance) -> bool:
        return (instance.pickable and self.variant.owns_slot(instance)
                and self.variant.table.outstanding(instance.slot) == 1)

    def _due_now(self, instance: Instance) -> None:
        plan = self._plans.get(instance)
        if plan is not None:
            plan.timer = None
        if self._can_take(instance) and not self._hand_over(instance):
            self._due.add(instance)

    def _hand_over(self, instance: Instance) -> bool:
        """Give ``instance`` (one request running, about to end) the next waiting request,
        one over its limit; False when nobody waits."""
        waiters = self.variant.waiters
        while waiters:
            _, _, waiter, cost, _ = waiters.pop()
            if waiter.done():
                continue
            self.variant.count(instance, cost)
            instance.sent_ahead += 1
            waiter.set_result(instance)
            return True
        return False
