"""An endpoint end to end: local Triton workers (if configured) plus the router in front."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from tritonmesh.config import ConfigError, EndpointConfig, load_config
from tritonmesh.membership import active
from tritonmesh.processconfig import ProcessRole
from tritonmesh.reload import restart_keys
from tritonmesh.server import Router
from tritonmesh.signals import StopSignals

__all__ = ["MEMORY_SNAPSHOTS_ENV", "open_endpoint", "reload_port_certificates", "run_endpoint"]

log = logging.getLogger("tritonmesh")

MEMORY_SNAPSHOTS_ENV = "TRITONMESH_MEMORY_SNAPSHOTS"


@contextlib.asynccontextmanager
async def open_endpoint(config: EndpointConfig, *, log_dir: str | Path | None = None,
                        seed: int | None = None,
                        role: ProcessRole | None = None) -> AsyncIterator[Router]:
    """Start every variant's local workers, then the router; stop both on exit. With a
    ``role`` (the supervisor of several router processes) the router runs the control
    plane and the role what serves the port."""
    async with contextlib.AsyncExitStack() as stack:
        instances = {v.name: list(v.instances) for v in config.variants}
        scalers = []
        metrics: dict[str, str] = {}  # local workers' metrics ports, for load reports
        for variant in config.variants:
            if variant.local_workers is None:
                continue
            from tritonmesh.workers.launcher import WorkerPool

            pool = await stack.enter_async_context(WorkerPool(
                count=variant.local_workers.count,
                model_repository=variant.local_workers.model_repository,
                log_dir=None if log_dir is None else Path(log_dir) / variant.name,
                restart=True,
            ))
            instances[variant.name].extend(pool.addresses)
            if variant.local_workers.autoscaling is not None:
                from tritonmesh.autoscaler import Autoscaler

                scaler = Autoscaler(variant.name, pool, variant.local_workers.autoscaling)
                stack.push_async_callback(scaler.stop_workers)  # after the router stops
                scalers.append(scaler)
            metrics.update((w.address, f"{w.host}:{w.metrics_port}") for w in pool.workers)
        router = Router(config, instances, seed=seed, metrics_addresses=metrics, role=role)
        await router.start()
        stack.push_async_callback(router.stop)
        if role is not None:
            await stack.enter_async_context(role.serve(router))
        assert router.balancer is not None
        for scaler in scalers:
            scaler.start(router.balancer, router.drains)
            stack.push_async_callback(scaler.close)
        router.autoscalers.extend(scalers)
        yield router


async def run_endpoint(config: EndpointConfig, *, log_dir: str | Path | None = None,
                       on_ready: Callable[[Router], None] | None = None,
                       config_path: str | Path | None = None,
                       role: ProcessRole | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully (workers included).
    Either signal while starting stops what had started and raises
    :class:`~tritonmesh.signals.Interrupted`.

    With ``config_path``, SIGHUP re-reads it and applies each variant's static
    ``instances`` (new ones join, removed ones drain first) and the ``work_hints``.
    Without one, SIGHUP is logged and ignored; so is SIGUSR1 unless memory snapshots
    are on (``TRITONMESH_MEMORY_SNAPSHOTS``).
    """
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[None]] = set()
    running = [config]
    serving: list[Router] = []

    def on_hup() -> None:
        if config_path is None:
            log.info("SIGHUP ignored: there is no configuration file to reload "
                     "(tritonmesh serve --config reloads one on SIGHUP)")
        elif not serving:
            log.info("SIGHUP ignored: still starting; send it again once serving")
        else:
            task = loop.create_task(_reload(serving[0], config_path, running))
            reloads.add(task)
            task.add_done_callback(reloads.discard)
    # Handled from the start: a hangup or an early reload must not kill the process.
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    snapshots = os.environ.get(MEMORY_SNAPSHOTS_ENV)
    if snapshots:
        _trace_memory(loop, Path(snapshots))
    else:
        loop.add_signal_handler(signal.SIGUSR1, log.info, "SIGUSR1 ignored: memory snapshots "
                                "are off (set %s to a directory to take them)",
                                MEMORY_SNAPSHOTS_ENV)
    try:
        with StopSignals() as signals:
            async with open_endpoint(config, log_dir=log_dir, role=role) as router:
                serving.append(router)
                signals.serving()
                if on_ready is not None:
                    on_ready(router)
                await signals.stop.wait()
                log.info("shutting down: finishing in-flight requests (up to %ss)",
                         config.shutdown_grace_s)
    finally:
        for sig in (signal.SIGHUP, signal.SIGUSR1):
            loop.remove_signal_handler(sig)


def _trace_memory(loop: asyncio.AbstractEventLoop, directory: Path) -> None:
    """Diagnostics for a suspected leak: trace Python allocations (one frame each, so
    the cost stays moderate) and write a snapshot on every SIGUSR1, for
    ``tracemalloc.Snapshot.load(...).compare_to(...)`` (bench/soak.py --tracemalloc)."""
    directory.mkdir(parents=True, exist_ok=True)
    tracemalloc.start(1)
    taken = itertools.count(1)

    def dump() -> None:
        path = directory / f"router-{os.getpid()}-{next(taken)}.tracemalloc"
        partial = path.with_suffix(".partial")
        tracemalloc.take_snapshot().dump(str(partial))
        partial.replace(path)  # readers never see half a file
        log.info("memory snapshot written to %s", path)
    loop.add_signal_handler(signal.SIGUSR1, dump)


def reload_port_certificates(router: Router, config: EndpointConfig) -> None:
    """New certificates for the router's port take effect (new connections); the rest of
    TLS is fixed at start. Compared with what is in effect, not with the last file read.
    With several router processes each does this for its own port."""
    serving = router.certificates.tls if router.certificates is not None else None
    if config.tls == serving:
        return
    try:
        replaced = config.tls is not None and router.certificates is not None \
            and router.certificates.replace(config.tls)
    except ConfigError as exc:  # OpenSSL refused what the config check passed
        log.error("reload: keeping the running certificates: %s", exc)
        return
    if replaced:
        log.info("reload: new certificates for %s; new connections get them, open ones "
                 "keep theirs", router.address)
    else:
        log.warning("reload: turning TLS or client certificates on or off takes a restart; "
                    "the running settings stay")


def _reload_tls(router: Router, config: EndpointConfig) -> None:
    assert router.balancer is not None
    if router.role is None or router.role.serves_data:  # else the router processes' part
        reload_port_certificates(router, config)
    variants = router.balancer.by_name
    if any(v.name in variants and v.upstream_tls != variants[v.name].config.upstream_tls
           for v in config.variants):
        log.warning("reload: upstream_tls is read at start; channels to Triton keep their "
                    "credentials until a restart")


async def _reload(router: Router, path: str | Path, running: list[EndpointConfig]) -> None:
    """SIGHUP: apply what can change while serving (:mod:`tritonmesh.reload`), or refuse
    the whole file. Every outcome is one log line; the running configuration stays on
    any error."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        log.error("reload: keeping the running configuration: %s", exc)
        return
    except Exception as exc:  # a parser's surprise; the running config must survive it
        log.error("reload: keeping the running configuration: %s: %s: %s", path,
                  type(exc).__name__, exc)
        return
    assert router.balancer is not None
    restart = restart_keys(running[0], config)
    if restart:
        log.error("reload: keeping the running configuration: %s changes %s, read only at "
                  "start (restart to apply)", path, ", ".join(restart))
        return
    # Local workers stay as they are; only the static instances are re-read.
    static = {i for v in running[0].variants for i in v.instances}
    _reload_tls(router, config)
    router.reload_auth(config)
    running[0] = config
    instances = {}
    for variant in config.variants:
        live = router.balancer.by_name.get(variant.name)
        keep = [] if live is None else [a for a in active(live) if a not in static]
        instances[variant.name] = [*keep, *variant.instances]
    router.balancer.set_work_hints(config.work_hints)
    router.balancer.set_retries(config.retries)
    router.balancer.reconfigure(config.variants)
    router.reconfigure(config)
    try:
        added, removed = await router.update_instances(instances)
    except Exception as exc:  # an instance's channel could not be made, say
        log.error("reload: %s applied, but changing the instances failed: %s: %s", path,
                  type(exc).__name__, exc)
        return
    log.info("reloaded %s: %d instances added, %d drained and removed", path, added, removed)
