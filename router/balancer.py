"""All variants of one endpoint: which one serves a request, which instance in it, and
sticky sequences.

The data path asks one thing of this module: :meth:`Balancer.acquire` (or
:meth:`Balancer.try_acquire`, which does not wait) gives a :class:`~tritonmesh.lease.Lease`
on the instance that serves a request, counted as outstanding there; the lease's
``release`` ends it. When every instance of the chosen variant is at its concurrency
limit, ``acquire`` waits in the variant's queue (late binding) itself.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Final, cast

from tritonmesh.config import RetryConfig, VariantConfig, WorkHint
from tritonmesh.decoupled import DecoupledModels
from tritonmesh.instance import Instance, InstanceState
from tritonmesh.lease import Lease
from tritonmesh.outlier import OutlierDetector
from tritonmesh.request_metrics import RequestMetrics
from tritonmesh.retry import RetryBudget
from tritonmesh.sharedcounts import SharedCounts
from tritonmesh.sharedpins import PinsFullError, SharedPins
from tritonmesh.variant import NoInstanceError, Variant
from tritonmesh.wire import RequestInfo, WireError, peek_work

__all__ = ["Balancer", "Instance", "InstanceState", "Lease", "NoInstanceError", "Variant"]

# ``timeout`` is the caller's deadline read a moment before acquire() starts its clock: a
# cancel this close to it is the deadline's.
_DEADLINE_SLACK_S: Final = 0.005

QUEUE_TIMEOUT = ("deadline exceeded while waiting in tritonmesh's queue for an instance "
                 "below its concurrency limit")


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
        self.metrics = RequestMetrics()  # per variant and model (tritonmesh.request_metrics)
        self._map_models()
        # (target variant or None, model, sequence id) -> (instance, last use); see
        # _pick_sequence().
        # The pin holds the instance, and with it the variant: a sequence never moves.
        self.sequences: dict[tuple[str | None, str, int | str], tuple[Instance, float]] = {}
        self.max_sequences = max_sequences
        self.max_sequence_id_bytes = max_sequence_id_bytes
        # Several router processes: the fleet's pins, in place of ``sequences``.
        self.shared_pins: SharedPins | None = None

    def _map_models(self) -> None:
        # Which variants serve a model, fixed with the variants. Built from the variants'
        # model lists, never from request names: arbitrary names must not grow a map.
        # Shadow variants take copies (tritonmesh.shadow), never live traffic, unless a
        # request names one in x-target-variant.
        live = [v for v in self.variants if v.config.shadow is None]
        listed = {name for v in live if v.models is not None for name in v.models}
        self._serving = {name: [v for v in live if v.serves(name)] for name in listed}
        # Models outside every variant's list go where Triton can answer for them.
        self._unlisted = [v for v in live if v.models is None] or live
        self.metrics.set_models(self.variants)

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
            budget.others = previous.others
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

    def try_acquire(self, info: RequestInfo, request: bytes, target_variant: str | None,
                    avoid: Instance | None = None) -> Lease | None:
        """A lease on the instance for this request, or None when every instance of its
        variant is at its concurrency limit (:meth:`acquire` waits for one).

        Requests of one sequence (same ``sequence_id``) go to the instance chosen at the
        sequence's start, since Triton keeps sequence state per server. ``avoid``: where
        this request's last attempt failed (see :meth:`_pick_avoiding`).
        Raises :class:`NoInstanceError` with the status to answer when none can serve it.
        """
        if info.sequence_id is not None or target_variant is not None or avoid is not None \
                or self.work_aware:
            return self._try(info, request, target_variant, avoid)[0]
        # Most requests, in fewer steps (this runs once per request): cost 1, no pin, the
        # variant that serves the model.
        candidates = self._serving.get(info.model_name, self._unlisted)
        variant = candidates[0] if len(candidates) == 1 \
            else self.choose_variant(info.model_name)
        instance = variant.pick()
        if instance is None:
            return self._none_free(variant, info)
        return Lease(instance, 1.0, self.outliers,
                     self.metrics.started(variant, info.model_name))

    def _try(self, info: RequestInfo, request: bytes, target_variant: str | None,
             avoid: Instance | None) -> tuple[Lease | None, Variant | None, float]:
        """:meth:`try_acquire`, with the variant it chose (None for a sequence) and the
        request's cost: a full variant is where :meth:`acquire` waits, at that cost."""
        cost = self.cost(info.model_name, request) if self.work_aware else 1.0
        if info.sequence_id is not None:
            pinned = self._pick_sequence(info, target_variant, cost)
            return self._lease(pinned, cost, info), None, cost
        variant = self.choose_variant(info.model_name, target_variant)
        instance = variant.pick(cost) if avoid is None \
            else self._pick_avoiding(variant, avoid, cost)
        if instance is not None:
            return self._lease(instance, cost, info), variant, cost
        return self._none_free(variant, info), variant, cost

    @staticmethod
    def _none_free(variant: Variant, info: RequestInfo) -> None:
        """None when ``variant`` picked nothing because its instances are at their limit
        (the request may wait for one); else :class:`NoInstanceError`: none can serve."""
        if variant.full():
            return None
        raise NoInstanceError(
            f"no healthy instance in variant '{variant.name}' can serve model "
            f"'{info.model_name}' right now")

    async def acquire(self, info: RequestInfo, request: bytes, target_variant: str | None,
                      timeout: float | None, avoid: Instance | None = None,
                      priority: int = 0) -> Lease:
        """:meth:`try_acquire`, waiting up to ``timeout`` seconds in the variant's queue
        when every instance is at its limit (late binding), in the request's priority class
        (its own ``priority`` parameter, else ``priority``, else the variant's default).
        Raises :class:`NoInstanceError` with the status to answer: that of the refusal,
        RESOURCE_EXHAUSTED when the queue is full, or DEADLINE_EXCEEDED after waiting in
        vain."""
        lease, variant, cost = self._try(info, request, target_variant, avoid)
        if lease is not None:
            return lease
        assert variant is not None  # full; a sequence never waits
        since = time.perf_counter()
        try:
            instance = await variant.wait(timeout, cost, info.priority or priority)
        except TimeoutError:
            self.metrics.refused(variant, info.model_name, "DEADLINE_EXCEEDED",
                                 time.perf_counter() - since)
            raise NoInstanceError(QUEUE_TIMEOUT, "DEADLINE_EXCEEDED") from None
        except NoInstanceError as exc:  # the queue is full, or shed this request
            self.metrics.refused(variant, info.model_name, exc.code_name,
                                 time.perf_counter() - since)
            raise
        except asyncio.CancelledError:
            # The call ended while it waited: the client went, or its deadline passed (gRPC
            # cancels the handler at the deadline, which can come before the queue's own
            # timeout of the same length). Counted as what the client saw.
            waited = time.perf_counter() - since
            late = timeout is not None and waited >= timeout - _DEADLINE_SLACK_S
            self.metrics.refused(variant, info.model_name,
                                 "DEADLINE_EXCEEDED" if late else "CANCELLED", waited)
            raise
        return self._lease(instance, cost, info, time.perf_counter() - since)

    def _lease(self, instance: Instance, cost: float, info: RequestInfo,
               queued_s: float = 0.0) -> Lease:
        stats = self.metrics.started(instance.variant, info.model_name)
        return Lease(instance, cost, self.outliers, stats, queued_s)

    @staticmethod
    def _pick_avoiding(variant: Variant, avoid: Instance, cost: float) -> Instance | None:
        """:meth:`Variant.pick` away from ``avoid`` (where the request's last attempt failed)
        while the variant has another instance to offer (Envoy's ``previous_hosts`` retry
        predicate); ``avoid`` again when it is the only one."""
        if avoid.variant is not variant or not avoid.pickable:
            return variant.pick(cost)
        variant.table.set_available(avoid.slot, False)
        try:
            instance = variant.pick(cost)
            if instance is not None or variant.table.pickable() > 0:
                return instance  # another one, or None: the others are busy, so wait
        finally:
            variant.table.set_available(avoid.slot, avoid.pickable)
        return variant.pick(cost)  # it is the only one: try it again

    def _pick_sequence(self, info: RequestInfo, target_variant: str | None,
                       cost: float) -> Instance:
        sequence_id = info.sequence_id
        assert sequence_id is not None
        if isinstance(sequence_id, str) and (
                len(sequence_id) > self.max_sequence_id_bytes
                or len(sequence_id.encode()) > self.max_sequence_id_bytes):
            raise NoInstanceError(
                f"sequence_id is longer than this router's limit of "
                f"{self.max_sequence_id_bytes} bytes (limits.max_sequence_id_bytes)",
                "INVALID_ARGUMENT")
        if self.shared_pins is not None:
            return self._pick_shared_sequence(self.shared_pins, info, target_variant, cost)
        key = (target_variant, info.model_name, sequence_id)
        sequences = self.sequences
        pinned = None if info.sequence_start else sequences.get(key)
        if pinned is not None and not pinned[0].removed:
            instance = pinned[0]
            instance.variant.count(instance, cost)
        else:
            if not info.sequence_end and key not in sequences \
                    and len(sequences) >= self.max_sequences:
                raise _too_many_sequences(len(sequences))
            instance = self._start_sequence(info, target_variant, cost)
        if info.sequence_end:
            sequences.pop(key, None)
        else:
            sequences[key] = (instance, time.monotonic())
        return instance

    def _start_sequence(self, info: RequestInfo, target_variant: str | None,
                        cost: float) -> Instance:
        """The instance a sequence with no (usable) pin goes to, counted."""
        variant = self.choose_variant(info.model_name, target_variant)
        picked = variant.pick(cost)
        if picked is None:
            raise NoInstanceError(
                f"no healthy instance in variant '{variant.name}' can start sequence "
                f"{info.sequence_id} of model '{info.model_name}'")
        return picked

    def _pick_shared_sequence(self, pins: SharedPins, info: RequestInfo,
                              target_variant: str | None, cost: float) -> Instance:
        """:meth:`_pick_sequence` on the fleet's pins (several router processes): the
        first request to reach any process pins the sequence for all of them; two
        processes starting one sequence at once agree on the pin that was claimed first."""
        assert info.sequence_id is not None
        key = pins.key(target_variant, info.model_name, info.sequence_id)
        found = None if info.sequence_start else pins.find(key)
        if found is not None:
            pinned = self._pinned_instance(found)
            if pinned is not None:
                pinned.variant.count(pinned, cost)
                if info.sequence_end:
                    pins.drop(key)
                return pinned
        instance = self._start_sequence(info, target_variant, cost)
        if info.sequence_end:
            pins.drop(key)
            return instance
        variant = instance.variant
        pin = (self.variants.index(variant), instance.slot,
               cast(SharedCounts, variant.table).generations[instance.slot])
        try:
            if info.sequence_start:
                pins.put(key, pin)
                return instance
            claimed = pins.claim(key, pin, stale=found)
        except PinsFullError as exc:
            variant.give_back(instance, cost)
            raise _too_many_sequences(len(pins)) from exc
        if claimed == pin:
            return instance
        winner = self._pinned_instance(claimed)
        if winner is None:  # the other process pinned an instance that left since
            pins.put(key, pin)
            return instance
        variant.give_back(instance, cost)
        winner.variant.count(winner, cost)
        return winner

    def _pinned_instance(self, pin: tuple[int, int, int]) -> Instance | None:
        """The instance a shared pin names, if this process knows it still."""
        index, slot, generation = pin
        if index >= len(self.variants):
            return None
        variant = self.variants[index]
        counts = cast(SharedCounts, variant.table)
        if not counts.knows(slot, generation):
            counts.resync()  # pinned by a process that heard of the instance first
            if not counts.knows(slot, generation):
                return None
        instance = variant.instances[slot]
        return None if instance is None or instance.removed else instance

    def expire_sequences(self, idle_s: float) -> int:
        """Forget sequences idle for longer than ``idle_s``, and those pinned to a removed
        instance; returns how many."""
        if self.shared_pins is not None:
            return self.shared_pins.expire(idle_s)
        cutoff = time.monotonic() - idle_s
        stale = [k for k, (instance, last) in self.sequences.items()
                 if last < cutoff or instance.removed]
        for key in stale:
            del self.sequences[key]
        return len(stale)

    def total_outstanding(self) -> int:
        return sum(v.table.total_outstanding() for v in self.variants)


def _too_many_sequences(open_now: int) -> NoInstanceError:
    return NoInstanceError(
        f"{open_now} sequences are open, this router's limit (limits.max_sequences); end "
        f"sequences with sequence_end, or an idle one is forgotten after "
        f"limits.sequence_idle_timeout_s", "RESOURCE_EXHAUSTED")
