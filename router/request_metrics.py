"""Per endpoint, variant and model metrics in SageMaker's terms.

The data path calls :meth:`RequestMetrics.started` once when a request holds an instance
(it returns the request's :class:`ModelStats`, the same object every time for a variant
and model) and :meth:`ModelStats.finished` once when it lets go of it. Both only bump
integers and floats that exist already; the collector (:mod:`tritonmesh.metrics`) turns
them into metric families at scrape time.

Label cardinality is bounded by the configuration and the fleet, never by requests: the
``model`` label is a model the variant lists under ``models``; for a variant that lists
none, a model its Triton reports READY in the repository index (asked by the health
checker, at most ``limits.max_model_policies`` per variant); else ``other``. Error codes
are gRPC's 17.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

if TYPE_CHECKING:
    from tritonmesh.balancer import Variant

__all__ = ["BUCKETS", "OTHER", "ModelStats", "RequestMetrics", "status_class"]

OTHER: Final = "other"

# Upper bounds (seconds): the router's own time is tens of microseconds, Triton's up to
# minutes for a generation.
BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)

# gRPC codes as HTTP's classes (grpc-gateway's mapping): a client's mistake or a server's.
_CLIENT_CODES: Final = frozenset({
    "CANCELLED", "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNAUTHENTICATED",
})


def status_class(code_name: str) -> str:
    """``4xx`` for a gRPC status that HTTP would call the client's error, else ``5xx``."""
    return "4xx" if code_name in _CLIENT_CODES else "5xx"


class _Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    def buckets(self) -> list[tuple[str, float]]:
        counts = list(self.counts)  # the loop thread may add meanwhile
        out: list[tuple[str, float]] = []
        cumulative = 0
        for bound, n in zip(BUCKETS, counts, strict=False):
            cumulative += n
            out.append((repr(bound), cumulative))
        out.append(("+Inf", cumulative + counts[-1]))
        return out


class ModelStats:
    """What one variant has seen of one model (or of its ``other`` models)."""

    __slots__ = ("concurrent", "errors", "invocations", "model_latency", "overhead_latency",
                 "queue_wait", "time_between_responses", "time_to_first_response")

    def __init__(self) -> None:
        self.concurrent = 0
        self.invocations = 0
        self.errors: dict[str, int] = {}  # by gRPC code name: at most 16 keys
        self.model_latency = _Histogram()
        self.overhead_latency = _Histogram()
        self.queue_wait = _Histogram()
        self.time_to_first_response = _Histogram()
        self.time_between_responses = _Histogram()

    def finished(self, code_name: str, model_s: float, overhead_s: float,
                 queued_s: float) -> None:
        """The request that :meth:`RequestMetrics.started` returned this for ended.

        ``code_name``: its gRPC status (``"OK"``); ``model_s``: from sending it upstream to
        its last answer (time in Triton); ``overhead_s``: the router's own time, ``queued_s``
        (the late-binding queue) included.
        """
        self.concurrent -= 1
        self.invocations += 1
        if code_name != "OK":
            self.errors[code_name] = self.errors.get(code_name, 0) + 1
        # _Histogram.observe, inlined: this runs once per request.
        histogram = self.model_latency
        histogram.counts[bisect_left(BUCKETS, model_s)] += 1
        histogram.sum += model_s
        histogram = self.overhead_latency
        histogram.counts[bisect_left(BUCKETS, overhead_s)] += 1
        histogram.sum += overhead_s
        histogram = self.queue_wait
        histogram.counts[0 if queued_s <= 0.0 else bisect_left(BUCKETS, queued_s)] += 1
        histogram.sum += queued_s


class RequestMetrics:
    """Every variant's :class:`ModelStats`, by model."""

    def __init__(self) -> None:
        # variant name -> model label -> stats. Replaced whole (never changed in place) when
        # variants list other models, so the scrape thread always reads a finished one.
        self._stats: dict[str, dict[str, ModelStats]] = {}

    def set_models(self, variants: Iterable[Variant]) -> None:
        """Label each variant's listed models; stats already counted stay (counters never go
        back, and a model listed again continues where it was)."""
        stats = {name: dict(models) for name, models in self._stats.items()}
        for variant in variants:
            models = stats.setdefault(variant.name, {})
            for model in (*(variant.models or ()), OTHER):
                models.setdefault(model, ModelStats())
        self._stats = stats

    def serve(self, variant: str, models: Iterable[str], cap: int) -> None:
        """Models a variant that lists none is seen to serve (its Triton reports them READY):
        counted by name from now on, at most ``cap`` of them per variant (the rest stay
        ``other``). Names come from Triton's repository, never from requests."""
        current = self._stats.get(variant)
        if current is None:
            return
        new = sorted(set(models) - current.keys())
        room = cap - (len(current) - 1)
        if not new or room <= 0:
            return
        stats = dict(self._stats)
        stats[variant] = {**current, **{m: ModelStats() for m in new[:room]}}
        self._stats = stats

    def started(self, variant: Variant, model: str) -> ModelStats:
        """A request for ``model`` holds an instance of ``variant`` now (concurrent + 1)."""
        models = self._stats[variant.name]
        stats = models.get(model)
        if stats is None:
            stats = models[OTHER]
        stats.concurrent += 1
        return stats

    def refused(self, variant: Variant, model: str, code_name: str, queued_s: float) -> None:
        """A request for ``model`` that ``variant``'s queue answered itself (full, or its
        deadline passed there): an invocation and an error that never held an instance."""
        self.started(variant, model).finished(code_name, 0.0, queued_s, queued_s)

    def families(self, endpoint: str) -> Iterator[Metric]:
        """The metric families, labelled ``endpoint``, ``variant``, ``model``."""
        labels = ["endpoint", "variant", "model"]
        invocations = CounterMetricFamily(
            "tritonmesh_model_invocations",
            "Requests that ended after holding an instance (SageMaker's Invocations); each "
            "attempt of a retried request counts.", labels=labels)
        errors = CounterMetricFamily(
            "tritonmesh_model_invocation_errors",
            "Invocations that ended in a gRPC error, by code and by class (4xx: the client's, "
            "5xx: the server's; SageMaker's Invocation4XXErrors and Invocation5XXErrors).",
            labels=[*labels, "class", "code"])
        concurrent = GaugeMetricFamily(
            "tritonmesh_model_concurrent_requests",
            "Requests holding an instance now (SageMaker's ConcurrentRequestsPerModel).",
            labels=labels)
        histograms = [
            ("model_latency", "tritonmesh_model_latency_seconds",
             "From sending a request to Triton to its last answer (SageMaker's ModelLatency)."),
            ("overhead_latency", "tritonmesh_model_overhead_latency_seconds",
             "The router's own time for a request, queue wait included (SageMaker's "
             "OverheadLatency)."),
            ("queue_wait", "tritonmesh_model_queue_wait_seconds",
             "Time a request waited in the late-binding queue for an instance (0 for those "
             "that did not wait)."),
            ("time_to_first_response", "tritonmesh_model_stream_time_to_first_response_seconds",
             "Streams: from sending a request to Triton to its first response."),
            ("time_between_responses",
             "tritonmesh_model_stream_time_between_responses_seconds",
             "Streams: between one response of a request and its next."),
        ]
        families = [HistogramMetricFamily(name, doc, labels=labels)
                    for _, name, doc in histograms]
        for variant, models in list(self._stats.items()):
            for model, stats in list(models.items()):
                lv = [endpoint, variant, model]
                invocations.add_metric(lv, stats.invocations)
                concurrent.add_metric(lv, stats.concurrent)
                for code, n in list(stats.errors.items()):
                    errors.add_metric([*lv, status_class(code), code], n)
                for (attr, _, _), family in zip(histograms, families, strict=True):
                    histogram: _Histogram = getattr(stats, attr)
                    family.add_metric(lv, histogram.buckets(), histogram.sum)
        yield from (invocations, errors, concurrent, *families)
