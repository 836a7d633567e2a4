"""Variants, their instances, and the choice of an instance for each request.

The data path asks two things of this module: :meth:`Balancer.pick` (which
instance serves this request; its outstanding count goes up) and
:meth:`Balancer.release` (the request ended; the count goes down). Both run on
the event-loop thread and touch only the native outstanding table and plain
attributes, so they need no locks. Membership and health change the same
tables from control-plane tasks on the same loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final, Protocol

from tritonmesh._core import OutstandingTable, WorkTable
from tritonmesh.config import QueueOrder, RetryConfig, RoutingStrategy, VariantConfig, WorkHint
from tritonmesh.decoupled import DecoupledModels
from tritonmesh.outlier import OutlierDetector
from tritonmesh.retry import RetryBudget
from tritonmesh.tls import connect
from tritonmesh.waitqueue import WaitQueue
from tritonmesh.wire import WireError, peek_work
from tritonmesh.workers.upstream import CHANNEL_OPTIONS, Upstream

__all__ = ["Balancer", "Instance", "NoInstanceError", "Variant", "VariantFull"]

# A new instance starts at this share of its weight and ramps to all of it over the
# variant's slow_start_s, in steps of a tenth of the window.
SLOW_START_FLOOR: Final = 0.1

# Dispatch ahead sends early only while the spread of log(service time / predicted) is at
# most this: bench/queue_sim.py --hints found it keeps an exact hint's gain and loses
# nothing with noisy or absent hints (docs/strategies.md).
AHEAD_MAX_RESIDUAL_SD: Final = 0.2

# Bucket upper bounds (seconds) for the per-instance latency histogram.
LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
)


class _Table(Protocol):
    """What every variant's table answers: ``OutstandingTable`` and ``WorkTable`` alike."""

    def add(self, weight: float = 1.0) -> int: ...
    def remove(self, slot: int) -> None: ...
    def set_weight(self, slot: int, weight: float) -> None: ...
    def set_available(self, slot: int, available: bool) -> None: ...
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


class VariantFull(NoInstanceError):
    """Every healthy instance is at its concurrency limit: wait with ``variant.wait()``."""

    def __init__(self, variant: Variant):
        super().__init__(f"every instance of variant '{variant.name}' is at its concurrency "
                         f"limit ({variant.limit})", "RESOURCE_EXHAUSTED")
        self.variant = variant


class Instance:
    """One Triton server inside a variant, with what the router has seen of it."""

    __slots__ = (
        "address", "ahead_timer", "drained", "ejected_until", "ejections", "errors", "failures",
        "free_at", "healthy", "latency_buckets", "latency_sum", "next_s", "requests",
        "sent_ahead", "slot", "state", "upstream", "variant", "weight",
    )

    def __init__(self, variant: Variant, slot: int, upstream: Upstream, weight: float = 1.0):
        self.variant = variant
        self.slot = slot
        self.weight = weight
        self.upstream = upstream
        self.address = upstream.address
        self.healthy = True
        self.state = "ACTIVE"
        # Set while draining; released once the last outstanding request ends.
        self.drained: asyncio.Event | None = None
        self.requests = 0
        self.errors = 0
        # Passive outlier detection (tritonmesh.outlier): failures in a row, times ejected.
        self.failures = 0
        self.ejections = 0
        self.ejected_until = 0.0
        self.latency_sum = 0.0
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        # Dispatch ahead (Variant.ahead_s > 0): when the last request sent here is
        # expected to end (loop time; 0.0 when idle) and how long it is expected to take,
        # and the timer that hands it the next waiting request.
        self.free_at = 0.0
        self.next_s = 0.0
        self.sent_ahead = 0  # requests sent here while the one before still ran
        self.ahead_timer: asyncio.TimerHandle | None = None

    @property
    def outstanding(self) -> int:
        if self.state == "REMOVED":
            # Once its last request ends, a removed instance's slot is freed (and may be
            # reused by a newer instance): nothing of it is outstanding any more.
            if self.variant.instances[self.slot] is not self or not self.variant.table_has(
                    self.slot):
                return 0
        return self.variant.table.outstanding(self.slot)

    def work_ahead(self) -> float:
        """LEAST_OUTSTANDING_WORK: the work outstanding here, a just-picked request's own
        included (what it will wait behind); 0.0 for other strategies."""
        work = self.variant.work
        return 0.0 if work is None else work.work(self.slot)

    def observe(self, seconds: float, ok: bool, ahead: float = 0.0, cost: float = 1.0) -> None:
        """Record one finished request (called from the release path, after release).

        ``ahead``: the work it found here when picked (:meth:`work_ahead`); a success
        teaches LEAST_OUTSTANDING_WORK this instance's seconds per unit of work.
        ``cost``: what it was picked with (dispatch ahead learns service time from it).
        """
        work = self.variant.work
        if work is not None and ok and seconds > 0.0 and self.state != "REMOVED":
            # The service-time line (dispatch ahead's, and what hint quality is learned
            # against): alone on its instance (limit 1) a request's time is its own cost's;
            # otherwise it waited behind the work it found there.
            work.observe_service(self.slot, cost if self.variant.limit == 1 else ahead,
                                 seconds)
            if self.variant.ahead_s > 0.0:
                # Timed from when it was sent, a request sent ahead included (its few
                # milliseconds in Triton's queue count): the line errs long, the safe side,
                # and stays right when Triton runs two requests side by side.
                rate = seconds / cost if cost > 0.0 else math.inf
            else:
                rate = seconds / ahead if ahead > 0.0 else math.inf
            if rate < math.inf:
                work.observe(self.slot, rate, time.monotonic())
        self.requests += 1
        if not ok:
            self.errors += 1
        self.latency_sum += seconds
        i = 0
        for bound in LATENCY_BUCKETS:
            if seconds <= bound:
                break
            i += 1
        self.latency_buckets[i] += 1

    def __repr__(self) -> str:
        return f"<Instance {self.variant.name}/{self.slot} {self.address} {self.state}>"


class Variant:
    """A production variant: a weight, a routing strategy and a table of instances."""

    def __init__(self, config: VariantConfig, *, seed: int | None = None,
                 channel_options: tuple[tuple[str, Any], ...] = CHANNEL_OPTIONS):
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
            counts = OutstandingTable(seed)
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
        self.waiters = WaitQueue()
        # Dispatch ahead: hand an instance its next waiting request this long before its
        # running one is expected to end (0: off). Instances whose moment came while
        # nobody was waiting are kept in _due for the next request that has to wait.
        self.ahead_s = config.dispatch_ahead_s
        self._due: set[Instance] = set()
        self._ramps: set[asyncio.Task[None]] = set()  # slow starts under way

    def reconfigure(self, config: VariantConfig) -> None:
        """Apply a reloaded config's live keys (see :mod:`tritonmesh.reload`): weight, models,
        limits, queue bound, default deadline, slow start, and the strategy within one table.
        Waiting requests get any capacity a higher limit frees at once."""
        if config.routing_strategy is not self.strategy and self.work is None:
            assert isinstance(self.table, OutstandingTable)
            self._pick = _strategy_pick(self.table, config.routing_strategy)
            self.strategy = config.routing_strategy
        # Channels keep the TLS they opened with; new ones too, until a restart.
        self.config = dataclasses.replace(config, upstream_tls=self.config.upstream_tls)
        self.weight = config.weight
        self.models = config.models
        self.limit = config.max_concurrency
        self.max_queue = config.max_queue
        self.default_deadline_s = config.default_deadline_s
        self.dispatch()

    def connect(self, address: str) -> Upstream:
        """A channel to ``address`` as this variant reaches its instances (TLS, limits)."""
        return connect(address, self.config.upstream_tls, self.channel_options)

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

    async def close(self) -> None:
        """End the variant's background work (slow starts under way, dispatch-ahead timers)."""
        for instance in self.instances:
            if instance is not None:
                self._stop_ahead(instance)
        ramps = list(self._ramps)
        for task in ramps:
            task.cancel()
        await asyncio.gather(*ramps, return_exceptions=True)

    async def _ramp(self, instance: Instance, window: float) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            await asyncio.sleep(window / 10)
            if instance.state == "REMOVED":  # its slot may belong to another instance soon
                return
            share = min(1.0, (loop.time() - start) / window)
            self.table.set_weight(instance.slot, instance.weight * max(share, SLOW_START_FLOOR))
            if share >= 1.0:
                return

    def acquire(self, slot: int, cost: float = 1.0) -> None:
        """Count a request of ``cost`` on a slot chosen by the caller (a pinned sequence)."""
        if self.work is not None:
            self.work.acquire(slot, cost)
        else:
            self.table.acquire(slot)
        if self.ahead_s > 0.0:
            self._booked(self.instances[slot], cost)  # type: ignore[arg-type]

    def release(self, slot: int, cost: float = 1.0) -> None:
        """A request picked or acquired with ``cost`` ended."""
        if self.work is not None:
            self.work.release(slot, cost)
        else:
            self.table.release(slot)
        if self.ahead_s > 0.0:
            instance = self.instances[slot]
            if instance is not None and instance.state == "REMOVED":
                # Its slot may be free now, and the table no longer answers for it.
                self._stop_ahead(instance)
            elif instance is not None:
                left = self.table.outstanding(slot)
                if left == 0:
                    self._stop_ahead(instance)
                    return
                if left == 1 and instance.free_at > 0.0:
                    # The request sent ahead starts now. Anchor its end here, on the
                    # observed end of the one before it, not on that one's prediction:
                    # chained predictions would drift by their errors' sum.
                    # A release does not say which request ended. If it was the one sent
                    # ahead (its client left within those few milliseconds), the running
                    # one was due anyway, and this anchor makes the next hand-over late,
                    # never early: the worst case is one ordinary late-binding hand-over
                    # when the running one ends. Assuming the other way round would send
                    # a second request ahead after every normal end.
                    instance.free_at = asyncio.get_running_loop().time() + instance.next_s
                self._arm(instance)

    # -- dispatch ahead ------------------------------------------------------------------

    def _booked(self, instance: Instance, cost: float) -> None:
        """A request of ``cost`` was sent to ``instance``: when is it expected to end?"""
        assert self.work is not None  # dispatch ahead needs LEAST_OUTSTANDING_WORK
        expected = self.work.service_time(instance.slot, cost)
        if not 0.0 <= self.work.residual_sd() <= AHEAD_MAX_RESIDUAL_SD:
            expected = -1.0  # hints not known to predict the end: wait for it
        self._due.discard(instance)
        if expected < 0.0:  # not learned yet: never hand over ahead on a guess
            instance.free_at = 0.0
        else:
            now = asyncio.get_running_loop().time()
            # Alone, it starts now; handed over ahead, when the running one ends.
            start = now if self.table.outstanding(instance.slot) <= 1 \
                else max(now, instance.free_at)
            instance.free_at = start + expected
            instance.next_s = expected
        self._arm(instance)

    def _stop_ahead(self, instance: Instance) -> None:
        self._due.discard(instance)
        instance.free_at = 0.0
        if instance.ahead_timer is not None:
            instance.ahead_timer.cancel()
            instance.ahead_timer = None

    def _arm(self, instance: Instance) -> None:
        """(Re)set ``instance``'s timer: due ``ahead_s`` before its one request ends."""
        if instance.ahead_timer is not None:
            instance.ahead_timer.cancel()
            instance.ahead_timer = None
        if instance.free_at > 0.0 and instance.state == "ACTIVE" \
                and self.table.outstanding(instance.slot) == 1:
            instance.ahead_timer = asyncio.get_running_loop().call_at(
                instance.free_at - self.ahead_s, self._ahead_due, instance)

    def _can_take_ahead(self, instance: Instance) -> bool:
        return (instance.state == "ACTIVE" and instance.healthy
                and self.instances[instance.slot] is instance
                and self.table.outstanding(instance.slot) == 1)

    def _ahead_due(self, instance: Instance) -> None:
        instance.ahead_timer = None
        if not self._can_take_ahead(instance):
            return
        if not self._hand_ahead(instance):
            self._due.add(instance)

    def _hand_ahead(self, instance: Instance) -> bool:
        """Give ``instance`` (one request running, about to end) the next waiting request,
        one over its limit; False when nobody waits."""
        waiters = self.waiters
        while waiters:
            _, _, waiter, cost = waiters.pop()
            if waiter.done():
                continue
            self.acquire(instance.slot, cost)
            instance.sent_ahead += 1
            waiter.set_result(instance)
            return True
        return False

    def _take_due(self) -> None:
        """A request has to wait: an instance already due takes it now, the one expected
        to free first. One whose request has run past its expected end is left alone:
        nobody knows how much longer it runs."""
        now = asyncio.get_running_loop().time()
        while self._due and self.waiters:
            instance = min(self._due, key=lambda i: i.free_at)
            self._due.discard(instance)
            if self._can_take_ahead(instance) and now <= instance.free_at:
                self._hand_ahead(instance)

    def table_has(self, slot: int) -> bool:
        return any(s == slot for s, _, _, _ in self.table.snapshot())

    def pick(self, cost: float = 1.0) -> Instance | None:
        """The strategy's choice, counted as outstanding; None if nothing can take it now.

        ``cost`` weighs the request for LEAST_OUTSTANDING_WORK; other strategies count 1.
        """
        if self.work is not None:
            slot = self.work.pick(cost, self.limit or 0)
            if slot < 0:
                return None
            instance = self.instances[slot]
            if self.ahead_s > 0.0:
                self._booked(instance, cost)  # type: ignore[arg-type]
            return instance
        slot = self._pick()
        if slot < 0:
            return None
        limit = self.limit
        if limit is not None and self.table.outstanding(slot) > limit:
            # The strategy's choice is full; the least loaded instance may not be.
            self.table.release(slot)
            slot = self.table.pick()
            if self.table.outstanding(slot) > limit:
                self.table.release(slot)
                return None
        return self.instances[slot]

    async def wait(self, timeout: float | None, cost: float = 1.0) -> Instance:
        """Wait (up to ``timeout`` seconds) for an instance below its limit.

        Oldest first; under LEAST_SLACK, lowest ``deadline - cost x seconds per unit``
        first, the deadline being ``timeout`` capped at ``default_deadline_s``.
        """
        if len(self.waiters) >= self.max_queue:
            raise NoInstanceError(
                f"variant '{self.name}': every instance is at its concurrency limit "
                f"({self.limit}) and {len(self.waiters)} requests are already waiting",
                "RESOURCE_EXHAUSTED")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Instance] = loop.create_future()
        key = 0.0
        if self.least_slack and self.work is not None:
            budget = self.default_deadline_s if timeout is None \
                else min(timeout, self.default_deadline_s)
            # Toward FIFO as far as the hints fail to predict service time.
            key = loop.time() + budget - (
                self.work.hint_quality() * cost * self.work.mean_estimate())
        entry = self.waiters.push(waiter, cost, key)
        if self._due:
            self._take_due()
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                # Handed over as we gave up: pass it on.
                Balancer.release(waiter.result(), cost)
            else:
                waiter.cancel()
                self.waiters.discard(entry)
            raise

    def dispatch(self) -> None:
        """Hand free capacity to waiting requests, in the queue's order."""
        waiters = self.waiters
        while waiters:
            _, _, waiter, cost = waiters.head()
            if waiter.done():
                waiters.pop()
                continue
            instance = self.pick(cost)
            if instance is None:
                return
            waiters.pop()
            waiter.set_result(instance)

    def serves(self, model_name: str) -> bool:
        return self.models is None or model_name in self.models

    def live_instances(self) -> Iterator[Instance]:
        return (i for i in self.instances if i is not None and i.state != "REMOVED")

    def set_healthy(self, instance: Instance, healthy: bool) -> None:
        instance.healthy = healthy
        self._sync(instance)
        if healthy:
            self.dispatch()

    def set_draining(self, instance: Instance) -> asyncio.Event:
        """Stop new picks; the returned event is set when no request is outstanding."""
        instance.state = "DRAINING"
        self._sync(instance)
        instance.drained = asyncio.Event()
        if not self.table.outstanding(instance.slot):
            instance.drained.set()
        return instance.drained

    def _sync(self, instance: Instance) -> None:
        self.table.set_available(instance.slot, instance.healthy and instance.state == "ACTIVE")

    def remove(self, instance: Instance) -> None:
        """Take the instance out of the table; its slot is freed once its requests finish."""
        instance.state = "REMOVED"
        self.table.remove(instance.slot)
        self._stop_ahead(instance)


def _strategy_pick(table: OutstandingTable, strategy: RoutingStrategy) -> Callable[[], int]:
    picks: dict[RoutingStrategy, Callable[[], int]] = {
        RoutingStrategy.RANDOM: table.pick_random,
        RoutingStrategy.LEAST_OUTSTANDING_REQUESTS: table.pick,
        RoutingStrategy.ROUND_ROBIN: table.pick_round_robin,
        RoutingStrategy.POWER_OF_TWO_CHOICES: table.pick_two,
    }
    return picks[strategy]


class Balancer:
    """All variants of one endpoint, and sticky sequences."""

    def __init__(self, variants: Iterable[Variant], *, rng: random.Random | None = None,
                 outliers: OutlierDetector | None = None,
                 work_hints: Mapping[str, WorkHint] | None = None,
                 retries: RetryConfig | None = None, max_sequences: int = 100_000,
                 max_sequence_id_bytes: int = 256, max_model_policies: int = 1_024):
        self.variants = list(variants)
        self.set_work_hints(work_hints or {})
        # Only LEAST_OUTSTANDING_WORK reads costs; nobody else pays for the peek.
        self.work_aware = any(v.work is not None for v in self.variants)
        self.outliers = outliers or OutlierDetector()
        self.decoupled = DecoupledModels(max_model_policies)
        self.set_retries(retries or RetryConfig())
        self.by_name = {v.name: v for v in self.variants}
        self._rng = rng or random.Random()
        self._map_models()
        # (target variant or None, model, sequence id) -> (instance, last use); see pick().
        # The pin holds the instance, and with it the variant: a sequence never moves.
        self.sequences: dict[tuple[str | None, str, int | str], tuple[Instance, float]] = {}
        self.max_sequences = max_sequences
        self.max_sequence_id_bytes = max_sequence_id_bytes

    def _map_models(self) -> None:
        # Which variants serve a model, fixed with the variants. Built from the variants'
        # model lists, never from request names: arbitrary names must not grow a map.
        listed = {name for v in self.variants if v.models is not None for name in v.models}
        self._serving = {name: [v for v in self.variants if v.serves(name)] for name in listed}
        # Models outside every variant's list go where Triton can answer for them.
        self._unlisted = [v for v in self.variants if v.models is None] or self.variants

    def reconfigure(self, configs: Iterable[VariantConfig]) -> None:
        """A reload's variant keys, live (same variant names; see :mod:`tritonmesh.reload`)."""
        for config in configs:
            self.by_name[config.name].reconfigure(config)
        self._map_models()

    def set_retries(self, retries: RetryConfig) -> None:
        """A budget with these limits. A reload starts its window anew; the totals the
        metrics report carry over (Prometheus counters must not go back)."""
        budget = RetryBudget(max_per_request=retries.max_per_request,
                             ratio=retries.budget_ratio,
                             min_per_s=retries.min_per_s, ttl_s=retries.ttl_s)
        previous: RetryBudget | None = getattr(self, "retry_budget", None)
        if previous is not None:
            budget.retried, budget.refused = previous.retried, previous.refused
        self.retry_budget = budget

    def set_work_hints(self, work_hints: Mapping[str, WorkHint]) -> None:
        """Where each model's request cost is read. Safe while serving: every request
        is released with the cost it was picked with."""
        # model -> (input name, parameter name, base), encoded once for the wire peek.
        self._hints = {
            model: ((h.input or "").encode(), (h.parameter or "").encode(), h.base)
            for model, h in work_hints.items()
        }

    def cost(self, model_name: str, request: bytes) -> float:
        """The request's cost for LEAST_OUTSTANDING_WORK: the model's hint plus its base;
        ``max(base, 1)`` for a request without a usable hint value, 1.0 without a hint."""
        hint = self._hints.get(model_name)
        if hint is None:
            return 1.0
        input_name, parameter, base = hint
        try:
            value = peek_work(request, input_name, parameter)
        except WireError:
            value = None
        if value is None or not math.isfinite(value):
            return max(base, 1.0)
        return max(base + value, 0.0)

    def instances(self) -> Iterator[Instance]:
        for variant in self.variants:
            yield from variant.live_instances()

    def _variants_for(self, model_name: str) -> list[Variant]:
        return self._serving.get(model_name, self._unlisted)

    def choose_variant(self, model_name: str, target_variant: str | None = None) -> Variant:
        """The variant for a request: the named one, else weighted random among servers."""
        if target_variant is not None:
            variant = self.by_name.get(target_variant)
            if variant is None:
                names = ", ".join(sorted(self.by_name))
                raise NoInstanceError(
                    f"unknown target variant '{target_variant}' (this endpoint has: {names})",
                    "INVALID_ARGUMENT",
                )
            return variant
        candidates = self._variants_for(model_name)
        if len(candidates) == 1:
            return candidates[0]
        ready = [v for v in candidates if v.table.pickable()] or candidates
        total = sum(v.weight for v in ready)
        r = self._rng.random() * total
        for variant in ready:
            r -= variant.weight
            if r < 0:
                return variant
        return ready[-1]

    def pick(
        self,
        model_name: str,
        target_variant: str | None = None,
        sequence_id: int | str | None = None,
        sequence_start: bool = False,
        sequence_end: bool = False,
        cost: float = 1.0,
    ) -> Instance:
        """Choose the instance for one request and count it as outstanding there.

        Requests of one sequence (same ``sequence_id``) go to the instance chosen
        at the sequence's start, since Triton keeps sequence state per server.
        """
        if sequence_id is not None:
            return self._pick_sequence(model_name, target_variant, sequence_id, sequence_start,
                                       sequence_end, cost)
        variant = self.choose_variant(model_name, target_variant)
        instance = variant.pick(cost)
        if instance is None:
            if variant.limit is not None and variant.table.pickable():
                raise VariantFull(variant)
            raise NoInstanceError(
                f"no healthy instance in variant '{variant.name}' can serve model "
                f"'{model_name}' right now"
            )
        return instance

    def pick_avoiding(self, avoid: Instance, model_name: str, target_variant: str | None,
                      cost: float = 1.0) -> Instance:
        """:meth:`pick` for a request outside any sequence, away from ``avoid`` (where its
        last attempt failed) while the variant has another instance to offer (Envoy's
        ``previous_hosts`` retry predicate); ``avoid`` again when it is the only one."""
        if not (avoid.healthy and avoid.state == "ACTIVE"):
            return self.pick(model_name, target_variant, cost=cost)
        variant = avoid.variant
        variant.table.set_available(avoid.slot, False)
        try:
            return self.pick(model_name, target_variant, cost=cost)
        except VariantFull:
            raise  # the others are busy: wait for whichever frees first
        except NoInstanceError:
            pass  # it is the only one: try it again
        finally:
            variant._sync(avoid)  # back to what its health and drain flags say
        return self.pick(model_name, target_variant, cost=cost)

    def _pick_sequence(self, model_name: str, target_variant: str | None,
                       sequence_id: int | str, start: bool, end: bool, cost: float) -> Instance:
        if isinstance(sequence_id, str) and (
                len(sequence_id) > self.max_sequence_id_bytes
                or len(sequence_id.encode()) > self.max_sequence_id_bytes):
            raise NoInstanceError(
                f"sequence_id is longer than this router's limit of "
                f"{self.max_sequence_id_bytes} bytes (limits.max_sequence_id_bytes)",
                "INVALID_ARGUMENT")
        key = (target_variant, model_name, sequence_id)
        sequences = self.sequences
        pinned = None if start else sequences.get(key)
        if pinned is not None and pinned[0].state != "REMOVED":
            instance = pinned[0]
            instance.variant.acquire(instance.slot, cost)
        else:
            if not end and key not in sequences and len(sequences) >= self.max_sequences:
                raise NoInstanceError(
                    f"{len(sequences)} sequences are open, this router's limit "
                    f"(limits.max_sequences); end sequences with sequence_end, or an idle "
                    f"one is forgotten after limits.sequence_idle_timeout_s",
                    "RESOURCE_EXHAUSTED")
            variant = self.choose_variant(model_name, target_variant)
            instance = variant.pick(cost)  # type: ignore[assignment]
            if instance is None:
                raise NoInstanceError(
                    f"no healthy instance in variant '{variant.name}' can start sequence "
                    f"{sequence_id} of model '{model_name}'"
                )
        if end:
            sequences.pop(key, None)
        else:
            sequences[key] = (instance, time.monotonic())
        return instance

    @staticmethod
    def release(instance: Instance, cost: float = 1.0) -> None:
        """One request on ``instance`` ended (``cost``: what it was picked with)."""
        variant = instance.variant
        variant.release(instance.slot, cost)
        if variant.waiters:
            variant.dispatch()
        if instance.drained is not None and not instance.outstanding:
            instance.drained.set()

    def expire_sequences(self, idle_s: float) -> int:
        """Forget sequences idle for longer than ``idle_s``, and those pinned to a removed
        instance; returns how many."""
        cutoff = time.monotonic() - idle_s
        stale = [k for k, (instance, last) in self.sequences.items()
                 if last < cutoff or instance.state == "REMOVED"]
        for key in stale:
            del self.sequences[key]
        return len(stale)

    def total_outstanding(self) -> int:
        return sum(v.table.total_outstanding() for v in self.variants)
