"""The ``processes`` key: how many router processes serve the port, and what a router
process is asked to do (:class:`ProcessRole`).

With ``processes: 1`` (the default) one process does everything. With K >= 2 a supervisor
owns the configuration, health checks, membership, the admin API, reloads and local
workers, and K router processes serve ``listen`` (SO_REUSEPORT) over the shared-memory
table (:mod:`tritonmesh.supervisor`, :mod:`tritonmesh.routerchild`). Only what the shared
table can do exactly across processes runs there; the rest is refused at start
(:func:`check_processes`), never silently degraded.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any, Final, Protocol

from tritonmesh.configvalues import ConfigError
from tritonmesh.routing import RoutingStrategy

if TYPE_CHECKING:
    import contextlib

    from prometheus_client.registry import Collector
    from tritonmesh.balancer import Balancer
    from tritonmesh.config import EndpointConfig, VariantConfig
    from tritonmesh.server import Router
    from tritonmesh.variant import _Table

__all__ = ["DEFAULT_SHARED_TABLE_SLOTS", "MULTIPROCESS_STRATEGIES", "ProcessRole",
           "check_processes", "fit_auto", "parse_processes", "parse_shared_table_slots"]

log = logging.getLogger("tritonmesh.processes")

# Strategies with a pick on the shared table (SharedTable.pick, pick_random, pick_two).
MULTIPROCESS_STRATEGIES: Final = frozenset({
    RoutingStrategy.LEAST_OUTSTANDING_REQUESTS, RoutingStrategy.RANDOM,
    RoutingStrategy.POWER_OF_TWO_CHOICES,
})
DEFAULT_SHARED_TABLE_SLOTS: Final = 1024
# The shared table's 127 process indexes, less the supervisor's and an inspector's.
MAX_PROCESSES: Final = 125


def parse_processes(value: Any, key: str = "processes") -> int:
    """An integer >= 1, or ``"auto"``: the CPUs this process may run on."""
    if value == "auto":
        return min(len(os.sched_getaffinity(0)), MAX_PROCESSES)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)  # from the command line
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer >= 1 or 'auto', got {value!r}")
    if not 1 <= value <= MAX_PROCESSES:
        raise ConfigError(f"{key}: must be in [1, {MAX_PROCESSES}] or 'auto', got {value}")
    return value


def parse_shared_table_slots(value: Any) -> int:
    """``shared_table_slots``: instances one variant may have at once with processes > 1."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 20:
        raise ConfigError(f"shared_table_slots: expected an integer in [1, {1 << 20}], "
                          f"got {value!r}")
    return value


def check_processes(config: EndpointConfig) -> None:
    """Refuse, naming the key and the reason, what K >= 2 router processes cannot do
    exactly: the shared table has no work table, no round-robin cursor and no external
    load."""
    if config.processes < 2:
        return
    for i, v in enumerate(config.variants):
        where = f"variants[{i}]."
        if v.routing_strategy not in MULTIPROCESS_STRATEGIES:
            names = ", ".join(sorted(s.value for s in MULTIPROCESS_STRATEGIES))
            raise ConfigError(
                f"{where}routing_strategy: {v.routing_strategy.value} needs one router "
                f"process (processes: {config.processes}); the shared table picks by {names}")
        for key, used in (("dispatch_ahead_s", v.dispatch_ahead_s > 0),
                          ("load_report", v.load_report is not None)):
            if used:
                raise ConfigError(
                    f"{where}{key}: not supported with processes: {config.processes} yet "
                    "(dispatch ahead's timers and load reports keep their state in one "
                    "process); use processes: 1")


def fit_auto(config: EndpointConfig) -> EndpointConfig:
    """``processes: auto`` asks for the machine where the configuration can use it: where
    several router processes would be refused (:func:`check_processes`), one serves, and
    the log says why. An explicit K >= 2 is still refused."""
    try:
        check_processes(config)
    except ConfigError as exc:
        log.info("processes: auto runs one router process: %s", exc)
        return dataclasses.replace(config, processes=1)
    return config


class ProcessRole(Protocol):
    """What a :class:`~tritonmesh.server.Router` does in a multi-process endpoint: serve
    the data port (router processes), run the control plane (the supervisor), and where
    each variant's table lives."""

    serves_data: bool  # open ``listen`` (with SO_REUSEPORT)
    controls: bool  # health checks, discovery, admin API, metrics

    def table(self, config: VariantConfig) -> _Table:
        """The variant's table: a view of its shared-memory segment."""

    def on_balancer(self, balancer: Balancer) -> None:
        """The router's balancer exists (before the port serves)."""

    def metrics(self, own: Collector) -> Collector:
        """What ``/metrics`` serves in place of the router's own counts."""

    def serve(self, router: Router) -> contextlib.AbstractAsyncContextManager[None]:
        """What runs beside the started router, until the endpoint stops."""
