"""Active health checks: each instance's ServerReady, and ModelReady for each model its
variant lists, on an interval, with thresholds.

An instance that fails ``unhealthy_threshold`` checks in a row leaves the pick
set (its outstanding requests still release normally); one that passes
``healthy_threshold`` in a row comes back. Health checks fail open: they never take
the last healthy instance of a variant out (Envoy's panic threshold, at its simplest).
A probe that times out on a starved machine is weak evidence, and acting on it for
every instance at once turns a slow fleet into no fleet; an instance that is really
gone is taken out by the outlier detector at its first refused connection.

The router's own ``grpc.health.v1`` status follows the probes: SERVING while any
instance in the pick set passed its last one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2
from tritonclient.grpc import service_pb2 as pb
from tritonmesh.balancer import Balancer, Instance
from tritonmesh.chore import Chore
from tritonmesh.config import HealthCheckConfig
from tritonmesh.workers.upstream import Upstream, await_call

__all__ = ["HealthChecker", "NotReady", "probe_ready", "readiness"]

log = logging.getLogger("tritonmesh.health")
T = TypeVar("T")

_SERVER_READY = pb.ServerReadyRequest().SerializeToString()
_READY_INDEX = pb.RepositoryIndexRequest(ready=True).SerializeToString()
INFERENCE_SERVICE = "inference.GRPCInferenceService"


@functools.cache
def _model_ready(model: str) -> bytes:
    raw: bytes = pb.ModelReadyRequest(name=model).SerializeToString()
    return raw


@dataclass(frozen=True)
class NotReady:
    """Why a Triton is not ready: ``reachable`` False when it could not be asked at all."""

    reachable: bool
    reason: str


async def readiness(upstream: Upstream, models: Iterable[str] | None, timeout: float
                    ) -> NotReady | None:
    """None when the Triton behind ``upstream`` is ready, and ready for each of ``models``
    (a Triton that lost one model answers ServerReady but fails that model's requests fast,
    which is what least-outstanding routing must not be drawn to); else why not."""
    unary = upstream.unary
    where = upstream.address
    try:
        raw = await await_call(unary["ServerReady"](_SERVER_READY, timeout=timeout))
        if not pb.ServerReadyResponse.FromString(raw).ready:
            return NotReady(True, f"Triton at {where} is not ready (ServerReady)")
        for model in sorted(models or ()):
            raw = await await_call(unary["ModelReady"](_model_ready(model), timeout=timeout))
            if not pb.ModelReadyResponse.FromString(raw).ready:
                return NotReady(True, f"model '{model}' is not ready on {where} (ModelReady)")
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        return NotReady(
            code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED),
            f"no ready Triton at {where}: its readiness probe failed with {code.name}: "
            f"{exc.details()}")
    return None


async def served_models(upstream: Upstream, timeout: float) -> list[str]:
    """The models the Triton behind ``upstream`` reports READY; none if it cannot say."""
    try:
        raw = await await_call(upstream.unary["RepositoryIndex"](_READY_INDEX, timeout=timeout))
    except grpc.aio.AioRpcError as exc:
        log.debug("repository index of %s: %s", upstream.address, exc.code().name)
        return []
    return [m.name for m in pb.RepositoryIndexResponse.FromString(raw).models
            if m.state == "READY"]


async def probe_ready(upstream: Upstream, models: Iterable[str] | None, timeout: float) -> bool:
    """Whether :func:`readiness` finds the Triton behind ``upstream`` ready."""
    return await readiness(upstream, models, timeout) is None


def _still_members(instances: list[Instance], answers: list[T | BaseException]
                      ) -> tuple[list[Instance], list[T]]:
    """The answers of instances still in the fleet. An instance removed while it was being
    asked has had its channel closed under the call, which then raises (grpc's UsageError,
    CancelledError): that is no news about it, and no reason to lose the round's other
    answers. Any other exception is a bug, and raised."""
    kept: list[Instance] = []
    values: list[T] = []
    for instance, answer in zip(instances, answers, strict=True):
        if instance.removed:
            continue
        if isinstance(answer, BaseException):
            raise answer
        kept.append(instance)
        values.append(answer)
    return kept, values


class HealthChecker(Chore):
    """Probe every instance; mark it healthy or not in its variant's table."""

    def __init__(self, balancer: Balancer, config: HealthCheckConfig,
                 servicer: health.aio.HealthServicer | None = None):
        self.balancer = balancer
        self.config = config
        self.servicer = servicer
        self._streak: dict[Instance, int] = {}  # >0: consecutive passes, <0: failures

    async def probe(self, instance: Instance) -> bool:
        """Whether the instance is ready, and ready for every model its variant serves."""
        return await probe_ready(instance.upstream, instance.variant.models,
                                 self.config.timeout_s)

    async def check_once(self) -> None:
        listed = list(self.balancer.instances())
        answers = await asyncio.gather(*(self.probe(i) for i in listed), return_exceptions=True)
        instances, results = _still_members(listed, answers)
        for instance, ok in zip(instances, results, strict=True):
            self.record(instance, ok)
        await self._learn_models(instances, results)
        # Streaks of removed instances go with them (membership changes at run time).
        for gone in [i for i in self._streak if i.removed]:
            del self._streak[gone]
        await self._publish()

    async def _learn_models(self, instances: list[Instance], ready: list[bool]) -> None:
        """Per-model metrics of variants that list no models name what Triton serves: one
        repository index per such variant and round, from an instance that passed."""
        asks: dict[str, Instance] = {}
        for instance, ok in zip(instances, ready, strict=True):
            if ok and instance.variant.models is None:
                asks.setdefault(instance.variant.name, instance)
        if not asks:
            return
        askers = list(asks.values())
        answers = await asyncio.gather(*(served_models(i.upstream, self.config.timeout_s)
                                         for i in askers), return_exceptions=True)
        metrics = self.balancer.metrics
        for instance, models in zip(*_still_members(askers, answers), strict=True):
            metrics.serve(instance.variant.name, models, self.balancer.decoupled.max_entries)

    def record(self, instance: Instance, ok: bool) -> None:
        streak = self._streak.get(instance, 0)
        streak = max(streak, 0) + 1 if ok else min(streak, 0) - 1
        self._streak[instance] = streak
        if ok:
            self.balancer.outliers.probe_passed(instance)
        if instance.healthy and streak <= -self.config.unhealthy_threshold:
            if not any(i is not instance and i.pickable for i in instance.variant.live_instances()):
                if streak == -self.config.unhealthy_threshold:
                    log.warning("instance %s fails its health checks, but it is the last healthy "
                                "instance of variant '%s': it stays in (fail open)",
                                instance.address, instance.variant.name)
                return
            log.warning("instance %s is unhealthy; no new requests go to it", instance.address)
            instance.healthy = False
            instance.variant.sync(instance)
        elif not instance.healthy and ok and streak >= self.config.healthy_threshold:
            log.info("instance %s is healthy again", instance.address)
            instance.healthy = True
            instance.variant.sync(instance)

    async def _publish(self) -> None:
        if self.servicer is None:
            return
        # From the probes themselves: failing open keeps an instance in the pick set, but a
        # router none of whose instances passes its last probe is not ready to serve.
        serving = any(i.pickable and self._streak.get(i, 1) > 0
                      for i in self.balancer.instances())
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.servicer.set("", status)
        await self.servicer.set(INFERENCE_SERVICE, status)

    async def run(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception:  # a probe bug must not end health checking
                log.exception("health check round failed")
            await asyncio.sleep(self.config.interval_s)

