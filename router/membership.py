"""Who is in a variant: instances joining (with slow start), draining out, and a wanted
set of addresses reconciled against the live one.

The admin API (AddInstance, RemoveInstance), SIGHUP reloads (``Router.update_instances``)
and DNS discovery change a serving variant's instances only through here, so a joining
instance always ramps up, and a leaving one always stops taking picks, finishes what it
has (up to a timeout), leaves the table and has its channel closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from tritonmesh.balancer import Instance, InstanceState, Variant
from tritonmesh.workers.upstream import Upstream

__all__ = ["Drains", "Reconciled", "active", "add", "drain", "reconcile"]

log = logging.getLogger("tritonmesh.membership")

Probe = Callable[[Upstream], Coroutine[Any, Any, bool]]


def active(variant: Variant) -> dict[str, Instance]:
    """The variant's instances that take picks (not draining), by address."""
    return {i.address: i for i in variant.live_instances() if i.state is InstanceState.ACTIVE}


def add(variant: Variant, upstream: Upstream, weight: float = 1.0, *,
        slow_start: bool = True) -> Instance:
    """Put ``upstream`` in ``variant``'s pick set. With ``slow_start`` (the default: the
    variant is serving) it starts at a tenth of ``weight`` and ramps up over the
    variant's ``slow_start_s``, so a cold instance is not handed every new request at
    once because it has none outstanding."""
    return variant.add(upstream, weight, slow_start=slow_start)


async def drain(instance: Instance, timeout_s: float) -> bool:
    """Stop new picks, wait for in-flight requests up to ``timeout_s``, then remove.

    Returns whether every request finished in time; the channel closes either way
    (still-running calls are cancelled and release through their own finally).
    """
    variant = instance.variant
    try:
        await asyncio.wait_for(variant.set_draining(instance).wait(), timeout_s)
    except TimeoutError:
        pass
    drained = instance.outstanding == 0
    variant.remove(instance)
    await instance.upstream.close(grace=0)
    return drained


class Drains:
    """Drains that run to their end whatever happens to whoever started them: an instance
    left DRAINING with nothing waiting for it would never leave, nor could its address
    join again. :meth:`wait` is for the owner's stop."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[bool]] = set()
        # Told of each instance removed (the native data path closes its connection there,
        # as drain closes the gRPC channel).
        self.removed: Callable[[Instance], None] | None = None

    def start(self, instance: Instance, timeout_s: float) -> asyncio.Task[bool]:
        """Drain ``instance`` in a task of its own; the task's result is :func:`drain`'s."""
        task = asyncio.get_running_loop().create_task(drain(instance, timeout_s))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self.removed is not None:
            removed = self.removed
            task.add_done_callback(lambda _: removed(instance))
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait(self) -> None:
        """Wait for every drain under way (failures are theirs: each closes its channel)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


@dataclass
class Reconciled:
    """What :func:`reconcile` changed: the instances added, by address, and the drains it
    started (each task's result: whether its instance finished everything in time)."""

    added: dict[str, Instance] = field(default_factory=dict)
    draining: dict[str, asyncio.Task[bool]] = field(default_factory=dict)

    async def drained(self) -> None:
        """Wait for the drains; cancelling this wait leaves them running."""
        if self.draining:
            await asyncio.wait(self.draining.values())


async def reconcile(variant: Variant, wanted: Collection[str],
                    current: Mapping[str, Instance], *, drains: Drains,
                    drain_timeout_s: float, leave_alone: Collection[str] = (),
                    probe: Probe | None = None, slow_start: bool = True,
                    source: str = "reconcile") -> Reconciled:
    """Make ``current`` (the instances the caller manages in ``variant``, by address)
    match ``wanted``: each address not in ``current`` nor in ``leave_alone`` joins (after
    ``probe`` says it is ready, when given; a failing probe is a "not yet"); each instance
    of ``current`` not wanted drains out through ``drains``. ``current`` is read again
    after the probes, so an address that joined meanwhile is not added twice. Logs each
    change, prefixed with ``source``."""
    result = Reconciled()
    wanted_set = set(wanted)
    joining = sorted(wanted_set - current.keys() - set(leave_alone))
    if joining:
        upstreams = [variant.connect(a) for a in joining]
        if probe is None:
            ready = [True] * len(upstreams)
        else:
            ready = await asyncio.gather(*(_ask(probe, u) for u in upstreams))
        for address, upstream, ok in zip(joining, upstreams, ready, strict=True):
            if ok and address not in current:
                result.added[address] = add(variant, upstream, slow_start=slow_start)
                log.info("%s: %s joined variant '%s'", source, address, variant.name)
            else:
                # Not ready yet (a pod still loading models): the caller asks again later.
                await upstream.close(grace=0)
    for address in sorted(current.keys() - wanted_set):
        log.info("%s: %s left variant '%s'; draining it", source, address, variant.name)
        result.draining[address] = drains.start(current[address], drain_timeout_s)
    return result


async def _ask(probe: Probe, upstream: Upstream) -> bool:
    try:
        return await probe(upstream)
    except Exception:
        log.debug("probe of %s failed", upstream.address, exc_info=True)
        return False
