"""One router process of a multi-process endpoint: ``python -m tritonmesh.routerchild
RUN_FILE INDEX``, started (and restarted) by :mod:`tritonmesh.supervisor`.

It serves ``listen`` with SO_REUSEPORT beside the other router processes, picks on the
variants' shared tables as process ``INDEX``, and learns membership from the
supervisor's file (:class:`tritonmesh.members.Follower`). It runs no control plane:
health checks, discovery, the admin API and reloads are the supervisor's. It writes one
line, ``ready``, on stdout once it serves; its logs name it ``router[INDEX]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pickle
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from tritonmesh._core import SharedTable
from tritonmesh.crosswake import ReleaseWaker
from tritonmesh.endpoint import reload_port_certificates
from tritonmesh.fleetbudget import SharedRetryCounts
from tritonmesh.fleetmetrics import SYNC_S, MetricsWriter
from tritonmesh.fleetoutliers import FleetOutliers, SharedEjections
from tritonmesh.loop import run as run_on_loop
from tritonmesh.members import Follower
from tritonmesh.metrics import BalancerCollector
from tritonmesh.server import Router
from tritonmesh.sharedcounts import SharedCounts
from tritonmesh.sharedpins import SharedPins
from tritonmesh.signals import StopSignals
from tritonmesh.supervisor import RunFile

if TYPE_CHECKING:
    from prometheus_client.registry import Collector
    from tritonmesh.balancer import Balancer
    from tritonmesh.config import VariantConfig

__all__ = ["RouterProcess", "main"]

log = logging.getLogger("tritonmesh.routerchild")

_PR_SET_PDEATHSIG = 1


class RouterProcess:
    """A router process's :class:`~tritonmesh.processconfig.ProcessRole`."""

    serves_data = True
    controls = False

    def __init__(self, run: RunFile, index: int):
        self.run = run
        self.index = index
        self.tables = {name: SharedTable.attach(segment, index)
                       for name, segment in run.segments.items()}
        limits = run.config.limits
        self.pins = SharedPins.attach(run.pins, limits.max_sequences)
        self.pins.idle_ns = int(limits.sequence_idle_timeout_s * 1e9)
        self.ejections = SharedEjections.attach(run.ejections)
        self.retries = SharedRetryCounts.attach(run.retries, index)
        self.variant_index = {v.name: i for i, v in enumerate(run.config.variants)}
        self.follower: Follower | None = None

    def table(self, config: VariantConfig) -> SharedCounts:
        return SharedCounts(self.tables[config.name], owner=False, ejections=self.ejections,
                            variant_index=self.variant_index[config.name])

    def on_balancer(self, balancer: Balancer) -> None:
        balancer.shared_pins = self.pins
        balancer.outliers = FleetOutliers(self.ejections, self.variant_index, supervisor=False)
        self.follower = Follower(self.run.members, balancer, self.retries)
        self.follower.sync()

    def metrics(self, own: Collector) -> Collector:
        return own  # a router process serves no /metrics: the supervisor does

    def serve(self, router: Router) -> contextlib.AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()

    def close(self) -> None:
        for table in self.tables.values():
            table.close()
        self.pins.close()
        self.ejections.close()
        self.retries.close()


def reload(router: Router, role: RouterProcess, run_path: str) -> None:
    """SIGHUP from the supervisor: it applied a reload and wrote the run file anew. The
    port's certificates, the variants' live keys, retries and work hints apply here as they
    did there; membership, weights and limits come from the membership file, as always."""
    with open(run_path, "rb") as f:
        config = pickle.load(f).config
    balancer = router.balancer
    assert balancer is not None and role.follower is not None
    reload_port_certificates(router, config)
    balancer.set_work_hints(config.work_hints)
    balancer.set_retries(config.retries)
    balancer.reconfigure(config.variants)
    router.reconfigure(config)
    role.follower.sync(force=True)
    log.info("reloaded the configuration the supervisor applied")


async def serve(run: RunFile, index: int, run_path: str) -> None:
    role = RouterProcess(run, index)
    loop = asyncio.get_running_loop()
    # Until it serves, a hangup must not end it; the supervisor sends none before.
    loop.add_signal_handler(signal.SIGHUP, log.info, "SIGHUP ignored while starting")
    try:
        with StopSignals() as signals:
            router = Router(run.config, {}, role=role)
            await router.start()
            loop.add_signal_handler(signal.SIGHUP, reload, router, role, run_path)
            assert role.follower is not None and router.balancer is not None
            if router.native is not None:  # it closes a removed instance's connection
                role.follower.removed = router.native.instance_removed
            following = loop.create_task(role.follower.run(router))
            wakers = [ReleaseWaker(v, cast(SharedCounts, v.table), loop)
                      for v in router.balancer.variants]
            writer = None if run.metrics_dir is None else MetricsWriter(
                run.metrics_dir, [BalancerCollector(router.balancer, run.config.name)])
            writing = None if writer is None else loop.create_task(_write_metrics(writer))
            try:
                print("ready", flush=True)
                os.dup2(2, 1)  # nobody reads the pipe after this line
                signals.serving()
                await signals.stop.wait()
            finally:
                await router.stop()
                for waker in wakers:
                    waker.stop()
                if writer is not None and writing is not None:
                    writing.cancel()
                    await asyncio.gather(writing, return_exceptions=True)
                    writer.write()  # the last counts, after every call ended
                    writer.close()
                following.cancel()
                await asyncio.gather(following, return_exceptions=True)
                await role.follower.close()
    finally:
        role.close()
        loop.remove_signal_handler(signal.SIGHUP)


async def _write_metrics(writer: MetricsWriter) -> None:
    while True:
        await asyncio.sleep(SYNC_S)
        writer.write()


def main(argv: Sequence[str] | None = None) -> int:
    run_path, index_text = sys.argv[1:] if argv is None else argv
    index = int(index_text)
    with contextlib.suppress(OSError, AttributeError):  # Linux: die with the supervisor
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    with open(run_path, "rb") as f:
        run: RunFile = pickle.load(f)  # written by our own supervisor, mode 0600
    logging.basicConfig(level=run.log_level,
                        format=f"%(asctime)s %(levelname)s router[{index}] %(name)s: "
                               "%(message)s")
    run_on_loop(serve(run, index, run_path), run.event_loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
