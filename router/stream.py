"""``ModelStreamInfer``: one client stream fanned out over per-instance upstream streams.

Accounting per request: one pick, one release, when its final response (or an error
response for it) arrives, when its upstream stream dies, or when the client's stream
ends, whichever comes first.

Memory per client stream is bounded by ``limits.max_stream_requests_in_flight``: a request is
in flight from when it is read until it is answered (its final response settled, or
its ``ModelInfer`` answer written to the client). At the bound the router stops reading
the client's stream, and HTTP/2 flow control stops the client. Responses respect the
client's flow control the other way: a write to the client waits until it reads, and
meanwhile the pump behind it reads nothing more from its upstream stream.

A request that has to wait (late binding's queue, or the first ``ModelConfig`` ask for
its model) waits in a task of its own, so later requests on the stream go on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Final

import grpc
import grpc.aio
from tritonmesh.balancer import Balancer, Instance, NoInstanceError
from tritonmesh.forwarding import (
    judge,
    priority_of,
    split_metadata,
    too_late,
)
from tritonmesh.stream_unary import UnaryCalls
from tritonmesh.stream_upstream import Pending, UpstreamStream
from tritonmesh.wire import (
    RequestInfo,
    WireError,
    error_stream_response,
    inject_empty_final,
    peek_request,
    peek_stream_response,
)
from tritonmesh.workers.upstream import (
    being_cancelled,
    cancel_in_core,
    upstream_cancelled,
)

__all__ = ["StreamSession"]

log = logging.getLogger("tritonmesh.proxy")

# How long a cancelled upstream stream's pump may take to notice before it is cancelled.
_PUMP_END_S: Final = 5.0


class StreamSession:
    """One client ``ModelStreamInfer`` stream fanned out over per-instance upstream streams.

    Each request is routed on its own. Upstream streams open lazily, one per
    instance used; their responses merge into the client stream. Responses of one
    request travel on one upstream stream in order, so per-request order holds.
    """

    def __init__(self, balancer: Balancer, context: grpc.aio.ServicerContext,
                 limit: int, floor_s: float):
        self.balancer = balancer
        self.context = context
        self.metadata, self.target, _, priority = split_metadata(context)
        self.priority = priority_of(priority)
        self.upstreams: dict[Instance, UpstreamStream] = {}
        self.unary = UnaryCalls(self)  # requests sent as ModelInfer
        # Every pump, until it has written its last error: it may still be writing after
        # its upstream left ``upstreams``, and the handler must not return before (gRPC
        # cannot send the status while a write is in progress, and the client would wait
        # for it until its deadline).
        self.pumps: set[asyncio.Task[None]] = set()
        # Requests waiting for an instance or for their model's policy, each in its task.
        self.waiting: set[asyncio.Task[None]] = set()
        self.write_lock = asyncio.Lock()
        self.limit = limit
        self.floor_s = floor_s
        self.in_flight = 0
        self.room: asyncio.Future[None] | None = None  # set while reading is paused
        # The client went (its reset cancelled the handler, or a write to it failed).
        # grpc.aio's context.cancelled() stays False after a client's RST_STREAM.
        self.client_gone = False

    async def run(self, requests: AsyncIterator[bytes]) -> None:
        if isinstance(self.priority, str):
            await self.context.abort(grpc.StatusCode.INVALID_ARGUMENT, self.priority)
        try:
            async for request in requests:
                await self._forward(request)
                if self.in_flight >= self.limit:
                    await self._wait_for_room()
            # The client half-closed: once no request is still waiting to be sent, so do
            # we, then wait for every outstanding final.
            while self.waiting:
                await asyncio.wait(list(self.waiting))
            for up in list(self.upstreams.values()):
                if up.pump is not None and not up.pump.done():
                    async with up.lock:
                        await up.call.done_writing()
            # Every task that may still write to the client ends before the handler does.
            # wait(), not gather(): if the client goes now, this handler is cancelled and
            # gather() would cancel the pumps mid-read (a native leak, see cancel_in_core);
            # _close() ends them through their calls instead.
            while self.pumps or self.unary.tasks:
                await asyncio.wait([*self.pumps, *self.unary.tasks])
        except asyncio.CancelledError:
            self.client_gone = True
            raise
        finally:
            await self._close()

    async def _wait_for_room(self) -> None:
        loop = asyncio.get_running_loop()
        while self.in_flight >= self.limit:
            self.room = loop.create_future()
            try:
                await self.room
            finally:
                self.room = None

    def answered(self) -> None:
        """One request of this stream is no longer in flight."""
        self.in_flight -= 1
        room = self.room
        if room is not None and not room.done() and self.in_flight < self.limit:
            room.set_result(None)

    def _later(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a request that has to wait in a task of its own (it is in flight)."""
        self.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._quietly(coro))
        self.waiting.add(task)
        task.add_done_callback(self.waiting.discard)

    @staticmethod
    async def _quietly(coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except Exception as exc:  # the client went; nothing to answer
            log.debug("waiting request not answered: %r", exc)

    async def _forward(self, request: bytes) -> None:
        try:
            info = peek_request(request)
        except WireError as exc:
            # Triton answers a bad request inside a stream in-stream and keeps the stream open.
            await self.write(error_stream_response(f"malformed ModelInferRequest: {exc}"))
            return
        late = too_late(self.context.time_remaining(), self.floor_s)
        if late is not None:
            await self.write(error_stream_response(late, info.id, info.model_name))
            return
        try:
            lease = self.balancer.try_acquire(info, request, self.target)
        except NoInstanceError as exc:
            await self.write(error_stream_response(str(exc), info.id, info.model_name))
            return
        if lease is None:  # every instance is at its limit: wait, in a task of its own
            self._later(self._wait_then_send(request, info))
            return
        await self._send(request, info, Pending(info, lease))

    async def _wait_then_send(self, request: bytes, info: RequestInfo) -> None:
        """Late binding: wait for an instance below its limit, then send."""
        sent = False
        try:
            try:
                assert isinstance(self.priority, int)
                lease = await self.balancer.acquire(info, request, self.target,
                                                    self.context.time_remaining(),
                                                    priority=self.priority)
            except NoInstanceError as exc:
                await self.write(error_stream_response(str(exc), info.id, info.model_name))
                return
            late = too_late(self.context.time_remaining(), self.floor_s)
            if late is not None:  # its deadline went by in the queue
                lease.abandon()
                await self.write(error_stream_response(late, info.id, info.model_name))
                return
            sent = True
            await self._send(request, info, Pending(info, lease), waited=True)
        finally:
            if not sent:
                self.answered()

    async def _send(self, request: bytes, info: RequestInfo, pending: Pending,
                    waited: bool = False) -> None:
        """Send on the upstream stream or as ``ModelInfer``, by the model's policy (asked of
        Triton first if unknown). ``waited``: it runs in a task of its own, counted in
        flight already."""
        as_unary = False
        # Sequences stay on the stream: Triton keeps their order there, concurrent calls
        # would not.
        if info.sequence_id is None:
            decoupled = self.balancer.decoupled.get(info.model_name, info.model_version)
            if decoupled is None:
                if waited:
                    await self._ask_then_send(request, info, pending)
                else:
                    self._later(self._ask_then_send(request, info, pending))
                return
            as_unary = decoupled is False
        if not waited:
            self.in_flight += 1
        if as_unary:
            self.unary.send(request, pending)
        else:
            await self._send_on_stream(request, info, pending)

    async def _ask_then_send(self, request: bytes, info: RequestInfo,
                             pending: Pending) -> None:
        """The model's policy is not known yet: ask Triton, then send one way or the other."""
        try:
            decoupled = await self.balancer.decoupled.ask(pending.lease.instance.upstream,
                                                          info.model_name, info.model_version)
        except BaseException:
            # The client went (or the question failed) before the request was anywhere
            # _close() can see it: release here, or the count stays up for good.
            pending.lease.release(False)
            self.answered()
            raise
        late = too_late(self.context.time_remaining(), self.floor_s)
        if late is not None:  # its deadline went by while Triton was asked
            pending.lease.abandon()
            self.answered()
            await self.write(error_stream_response(late, info.id, info.model_name))
        elif decoupled is False:  # unknown (no such model, say): Triton answers in-stream
            self.unary.send(request, pending)
        else:
            await self._send_on_stream(request, info, pending)

    async def _send_on_stream(self, request: bytes, info: RequestInfo,
                              pending: Pending) -> None:
        instance = pending.lease.instance
        data = request if info.empty_final else inject_empty_final(request)
        pending.lease.sending()
        queued = False
        try:
            while True:
                up = self.upstreams.get(instance)
                if up is None:
                    up = self._open(instance)
                async with up.lock:
                    if self.upstreams.get(instance) is not up:
                        continue  # it died while this request waited to write: open another
                    # From here its pump (or _close()) settles it, however it ends.
                    up.pending.append(pending)
                    queued = True
                    try:
                        await up.call.write(data)
                    except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                        # The upstream stream is already gone; its pump fails every pending
                        # request.
                        log.debug("write to %s failed: %s", instance.address, exc)
                    return
        finally:
            if not queued:  # cancelled while waiting to write
                pending.lease.release(False)
                self.answered()

    def _open(self, instance: Instance) -> UpstreamStream:
        call = instance.upstream.stream_infer(
            timeout=self.context.time_remaining(), metadata=self.metadata
        )
        up = UpstreamStream(instance, call)
        self.upstreams[instance] = up
        up.pump = pump = asyncio.get_running_loop().create_task(self._pump(up))
        self.pumps.add(pump)
        pump.add_done_callback(self.pumps.discard)
        return up

    async def _pump(self, up: UpstreamStream) -> None:
        instance = up.instance
        failure: str | None = "closed the stream before the final response"
        code_name = "UNAVAILABLE"
        try:
            try:
                # One response at a time: while its write to the client waits (the client
                # is not reading), nothing more is read from this upstream stream.
                async for response in up.call:
                    await self._on_response(up, response)
            except asyncio.CancelledError:
                if being_cancelled():
                    raise  # _close() ended this pump
                raise upstream_cancelled() from None  # the instance's channel closed
        except grpc.aio.AioRpcError as exc:
            code_name = exc.code().name
            # Cancelled because the client went: the finally below settles that case.
            if not (exc.code() == grpc.StatusCode.CANCELLED and self.client_gone):
                judge(self.balancer.outliers, instance, exc, False, self.context)
                failure = f"failed: [{exc.code().name}] {exc.details()}"
        finally:
            if self.client_gone:
                # The client went (a write to it may have failed with an error of gRPC's
                # own, not an AioRpcError): its requests end CANCELLED, not the instance's
                # failure, and nobody is left to answer.
                code_name, failure = "CANCELLED", None
            # Whatever ended this pump (upstream death, a write to a client that is gone,
            # cancellation), nothing it carried may stay outstanding: release before any
            # await, since _close() no longer sees an upstream once it leaves the dict.
            if self.upstreams.get(instance) is up:
                del self.upstreams[instance]
            orphans = self._settle_all(up, code_name)
        if failure is not None:
            for p in orphans:
                await self.write(error_stream_response(
                    f"upstream instance {instance.address} {failure}", p.id, p.model_name))

    async def _on_response(self, up: UpstreamStream, response: bytes) -> None:
        try:
            info = peek_stream_response(response)
        except WireError:
            await self.write(response)
            return
        if not info.terminal:
            # A decoupled model's error need not be its final response: the request is
            # judged now, once, and never as a success at its (empty) final.
            up.responded(info.id, info.error_message)
            await self.write(response)
            return
        pending = self._settle(up, info.id, info.error_message,
                               info.has_outputs or bool(info.error_message))
        if (
            info.final and not info.has_outputs and not info.error_message
            and pending is not None and not pending.client_wants_empty_final
        ):
            return  # an empty final the router asked for; the client did not
        await self.write(response)

    def _settle(self, up: UpstreamStream, request_id: str, error: str,
                response: bool) -> Pending | None:
        found = up.settle(request_id, error, response)
        if found is not None:
            self.answered()
        return found

    def _settle_all(self, up: UpstreamStream, code_name: str = "CANCELLED") -> list[Pending]:
        orphans = up.settle_all(code_name)
        for _ in orphans:
            self.answered()
        return orphans

    async def write(self, response: bytes) -> None:
        async with self.write_lock:
            try:
                await self.context.write(response)
            except Exception:
                # The handler writes until every pump has ended, so a failed write means
                # the call has ended: the client went (gRPC raises its own batch error).
                self.client_gone = True
                raise

    async def _close(self) -> None:
        """Release everything still pending and end every upstream call."""
        ups = list(self.upstreams.values())
        for up in ups:
            # In the core only: the pump's pending read then ends by itself, and its batch
            # is freed (cancelling the pump task while it reads leaks it; see cancel_in_core).
            # A write in progress ends too, before its task is cancelled below.
            cancel_in_core(up.call)
        # Requests still waiting release what they hold in their own handlers; end them
        # before the upstreams are collected, so that none is left writing to one.
        waiting = list(self.waiting)
        for task in waiting:
            task.cancel()
        if waiting:
            await asyncio.wait(waiting)
        ups += [up for up in self.upstreams.values() if up not in ups]
        self.upstreams.clear()
        calls = self.unary.cancel()
        for up in ups:
            cancel_in_core(up.call)  # again: one a waiting request opened meanwhile
            self._settle_all(up)
        pumps = list(self.pumps)
        if pumps:
            _, stuck = await asyncio.wait(pumps, timeout=_PUMP_END_S)
            for pump in stuck:
                pump.cancel()
            for pump in pumps:
                try:
                    await pump
                except (asyncio.CancelledError, Exception) as exc:  # the client may be gone
                    log.debug("upstream stream ended with %r", exc)
        await self.unary.closed(calls)
