"""A router process's metrics files (tritonmesh.fleetmetrics.MetricsWriter) as the
supervisor's MultiProcessCollector reads them back: latest values, series that come, go
and come back."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import CollectorRegistry
from tritonmesh.fleetmetrics import MetricsWriter


class Counts:
    """A collector of per-instance request counts and one latency histogram."""

    def __init__(self) -> None:
        self.requests: dict[str, float] = {}
        self.latency = [("0.1", 0.0), ("+Inf", 0.0)]
        self.latency_sum = 0.0

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("tm_requests", "requests", labels=["instance"])
        for instance, value in self.requests.items():
            family.add_metric([instance], value)
        yield family
        histogram = HistogramMetricFamily("tm_latency_seconds", "latency")
        histogram.add_metric([], self.latency, self.latency_sum)
        yield histogram


def _read(directory: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(directory))
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "pid"))): s.value
            for family in registry.collect() for s in family.samples}


def test_each_write_leaves_the_latest_values(tmp_path: Path) -> None:
    counts = Counts()
    writer = MetricsWriter(str(tmp_path), [counts])
    try:
        counts.requests = {"a:1": 3, "b:1": 5}
        writer.write()
        counts.requests = {"a:1": 4, "b:1": 9}
        counts.latency, counts.latency_sum = [("0.1", 2.0), ("+Inf", 3.0)], 0.75
        writer.write()
        seen = _read(tmp_path)
        assert seen[("tm_requests_total", (("instance", "a:1"),))] == 4
        assert seen[("tm_requests_total", (("instance", "b:1"),))] == 9
        assert seen[("tm_latency_seconds_bucket", (("le", "0.1"),))] == 2
        assert seen[("tm_latency_seconds_bucket", (("le", "+Inf"),))] == 3
        assert seen[("tm_latency_seconds_count", ())] == 3
        assert seen[("tm_latency_seconds_sum", ())] == 0.75
        # b leaves (its last count stays: a counter never goes back), then comes back.
        counts.requests = {"a:1": 6}
        writer.write()
        counts.requests = {"a:1": 6, "b:1": 11}
        writer.write()
        seen = _read(tmp_path)
        assert seen[("tm_requests_total", (("instance", "a:1"),))] == 6
        assert seen[("tm_requests_total", (("instance", "b:1"),))] == 11
    finally:
        writer.close()
    assert sorted(os.listdir(tmp_path)) == sorted(
        f"{kind}_{os.getpid()}.db" for kind in ("counter", "histogram", "gauge_livesum"))
