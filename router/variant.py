"""A production variant: a weight, a routing strategy, a table of instances, and late
binding's queue of requests waiting for one below its concurrency limit.

Everything here runs on the event-loop thread and touches only the native table and plain
attributes, so it needs no locks. The data path reaches it through
:meth:`tritonmesh.balancer.Balancer.acquire` and :class:`tritonmesh.lease.Lease`, the
control plane through :mod:`tritonmesh.membership`, health and outlier detection.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Final, Protocol, cast

from tritonmesh._core import OutstandingTable, WorkTable
from tritonmesh.config import QueueOrder, RoutingStrategy, VariantConfig
from tritonmesh.dispatch_ahead import DispatchAhead
from tritonmesh.instance import Instance, InstanceState
from tritonmesh.tls import connect
from tritonmesh.waitqueue import WaitQueue
from tritonmesh.workers.upstream import CHANNEL_OPTIONS, Upstream

__all__ = ["SLOW_START_FLOOR", "NoInstanceError", "Variant"]

# A new instance starts at this share of its weight and ramps to all of it over the
# variant's slow_start_s, in steps of a tenth of the window.
SLOW_START_FLOOR: Final = 0.1


class _Table(Protocol):
    """What every variant's table answers: ``OutstandingTable`` and ``WorkTable`` alike."""

    def add(self, weight: float = 1.0) -> int: ...
    def remove(self, slot: int) -> None: ...
    def set_weight(self, slot: int, weight: float) -> None: ...
    def set_available(self, slot: int, available: bool) -> None: ...
    def set_external(self, slot: int, load: float) -> None: ...
    def outstanding(self, slot: int) -> int: ...
    def pick(self) -> int: ...
    def acquire(self, slot: int) -> None: ...
    def release(self, slot: int) -> None: ...
    def snapshot(self) -> list[tuple[int, int, float, str]]: ...
    def total_outstanding(self) -> int: ...
    def pickable(self) -> int: ...


class NoInstanceError(LookupError):
    """No instance can take the request; ``code_name`` is the gRPC status to answer with."""

    def __init__(self, message: str, code_name: str = "UNAVAILABLE"):
        super().__init__(message)
        self.code_name = code_name


class Variant:
    """A production variant: a weight, a routing strategy and a table of instances."""

    def __init__(self, config: VariantConfig, *, seed: int | None = None,
                 channel_options: tuple[tuple[str, Any], ...] = CHANNEL_OPTIONS,
                 table: _Table | None = None):
        """``table``: the counts to pick on instead of a private table (several router
        processes: :class:`tritonmesh.sharedcounts.SharedCounts`)."""
        self.config = config
        self.channel_options = channel_options
        self.name = config.name
        self.weight = config.weight
        self.strategy = config.routing_strategy
        self.models = config.models
        self.table: _Table
        # LEAST_OUTSTANDING_WORK's table (the same object as ``table``), else None.
        self.work: WorkTable | None = None
        self._pick: Callable[[], int]
        if self.strategy is RoutingStrategy.LEAST_OUTSTANDING_WORK:
            self.table = self.work = WorkTable(seed)
            self._pick = self.work.pick
        else:
            counts = OutstandingTable(seed) if table is None else cast(OutstandingTable, table)
            self.table = counts
            self._pick = _strategy_pick(counts, self.strategy)
        # Indexed by slot: the hot path turns a slot into an instance with one list index.
        self.instances: list[Instance | None] = []
        # Late binding: with a per-instance concurrency limit, requests beyond it wait here
        # and go to the first instance that frees a slot, instead of queueing inside one
        # Triton behind a long generation; oldest first, or least slack first.
        self.limit = config.max_concurrency
        self.max_queue = config.max_queue
        self.least_slack = config.queue_order is QueueOrder.LEAST_SLACK
        self.default_deadline_s = config.default_deadline_s
        self.default_priority = config.default_priority
        self.aging_s = config.priority_aging_s
        self.waiters = WaitQueue()
        # Several router processes: told when a request starts to wait, so that releases
        # in the other processes wake this one (tritonmesh.crosswake).
        self.on_wait: Callable[[], None] | None = None
        self.ahead: DispatchAhead | None = None
        if config.dispatch_ahead_s > 0.0 and self.work is not None:
            self.ahead = DispatchAhead(self, config.dispatch_ahead_s)
        self._ramps: set[asyncio.Task[None]] = set()  # slow starts under way

    def reconfigure(self, config: VariantConfig) -> None:
        """Apply a reloaded config's live keys (see :mod:`tritonmesh.reload`): weight, models,
        limits, queue bound, default deadline, slow start, and the strategy within one table.
        Waiting requests get any capacity a higher limit frees at once."""
        if config.routing_strategy is not self.strategy and self.work is None:
            self._pick = _strategy_pick(cast(OutstandingTable, self.table),
                                        config.routing_strategy)
            self.strategy = config.routing_strategy
        # Channels keep the TLS they opened with; new ones too, until a restart.
        self.config = dataclasses.replace(config, upstream_tls=self.config.upstream_tls)
        self.weight = config.weight
        self.models = config.models
        self.limit = config.max_concurrency
        self.max_queue = config.max_queue
        self.default_deadline_s = config.default_deadline_s
        self.default_priority = config.default_priority
        self.aging_s = config.priority_aging_s
        self.dispatch()

    def connect(self, address: str) -> Upstream:
        """A channel to ``address`` as this variant reaches its instances (TLS, limits)."""
        return connect(address, self.config.upstream_tls, self.channel_options)

    # -- membership ------------------------------------------------------------------------

    def add(self, upstream: Upstream, weight: float = 1.0, *, slow_start: bool = False) -> Instance:
        """Add an instance to the pick set.

        With ``slow_start`` (instances joining a serving variant) it starts at
        ``SLOW_START_FLOOR`` of its weight and ramps linearly to all of it over the
        variant's ``slow_start_s``, so a cold instance is not handed every new request
        at once because it has none outstanding.
        """
        window = self.config.slow_start_s if slow_start else 0.0
        slot = self.table.add(weight * SLOW_START_FLOOR if window > 0 else weight)
        instance = Instance(self, slot, upstream, weight)
        while len(self.instances) <= slot:
            self.instances.append(None)
        self.instances[slot] = instance
        if window > 0:
            task = asyncio.get_running_loop().create_task(self._ramp(instance, window))
            self._ramps.add(task)
            task.add_done_callback(self._ramps.discard)
        self.dispatch()
        return instance

    async def _ramp(self, instance: Instance, window: float) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            await asyncio.sleep(window / 10)
            if instance.removed:  # its slot may belong to another instance soon
                return
            share = min(1.0, (loop.time() - start) / window)
            self.table.set_weight(instance.slot, instance.weight * max(share, SLOW_START_FLOOR))
            if share >= 1.0:
                return

    def set_draining(self, instance: Instance) -> asyncio.Event:
        """Stop new picks; the returned event is set when no request is outstanding."""
        instance.state = InstanceState.DRAINING
        self.sync(instance)
        instance.drained = asyncio.Event()
        if not self.table.outstanding(instance.slot):
            instance.drained.set()
        return instance.drained

    def remove(self, instance: Instance) -> None:
        """Take the instance out of the table; its slot is freed once its requests finish."""
        instance.state = InstanceState.REMOVED
        self.table.remove(instance.slot)
        if self.ahead is not None:
            self.ahead.stop(instance)

    def sync(self, instance: Instance) -> None:
        """Tell the table whether ``instance`` may be picked (its state or a detector's flag
        changed); waiting requests get it at once if it may."""
        pickable = instance.pickable
        self.table.set_available(instance.slot, pickable)
        if pickable:
            self.dispatch()

    def owns_slot(self, instance: Instance) -> bool:
        """Whether ``instance`` is a member whose slot is still its own: a removed one's
        slot may belong to a newer instance once its last request ends."""
        return not instance.removed and self.instances[instance.slot] is instance

    def holds(self, instance: Instance) -> bool:
        """Whether the table still answers for ``instance`` (a removed one's slot is freed
        when its last request ends)."""
        return self.instances[instance.slot] is instance and any(
            s == instance.slot for s, _, _, _ in self.table.snapshot())

    def live_instances(self) -> Iterator[Instance]:
        return (i for i in self.instances if i is not None and not i.removed)

    def serves(self, model_name: str) -> bool:
        return self.models is None or model_name in self.models

    async def close(self) -> None:
        """End the variant's background work (slow starts under way, dispatch-ahead timers)."""
        if self.ahead is not None:
            self.ahead.close()
        ramps = list(self._ramps)
        for task in ramps:
            task.cancel()
        await asyncio.gather(*ramps, return_exceptions=True)

    # -- counting --------------------------------------------------------------------------

    def pick(self, cost: float = 1.0) -> Instance | None:
        """The strategy's choice, counted as outstanding; None if nothing can take it now.

        ``cost`` weighs the request for LEAST_OUTSTANDING_WORK; other strategies count 1.
        """
        if self.work is not None:
            slot = self.work.pick(cost, self.limit or 0)
            if slot < 0:
                return None
            instance = self.instances[slot]
            assert instance is not None
            if self.ahead is not None:
                self.ahead.booked(instance, cost)
            return instance
        slot = self._pick()
        if slot < 0:
            return None
        limit = self.limit
        if limit is not None and self.table.outstanding(slot) > limit:
            # The strategy's choice is full; the least loaded instance with room takes it.
            self.table.release(slot)
            slot = cast(OutstandingTable, self.table).pick_under(limit)
            if slot < 0:
                return None
        return self.instances[slot]

    def count(self, instance: Instance, cost: float = 1.0) -> None:
        """Count a request of ``cost`` on an instance the caller chose (a pinned sequence,
        a hand-over ahead), whatever its limit."""
        if self.work is not None:
            self.work.acquire(instance.slot, cost)
        else:
            self.table.acquire(instance.slot)
        if self.ahead is not None:
            self.ahead.booked(instance, cost)

    def give_back(self, instance: Instance, cost: float = 1.0) -> None:
        """A request counted on ``instance`` with ``cost`` ended: its count goes down, a
        waiting request may take its place, and a draining instance may be done."""
        if self.work is not None:
            self.work.release(instance.slot, cost)
        else:
            self.table.release(instance.slot)
        if self.ahead is not None:
            self.ahead.released(instance)
        if self.waiters.heap:
            self.dispatch()
        if instance.drained is not None and not instance.outstanding:
            instance.drained.set()

    # -- late binding ----------------------------------------------------------------------

    def full(self) -> bool:
        """Whether a request that found no instance may wait for one: a limit holds them
        back, not the lack of any pickable instance."""
        return self.limit is not None and self.table.pickable() > 0

    async def wait(self, timeout: float | None, cost: float = 1.0,
                   priority: int = 0) -> Instance:
        """Wait (up to ``timeout`` seconds) for an instance below its limit; it comes counted.

        Oldest first; under LEAST_SLACK, lowest ``deadline - cost x seconds per unit``
        first, the deadline being ``timeout`` capped at ``default_deadline_s``; either
        shifted by the request's ``priority`` class (0: ``default_priority``), see
        :mod:`tritonmesh.waitqueue`. Raises :class:`NoInstanceError` when the queue is full
        (or this request is shed from it for one of a higher class) and TimeoutError when
        ``timeout`` passes first.
        """
        priority = priority or self.default_priority
        if len(self.waiters) >= self.max_queue:
            self._make_room(priority)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Instance] = loop.create_future()
        key = loop.time() + (priority - 1) * self.aging_s
        if self.least_slack and self.work is not None:
            budget = self.default_deadline_s if timeout is None \
                else min(timeout, self.default_deadline_s)
            # Toward FIFO as far as the hints fail to predict service time.
            key += budget - self.work.hint_quality() * cost * self.work.mean_estimate()
        entry = self.waiters.push(waiter, cost, key, priority)
        if self.on_wait is not None:
            self.on_wait()
        if self.ahead is not None:
            self.ahead.waiting()
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Handed over as we gave up: pass it on.
                self.give_back(waiter.result(), cost)
            else:
                waiter.cancel()
                self.waiters.discard(entry)
            raise

    def _make_room(self, priority: int) -> None:
        """The queue is full: shed its lowest-class request for one of a higher class, or
        refuse this one."""
        lowest = self.waiters.lowest()
        if lowest[4] <= priority:
            raise NoInstanceError(
                f"variant '{self.name}': every instance is at its concurrency limit "
                f"({self.limit}) and {len(self.waiters)} requests are already waiting "
                f"(max_queue), none of a lower priority than this one ({priority})",
                "RESOURCE_EXHAUSTED")
        self.waiters.discard(lowest)
        lowest[2].set_exception(NoInstanceError(
            f"variant '{self.name}': shed from the full queue (max_queue {self.max_queue}) "
            f"for a request of higher priority ({priority}, this one {lowest[4]})",
            "RESOURCE_EXHAUSTED"))

    def dispatch(self) -> None:
        """Hand free capacity to waiting requests, in the queue's order."""
        waiters = self.waiters
        while waiters:
            _, _, waiter, cost, _ = waiters.head()
            if waiter.done():
                waiters.pop()
                continue
            instance = self.pick(cost)
            if instance is None:
                return
            waiters.pop()
            waiter.set_result(instance)


def _strategy_pick(table: OutstandingTable, strategy: RoutingStrategy) -> Callable[[], int]:
    picks: dict[RoutingStrategy, Callable[[], int]] = {
        RoutingStrategy.RANDOM: table.pick_random,
        RoutingStrategy.LEAST_OUTSTANDING_REQUESTS: table.pick,
        RoutingStrategy.ROUND_ROBIN: table.pick_round_robin,
        RoutingStrategy.POWER_OF_TWO_CHOICES: table.pick_two,
    }
    return picks[strategy]
