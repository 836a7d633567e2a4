"""Membership across router processes: the supervisor publishes it, router processes
follow it.

The shared table says how loaded each slot is and whether it may be picked; it does not
say where a slot's Triton is. The supervisor, the only process that adds and removes
slots, writes that beside the segments: a small JSON file in /dev/shm
(``tritonmesh-<supervisor pid>-members``, replaced whole by rename, so a reader sees one
version or the next), naming each variant's segment and, per slot in use, its
generation, address and weight. A slot becomes pickable only once the file naming it is
out (:meth:`SharedCounts.published`).

A router process re-reads the file when it changes (checked every ``POLL_S``; a pin
naming a slot it does not know yet makes it read at once), and its picks skip a slot
until then (``SharedCounts.learn``); an instance that left the file (its
drain is over, or its slot was reused) is removed here and its channel closed. The same
poll brings each instance's ``ejected`` in step with the fleet's ejections
(:mod:`tritonmesh.fleetoutliers`; picks read those directly), in the supervisor too,
exchanges retry counts with the other processes (:mod:`tritonmesh.fleetbudget`), and
keeps the port's ``grpc.health.v1`` status in step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import TYPE_CHECKING, Any, Final, cast

from grpc_health.v1 import health, health_pb2
from tritonmesh._core import _segment
from tritonmesh.fleetoutliers import FleetOutliers
from tritonmesh.health import INFERENCE_SERVICE
from tritonmesh.instance import Instance, InstanceState
from tritonmesh.sharedcounts import SharedCounts

if TYPE_CHECKING:
    from collections.abc import Callable

    from tritonmesh.balancer import Balancer
    from tritonmesh.fleetbudget import SharedRetryCounts
    from tritonmesh.server import Router

__all__ = ["POLL_S", "Follower", "Publisher", "members_path"]

log = logging.getLogger("tritonmesh.members")

# How often a router process looks for a new membership, and the supervisor for drains
# done in other processes. Control plane only: a pick never waits for it.
POLL_S: Final = 0.1


def members_path(pid: int | None = None) -> str:
    """The membership file of the supervisor ``pid`` (default: this process); its name is
    a segment name, so ``unlink_stale`` removes it with the segments of a dead supervisor."""
    return _segment.path(_segment.segment_name("members", pid))


def counts_of(balancer: Balancer) -> dict[str, SharedCounts]:
    return {v.name: cast(SharedCounts, v.table) for v in balancer.variants}


class Publisher:
    """The supervisor's side: writes the membership file after every add and remove, and
    ends drains whose last request ended in another process."""

    def __init__(self, path: str, segments: dict[str, str]):
        self.path = path
        self.segments = segments
        self.balancer: Balancer | None = None
        self.version = 0
        self.weights: dict[str, float] = {}  # the variants' weights last published
        # The supervisor's health checker publishes here what the port's grpc.health.v1
        # says (SERVING while some instance passed its last probe), for the router
        # processes to answer; None until its first round.
        self.health = health.aio.HealthServicer()
        self.serving: bool | None = None
        self._scheduled = False

    def changed(self) -> None:
        """A slot was added or removed: publish once the caller is done (its instance is
        in place only after the table's add returns)."""
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.publish)

    def publish(self) -> None:
        self._scheduled = False
        balancer = self.balancer
        if balancer is None:
            return
        members: dict[str, list[Any]] = {}
        for variant in balancer.variants:
            counts = cast(SharedCounts, variant.table)
            members[variant.name] = [
                [i.slot, counts.shared.generation(i.slot), i.address, i.weight]
                for i in variant.live_instances()]
        limits = {v.name: v.limit or 0 for v in balancer.variants}
        self.weights = {v.name: v.weight for v in balancer.variants}
        self.version += 1
        partial = f"{self.path}.partial"
        with open(partial, "w", encoding="utf-8") as f:
            json.dump({"version": self.version, "segments": self.segments,
                       "members": members, "limits": limits, "weights": self.weights,
                       "serving": self.serving}, f)
        os.replace(partial, self.path)
        for counts in counts_of(balancer).values():
            counts.published()

    async def run(self) -> None:
        """Drains (a router process's release does not reach the supervisor's event), and
        a variant's new weight or concurrency limit (a reload, UpdateVariantWeights) out to
        the router processes, the limit into every slot."""
        while True:
            await asyncio.sleep(POLL_S)
            if self.balancer is None:
                continue
            changed = False
            for variant in self.balancer.variants:
                counts = cast(SharedCounts, variant.table)
                if counts.limit != (variant.limit or 0):
                    counts.set_limit(variant.limit or 0)
                    changed = True
                changed = changed or self.weights.get(variant.name) != variant.weight
            if isinstance(self.balancer.outliers, FleetOutliers):
                self.balancer.outliers.follow(self.balancer.instances())
            answer = await self.health.Check(health_pb2.HealthCheckRequest(service=""), None)
            serving = answer.status == health_pb2.HealthCheckResponse.SERVING
            if serving is not self.serving:
                self.serving = serving
                changed = True
            if changed:
                self.publish()
            for instance in self.balancer.instances():
                drained = instance.drained
                if drained is not None and not drained.is_set() and not instance.outstanding:
                    drained.set()


class Follower:
    """A router process's side: its variants' instances as the supervisor published them."""

    def __init__(self, path: str, balancer: Balancer, retries: SharedRetryCounts | None = None):
        self.path = path
        self.balancer = balancer
        self.retries = retries  # the fleet's retry counts, exchanged every poll
        self._seen: tuple[int, int, int] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._serving: bool | None = None
        self._published_serving: bool | None = None  # the supervisor's verdict
        # Told of each instance removed (the native data path closes its connection there).
        self.removed: Callable[[Instance], None] | None = None
        for counts in counts_of(balancer).values():
            counts.resync = self.sync

    def sync(self, force: bool = False) -> None:
        """Re-read the membership file if it changed since the last read (``force``: even
        if not, after a reload set the variants' weights and limits from the file)."""
        if force:
            self._seen = None
        try:
            stat = os.stat(self.path)  # one syscall per poll while nothing changes
            if (stat.st_ino, stat.st_mtime_ns, stat.st_size) == self._seen:
                return
            with open(self.path, encoding="utf-8") as f:
                stat = os.fstat(f.fileno())
                seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
                data = json.load(f)
        except FileNotFoundError:
            return
        self._seen = seen
        self._published_serving = data.get("serving")
        members = data["members"]
        for variant in self.balancer.variants:
            variant.limit = data["limits"].get(variant.name) or None
            variant.weight = data["weights"].get(variant.name, variant.weight)
            counts = cast(SharedCounts, variant.table)
            wanted = {slot: (gen, address, weight)
                      for slot, gen, address, weight in members.get(variant.name, ())}
            for instance in list(variant.live_instances()):
                entry = wanted.get(instance.slot)
                if entry is None or not counts.knows(instance.slot, entry[0]):
                    self._remove(counts, instance)
            for slot, (gen, address, weight) in wanted.items():
                variant.instances.extend([None] * (slot + 1 - len(variant.instances)))
                if counts.knows(slot, gen):
                    continue
                variant.instances[slot] = Instance(variant, slot, variant.connect(address),
                                                   weight)
                counts.learn(slot, gen)
                log.info("%s joined variant '%s'", address, variant.name)

    def _remove(self, counts: SharedCounts, instance: Instance) -> None:
        instance.state = InstanceState.REMOVED
        counts.forget(instance.slot)
        log.info("%s left variant '%s'", instance.address, instance.variant.name)
        # The supervisor removes an instance after its drain: what is still running here
        # is cancelled, as the supervisor's own drain does, and releases in its finally.
        task = asyncio.get_running_loop().create_task(instance.upstream.close(grace=0))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        if self.removed is not None:
            self.removed(instance)

    async def run(self, router: Router) -> None:
        while True:
            self.sync()
            if isinstance(self.balancer.outliers, FleetOutliers):
                self.balancer.outliers.follow(self.balancer.instances())
            if self.retries is not None:
                self.retries.exchange(self.balancer.retry_budget)
            await self._publish_health(router)
            await asyncio.sleep(POLL_S)

    async def _publish_health(self, router: Router) -> None:
        servicer = None if router.health is None else router.health.servicer
        if servicer is None:
            return
        serving = self._published_serving
        if serving is None:  # the supervisor's checks have not run yet
            serving = any(counts.pickable() for counts in counts_of(self.balancer).values())
        if serving is not self._serving:
            self._serving = serving
            status = (health_pb2.HealthCheckResponse.SERVING if serving
                      else health_pb2.HealthCheckResponse.NOT_SERVING)
            await servicer.set("", status)
            await servicer.set(INFERENCE_SERVICE, status)

    async def close(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
