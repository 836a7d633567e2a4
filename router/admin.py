"""The admin gRPC service (proto/tritonmesh_admin.proto): inspect and change membership
and weights.

Served on the router's admin listener only (``admin_listen``), never on the data port.
An instance joins only after its address passed every check and Triton answered the
probe: a TCP ``HOST:PORT`` (no ``unix:`` or other gRPC schemes) whose every resolved
address is in ``instance_networks``, ready (ServerReady) and ready for each model its
variant lists (ModelReady). A call refused at any step adds nothing and leaves no channel.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
import socket
from collections.abc import Sequence
from typing import NoReturn

import grpc
import grpc.aio
from tritonmesh._pb import tritonmesh_admin_pb2 as apb
from tritonmesh._pb import tritonmesh_admin_pb2_grpc as apb_grpc
from tritonmesh.balancer import Balancer, Instance, Variant
from tritonmesh.config import IPNetwork
from tritonmesh.health import readiness
from tritonmesh.loadreport import InstanceLoad, LoadReporter
from tritonmesh.membership import Drains, add
from tritonmesh.weights import WeightError, WeightUpdate, update_weights

__all__ = ["AdminService", "instance_message", "variant_message"]

log = logging.getLogger("tritonmesh.admin")

_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def instance_message(instance: Instance, load: InstanceLoad | None = None) -> apb.Instance:
    return apb.Instance(
        variant=instance.variant.name, slot=instance.slot, address=instance.address,
        state=instance.state, healthy=instance.healthy, outstanding=instance.outstanding,
        requests=instance.requests, errors=instance.errors,
        weight=instance.weight,
        load_report="off" if load is None else "stale" if load.stale else "ok",
        external_requests=0.0 if load is None else load.external,
    )


def variant_message(variant: Variant) -> apb.Variant:
    message = apb.Variant(name=variant.name, weight=variant.weight,
                          routing_strategy=variant.strategy.value,
                          models=sorted(variant.models or ()),
                          max_concurrency_per_instance=variant.limit or 0)
    work = variant.work
    if work is not None:
        message.hint_quality = work.hint_quality()
        residual = work.residual_sd()
        if residual >= 0.0:
            message.hint_residual_sd = residual
    return message


class _Refused(Exception):
    """AddInstance cannot go on: the status code and the message for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str
                 ) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("context.abort returned")


def _tcp_target(address: str) -> tuple[str, int]:
    """HOST:PORT (``[v6]:PORT`` for IPv6) split; anything else, gRPC schemes included, is
    refused, since the router would dial it as given."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    valid = bool(sep and port.isdigit() and 0 < int(port) < 65536)
    if valid:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            valid = _HOST_NAME.fullmatch(host) is not None
    if not valid:
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                       f"address: expected HOST:PORT of a Triton gRPC endpoint over TCP "
                       f"(no unix: or other schemes), got {address!r}")
    return host, int(port)


async def _check_networks(host: str, port: int, networks: Sequence[IPNetwork],
                          timeout: float) -> None:
    """Every address ``host`` resolves to must be in ``networks``: a name that also
    resolves elsewhere could be dialled there."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
    except (OSError, TimeoutError) as exc:
        raise _Refused(grpc.StatusCode.UNAVAILABLE,
                       f"cannot resolve {host!r}: {exc}; nothing was added") from None
    allowed = ", ".join(map(str, networks)) or "none"
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).partition("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not any(ip in network for network in networks):
            what = str(ip) if host == str(ip) else f"{host} resolves to {ip}, which is"
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED,
                           f"{what} outside instance_networks ({allowed}): add its network "
                           "to instance_networks in the router's config to allow it")


class AdminService(apb_grpc.AdminServicer):  # type: ignore[misc]  # generated, untyped
    """``instance_networks``: what AddInstance accepts. ``probe_timeout_s``: the deadline of
    each probe step (name resolution, ServerReady, each ModelReady) when the call has none.
    ``drains``: where RemoveInstance's drains run (the router's, which its stop waits for)."""

    def __init__(self, balancer: Balancer, instance_networks: Sequence[IPNetwork],
                 probe_timeout_s: float, drains: Drains | None = None):
        self.balancer = balancer
        self.instance_networks = tuple(instance_networks)
        self.probe_timeout_s = probe_timeout_s
        self.drains = Drains() if drains is None else drains
        self.load_reporters: Sequence[LoadReporter] = ()  # the router's, set once it starts
        self.data_path = ("", "")  # what serves the inference port, and why (the router's)
        self.processes = 1  # the router processes serving it

    async def ListInstances(self, request: apb.ListInstancesRequest,
                            context: grpc.aio.ServicerContext) -> apb.ListInstancesResponse:
        variants = [v for v in self.balancer.variants
                    if not request.variant or v.name == request.variant]
        if request.variant and not variants:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"no variant '{request.variant}'")
        loads = {load.instance: load for r in self.load_reporters for load in r.loads.values()}
        return apb.ListInstancesResponse(
            variants=[variant_message(v) for v in variants],
            instances=[instance_message(i, loads.get(i)) for v in variants
                       for i in v.live_instances()],
            data_path=self.data_path[0], data_path_reason=self.data_path[1],
            processes=self.processes,
        )

    async def AddInstance(self, request: apb.AddInstanceRequest,
                          context: grpc.aio.ServicerContext) -> apb.Instance:
        try:
            return await self._add(request, context)
        except _Refused as exc:
            await _abort(context, exc.code, str(exc))

    async def _add(self, request: apb.AddInstanceRequest,
                   context: grpc.aio.ServicerContext) -> apb.Instance:
        # Everything that needs no channel first: a refused call opens none.
        variant = self.balancer.by_name.get(request.variant)
        if variant is None:
            raise _Refused(grpc.StatusCode.NOT_FOUND, f"no variant '{request.variant}'")
        if not (math.isfinite(request.weight) and request.weight >= 0):
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                           f"weight must be a finite number > 0 (0 means 1), got "
                           f"{request.weight}")
        address = request.address
        host, port = _tcp_target(address)
        _check_absent(variant, address)
        remaining = context.time_remaining()
        timeout = self.probe_timeout_s if remaining is None else max(remaining, 0.0)
        await _check_networks(host, port, self.instance_networks, timeout)
        upstream = variant.connect(address)
        try:
            not_ready = await readiness(upstream, variant.models, timeout)
            if not_ready is not None:
                raise _Refused(grpc.StatusCode.FAILED_PRECONDITION if not_ready.reachable
                               else grpc.StatusCode.UNAVAILABLE,
                               f"{not_ready.reason}; nothing was added")
            _check_absent(variant, address)  # another call may have added it meanwhile
        except BaseException:
            await upstream.close(grace=0)
            raise
        instance = add(variant, upstream, request.weight or 1.0)
        return instance_message(instance)

    async def RemoveInstance(self, request: apb.RemoveInstanceRequest,
                             context: grpc.aio.ServicerContext) -> apb.RemoveInstanceResponse:
        variant = self.balancer.by_name.get(request.variant)
        if variant is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"no variant '{request.variant}'")
        timeout = request.drain_timeout_s or 30.0
        if not (math.isfinite(timeout) and timeout > 0):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"drain_timeout_s must be a finite number > 0 (0 means 30), got "
                         f"{request.drain_timeout_s}")
        found = [i for i in variant.live_instances() if i.address == request.address]
        if not found:
            await _abort(context, grpc.StatusCode.NOT_FOUND,
                         f"{request.address} is not in variant '{variant.name}'")
        instance = found[0]
        # The drain runs to its end whatever happens to this call.
        drained: bool = await asyncio.shield(self.drains.start(instance, timeout))
        return apb.RemoveInstanceResponse(instance=instance_message(instance), drained=drained)

    async def UpdateVariantWeights(self, request: apb.UpdateVariantWeightsRequest,
                                   context: grpc.aio.ServicerContext
                                   ) -> apb.UpdateVariantWeightsResponse:
        updates = [WeightUpdate(v.variant, v.weight,
                                v.max_concurrency_per_instance
                                if v.HasField("max_concurrency_per_instance") else None)
                   for v in request.variants]
        try:
            update_weights(self.balancer, updates)
        except WeightError as exc:
            await _abort(context, grpc.StatusCode[exc.code_name], str(exc))
        log.info("weights updated: %s", ", ".join(
            f"{u.variant}={u.weight:g}" + ("" if u.capacity is None else
                                           f" (max_concurrency_per_instance {u.capacity})")
            for u in updates))
        return apb.UpdateVariantWeightsResponse(
            variants=[variant_message(v) for v in self.balancer.variants])


def _check_absent(variant: Variant, address: str) -> None:
    if any(i.address == address for i in variant.live_instances()):
        raise _Refused(grpc.StatusCode.ALREADY_EXISTS,
                       f"{address} is already in variant '{variant.name}'")

