"""The data path: forward inference bytes to the chosen instance and account for them.

Accounting rule: one pick, one release, in ``finally``. A unary call releases
when it ends, however it ends. A request inside a stream releases when its
final response (or an error response for it) arrives, when its upstream
stream dies, or when the client's stream ends — whichever comes first
(:mod:`tritonmesh.stream`).

A stream's requests for non-decoupled models go upstream as ``ModelInfer``, not on
the stream: Triton 2.51 crashes when non-decoupled and decoupled models answer on
streams at once (:mod:`tritonmesh.decoupled` says more). The client cannot tell:
the answer comes back on its stream exactly as Triton would have sent it there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Final

import grpc
import grpc.aio
from tritonmesh.balancer import Balancer, Instance, NoInstanceError
from tritonmesh.config import EndpointConfig
from tritonmesh.forwarding import (
    RETRY_ON_KEY,
    RETRY_ON_VALUES,
    TARGET_VARIANT_KEY,
    Absorbed,
    Metadata,
    attempt_timeout,
    client_gone,
    forwardable_metadata,
    judge,
    per_try_expired,
    priority_of,
    split_metadata,
    status,
    too_late,
)
from tritonmesh.shadow import Shadows
from tritonmesh.stream import StreamSession
from tritonmesh.wire import RequestInfo, WireError, peek_request
from tritonmesh.workers.upstream import await_call

__all__ = ["TARGET_VARIANT_KEY", "Proxy", "forwardable_metadata"]


_NOT_RETRIED: Final = {
    "per_request": "this request's retries are used up",
    "deadline": "its deadline has passed",
    "budget": "the endpoint's retry budget is spent",
}


def _retry_on_error(value: str) -> str | None:
    """Why an ``x-tritonmesh-retry-on`` value is refused; None when it is known."""
    unknown = {v.strip() for v in value.split(",")} - RETRY_ON_VALUES
    if not unknown:
        return None
    return (f"{RETRY_ON_KEY}: unknown value {', '.join(sorted(unknown))!r} "
            f"(known: {', '.join(sorted(RETRY_ON_VALUES))})")


class Proxy:
    """Handlers for ``ModelInfer`` and ``ModelStreamInfer`` over a :class:`Balancer`."""

    def __init__(self, balancer: Balancer, config: EndpointConfig | None = None,
                 shadows: Shadows | None = None):
        self.balancer = balancer
        self.shadows = shadows or None  # None when no variant is a shadow: nothing to do
        config = config or EndpointConfig()
        self.stream_limit = config.limits.max_stream_requests_in_flight
        self.floor_s = config.limits.min_upstream_deadline_ms / 1000.0

    async def model_infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            info = peek_request(request)
        except WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"malformed ModelInferRequest: {exc}")
        metadata, target, retry_on, priority_value = split_metadata(context)
        priority = priority_of(priority_value)
        if isinstance(priority, str):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, priority)
        assert isinstance(priority, int)
        if retry_on is not None:
            refused = _retry_on_error(retry_on)
            if refused is not None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refused)
        if self.shadows is None:
            return await self._forward(request, info, context, metadata, target,
                                       retry_on is not None, priority, None)
        # Shadows get the live answer to compare with, however the live request ends.
        copied: list[asyncio.Future[bytes | None]] = []
        response = None
        try:
            response = await self._forward(request, info, context, metadata, target,
                                           retry_on is not None, priority, copied)
            return response
        finally:
            for answer in copied:
                answer.set_result(response)

    async def _forward(self, request: bytes, info: RequestInfo,
                       context: grpc.aio.ServicerContext, metadata: Metadata,
                       target: str | None, retry_on_timeout: bool, priority: int,
                       copied: list[asyncio.Future[bytes | None]] | None) -> bytes:
        """Send a ModelInfer to an instance (and, after a failure that allows it, to
        another); ``copied``: where a shadow copy's answer future goes, if one is made."""
        balancer = self.balancer
        budget = balancer.retry_budget
        budget.deposit()
        floor_s = self.floor_s
        attempt = 0
        avoid: Instance | None = None  # where the last attempt failed
        while True:
            late = too_late(context.time_remaining(), floor_s)
            if late is not None:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, late)
            try:
                lease = await balancer.acquire(info, request, target, context.time_remaining(),
                                               avoid, priority)
            except NoInstanceError as exc:
                await context.abort(status(exc.code_name), str(exc))
            remaining = context.time_remaining()
            late = too_late(remaining, floor_s)
            if late is not None:  # its deadline went by in the queue
                lease.abandon()
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, late)
            instance = lease.instance
            if copied is not None and attempt == 0 and self.shadows is not None:
                answer = self.shadows.copy(instance.variant, info, request, metadata, remaining)
                if answer is not None:
                    copied.append(answer)
            ok = False
            config = instance.variant.config
            timeout, per_try_bound = attempt_timeout(remaining, config.per_try_timeout_s)
            # Absorbing, Triton gets no deadline (its expiry there is a cancellation too):
            # the client's is grpc.aio's to enforce, a per-try timeout the router's.
            absorb = Absorbed(lease) if config.absorbs else None
            lease.sending()
            try:
                call = await_call(instance.upstream.model_infer(
                    request, timeout=timeout if absorb is None else None, metadata=metadata
                ), None if absorb is None else absorb.take)
                response: bytes = await (call if absorb is None or not per_try_bound
                                         else asyncio.wait_for(call, timeout))
                ok = True
                lease.succeeded()
                return response
            except grpc.aio.AioRpcError as exc:
                lease.code = exc.code().name
                code, trailing = exc.code(), tuple(exc.trailing_metadata() or ())
                details, retryable = judge(lease.outliers, instance, exc, per_try_bound, context)
            except TimeoutError:  # the router's per-try timer; the call was absorbed
                lease.code = "DEADLINE_EXCEEDED"
                code, trailing = grpc.StatusCode.DEADLINE_EXCEEDED, ()
                details, retryable = per_try_expired(lease.outliers, instance), "timeout"
            finally:
                if absorb is None or not absorb.active:  # an absorbed call releases its own
                    lease.release(ok)
            # Only a request that provably never reached Triton, or one whose client said
            # it may run twice, goes elsewhere; a sequence is pinned, never moved.
            retry = retryable == "unreached" or (retryable == "timeout" and retry_on_timeout)
            if retry and info.sequence_id is None:
                attempt += 1
                refused = budget.withdraw(attempt, context.time_remaining())
                if refused is None:
                    avoid = instance
                    continue
                details = f"{details} (not retried: {_NOT_RETRIED[refused]})"
            if client_gone(context):
                # gRPC has already answered the client (cancelled, deadline passed); a
                # status sent now fails in the core and is logged as an error.
                raise asyncio.CancelledError from None
            # Only now, released: abort() sends the status before it raises, and a client
            # that has its answer must find the request released (its count back, its
            # outcome seen).
            await context.abort(code, details, trailing)

    async def model_stream_infer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> None:
        await StreamSession(self.balancer, context, self.stream_limit, self.floor_s).run(requests)
