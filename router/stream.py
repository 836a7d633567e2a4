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
import collections
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Final

import grpc
import grpc.aio
from tritonmesh.balancer import Balancer, Instance, NoInstanceError, Variant, VariantFull
from tritonmesh.forwarding import (
    QUEUE_TIMEOUT,
    client_gone,
    never_reached,
    split_metadata,
    too_late,
)
from tritonmesh.request_metrics import ModelStats
from tritonmesh.wire import (
    RequestInfo,
    WireError,
    error_stream_response,
    inject_empty_final,
    peek_request,
    peek_stream_response,
    stream_response_from_unary,
)
from tritonmesh.workers.upstream import (
    await_call,
    being_cancelled,
    cancel_in_core,
    upstream_cancelled,
)

__all__ = ["StreamSession"]

log = logging.getLogger("tritonmesh.proxy")

# How long a cancelled upstream stream's pump may take to notice before it is cancelled.
_PUMP_END_S: Final = 5.0


class _Pending:
    """A request sent on an upstream stream whose final response has not arrived."""

    __slots__ = ("ahead", "client_wants_empty_final", "code", "cost", "failed", "id",
                 "last", "model_name", "queued", "sent", "started", "stats")

    def __init__(self, request_id: str, model_name: str, client_wants_empty_final: bool,
                 cost: float, ahead: float, stats: ModelStats, queued: float = 0.0):
        self.id = request_id
        self.model_name = model_name
        self.client_wants_empty_final = client_wants_empty_final
        self.cost = cost  # what it was picked with, released with
        self.ahead = ahead  # LEAST_OUTSTANDING_WORK: the work it found on its instance
        self.started = time.perf_counter()
        self.failed = False  # an in-stream error came for it (final or not)
        # Request metrics (tritonmesh.request_metrics); the Lease takes these over.
        self.stats = stats
        self.queued = queued  # seconds in the late-binding queue
        self.sent = self.started  # when it went upstream
        self.last = 0.0  # when its last response came (0.0: none yet)
        self.code = "OK"  # the gRPC status it ends with, when not OK


class _Upstream:
    """One upstream ``ModelStreamInfer`` call of a client stream, to one instance."""

    __slots__ = ("call", "instance", "lock", "pending", "pump")

    def __init__(self, instance: Instance, call: grpc.aio.StreamStreamCall):
        self.instance = instance
        self.call = call
        self.pending: collections.deque[_Pending] = collections.deque()
        self.pump: asyncio.Task[None] | None = None
        # gRPC allows one write in progress per call; requests that waited in a task of
        # their own write beside the reading loop.
        self.lock = asyncio.Lock()


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
        self.metadata, self.target, _ = split_metadata(context)
        self.upstreams: dict[Instance, _Upstream] = {}
        # Requests sent as ModelInfer, still running, and what each holds on its instance.
        self.unary: dict[asyncio.Task[None], tuple[Instance, _Pending]] = {}
        # Requests waiting for an instance or for their model's policy, each in its task.
        self.waiting: set[asyncio.Task[None]] = set()
        self.write_lock = asyncio.Lock()
        self.limit = limit
        self.floor_s = floor_s
        self.in_flight = 0
        self.room: asyncio.Future[None] | None = None  # set while reading is paused

    async def run(self, requests: AsyncIterator[bytes]) -> None:
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
            pumps = [up.pump for up in self.upstreams.values() if up.pump is not None]
            if pumps or self.unary:
                # wait(), not gather(): if the client goes now, this handler is cancelled and
                # gather() would cancel the pumps mid-read (a native leak, see
                # cancel_in_core); _close() ends them through their calls instead.
                await asyncio.wait([*pumps, *self.unary])
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

    def _answered(self) -> None:
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
            await self._write(error_stream_response(f"malformed ModelInferRequest: {exc}"))
            return
        late = too_late(self.context.time_remaining(), self.floor_s)
        if late is not None:
            await self._write(error_stream_response(late, info.id, info.model_name))
            return
        balancer = self.balancer
        cost = balancer.cost(info.model_name, request) if balancer.work_aware else 1.0
        try:
            instance = balancer.pick(info.model_name, self.target, info.sequence_id,
                                     info.sequence_start, info.sequence_end, cost)
        except VariantFull as full:
            self._later(self._wait_then_send(request, info, cost, full.variant))
            return
        except NoInstanceError as exc:
            await self._write(error_stream_response(str(exc), info.id, info.model_name))
            return
        pending = _Pending(info.id, info.model_name, info.empty_final, cost, instance.work_ahead(),
                           balancer.metrics.started(instance.variant, info.model_name))
        # Sequences stay on the stream: Triton keeps their order there, concurrent calls
        # would not.
        if info.sequence_id is None:
            decoupled = balancer.decoupled.get(info.model_name, info.model_version)
            if decoupled is None:
                self._later(self._ask_then_send(request, info, instance, pending))
                return
            if decoupled is False:
                self.in_flight += 1
                self._send_unary(request, instance, pending)
                return
        self.in_flight += 1
        await self._send_on_stream(request, info, instance, pending)

    async def _wait_then_send(self, request: bytes, info: RequestInfo, cost: float,
                              variant: Variant) -> None:
        """Late binding: wait for an instance below its limit, then send."""
        sent = False
        metrics = self.balancer.metrics
        since = time.perf_counter()
        try:
            try:
                instance = await variant.wait(self.context.time_remaining(), cost)
            except NoInstanceError as exc:
                metrics.refused(variant, info.model_name, exc.code_name,
                                time.perf_counter() - since)
                await self._write(error_stream_response(str(exc), info.id, info.model_name))
                return
            except TimeoutError:
                metrics.refused(variant, info.model_name, "DEADLINE_EXCEEDED",
                                time.perf_counter() - since)
                await self._write(error_stream_response(QUEUE_TIMEOUT, info.id,
                                                        info.model_name))
                return
            queued = time.perf_counter() - since
            late = too_late(self.context.time_remaining(), self.floor_s)
            if late is not None:  # its deadline went by in the queue
                self.balancer.release(instance, cost)
                metrics.refused(variant, info.model_name, "DEADLINE_EXCEEDED", queued)
                await self._write(error_stream_response(late, info.id, info.model_name))
                return
            pending = _Pending(info.id, info.model_name, info.empty_final, cost,
                               instance.work_ahead(),
                               metrics.started(instance.variant, info.model_name), queued)
            as_unary = False
            if info.sequence_id is None:
                decoupled = self.balancer.decoupled.get(info.model_name, info.model_version)
                if decoupled is None:
                    sent = True
                    await self._ask_then_send(request, info, instance, pending)
                    return
                as_unary = decoupled is False
            sent = True
            if as_unary:
                self._send_unary(request, instance, pending)
            else:
                await self._send_on_stream(request, info, instance, pending)
        finally:
            if not sent:
                self._answered()

    async def _ask_then_send(self, request: bytes, info: RequestInfo, instance: Instance,
                             pending: _Pending) -> None:
        """The model's policy is not known yet: ask Triton, then send one way or the other."""
        try:
            decoupled = await self.balancer.decoupled.ask(instance.upstream, info.model_name,
                                                          info.model_version)
        except BaseException:
            # The client went (or the question failed) before the request was anywhere
            # _close() can see it: release here, or the count stays up for good.
            pending.code = "CANCELLED"
            self._release(instance, pending, False)
            self._answered()
            raise
        late = too_late(self.context.time_remaining(), self.floor_s)
        if late is not None:  # its deadline went by while Triton was asked
            self.balancer.release(instance, pending.cost)
            pending.stats.finished("DEADLINE_EXCEEDED", 0.0,
                                   time.perf_counter() - pending.started + pending.queued,
                                   pending.queued)
            self._answered()
            await self._write(error_stream_response(late, info.id, info.model_name))
        elif decoupled is False:  # unknown (no such model, say): Triton answers in-stream
            self._send_unary(request, instance, pending)
        else:
            await self._send_on_stream(request, info, instance, pending)

    def _send_unary(self, request: bytes, instance: Instance, pending: _Pending) -> None:
        pending.sent = time.perf_counter()
        task = asyncio.get_running_loop().create_task(
            self._unary_call(request, instance, pending))
        self.unary[task] = (instance, pending)

    async def _send_on_stream(self, request: bytes, info: RequestInfo, instance: Instance,
                              pending: _Pending) -> None:
        data = request if info.empty_final else inject_empty_final(request)
        pending.sent = time.perf_counter()
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
                pending.code = "CANCELLED"
                self._release(instance, pending, False)
                self._answered()

    async def _unary_call(self, request: bytes, instance: Instance, pending: _Pending) -> None:
        """Send one stream request as ``ModelInfer`` and answer it on the client's stream."""
        task = asyncio.current_task()
        assert task is not None
        ok = False
        timeout = self.context.time_remaining()
        per_try = instance.variant.config.per_try_timeout_s
        per_try_bound = per_try is not None and (timeout is None or per_try < timeout)
        if per_try_bound:
            timeout = per_try
        try:
            try:
                response = await await_call(instance.upstream.model_infer(
                    request, timeout=timeout, metadata=self.metadata))
                ok = True
                self._responded(pending)
                self.balancer.outliers.success(instance)
                out = stream_response_from_unary(response)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                pending.code = code.name
                details = exc.details() or code.name
                if never_reached(exc):
                    self.balancer.outliers.connect_failure(instance)
                elif (per_try_bound and code == grpc.StatusCode.DEADLINE_EXCEEDED
                      and not client_gone(self.context)):
                    self.balancer.outliers.failure(instance, "PER_TRY_TIMEOUT")
                    details = (f"upstream instance {instance.address} did not answer within "
                               f"per_try_timeout_s ({per_try:g} s)")
                else:
                    self.balancer.outliers.failure(instance, code.name)
                if code == grpc.StatusCode.UNIMPLEMENTED and "decoupled" in details:
                    # Reloaded behind the router's back as decoupled: ask again next time.
                    self.balancer.decoupled.forget()
                # Triton's in-stream error for a non-decoupled request: message and id.
                out = error_stream_response(details, pending.id)
            finally:
                if self.unary.pop(task, None) is not None:  # _close() may have released it
                    self._release(instance, pending, ok)
            try:
                await self._write(out)
            except Exception as exc:  # the client went; nothing to answer
                log.debug("answer for %s not written: %r", pending.id, exc)
        finally:
            self._answered()

    def _open(self, instance: Instance) -> _Upstream:
        call = instance.upstream.stream_infer(
            timeout=self.context.time_remaining(), metadata=self.metadata
        )
        up = _Upstream(instance, call)
        self.upstreams[instance] = up
        up.pump = asyncio.get_running_loop().create_task(self._pump(up))
        return up

    async def _pump(self, up: _Upstream) -> None:
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
            if exc.code() == grpc.StatusCode.CANCELLED and self.context.cancelled():
                failure = None
            else:
                if never_reached(exc):
                    self.balancer.outliers.connect_failure(instance)
                else:
                    self.balancer.outliers.failure(instance, exc.code().name)
                failure = f"failed: [{exc.code().name}] {exc.details()}"
        finally:
            # Whatever ended this pump (upstream death, a write to a client that is gone,
            # cancellation), nothing it carried may stay outstanding: release before any
            # await, since _close() no longer sees an upstream once it leaves the dict.
            if self.upstreams.get(instance) is up:
                del self.upstreams[instance]
            orphans = self._settle_all(up, code_name)
        if failure is not None:
            for p in orphans:
                await self._write(error_stream_response(
                    f"upstream instance {instance.address} {failure}", p.id, p.model_name))

    async def _on_response(self, up: _Upstream, response: bytes) -> None:
        try:
            info = peek_stream_response(response)
        except WireError:
            await self._write(response)
            return
        if not info.terminal:
            for p in up.pending:
                if p.id == info.id:
                    self._responded(p)
                    if info.error_message:
                        # A decoupled model's error need not be its final response: judge
                        # the request now, once, and never as a success at its (empty) final.
                        self._failed(up.instance, p, info.error_message)
                    break
            await self._write(response)
            return
        pending = self._settle(up, info.id, info.error_message,
                               info.has_outputs or bool(info.error_message))
        if (
            info.final and not info.has_outputs and not info.error_message
            and pending is not None and not pending.client_wants_empty_final
        ):
            return  # an empty final the router asked for; the client did not
        await self._write(response)

    def _settle(self, up: _Upstream, request_id: str, error: str,
                response: bool) -> _Pending | None:
        """Close the oldest pending request with this id on this upstream, tell the outlier
        detector how it went (``error``: its final response's, "" for none), and release
        it. ``response``: the final carries an answer (not just the end of one)."""
        pending = up.pending
        found = None
        for i, p in enumerate(pending):
            if p.id == request_id:
                found = p
                del pending[i]
                break
        if found is None:
            if not pending:
                return None
            found = pending.popleft()
        if response:
            self._responded(found)
        if error:
            self._failed(up.instance, found, error)
        elif not found.failed:
            self.balancer.outliers.success(up.instance)
        self._release(up.instance, found, not found.failed)
        self._answered()
        return found

    def _failed(self, instance: Instance, p: _Pending, error: str) -> None:
        """An in-stream error came for ``p``: the outlier detector hears of it once per
        request, however many error responses a decoupled model sends."""
        if not p.failed:
            p.failed = True
            p.code = "UNKNOWN"  # Triton's in-stream errors carry a message, not a code
            self.balancer.outliers.stream_error(instance, error)

    def _settle_all(self, up: _Upstream, code_name: str) -> list[_Pending]:
        """Release every request still pending on ``up`` as failed (``code_name``: why);
        return them."""
        orphans = list(up.pending)
        up.pending.clear()
        for p in orphans:
            if not p.failed:
                p.code = code_name
            self._release(up.instance, p, False)
            self._answered()
        return orphans

    def _release(self, instance: Instance, p: _Pending, ok: bool) -> None:
        self.balancer.release(instance, p.cost)
        now = time.perf_counter()
        instance.observe(now - p.started, ok, p.ahead, p.cost)
        code_name = "OK" if ok else "UNKNOWN" if p.code == "OK" else p.code
        p.stats.finished(code_name, now - p.sent, p.sent - p.started + p.queued, p.queued)

    @staticmethod
    def _responded(p: _Pending) -> None:
        """A response for ``p`` came: time to first response, or since the one before."""
        now = time.perf_counter()
        if p.last:
            p.stats.time_between_responses.observe(now - p.last)
        else:
            p.stats.time_to_first_response.observe(now - p.sent)
        p.last = now

    async def _write(self, response: bytes) -> None:
        async with self.write_lock:
            await self.context.write(response)

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
        calls = list(self.unary.items())
        self.unary.clear()
        for task, (instance, pending) in calls:
            task.cancel()  # a task cancelled before it ran has no finally: release here
            pending.code = "CANCELLED"
            self._release(instance, pending, False)
        for up in ups:
            cancel_in_core(up.call)  # again: one a waiting request opened meanwhile
            self._settle_all(up, "CANCELLED")
        pumps = [up.pump for up in ups if up.pump is not None]
        if pumps:
            _, stuck = await asyncio.wait(pumps, timeout=_PUMP_END_S)
            for pump in stuck:
                pump.cancel()
            for pump in pumps:
                try:
                    await pump
                except (asyncio.CancelledError, Exception) as exc:  # the client may be gone
                    log.debug("upstream stream ended with %r", exc)
        for task, _ in calls:
            try:
                await task
            except asyncio.CancelledError:
                pass
