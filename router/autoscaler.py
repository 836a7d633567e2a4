"""Autoscaling of a variant's local workers (SageMaker's target tracking on concurrency).

Every ``interval_s`` the variant's demand is sampled: requests outstanding on its instances
plus those waiting in its late-binding queue. The workers it needs are
``ceil(demand / target_concurrency)``, within ``min`` and ``max``. When every sample for
``scale_out_cooldown_s`` asked for more, the missing workers start (in parallel) and join
the variant once Triton and every model are ready; when every sample for
``scale_in_cooldown_s`` asked for fewer, the newest worker drains (no new picks, its
requests finish, up to ``drain_timeout_s``), leaves the variant and stops. No action
follows another within the cooldown of its own direction. The ``min`` workers started with
the endpoint are never scaled in, and only they are restarted if they die.
"""

from __future__ import annotations

import asyncio
import logging
import math

from tritonmesh.autoscale_config import Autoscaling
from tritonmesh.balancer import Balancer, InstanceState, Variant
from tritonmesh.membership import Drains
from tritonmesh.workers.launcher import TritonWorker, WorkerPool

__all__ = ["Autoscaler"]

log = logging.getLogger("tritonmesh.autoscaler")


class Autoscaler:
    """Scales ``pool``'s variant between ``spec.min`` and ``spec.max`` workers."""

    def __init__(self, variant_name: str, pool: WorkerPool, spec: Autoscaling):
        self.variant_name = variant_name
        self.pool = pool
        self.spec = spec
        self.added: list[TritonWorker] = []  # started by scaling out, newest last
        self.scaled_out = 0
        self.scaled_in = 0
        self.last_wanted = spec.min
        self._variant: Variant | None = None
        self._drains: Drains | None = None
        self._task: asyncio.Task[None] | None = None
        self._next_index = len(pool.workers)

    @property
    def workers(self) -> int:
        return len(self.pool.workers) + len(self.added)

    def start(self, balancer: Balancer, drains: Drains) -> None:
        """Scale the balancer's variant; its drains go through ``drains`` (the router's),
        so that whoever closes a removed instance's connections hears of it."""
        self._variant = balancer.by_name[self.variant_name]
        self._drains = drains
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop scaling (a scale-out under way stops the workers it was starting)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def stop_workers(self, grace: float = 10.0) -> None:
        """Stop the workers scaling out started (after the router stopped)."""
        added, self.added = self.added, []
        await asyncio.gather(*(w.stop(grace) for w in added))

    def wanted(self) -> int:
        """The local workers the demand sampled now asks for, within min and max."""
        variant = self._variant
        assert variant is not None
        demand = variant.table.total_outstanding() + len(variant.waiters)
        local = {w.address for w in (*self.pool.workers, *self.added)}
        others = sum(1 for i in variant.live_instances()
                     if i.state is InstanceState.ACTIVE and i.address not in local)
        needed = math.ceil(demand / self.spec.target_concurrency) - others
        return min(max(needed, self.spec.min), self.spec.max)

    async def _run(self) -> None:
        spec = self.spec
        loop = asyncio.get_running_loop()
        last_change = loop.time()
        more_since: float | None = None
        fewer_since: float | None = None
        while True:
            await asyncio.sleep(spec.interval_s)
            now = loop.time()
            wanted, have = self.wanted(), self.workers
            self.last_wanted = wanted
            if wanted > have:
                fewer_since = None
                more_since = now if more_since is None else more_since
                if now - more_since >= spec.scale_out_cooldown_s \
                        and now - last_change >= spec.scale_out_cooldown_s:
                    await self._scale_out(wanted - have)
                    last_change, more_since = loop.time(), None
            elif wanted < have:
                more_since = None
                fewer_since = now if fewer_since is None else fewer_since
                if now - fewer_since >= spec.scale_in_cooldown_s \
                        and now - last_change >= spec.scale_in_cooldown_s:
                    await self._scale_in()
                    last_change, fewer_since = loop.time(), None
            else:
                more_since = fewer_since = None

    async def _scale_out(self, count: int) -> None:
        variant = self._variant
        assert variant is not None
        pool = self.pool
        workers = []
        for _ in range(count):
            index, self._next_index = self._next_index, self._next_index + 1
            workers.append(TritonWorker(index, pool.model_repository,
                                        pool.log_dir / f"triton-{index}.log"))
        log.info("variant '%s': scaling out from %d to %d workers", self.variant_name,
                 self.workers, self.workers + count)
        starts = [asyncio.get_running_loop().create_task(w.start(pool.start_timeout))
                  for w in workers]
        try:
            results = await asyncio.gather(*starts, return_exceptions=True)
        except asyncio.CancelledError:
            await asyncio.gather(*starts, return_exceptions=True)
            await asyncio.gather(*(w.stop(1.0) for w in workers))
            raise
        for worker, result in zip(workers, results, strict=True):
            if isinstance(result, BaseException):
                log.error("variant '%s': a worker did not start: %s", self.variant_name,
                          result)
                await worker.stop(1.0)
                continue
            variant.add(variant.connect(worker.address), slow_start=True)
            self.added.append(worker)
            self.scaled_out += 1
            log.info("variant '%s': worker %s joined (%d workers)", self.variant_name,
                     worker.address, self.workers)

    async def _scale_in(self) -> None:
        variant = self._variant
        assert variant is not None and self._drains is not None
        if not self.added:
            return
        worker = self.added[-1]
        log.info("variant '%s': scaling in from %d workers: draining %s", self.variant_name,
                 self.workers, worker.address)
        for instance in list(variant.live_instances()):
            if instance.address == worker.address:
                drained = await self._drains.start(instance, self.spec.drain_timeout_s)
                if not drained:
                    log.warning("variant '%s': %s still had requests after drain_timeout_s "
                                "(%g s); they were cancelled", self.variant_name,
                                worker.address, self.spec.drain_timeout_s)
        self.added.remove(worker)
        await worker.stop()
        self.scaled_in += 1
        log.info("variant '%s': worker %s stopped (%d workers)", self.variant_name,
                 worker.address, self.workers)
