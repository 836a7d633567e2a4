"""Shadow variants: a sampled copy of a live variant's ``ModelInfer`` requests goes to a
variant that takes no live traffic; its answers are measured and discarded.

The live request is never delayed or failed by its shadow: the copy is a task of its own,
started after the live request has its instance, and the live path only draws a random
number and creates that task. The shadow has its own instances and outstanding counts (it
is a variant of its own), never waits for capacity (a shadow at its concurrency limit skips
the copy and counts it), and gets the live request's remaining deadline, so it never
outlives its client by much. When both answers are in, their outputs are compared: the
names, datatypes, shapes and bytes of every output tensor (ids and model versions may
differ).

Streams are not shadowed: a decoupled model answers one request with many responses, whose
comparison is not one of outputs, and copying a stream request would mean opening an upstream
stream per client stream on the shadow. Requests of a sequence are not shadowed either: the
shadow would see only the sampled part of each sequence.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import Final

import grpc.aio
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from tritonclient.grpc import service_pb2 as pb
from tritonmesh.balancer import Balancer, NoInstanceError, Variant
from tritonmesh.config import ShadowConfig
from tritonmesh.forwarding import Metadata
from tritonmesh.instance import LATENCY_BUCKETS
from tritonmesh.wire import RequestInfo
from tritonmesh.workers.upstream import await_call

__all__ = ["ShadowCollector", "Shadows"]

log = logging.getLogger("tritonmesh.shadow")

OTHER_MODEL: Final = "other"  # the label of a model no variant lists, so labels stay bounded


class _Stats:
    """What one shadow variant did, per model."""

    __slots__ = ("latency_buckets", "latency_sum", "matched", "mismatched", "outcomes")

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = {}  # "OK", a gRPC status name, or "SKIPPED"
        self.matched = 0
        self.mismatched = 0
        self.latency_sum = 0.0
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)

    def observe(self, outcome: str, seconds: float | None) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if seconds is not None:
            self.latency_sum += seconds
            self.latency_buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1


class Shadows:
    """The endpoint's shadow variants, by the live variant they copy."""

    def __init__(self, balancer: Balancer, rng: random.Random | None = None):
        self.balancer = balancer
        self._rng = rng or random.Random()
        self.of: dict[str, list[tuple[Variant, ShadowConfig]]] = {}
        for variant in balancer.variants:
            shadow = variant.config.shadow
            if shadow is not None:
                self.of.setdefault(shadow.of, []).append((variant, shadow))
        self.in_flight: dict[str, int] = {}  # copies under way, per shadow variant
        self.stats: dict[tuple[str, str], _Stats] = {}  # (shadow variant, model label)
        self._tasks: set[asyncio.Task[None]] = set()

    def __bool__(self) -> bool:
        return bool(self.of)

    def copy(self, live: Variant, info: RequestInfo, request: bytes, metadata: Metadata,
             timeout: float | None) -> asyncio.Future[bytes | None] | None:
        """Maybe copy a live request to ``live``'s shadows. Returns the future the live
        path sets to its answer (None when it failed), or None when nothing was copied."""
        shadows = self.of.get(live.name)
        if not shadows or info.sequence_id is not None:
            return None
        answer: asyncio.Future[bytes | None] | None = None
        loop = asyncio.get_running_loop()
        for shadow, config in shadows:
            if self._rng.random() >= config.sample:
                continue
            if self.in_flight.get(shadow.name, 0) >= config.max_in_flight:
                self._stats(shadow, _listed(shadow, info.model_name)).observe("SKIPPED", None)
                continue
            self.in_flight[shadow.name] = self.in_flight.get(shadow.name, 0) + 1
            if answer is None:
                answer = loop.create_future()
            task = loop.create_task(
                self._shadow(shadow, info, request, metadata, timeout, answer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return answer

    async def _shadow(self, shadow: Variant, info: RequestInfo, request: bytes,
                      metadata: Metadata, timeout: float | None,
                      answer: asyncio.Future[bytes | None]) -> None:
        try:
            await self._copy(shadow, info, request, metadata, timeout, answer)
        finally:
            self.in_flight[shadow.name] -= 1

    async def _copy(self, shadow: Variant, info: RequestInfo, request: bytes,
                    metadata: Metadata, timeout: float | None,
                    answer: asyncio.Future[bytes | None]) -> None:
        model = _listed(shadow, info.model_name)
        try:
            lease = self.balancer.try_acquire(info, request, shadow.name)
        except NoInstanceError:
            lease = None
        if lease is None:  # at its limit, or nothing healthy: skip, never wait
            self._stats(shadow, model).observe("SKIPPED", None)
            return
        ok = False
        response: bytes | None = None
        outcome = "OK"
        try:
            response = await await_call(lease.instance.upstream.model_infer(
                request, timeout=timeout, metadata=metadata))
            ok = True
        except grpc.aio.AioRpcError as exc:
            outcome = lease.code = exc.code().name
        except Exception as exc:  # never let a shadow's failure escape into the loop's log
            outcome = "INTERNAL"
            log.debug("shadow request to %s failed: %r", lease.instance.address, exc)
        finally:
            seconds = time.perf_counter() - lease.started
            lease.release(ok)
        live = await asyncio.shield(answer)
        # A model that answered is one Triton serves: a bounded set, so it may be a label.
        label = info.model_name if ok or live is not None else model
        stats = self._stats(shadow, label)
        stats.observe(outcome, seconds)
        if response is not None and live is not None:
            if _same_outputs(response, live):
                stats.matched += 1
            else:
                stats.mismatched += 1

    def _stats(self, shadow: Variant, model: str) -> _Stats:
        key = (shadow.name, model)
        stats = self.stats.get(key)
        if stats is None:
            stats = self.stats[key] = _Stats()
        return stats

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _listed(shadow: Variant, model: str) -> str:
    """The model's label when the shadow lists it; else the label of every other model."""
    return model if shadow.models is not None and model in shadow.models else OTHER_MODEL


def _same_outputs(shadow: bytes, live: bytes) -> bool:
    a = pb.ModelInferResponse.FromString(shadow)
    b = pb.ModelInferResponse.FromString(live)
    return ([(o.name, o.datatype, list(o.shape)) for o in a.outputs]
            == [(o.name, o.datatype, list(o.shape)) for o in b.outputs]
            and list(a.raw_output_contents) == list(b.raw_output_contents))


class ShadowCollector(Collector):
    """Prometheus metrics of the shadow variants, per shadow and model."""

    def __init__(self, shadows: Shadows):
        self.shadows = shadows

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        labels = ["shadow", "of", "model"]
        requests = CounterMetricFamily(
            "tritonmesh_shadow_requests",
            "Requests copied to a shadow variant, by outcome (OK, a gRPC status, or SKIPPED "
            "when the shadow had no free instance).", labels=[*labels, "outcome"])
        outputs = CounterMetricFamily(
            "tritonmesh_shadow_outputs",
            "Shadow answers compared with the live answer, by whether every output matched.",
            labels=[*labels, "match"])
        latency = HistogramMetricFamily(
            "tritonmesh_shadow_latency_seconds",
            "Time from sending a copied request to the shadow's answer.", labels=labels)
        of = {v.name: live for live, shadows in self.shadows.of.items() for v, _ in shadows}
        for (name, model), stats in list(self.shadows.stats.items()):
            lv = [name, of[name], model]
            for outcome, n in list(stats.outcomes.items()):
                requests.add_metric([*lv, outcome], n)
            outputs.add_metric([*lv, "true"], stats.matched)
            outputs.add_metric([*lv, "false"], stats.mismatched)
            latency.add_metric(lv, _cumulative(stats.latency_buckets), stats.latency_sum)
        yield from (requests, outputs, latency)


def _cumulative(buckets: Iterable[int]) -> list[tuple[str, float]]:
    out = []
    total = 0
    for bound, n in zip([*map(str, LATENCY_BUCKETS), "+Inf"], buckets, strict=True):
        total += n
        out.append((bound, float(total)))
    return out
