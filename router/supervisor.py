"""The supervisor of a multi-process endpoint (``processes`` >= 2).

It owns what there is one of: the configuration and its SIGHUP reloads, the local
workers, health checks, discovery, membership, the admin API and ``/metrics``; it serves
no inference. K router processes serve ``listen`` together (SO_REUSEPORT: the kernel
spreads connections over them), each a fresh interpreter (``python -m
tritonmesh.routerchild``, never a fork of a process with a running loop and gRPC), with
a process index of its own (1..K; the supervisor is 0) in every variant's shared table.

A router process that exits is reaped, its share of every table reclaimed (its ledger
subtracted from the fleet-wide counts: nothing leaks, whatever instruction it died at),
and it is started again with the same index; the others keep serving the port
meanwhile. SIGTERM (or SIGINT) stops the router processes first (each finishes its
in-flight requests within ``shutdown_grace_s``), then the control plane and the workers,
then removes the segments. Segments of a supervisor that died without that cleanup are
removed at the next start (``unlink_stale``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import glob
import logging
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING, Final

from tritonmesh._core import SharedTable, _segment, unlink_stale
from tritonmesh.configvalues import ConfigError
from tritonmesh.fleetbudget import SharedRetryCounts
from tritonmesh.fleetmetrics import SYNC_S, FleetCollector, instance_counts, process_exited
from tritonmesh.fleetoutliers import FleetOutliers, SharedEjections
from tritonmesh.members import POLL_S, Publisher, members_path
from tritonmesh.sharedcounts import SharedCounts
from tritonmesh.sharedpins import SharedPins

if TYPE_CHECKING:
    from prometheus_client.registry import Collector
    from tritonmesh.balancer import Balancer
    from tritonmesh.config import EndpointConfig, VariantConfig
    from tritonmesh.server import Router

__all__ = ["RunFile", "Supervisor"]

log = logging.getLogger("tritonmesh.supervisor")

# A router process that is not serving by then failed to start (its interpreter, imports
# and gRPC server take about a second).
START_TIMEOUT_S: Final = 60.0
# A router process that exits sooner than this after its start is restarted only after
# this long, so one that cannot start does not spin.
RESTART_BACKOFF_S: Final = 1.0
# After its grace period a router process that has not exited is killed.
STOP_MARGIN_S: Final = 10.0


# The router processes' metrics files live in a temporary directory named for the supervisor.
METRICS_PREFIX: Final = "tritonmesh-metrics-"


def _remove_stale_metrics() -> list[str]:
    """Metrics directories of supervisors that are no longer running (killed, so their
    own cleanup never ran)."""
    removed = []
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{METRICS_PREFIX}*-*")):
        pid = os.path.basename(path)[len(METRICS_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _segment.running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@dataclasses.dataclass(frozen=True)
class RunFile:
    """What a router process is started with (pickled beside the segments)."""

    config: EndpointConfig
    members: str  # the membership file (tritonmesh.members)
    segments: dict[str, str]  # variant name -> its shared table's segment
    log_level: int
    event_loop: str | None  # --event-loop, else the environment's choice
    metrics_dir: str | None  # where its counts go (tritonmesh.fleetmetrics)
    pins: str  # the sequence pins' segment (tritonmesh.sharedpins)
    ejections: str  # the fleet's ejections (tritonmesh.fleetoutliers)
    retries: str  # each router process's retry counts (tritonmesh.fleetbudget)


class ChildStartError(RuntimeError):
    """A router process exited or did not answer before it served."""


class Supervisor:
    """The supervisor's :class:`~tritonmesh.processconfig.ProcessRole`; a ``with`` block
    owns its segments, its files in /dev/shm and the reserved port."""

    serves_data = False
    controls = True

    def __init__(self, config: EndpointConfig, event_loop: str | None = None):
        self.config = config
        self.processes = config.processes
        # Indexes: 0 the supervisor, 1..K the router processes, K + 1 for one process
        # that inspects the tables (tests; a debugger), so that it never takes a router's.
        self.inspector = self.processes + 1
        self.event_loop = event_loop
        self.tables: dict[str, SharedTable] = {}
        self.pins: SharedPins | None = None
        self.ejections: SharedEjections | None = None
        self.retries: SharedRetryCounts | None = None
        self.variant_index = {v.name: i for i, v in enumerate(config.variants)}
        self.run_path = _segment.path(_segment.segment_name("run"))
        self.publisher = Publisher(members_path(), {})
        self.port = 0
        self.metrics_dir: str | None = None
        self._reserved: socket.socket | None = None
        self.children: dict[int, asyncio.subprocess.Process] = {}
        self.restarts = 0
        self._stopping = False
        self._watches: set[asyncio.Task[None]] = set()

    def __enter__(self) -> Supervisor:
        removed = unlink_stale() + _remove_stale_metrics()
        if removed:
            log.info("removed %d stale shared-memory files and metrics directories: %s",
                     len(removed), ", ".join(removed))
        try:
            for i, variant in enumerate(self.config.variants):
                self.tables[variant.name] = SharedTable.create(
                    self.config.shared_table_slots, self.inspector + 1, tag=f"v{i}",
                    unlink_stale=False)
            self.pins = SharedPins.create(self.config.limits.max_sequences)
            self.ejections = SharedEjections.create(len(self.config.variants),
                                                    self.config.shared_table_slots)
            self.retries = SharedRetryCounts.create(self.inspector + 1)
        except OSError as exc:
            self.__exit__(None, None, None)
            raise ConfigError(
                f"processes: {self.processes} router processes share their counts in "
                f"{_segment.SHM_DIR}, which cannot be used: {exc.strerror or exc} "
                "(mount a writable tmpfs there, or use processes: 1)") from None
        self.publisher.segments = {name: t.name for name, t in self.tables.items()}
        host, _, port = self.config.listen.rpartition(":")
        self.port = int(port) or self._reserve(host)
        self.metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_PREFIX}{os.getpid()}-")
        self._write_run(self.config)
        return self

    def _write_run(self, config: EndpointConfig) -> None:
        """The run file router processes start (and reload) from; replaced whole."""
        host = config.listen.rpartition(":")[0]
        run = RunFile(dataclasses.replace(config, listen=f"{host}:{self.port}"),
                      self.publisher.path, self.publisher.segments,
                      logging.getLogger().getEffectiveLevel(), self.event_loop, self.metrics_dir,
                      self.pins.name if self.pins is not None else "",
                      self.ejections.name if self.ejections is not None else "",
                      self.retries.name if self.retries is not None else "")
        partial = f"{self.run_path}.partial"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            pickle.dump(run, f)
        os.replace(partial, self.run_path)

    async def _count_fleet(self, router: Router) -> None:
        """The router processes' request and error counts onto this process's instances,
        for the admin API (``tritonmesh status``); /metrics reads the files itself."""
        if self.metrics_dir is None:
            return
        while True:
            await asyncio.sleep(SYNC_S)
            counts = instance_counts(self.metrics_dir)
            assert router.balancer is not None
            for instance in router.balancer.instances():
                instance.requests, instance.errors = counts.get(
                    (instance.variant.name, instance.address), (0, 0))

    async def _forward_reloads(self, router: Router) -> None:
        """A SIGHUP reload applied here (``router.config`` replaced) goes to every router
        process: the run file anew, then SIGHUP to each."""
        applied = router.config
        while True:
            await asyncio.sleep(POLL_S)
            if router.config is not applied:
                applied = router.config
                self._write_run(applied)
                for proc in self.children.values():
                    if proc.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            proc.send_signal(signal.SIGHUP)

    def _reserve(self, host: str) -> int:
        """Port 0: bind a port for every router process to share (SO_REUSEPORT), held
        here, not listening, so that it stays theirs while one restarts."""
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), 0, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        self._reserved = sock
        port: int = sock.getsockname()[1]
        return port

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for table in self.tables.values():
            table.unlink()
            table.close()
        self.tables.clear()
        for shared in (self.pins, self.ejections, self.retries):
            if shared is not None:
                shared.unlink()
                shared.close()
        self.pins = self.ejections = self.retries = None
        for path in (self.run_path, f"{self.run_path}.partial", self.publisher.path,
                     f"{self.publisher.path}.partial"):
            if os.path.lexists(path):  # a read-only /dev/shm refuses even a missing name
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.metrics_dir = None

    # -- ProcessRole -------------------------------------------------------------------

    def table(self, config: VariantConfig) -> SharedCounts:
        counts = SharedCounts(self.tables[config.name], owner=True,
                              limit=config.max_concurrency or 0, ejections=self.ejections,
                              variant_index=self.variant_index[config.name])
        counts.on_change = self.publisher.changed
        return counts

    def on_balancer(self, balancer: Balancer) -> None:
        self.publisher.balancer = balancer
        balancer.shared_pins = self.pins  # the supervisor sweeps idle pins
        assert self.ejections is not None
        # Its health checks end ejections (probe_passed); it ejects nothing itself.
        balancer.outliers = FleetOutliers(self.ejections, self.variant_index, supervisor=True)

    def metrics(self, own: Collector) -> Collector:
        assert self.metrics_dir is not None
        return FleetCollector(self.metrics_dir, own)

    @contextlib.asynccontextmanager
    async def serve(self, router: Router) -> AsyncIterator[None]:
        """Publish the membership, start the K router processes and watch them; on exit,
        stop them (before the control plane and the workers stop)."""
        router.port = self.port
        assert router.health is not None
        # No port of its own to answer on: the verdict goes to the router processes.
        router.health.servicer = self.publisher.health
        self.publisher.publish()
        loop = asyncio.get_running_loop()
        publishing = loop.create_task(self.publisher.run())
        reloading = loop.create_task(self._forward_reloads(router))
        counting = loop.create_task(self._count_fleet(router))
        try:
            started = await asyncio.gather(
                *(self._start(i) for i in range(1, self.processes + 1)),
                return_exceptions=True)
            failed = [e for e in started if isinstance(e, BaseException)]
            if failed:
                raise failed[0]
            for index in self.children:
                self._watch(index)
            log.info("%d router processes serving %s", self.processes, router.address)
            yield
        finally:
            self._stopping = True
            await self._stop_children(router.config.shutdown_grace_s)
            for task in (publishing, reloading, counting):
                task.cancel()
            await asyncio.gather(publishing, reloading, counting, return_exceptions=True)

    # -- router processes --------------------------------------------------------------

    async def _start(self, index: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tritonmesh.routerchild", self.run_path, str(index),
            stdout=asyncio.subprocess.PIPE, start_new_session=False)
        self.children[index] = proc
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            code = await proc.wait()
            self._reclaim(index)
            raise ChildStartError(f"router[{index}] (pid {proc.pid}) did not start "
                                  f"(exit status {code}); its log is above")
        log.info("router[%d] started (pid %d)", index, proc.pid)

    def _watch(self, index: int) -> None:
        task = asyncio.get_running_loop().create_task(self._keep(index))
        self._watches.add(task)
        task.add_done_callback(self._watches.discard)

    async def _keep(self, index: int) -> None:
        """Restart router process ``index`` whenever it exits, until the stop."""
        while True:
            proc = self.children[index]
            started = time.monotonic()
            code = await proc.wait()
            if self._stopping:
                return
            reclaimed = self._reclaim(index)
            log.warning("router[%d] (pid %d) exited (status %s); %d requests it held "
                        "reclaimed; restarting it", index, proc.pid, code, reclaimed)
            if time.monotonic() - started < RESTART_BACKOFF_S:
                await asyncio.sleep(RESTART_BACKOFF_S)
            if self._stopping:
                return
            try:
                await self._start(index)
                self.restarts += 1
            except (ChildStartError, OSError) as exc:
                log.error("%s; trying again", exc)

    def _reclaim(self, index: int) -> int:
        """The share of router process ``index`` (exited and reaped) in every table."""
        if self.retries is not None:
            self.retries.clear(index)
        if self.metrics_dir is not None and index in self.children:
            process_exited(self.metrics_dir, self.children[index].pid)
        return sum(table.reclaim(index) for table in self.tables.values()
                   if table.pid(index))

    async def _stop_children(self, grace_s: float) -> None:
        for proc in self.children.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for index, proc in self.children.items():
            try:
                await asyncio.wait_for(proc.wait(), grace_s + STOP_MARGIN_S)
            except TimeoutError:
                log.warning("router[%d] did not stop in time; killing it", index)
                proc.kill()
                await proc.wait()
            self._reclaim(index)
        for task in list(self._watches):
            task.cancel()
        await asyncio.gather(*self._watches, return_exceptions=True)
