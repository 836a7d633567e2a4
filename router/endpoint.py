"""An endpoint end to end: local Triton workers (if configured) plus the router in front."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from tritonmesh.config import EndpointConfig
from tritonmesh.server import Router

__all__ = ["open_endpoint", "run_endpoint"]

log = logging.getLogger("tritonmesh")


@contextlib.asynccontextmanager
async def open_endpoint(config: EndpointConfig, *, log_dir: str | Path | None = None,
                        seed: int | None = None) -> AsyncIterator[Router]:
    """Start every variant's local workers, then the router; stop both on exit."""
    async with contextlib.AsyncExitStack() as stack:
        instances = {v.name: list(v.instances) for v in config.variants}
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
        router = Router(config, instances, seed=seed)
        await router.start()
        stack.push_async_callback(router.stop)
        yield router


async def run_endpoint(config: EndpointConfig, *, log_dir: str | Path | None = None,
                       on_ready: Callable[[Router], None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully (workers included)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with open_endpoint(config, log_dir=log_dir) as router:
            if on_ready is not None:
                on_ready(router)
            await stop.wait()
            log.info("shutting down: finishing in-flight requests (up to %ss)",
                     config.shutdown_grace_s)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
