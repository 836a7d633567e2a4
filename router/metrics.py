"""Prometheus metrics, collected at scrape time from the balancer's own state.

The request path only bumps plain integers on its instance (see
``Lease.release``); this collector turns them into metric families when
Prometheus asks, so scraping costs the data path nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from tritonmesh.balancer import Balancer
from tritonmesh.instance import LATENCY_BUCKETS

if TYPE_CHECKING:
    from tritonmesh.autoscaler import Autoscaler
    from tritonmesh.discovery import Discovery
    from tritonmesh.loadreport import LoadReporter

__all__ = ["AutoscalerCollector", "BalancerCollector", "DiscoveryCollector",
           "LoadReportCollector"]


class BalancerCollector(Collector):
    """Per instance and variant, and per model (:mod:`tritonmesh.request_metrics`, labelled
    with the ``endpoint`` name)."""

    def __init__(self, balancer: Balancer, endpoint: str = ""):
        self.balancer = balancer
        self.endpoint = endpoint

    def collect(self) -> Iterator[Metric]:
        labels = ["variant", "instance"]
        outstanding = GaugeMetricFamily(
            "tritonmesh_instance_outstanding_requests",
            "Requests sent to the instance whose final response has not arrived.", labels=labels)
        healthy = GaugeMetricFamily(
            "tritonmesh_instance_healthy", "1 if the instance passes health checks.",
            labels=labels)
        requests = CounterMetricFamily(
            "tritonmesh_instance_requests", "Requests finished on the instance.", labels=labels)
        errors = CounterMetricFamily(
            "tritonmesh_instance_errors", "Requests on the instance that ended in an error.",
            labels=labels)
        latency = HistogramMetricFamily(
            "tritonmesh_instance_request_duration_seconds",
            "Time from routing a request to its final response.", labels=labels)
        variant_outstanding = GaugeMetricFamily(
            "tritonmesh_variant_outstanding_requests", "Outstanding requests in the variant.",
            labels=["variant"])
        ahead = CounterMetricFamily(
            "tritonmesh_instance_dispatched_ahead",
            "Requests sent to the instance before the one it was running ended "
            "(dispatch_ahead_s).", labels=labels)
        absorbed = CounterMetricFamily(
            "tritonmesh_instance_absorbed",
            "ModelInfer calls whose client left (cancelled, or its deadline passed) that the "
            "instance was left to finish (upstream_cancellation: absorb).", labels=labels)
        queued = GaugeMetricFamily(
            "tritonmesh_variant_queued_requests",
            "Requests waiting in the router for an instance below its concurrency limit.",
            labels=["variant"])
        hint_quality = GaugeMetricFamily(
            "tritonmesh_variant_hint_quality",
            "LEAST_OUTSTANDING_WORK: the share of the spread of log service time that "
            "request costs (work_hints) explain, 0 to 1 (1 until learned).",
            labels=["variant"])
        hint_residual = GaugeMetricFamily(
            "tritonmesh_variant_hint_residual_sd",
            "LEAST_OUTSTANDING_WORK: the spread of log(service time / predicted from the "
            "cost) over recent requests (absent until learned).", labels=["variant"])
        for variant in self.balancer.variants:
            variant_outstanding.add_metric([variant.name], variant.table.total_outstanding())
            if variant.work is not None:
                hint_quality.add_metric([variant.name], variant.work.hint_quality())
                if (residual := variant.work.residual_sd()) >= 0.0:
                    hint_residual.add_metric([variant.name], residual)
            # len() only: this runs on the scrape thread while the loop mutates the deque.
            queued.add_metric([variant.name], len(variant.waiters))
            # Counts from one snapshot: an instance removed during the scrape may have
            # left the table (its slot freed) by the time it is reached below.
            counts = {slot: n for slot, n, _, _ in variant.table.snapshot()}
            for inst in variant.live_instances():
                lv = [variant.name, inst.address]
                outstanding.add_metric(lv, counts.get(inst.slot, 0))
                healthy.add_metric(lv, 1.0 if inst.healthy else 0.0)
                requests.add_metric(lv, inst.requests)
                errors.add_metric(lv, inst.errors)
                absorbed.add_metric(lv, inst.absorbed)
                if variant.ahead is not None:
                    ahead.add_metric(lv, inst.sent_ahead)
                cumulative = 0
                buckets = []
                for bound, n in zip(LATENCY_BUCKETS, inst.latency_buckets, strict=False):
                    cumulative += n
                    buckets.append((repr(bound), cumulative))
                buckets.append(("+Inf", inst.requests))
                latency.add_metric(lv, buckets, inst.latency_sum)
        budget = self.balancer.retry_budget
        retries = CounterMetricFamily(
            "tritonmesh_retries",
            "ModelInfer requests sent again, elsewhere, after a connection could not be made.")
        retries.add_metric([], budget.retried)
        refused = CounterMetricFamily(
            "tritonmesh_retries_refused",
            "Retries not sent: per_request (limit), deadline, budget (the endpoint's retry "
            "budget).", labels=["reason"])
        for reason, n in list(budget.refused.items()):
            refused.add_metric([reason], n)
        yield from (outstanding, healthy, requests, errors, absorbed, ahead, latency,
                    variant_outstanding, queued, retries, refused, hint_quality, hint_residual)
        yield from self.balancer.metrics.families(self.endpoint)


class DiscoveryCollector(Collector):
    """DNS discovery (tritonmesh.discovery), per variant that uses it."""

    def __init__(self, discoveries: Sequence[Discovery]):
        self.discoveries = discoveries

    def collect(self) -> Iterator[Metric]:
        labels = ["variant", "dns"]
        instances = GaugeMetricFamily(
            "tritonmesh_discovery_instances",
            "Instances the variant has from DNS now (the last good answer's, once ready).",
            labels=labels)
        lookups = CounterMetricFamily(
            "tritonmesh_discovery_lookups", "DNS lookups made.", labels=labels)
        failures = CounterMetricFamily(
            "tritonmesh_discovery_failures",
            "Lookups that failed or came back empty; the last good set was kept.",
            labels=labels)
        success = GaugeMetricFamily(
            "tritonmesh_discovery_last_success_timestamp_seconds",
            "When the last good answer came (Unix time; 0: never).", labels=labels)
        for d in self.discoveries:
            lv = [d.variant.name, d.spec.dns]
            instances.add_metric(lv, len(d.owned))
            lookups.add_metric(lv, d.lookups)
            failures.add_metric(lv, d.failures)
            success.add_metric(lv, d.last_success)
        yield from (instances, lookups, failures, success)


class AutoscalerCollector(Collector):
    """Local workers' autoscaling (tritonmesh.autoscaler), per variant that uses it."""

    def __init__(self, autoscalers: Sequence[Autoscaler]):
        self.autoscalers = autoscalers

    def collect(self) -> Iterator[Metric]:
        workers = GaugeMetricFamily(
            "tritonmesh_autoscaler_workers", "Local Triton workers the variant runs now.",
            labels=["variant"])
        wanted = GaugeMetricFamily(
            "tritonmesh_autoscaler_wanted_workers",
            "Workers the last sampled demand asks for (within min and max).",
            labels=["variant"])
        out = CounterMetricFamily(
            "tritonmesh_autoscaler_scaled_out", "Workers started by scaling out.",
            labels=["variant"])
        into = CounterMetricFamily(
            "tritonmesh_autoscaler_scaled_in", "Workers drained and stopped by scaling in.",
            labels=["variant"])
        for scaler in list(self.autoscalers):
            lv = [scaler.variant_name]
            workers.add_metric(lv, scaler.workers)
            wanted.add_metric(lv, scaler.last_wanted)
            out.add_metric(lv, scaler.scaled_out)
            into.add_metric(lv, scaler.scaled_in)
        yield from (workers, wanted, out, into)


class LoadReportCollector(Collector):
    """Load reports (tritonmesh.loadreport), per instance of the variants that poll them."""

    def __init__(self, reporters: Sequence[LoadReporter]):
        self.reporters = reporters

    def collect(self) -> Iterator[Metric]:
        labels = ["variant", "instance"]
        external = GaugeMetricFamily(
            "tritonmesh_instance_external_requests",
            "Requests Triton reports on the instance that this router did not send (queued "
            "plus executing, less this router's outstanding), as blended into picks.",
            labels=labels)
        stale = GaugeMetricFamily(
            "tritonmesh_instance_load_report_stale",
            "1 while the instance's metrics had no good poll for stale_after_intervals: "
            "picks there use local counts only.", labels=labels)
        polls = CounterMetricFamily(
            "tritonmesh_instance_load_report_polls", "Polls of the instance's metrics.",
            labels=labels)
        failures = CounterMetricFamily(
            "tritonmesh_instance_load_report_failures",
            "Polls of the instance's metrics that failed (unreachable, timeout, bad page).",
            labels=labels)
        for reporter in self.reporters:
            # A copy: this runs on the scrape thread while the loop adds and drops instances.
            for load in list(reporter.loads.values()):
                lv = [reporter.variant.name, load.instance.address]
                external.add_metric(lv, load.external)
                stale.add_metric(lv, 1.0 if load.stale else 0.0)
                polls.add_metric(lv, load.polls)
                failures.add_metric(lv, load.failures)
        yield from (external, stale, polls, failures)
