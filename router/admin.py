"""The admin gRPC service (proto/tritonmesh_admin.proto): inspect and change membership."""

from __future__ import annotations

import asyncio
from typing import NoReturn

import grpc
import grpc.aio
from tritonmesh._pb import tritonmesh_admin_pb2 as apb
from tritonmesh._pb import tritonmesh_admin_pb2_grpc as apb_grpc
from tritonmesh.balancer import Balancer, Instance
from tritonmesh.config import ConfigError, _address

__all__ = ["AdminService", "instance_message"]


def instance_message(instance: Instance) -> apb.Instance:
    return apb.Instance(
        variant=instance.variant.name, slot=instance.slot, address=instance.address,
        state=instance.state, healthy=instance.healthy, outstanding=instance.outstanding,
        requests=instance.requests, errors=instance.errors,
        weight=instance.weight,
    )


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str
                 ) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("context.abort returned")


class AdminService(apb_grpc.AdminServicer):  # type: ignore[misc]  # generated, untyped
    def __init__(self, balancer: Balancer):
        self.balancer = balancer

    async def ListInstances(self, request: apb.ListInstancesRequest,
                            context: grpc.aio.ServicerContext) -> apb.ListInstancesResponse:
        variants = [v for v in self.balancer.variants
                    if not request.variant or v.name == request.variant]
        if request.variant and not variants:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"no variant '{request.variant}'")
        return apb.ListInstancesResponse(
            variants=[apb.Variant(name=v.name, weight=v.weight,
                                  routing_strategy=v.strategy.value,
                                  models=sorted(v.models or ())) for v in variants],
            instances=[instance_message(i) for v in variants for i in v.live_instances()],
        )

    async def AddInstance(self, request: apb.AddInstanceRequest,
                          context: grpc.aio.ServicerContext) -> apb.Instance:
        variant = self.balancer.by_name.get(request.variant)
        if variant is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"no variant '{request.variant}'")
        try:
            address = _address(request.address, "address")
        except ConfigError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if any(i.address == address for i in variant.live_instances()):
            await _abort(context, grpc.StatusCode.ALREADY_EXISTS,
                                f"{address} is already in variant '{variant.name}'")
        if request.weight < 0:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "weight must be positive")
        instance = variant.add(variant.connect(address), request.weight or 1.0, slow_start=True)
        return instance_message(instance)

    async def RemoveInstance(self, request: apb.RemoveInstanceRequest,
                             context: grpc.aio.ServicerContext) -> apb.RemoveInstanceResponse:
        variant = self.balancer.by_name.get(request.variant)
        if variant is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"no variant '{request.variant}'")
        found = [i for i in variant.live_instances() if i.address == request.address]
        if not found:
            await _abort(context, grpc.StatusCode.NOT_FOUND,
                                f"{request.address} is not in variant '{variant.name}'")
        instance = found[0]
        drained = await drain(instance, request.drain_timeout_s or 30.0)
        message = instance_message(instance)
        return apb.RemoveInstanceResponse(instance=message, drained=drained)


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
