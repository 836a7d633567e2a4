"""The server-wide RPCs: answered for the whole fleet, as one Triton would answer.

None of these are on the inference hot path, so they decode with tritonclient's
generated messages.

* ServerLive: the router itself is live.
* ServerReady: at least one healthy instance, and it says it is ready.
* ModelReady: some healthy instance of a variant serving the model says it is ready.
* ServerMetadata, ModelMetadata, ModelConfig: forwarded to a healthy instance serving
  the model, so errors (an unknown model) are Triton's own.
* ModelStatistics: summed over instances. RepositoryIndex: the union.
* RepositoryModelLoad/Unload, TraceSetting, LogSettings: sent to every instance;
  a partial failure names the instances that failed. They, and shared-memory
  registration, are control RPCs: refused without an admin token
  (:class:`tritonmesh.auth.ControlAccess`), except a TraceSetting or LogSettings
  that changes no setting (a read).
* Shared memory: host-local memory cannot cross a router, so registration is
  UNIMPLEMENTED and status lists no regions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
import grpc.aio
from tritonclient.grpc import service_pb2 as pb
from tritonmesh.auth import CONTROL_RPCS, ControlAccess, Tokens, WithoutCredential
from tritonmesh.balancer import Balancer, Instance
from tritonmesh.forwarding import forwardable_metadata
from tritonmesh.strict import LogLimit, log_bad_input
from tritonmesh.workers.upstream import await_call

__all__ = ["Fanout"]

log = logging.getLogger("tritonmesh.fanout")
_STATS_GAP_LOG = LogLimit()

Handler = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]

SHM_MESSAGE = (
    "shared memory is not supported through tritonmesh: {kind} shared memory regions are "
    "local to one Triton host, and the router spreads requests over many; send tensors in "
    "the request instead"
)


class Fanout:
    """Handlers for every unary RPC of GRPCInferenceService except ModelInfer."""

    def __init__(self, balancer: Balancer, *, timeout_s: float = 10.0,
                 access: ControlAccess | None = None):
        self.balancer = balancer
        self.timeout_s = timeout_s
        self.access = access if access is not None else ControlAccess(Tokens())

    def handlers(self) -> dict[str, Handler]:
        handlers = {
            "ServerLive": self.server_live,
            "ServerReady": self.server_ready,
            "ModelReady": self.model_ready,
            "ServerMetadata": self.server_metadata,
            "ModelMetadata": self.model_metadata,
            "ModelConfig": self.model_config,
            "ModelStatistics": self.model_statistics,
            "RepositoryIndex": self.repository_index,
            "RepositoryModelLoad": self.repository_model_load,
            "RepositoryModelUnload": self.repository_model_unload,
            "TraceSetting": self.broadcast_first("TraceSetting"),
            "LogSettings": self.broadcast_first("LogSettings"),
            "SystemSharedMemoryStatus": self.shm_status(pb.SystemSharedMemoryStatusResponse),
            "CudaSharedMemoryStatus": self.shm_status(pb.CudaSharedMemoryStatusResponse),
            "SystemSharedMemoryRegister": self.shm_unimplemented("system"),
            "SystemSharedMemoryUnregister": self.shm_unimplemented("system"),
            "CudaSharedMemoryRegister": self.shm_unimplemented("CUDA"),
            "CudaSharedMemoryUnregister": self.shm_unimplemented("CUDA"),
        }
        # Handlers that read a field decode the request themselves; the others forward it or
        # do not need it, so it is checked here: malformed bytes are INVALID_ARGUMENT from the
        # router, not whatever each Triton makes of them (2.51: INTERNAL "Unable to parse
        # request") nor an answer to a request nobody could read.
        for name in CONTROL_RPCS:
            handlers[name] = self._restricted(name, handlers[name])
        for name in handlers.keys() - _DECODED_BY_HANDLER:
            handlers[name] = _validating(getattr(pb, f"{name}Request"), handlers[name])
        return handlers

    def _restricted(self, method: str, handler: Handler) -> Handler:
        # A TraceSetting or LogSettings without settings reads them: open, as in Triton.
        reads = method in ("TraceSetting", "LogSettings")
        message_type = getattr(pb, f"{method}Request")

        async def checked(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            if not reads or message_type.FromString(request).settings:
                await self.access.check(method, context)
            # The admin token is the router's: it is not broadcast to every instance.
            return await handler(request, WithoutCredential(context))
        return checked

    # -- helpers ---------------------------------------------------------------------

    def _healthy(self, model_name: str | None = None) -> list[Instance]:
        variants = (self.balancer.variants if model_name is None
                    else self.balancer._variants_for(model_name))
        return [i for v in variants for i in v.live_instances() if i.pickable]

    def _all(self) -> list[Instance]:
        return list(self.balancer.instances())

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return self.timeout_s if remaining is None else min(remaining, self.timeout_s)

    async def _call(self, instance: Instance, method: str, request: bytes,
                    context: grpc.aio.ServicerContext) -> bytes:
        metadata, _ = forwardable_metadata(context)
        return await await_call(instance.upstream.unary[method](
            request, timeout=self._timeout(context), metadata=metadata))

    async def _gather(self, instances: Iterable[Instance], method: str, request: bytes,
                      context: grpc.aio.ServicerContext
                      ) -> list[tuple[Instance, bytes | grpc.aio.AioRpcError]]:
        targets = list(instances)
        results = await asyncio.gather(
            *(self._call(i, method, request, context) for i in targets), return_exceptions=True
        )
        out: list[tuple[Instance, bytes | grpc.aio.AioRpcError]] = []
        for instance, result in zip(targets, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, grpc.aio.AioRpcError):
                raise result
            out.append((instance, result))
        return out

    async def _forward_one(self, method: str, request: bytes, model_name: str | None,
                           context: grpc.aio.ServicerContext) -> bytes:
        healthy = self._healthy(model_name)
        if not healthy:
            await context.abort(grpc.StatusCode.UNAVAILABLE, _no_healthy(model_name))
        # Least outstanding first: metadata calls should not queue behind long generations.
        healthy.sort(key=lambda i: i.outstanding)
        try:
            return await self._call(healthy[0], method, request, context)
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
        raise AssertionError("unreachable")

    # -- health ----------------------------------------------------------------------

    async def server_live(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return pb.ServerLiveResponse(live=True).SerializeToString()  # type: ignore[no-any-return]

    async def server_ready(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        results = await self._gather(self._healthy(), "ServerReady", request, context)
        ready = any(
            not isinstance(r, grpc.aio.AioRpcError) and pb.ServerReadyResponse.FromString(r).ready
            for _, r in results
        )
        return pb.ServerReadyResponse(ready=ready).SerializeToString()  # type: ignore[no-any-return]

    async def model_ready(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        name = (await _decode(pb.ModelReadyRequest, request, context)).name
        results = await self._gather(self._healthy(name), "ModelReady", request, context)
        ready = any(
            not isinstance(r, grpc.aio.AioRpcError) and pb.ModelReadyResponse.FromString(r).ready
            for _, r in results
        )
        return pb.ModelReadyResponse(ready=ready).SerializeToString()  # type: ignore[no-any-return]

    # -- forwarded -------------------------------------------------------------------

    async def server_metadata(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._forward_one("ServerMetadata", request, None, context)

    async def model_metadata(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        name = (await _decode(pb.ModelMetadataRequest, request, context)).name
        return await self._forward_one("ModelMetadata", request, name, context)

    async def model_config(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        name = (await _decode(pb.ModelConfigRequest, request, context)).name
        return await self._forward_one("ModelConfig", request, name, context)

    # -- merged ----------------------------------------------------------------------

    async def model_statistics(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        name = (await _decode(pb.ModelStatisticsRequest, request, context)).name or None
        # Every member, ejected and draining ones included: counters are cumulative, and
        # leaving one out while it is unhealthy would make the sums go back.
        variants = self.balancer.variants if name is None else self.balancer._variants_for(name)
        members = [i for v in variants for i in v.live_instances()]
        results = await self._gather(members, "ModelStatistics", request, context)
        await _abort_if_all_failed(results, context)
        missing = [f"{i.address} ({r.code().name})" for i, r in results
                   if isinstance(r, grpc.aio.AioRpcError) and r.code() != grpc.StatusCode.NOT_FOUND
                   and r.code() != grpc.StatusCode.INVALID_ARGUMENT]
        if missing and _STATS_GAP_LOG.due():
            log.warning("ModelStatistics: sums leave out %d of %d instances that did not "
                        "answer, so they may go back: %s%s", len(missing), len(results),
                        ", ".join(missing[:10]), _STATS_GAP_LOG.more())
        merged: dict[tuple[str, str], Any] = {}
        for _, r in results:
            if isinstance(r, grpc.aio.AioRpcError):
                continue
            for stats in pb.ModelStatisticsResponse.FromString(r).model_stats:
                key = (stats.name, stats.version)
                if key in merged:
                    _add_stats(merged[key], stats)
                else:
                    merged[key] = stats
        response = pb.ModelStatisticsResponse(model_stats=list(merged.values()))
        return response.SerializeToString()  # type: ignore[no-any-return]

    async def repository_index(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        results = await self._gather(self._healthy(), "RepositoryIndex", request, context)
        await _abort_if_all_failed(results, context)
        models: dict[tuple[str, str], Any] = {}
        for _, r in results:
            if isinstance(r, grpc.aio.AioRpcError):
                continue
            for m in pb.RepositoryIndexResponse.FromString(r).models:
                key = (m.name, m.version)
                # A model counts as READY if any instance has it ready.
                if key not in models or (m.state == "READY" and models[key].state != "READY"):
                    models[key] = m
        response = pb.RepositoryIndexResponse(models=[models[k] for k in sorted(models)])
        return response.SerializeToString()  # type: ignore[no-any-return]

    # -- broadcast -------------------------------------------------------------------

    async def _broadcast(self, method: str, request: bytes,
                         context: grpc.aio.ServicerContext) -> bytes:
        # A model loaded anew may have a new transaction policy.
        self.balancer.decoupled.forget()
        instances = self._all()
        if not instances:
            await context.abort(grpc.StatusCode.UNAVAILABLE, _no_healthy(None))
        results = await self._gather(instances, method, request, context)
        failed = [(i, r) for i, r in results if isinstance(r, grpc.aio.AioRpcError)]
        if failed:
            detail = "; ".join(f"{i.address}: {r.details()}" for i, r in failed)
            code = failed[0][1].code()
            await context.abort(
                code, f"{method} failed on {len(failed)} of {len(results)} instances: {detail}"
            )
        first = results[0][1]
        assert isinstance(first, bytes)
        return first

    async def repository_model_load(self, request: bytes,
                                    context: grpc.aio.ServicerContext) -> bytes:
        return await self._broadcast("RepositoryModelLoad", request, context)

    async def repository_model_unload(self, request: bytes,
                                      context: grpc.aio.ServicerContext) -> bytes:
        return await self._broadcast("RepositoryModelUnload", request, context)

    def broadcast_first(self, method: str) -> Handler:
        async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await self._broadcast(method, request, context)
        return handler

    # -- shared memory -----------------------------------------------------------------

    @staticmethod
    def shm_status(response_type: Any) -> Handler:
        empty: bytes = response_type().SerializeToString()

        async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return empty
        return handler

    @staticmethod
    def shm_unimplemented(kind: str) -> Handler:
        async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, SHM_MESSAGE.format(kind=kind))
            raise AssertionError("unreachable")
        return handler


def _no_healthy(model_name: str | None) -> str:
    if model_name:
        return f"no healthy Triton instance serves model '{model_name}'"
    return "no healthy Triton instance behind this router"


_DECODED_BY_HANDLER = frozenset({"ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics"})


def _validating(message_type: Any, handler: Handler) -> Handler:
    async def validated(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await _decode(message_type, request, context)
        return await handler(request, context)

    return validated


async def _decode(message_type: Any, request: bytes, context: grpc.aio.ServicerContext) -> Any:
    try:
        return message_type.FromString(request)
    except Exception as exc:  # protobuf's DecodeError
        log_bad_input(message_type.__name__, str(exc))
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"malformed {message_type.__name__}: {exc}")


async def _abort_if_all_failed(results: list[tuple[Instance, bytes | grpc.aio.AioRpcError]],
                               context: grpc.aio.ServicerContext) -> None:
    if not results:
        await context.abort(grpc.StatusCode.UNAVAILABLE, _no_healthy(None))
    if all(isinstance(r, grpc.aio.AioRpcError) for _, r in results):
        err = results[0][1]
        assert isinstance(err, grpc.aio.AioRpcError)
        await context.abort(err.code(), err.details() or "")


def _add_stats(into: Any, other: Any) -> None:
    """Sum one instance's ModelStatistics into another's, field by field."""
    into.inference_count += other.inference_count
    into.execution_count += other.execution_count
    into.last_inference = max(into.last_inference, other.last_inference)
    _add_durations(into.inference_stats, other.inference_stats)
    by_size = {b.batch_size: b for b in into.batch_stats}
    for b in other.batch_stats:
        if b.batch_size in by_size:
            _add_durations(by_size[b.batch_size], b)
        else:
            into.batch_stats.add().CopyFrom(b)
    for key, rs in other.response_stats.items():
        _add_durations(into.response_stats[key], rs)


def _add_durations(into: Any, other: Any) -> None:
    """Add every StatisticDuration (count, ns) field of ``other`` to ``into``."""
    for fd, value in other.ListFields():
        if fd.message_type is not None and fd.message_type.name == "StatisticDuration":
            target = getattr(into, fd.name)
            target.count += value.count
            target.ns += value.ns
