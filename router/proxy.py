"""The data path: forward inference bytes to the chosen instance and account for them.

Accounting rule: one pick, one release, in ``finally``. A unary call releases
when it ends, however it ends. A request inside a stream releases when its
final response (or an error response for it) arrives, when its upstream
stream dies, or when the client's stream ends — whichever comes first.

A stream's requests for non-decoupled models go upstream as ``ModelInfer``, not on
the stream: Triton 2.51 crashes when non-decoupled and decoupled models answer on
streams at once (:mod:`tritonmesh.decoupled` says more). The client cannot tell:
the answer comes back on its stream exactly as Triton would have sent it there.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Final

import grpc
import grpc.aio
from tritonmesh.balancer import Balancer, Instance, NoInstanceError, VariantFull
from tritonmesh.wire import (
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

__all__ = ["TARGET_VARIANT_KEY", "Proxy", "forwardable_metadata"]

log = logging.getLogger("tritonmesh.proxy")

TARGET_VARIANT_KEY: Final = "x-target-variant"
# Connection-level and routing keys stay at this hop; everything else the client
# sent (auth tokens, tracing headers) goes upstream as is.
_HOP_BY_HOP: Final = frozenset({
    "te", "content-type", "user-agent", "grpc-timeout", "grpc-encoding",
    "grpc-accept-encoding", "grpc-internal-encoding-request", "connection", "keep-alive",
    "host", "proxy-connection", "transfer-encoding", "upgrade", TARGET_VARIANT_KEY,
})

Metadata = tuple[tuple[str, str | bytes], ...]


def forwardable_metadata(context: grpc.aio.ServicerContext) -> tuple[Metadata, str | None]:
    """Split the client's metadata into what goes upstream and the target variant."""
    forward = []
    target = None
    for key, value in context.invocation_metadata() or ():
        if key == TARGET_VARIANT_KEY:
            target = value if isinstance(value, str) else value.decode()
        elif key not in _HOP_BY_HOP and not key.startswith(":"):
            forward.append((key, value))
    return tuple(forward), target


def _never_reached(exc: grpc.aio.AioRpcError) -> bool:
    """Whether the call failed before any byte could reach Triton (no connection)."""
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    details = exc.details() or ""
    return "failed to connect" in details or "Connection refused" in details


_QUEUE_TIMEOUT: Final = ("deadline exceeded while waiting in tritonmesh's queue for an instance "
                         "below its concurrency limit")


async def _wait(full: VariantFull, context: grpc.aio.ServicerContext, cost: float) -> Instance:
    try:
        return await full.variant.wait(context.time_remaining(), cost)
    except NoInstanceError as exc:
        await context.abort(_status(exc.code_name), str(exc))
    except TimeoutError:
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, _QUEUE_TIMEOUT)
    raise AssertionError("unreachable")


# How long a cancelled upstream stream's pump may take to notice before it is cancelled.
_PUMP_END_S: Final = 5.0

_NOT_RETRIED: Final = {
    "per_request": "this request's retries are used up",
    "deadline": "its deadline has passed",
    "budget": "the endpoint's retry budget is spent",
}


def _client_gone(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return context.cancelled() or (remaining is not None and remaining <= 0)


def _status(code_name: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, code_name)


class Proxy:
    """Handlers for ``ModelInfer`` and ``ModelStreamInfer`` over a :class:`Balancer`."""

    def __init__(self, balancer: Balancer):
        self.balancer = balancer

    async def model_infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            info = peek_request(request)
        except WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"malformed ModelInferRequest: {exc}")
        metadata, target = forwardable_metadata(context)
        balancer = self.balancer
        budget = balancer.retry_budget
        budget.deposit()
        cost = balancer.cost(info.model_name, request) if balancer.work_aware else 1.0
        attempt = 0
        while True:
            try:
                instance = balancer.pick(info.model_name, target, info.sequence_id,
                                         info.sequence_start, info.sequence_end, cost)
            except VariantFull as full:
                instance = await _wait(full, context, cost)
            except NoInstanceError as exc:
                await context.abort(_status(exc.code_name), str(exc))
            ahead = instance.work_ahead()
            started = time.perf_counter()
            ok = False
            failed: tuple[grpc.StatusCode, str, Metadata] | None = None
            try:
                response: bytes = await await_call(instance.upstream.model_infer(
                    request, timeout=context.time_remaining(), metadata=metadata
                ))
                ok = True
                balancer.outliers.success(instance)
                return response
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                details = exc.details() or ""
                if _never_reached(exc):
                    balancer.outliers.connect_failure(instance)
                    # Provably never reached Triton: safe to send elsewhere, within the
                    # per-request limit, the deadline and the endpoint's retry budget.
                    # A sequence is pinned to its instance, so it is never moved.
                    if info.sequence_id is None:
                        attempt += 1
                        refused = budget.withdraw(attempt, context.time_remaining())
                        if refused is None:
                            continue
                        details = f"{details} (not retried: {_NOT_RETRIED[refused]})"
                else:
                    balancer.outliers.failure(instance, code.name)
                if _client_gone(context):
                    # gRPC has already answered the client (cancelled, deadline passed); a
                    # status sent now fails in the core and is logged as an error.
                    raise asyncio.CancelledError from None
                failed = (code, details, tuple(exc.trailing_metadata() or ()))
            finally:
                balancer.release(instance, cost)
                instance.observe(time.perf_counter() - started, ok, ahead, cost)
            # Only now: abort() sends the status before it raises, and a client that has
            # its answer must find the request released (its count back, its outcome seen).
            assert failed is not None
            await context.abort(*failed)

    async def model_stream_infer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> None:
        await _StreamSession(self.balancer, context).run(requests)


class _Pending:
    """A request sent on an upstream stream whose final response has not arrived."""

    __slots__ = ("ahead", "client_wants_empty_final", "cost", "failed", "id", "model_name",
                 "started")

    def __init__(self, request_id: str, model_name: str, client_wants_empty_final: bool,
                 cost: float, ahead: float):
        self.id = request_id
        self.model_name = model_name
        self.client_wants_empty_final = client_wants_empty_final
        self.cost = cost  # what it was picked with, released with
        self.ahead = ahead  # LEAST_OUTSTANDING_WORK: the work it found on its instance
        self.started = time.perf_counter()
        self.failed = False  # an in-stream error came for it (final or not)


class _Upstream:
    """One upstream ``ModelStreamInfer`` call of a client stream, to one instance."""

    __slots__ = ("call", "instance", "pending", "pump")

    def __init__(self, instance: Instance, call: grpc.aio.StreamStreamCall):
        self.instance = instance
        self.call = call
        self.pending: collections.deque[_Pending] = collections.deque()
        self.pump: asyncio.Task[None] | None = None


class _StreamSession:
    """One client ``ModelStreamInfer`` stream fanned out over per-instance upstream streams.

    Each request is routed on its own. Upstream streams open lazily, one per
    instance used; their responses merge into the client stream. Responses of one
    request travel on one upstream stream in order, so per-request order holds.
    """

    def __init__(self, balancer: Balancer, context: grpc.aio.ServicerContext):
        self.balancer = balancer
        self.context = context
        self.metadata, self.target = forwardable_metadata(context)
        self.upstreams: dict[Instance, _Upstream] = {}
        # Requests sent as ModelInfer, still running, and what each holds on its instance.
        self.unary: dict[asyncio.Task[None], tuple[Instance, _Pending]] = {}
        self.write_lock = asyncio.Lock()

    async def run(self, requests: AsyncIterator[bytes]) -> None:
        try:
            async for request in requests:
                await self._forward(request)
            # The client half-closed: so do we, then wait for every outstanding final.
            for up in list(self.upstreams.values()):
                if up.pump is not None and not up.pump.done():
                    await up.call.done_writing()
            pumps = [up.pump for up in self.upstreams.values() if up.pump is not None]
            if pumps or self.unary:
                # wait(), not gather(): if the client goes now, this handler is cancelled and
                # gather() would cancel the pumps mid-read (a native leak, see
                # cancel_in_core); _close() ends them through their calls instead.
                await asyncio.wait([*pumps, *self.unary])
        finally:
            await self._close()

    async def _forward(self, request: bytes) -> None:
        try:
            info = peek_request(request)
        except WireError as exc:
            # Triton answers a bad request inside a stream in-stream and keeps the stream open.
            await self._write(error_stream_response(f"malformed ModelInferRequest: {exc}"))
            return
        balancer = self.balancer
        cost = balancer.cost(info.model_name, request) if balancer.work_aware else 1.0
        try:
            try:
                instance = balancer.pick(info.model_name, self.target, info.sequence_id,
                                         info.sequence_start, info.sequence_end, cost)
            except VariantFull as full:
                instance = await full.variant.wait(self.context.time_remaining(), cost)
        except NoInstanceError as exc:
            await self._write(error_stream_response(str(exc), info.id, info.model_name))
            return
        except TimeoutError:
            await self._write(error_stream_response(_QUEUE_TIMEOUT, info.id, info.model_name))
            return
        pending = _Pending(info.id, info.model_name, info.empty_final, cost, instance.work_ahead())
        try:
            # Sequences stay on the stream: Triton keeps their order there, concurrent calls
            # would not.
            as_unary = info.sequence_id is None and await self._non_decoupled(
                instance, info.model_name, info.model_version)
        except BaseException:
            # The client went (or the question failed) before the request was anywhere
            # _close() can see it: release here, or the count stays up for good.
            self._release(instance, pending, False)
            raise
        if as_unary:
            task = asyncio.get_running_loop().create_task(self._unary_call(request, pending))
            self.unary[task] = (instance, pending)
            return
        up = self.upstreams.get(instance)
        if up is None:
            up = self._open(instance)
        up.pending.append(pending)
        try:
            await up.call.write(request if info.empty_final else inject_empty_final(request))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            # The upstream stream is already gone; its pump fails every pending request.
            log.debug("write to %s failed: %s", instance.address, exc)

    async def _non_decoupled(self, instance: Instance, model_name: str, version: str) -> bool:
        decoupled = self.balancer.decoupled.get(model_name, version)
        if decoupled is None:
            decoupled = await self.balancer.decoupled.ask(instance.upstream, model_name, version)
        return decoupled is False  # unknown (no such model, say): Triton answers in-stream

    async def _unary_call(self, request: bytes, pending: _Pending) -> None:
        """Send one stream request as ``ModelInfer`` and answer it on the client's stream."""
        task = asyncio.current_task()
        assert task is not None
        instance = self.unary[task][0]
        ok = False
        try:
            response = await await_call(instance.upstream.model_infer(
                request, timeout=self.context.time_remaining(), metadata=self.metadata))
            ok = True
            self.balancer.outliers.success(instance)
            out = stream_response_from_unary(response)
        except grpc.aio.AioRpcError as exc:
            if _never_reached(exc):
                self.balancer.outliers.connect_failure(instance)
            else:
                self.balancer.outliers.failure(instance, exc.code().name)
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED and "decoupled" in (exc.details() or ""):
                # Reloaded behind the router's back as decoupled: ask again next time.
                self.balancer.decoupled.forget()
            # Triton's in-stream error for a non-decoupled request: the message and the id.
            out = error_stream_response(exc.details() or exc.code().name, pending.id)
        finally:
            if self.unary.pop(task, None) is not None:  # _close() may have released it
                self._release(instance, pending, ok)
        try:
            await self._write(out)
        except Exception as exc:  # the client went; nothing to answer
            log.debug("answer for %s not written: %r", pending.id, exc)

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
        try:
            try:
                async for response in up.call:
                    await self._on_response(up, response)
            except asyncio.CancelledError:
                if being_cancelled():
                    raise  # _close() ended this pump
                raise upstream_cancelled() from None  # the instance's channel closed
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and self.context.cancelled():
                failure = None
            else:
                if _never_reached(exc):
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
            orphans = self._settle_all(up)
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
            if info.error_message:
                # A decoupled model's error need not be its final response: judge the
                # request now, once, and never as a success at its (empty) final.
                for p in up.pending:
                    if p.id == info.id:
                        self._failed(up.instance, p, info.error_message)
                        break
            await self._write(response)
            return
        pending = self._settle(up, info.id, info.error_message)
        if (
            info.final and not info.has_outputs and not info.error_message
            and pending is not None and not pending.client_wants_empty_final
        ):
            return  # an empty final the router asked for; the client did not
        await self._write(response)

    def _settle(self, up: _Upstream, request_id: str, error: str) -> _Pending | None:
        """Close the oldest pending request with this id on this upstream, tell the outlier
        detector how it went (``error``: its final response's, "" for none), and release
        it."""
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
        if error:
            self._failed(up.instance, found, error)
        elif not found.failed:
            self.balancer.outliers.success(up.instance)
        self._release(up.instance, found, not found.failed)
        return found

    def _failed(self, instance: Instance, p: _Pending, error: str) -> None:
        """An in-stream error came for ``p``: the outlier detector hears of it once per
        request, however many error responses a decoupled model sends."""
        if not p.failed:
            p.failed = True
            self.balancer.outliers.stream_error(instance, error)

    def _settle_all(self, up: _Upstream) -> list[_Pending]:
        """Release every request still pending on ``up`` as failed; return them."""
        orphans = list(up.pending)
        up.pending.clear()
        for p in orphans:
            self._release(up.instance, p, False)
        return orphans

    def _release(self, instance: Instance, p: _Pending, ok: bool) -> None:
        self.balancer.release(instance, p.cost)
        instance.observe(time.perf_counter() - p.started, ok, p.ahead, p.cost)

    async def _write(self, response: bytes) -> None:
        async with self.write_lock:
            await self.context.write(response)

    async def _close(self) -> None:
        """Release everything still pending and end every upstream call."""
        ups: Sequence[_Upstream] = list(self.upstreams.values())
        self.upstreams.clear()
        calls = list(self.unary.items())
        self.unary.clear()
        for task, (instance, pending) in calls:
            task.cancel()  # a task cancelled before it ran has no finally: release here
            self._release(instance, pending, False)
        for up in ups:
            # In the core only: the pump's pending read then ends by itself, and its batch
            # is freed (cancelling the pump task while it reads leaks it; see cancel_in_core).
            cancel_in_core(up.call)
            self._settle_all(up)
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
            with contextlib.suppress(asyncio.CancelledError):
                await task
