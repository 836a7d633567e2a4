"""``/metrics`` for the fleet of router processes, in prometheus_client's multiprocess mode.

With ``processes`` >= 2 the requests are counted in the router processes, and the
supervisor serves ``/metrics``. Each router process writes what its
:class:`~tritonmesh.metrics.BalancerCollector` counts (the counters and histograms:
requests, errors, latencies, per instance and per model) into prometheus_client's
multiprocess files, ``counter_<pid>.db`` and ``histogram_<pid>.db`` in a directory the
supervisor made (the ``PROMETHEUS_MULTIPROC_DIR`` layout), every ``SYNC_S`` and when it
stops. The supervisor's ``/metrics`` adds them up with the library's
``MultiProcessCollector``, the files of exited processes included, so a counter does not
go back when a router process is restarted (its successor, a new pid, starts from zero).
The gauges are the supervisor's own (outstanding counts are fleet-wide already in the
shared table, health is its checks'), except those a router process keeps alone
(``FLEET_GAUGES``: the per-model concurrent requests, the requests waiting in a queue):
each writes them as a ``livesum`` gauge file, ``gauge_livesum_<pid>.db``, the supervisor
serves their sum and deletes an exited process's file when it reaps the process
(``mark_process_dead``). They are up to ``SYNC_S`` old. Not in the fleet view: what a
router process counted in the last ``SYNC_S`` before it was killed.
"""

from __future__ import annotations

import glob
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Final

from prometheus_client.core import Metric
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

__all__ = ["FLEET_GAUGES", "SYNC_S", "FleetCollector", "MetricsWriter", "instance_counts",
           "process_exited"]

Series = tuple[str, str, tuple[tuple[str, str], ...]]  # family, sample name, labels

# How often a router process writes its counts for the supervisor's /metrics.
SYNC_S: Final = 1.0
# Gauges each router process keeps of its own requests: the fleet's value is their sum.
FLEET_GAUGES: Final = frozenset({"tritonmesh_model_concurrent_requests",
                                 "tritonmesh_variant_queued_requests"})


class MetricsWriter:
    """A router process's side: its collectors' counters and histograms, written as
    prometheus_client's multiprocess files."""

    def __init__(self, directory: str, collectors: Iterable[Collector]):
        self.collectors = list(collectors)
        pid = os.getpid()
        # prometheus_client's multiprocess parts carry no annotations.
        self._counters = MmapedDict(  # type: ignore[no-untyped-call]
            os.path.join(directory, f"counter_{pid}.db"))
        self._histograms = MmapedDict(  # type: ignore[no-untyped-call]
            os.path.join(directory, f"histogram_{pid}.db"))
        self._gauges = MmapedDict(  # type: ignore[no-untyped-call]
            os.path.join(directory, f"gauge_livesum_{pid}.db"))
        # A series' file key is a JSON text; the series are the same from one write to the
        # next, and encoding every key every second was most of an idle process's writes.
        # Each write keeps the keys it used, so series that went (instances removed) go too.
        self._keys: dict[Series, str] = {}
        self._used: dict[Series, str] = {}

    def _key(self, family: Metric, name: str, labels: dict[str, str]) -> str:
        series = (family.name, name, tuple(labels.items()))
        key = self._keys.get(series)
        if key is None:
            key = mmap_key(family.name, name, list(labels), list(labels.values()),
                           family.documentation)
        self._used[series] = key
        return key

    def write(self) -> None:
        for collector in self.collectors:
            for family in collector.collect():
                if family.type == "counter":
                    self._counter(family)
                elif family.type == "histogram":
                    self._histogram(family)
                elif family.name in FLEET_GAUGES:
                    self._gauge(family)
        self._keys, self._used = self._used, {}

    def _gauge(self, family: Metric) -> None:
        for s in family.samples:
            key = self._key(family, s.name, s.labels)
            self._gauges.write_value(key, s.value, 0.0)  # type: ignore[no-untyped-call]

    def _counter(self, family: Metric) -> None:
        for s in family.samples:
            if s.name.endswith("_total"):
                key = self._key(family, s.name, s.labels)
                self._counters.write_value(key, s.value, 0.0)  # type: ignore[no-untyped-call]

    def _histogram(self, family: Metric) -> None:
        # The files hold each bucket's own count; the collector adds them up again.
        below: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)
        for s in family.samples:
            if s.name.endswith("_bucket"):
                series = tuple((k, v) for k, v in s.labels.items() if k != "le")
                value, below[series] = s.value - below[series], s.value
            elif s.name.endswith("_sum"):
                value = s.value
            else:
                continue  # _count: the collector derives it from the buckets
            key = self._key(family, s.name, s.labels)
            self._histograms.write_value(key, value, 0.0)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self._counters.close()  # type: ignore[no-untyped-call]
        self._histograms.close()  # type: ignore[no-untyped-call]
        self._gauges.close()  # type: ignore[no-untyped-call]


def process_exited(directory: str, pid: int) -> None:
    """Router process ``pid`` exited: its gauges leave the fleet's sums (its counters stay:
    a counter must not go back)."""
    mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def instance_counts(directory: str) -> dict[tuple[str, str], tuple[int, int]]:
    """(requests, errors) per (variant, instance address), added up over every router
    process that ever wrote: what ``tritonmesh status`` shows for the fleet."""
    files = glob.glob(os.path.join(directory, "counter_*.db"))
    found: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for family in MultiProcessCollector.merge(files):  # type: ignore[no-untyped-call]
        column = {"tritonmesh_instance_requests": 0, "tritonmesh_instance_errors": 1}.get(
            family.name)
        if column is None:
            continue
        for s in family.samples:
            found[s.labels["variant"], s.labels["instance"]][column] += int(s.value)
    return {key: (requests, errors) for key, (requests, errors) in found.items()}


class FleetCollector(Collector):
    """The supervisor's side: the router processes' counters and histograms, added up,
    beside the gauges of ``own`` (its counters and histograms count nothing: it serves
    no requests)."""

    def __init__(self, directory: str, own: Collector):
        self.own = own
        self.processes = MultiProcessCollector(  # type: ignore[no-untyped-call]
            None, path=directory)

    def collect(self) -> Iterator[Metric]:
        for family in self.own.collect():
            if family.type not in ("counter", "histogram") and family.name not in FLEET_GAUGES:
                yield family
        yield from self.processes.collect()  # type: ignore[no-untyped-call]
