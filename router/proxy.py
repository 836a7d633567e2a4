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
import time
from collections.abc import AsyncIterator
from typing import Final

import grpc
import grpc.aio
from tritonmesh.balancer import Balancer, Instance, NoInstanceError, VariantFull
from tritonmesh.config import EndpointConfig
from tritonmesh.forwarding import (
    QUEUE_TIMEOUT,
    RETRY_ON_KEY,
    RETRY_ON_VALUES,
    TARGET_VARIANT_KEY,
    Metadata,
    client_gone,
    forwardable_metadata,
    never_reached,
    split_metadata,
    status,
    too_late,
)
from tritonmesh.request_metrics import RequestMetrics
from tritonmesh.stream import StreamSession
from tritonmesh.wire import WireError, peek_request
from tritonmesh.workers.upstream import await_call

__all__ = ["TARGET_VARIANT_KEY", "Proxy", "forwardable_metadata"]


async def _wait(full: VariantFull, context: grpc.aio.ServicerContext, cost: float,
                metrics: RequestMetrics, model_name: str) -> Instance:
    variant = full.variant
    since = time.perf_counter()
    try:
        return await variant.wait(context.time_remaining(), cost)
    except NoInstanceError as exc:
        metrics.refused(variant, model_name, exc.code_name, time.perf_counter() - since)
        await context.abort(status(exc.code_name), str(exc))
    except TimeoutError:
        metrics.refused(variant, model_name, "DEADLINE_EXCEEDED", time.perf_counter() - since)
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, QUEUE_TIMEOUT)
    raise AssertionError("unreachable")


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

    def __init__(self, balancer: Balancer, config: EndpointConfig | None = None):
        self.balancer = balancer
        config = config or EndpointConfig()
        self.stream_limit = config.limits.max_stream_requests_in_flight
        self.floor_s = config.limits.min_upstream_deadline_ms / 1000.0

    async def model_infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            info = peek_request(request)
        except WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"malformed ModelInferRequest: {exc}")
        metadata, target, retry_on = split_metadata(context)
        if retry_on is not None:
            refused = _retry_on_error(retry_on)
            if refused is not None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refused)
        retry_on_timeout = retry_on is not None  # "timeout" is the one value there is
        balancer = self.balancer
        budget = balancer.retry_budget
        budget.deposit()
        cost = balancer.cost(info.model_name, request) if balancer.work_aware else 1.0
        floor_s = self.floor_s
        attempt = 0
        avoid: Instance | None = None  # where the last attempt failed
        while True:
            remaining = context.time_remaining()
            late = too_late(remaining, floor_s)
            if late is not None:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, late)
            attempted = time.perf_counter()
            queued_s = 0.0
            try:
                if avoid is None:
                    instance = balancer.pick(info.model_name, target, info.sequence_id,
                                             info.sequence_start, info.sequence_end, cost)
                else:
                    instance = balancer.pick_avoiding(avoid, info.model_name, target, cost)
            except VariantFull as full:
                instance = await _wait(full, context, cost, balancer.metrics, info.model_name)
                queued_s = time.perf_counter() - attempted
                remaining = context.time_remaining()
                late = too_late(remaining, floor_s)
                if late is not None:  # its deadline went by in the queue
                    balancer.release(instance, cost)
                    balancer.metrics.refused(instance.variant, info.model_name,
                                             "DEADLINE_EXCEEDED", queued_s)
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, late)
            except NoInstanceError as exc:
                await context.abort(status(exc.code_name), str(exc))
            ahead = instance.work_ahead()
            started = time.perf_counter()
            # Request metrics (tritonmesh.request_metrics); the Lease takes these over.
            stats = balancer.metrics.started(instance.variant, info.model_name)
            code_name = "CANCELLED"  # unless an answer or Triton's status says otherwise
            ok = False
            failed: tuple[grpc.StatusCode, str, Metadata] | None = None
            timeout = remaining
            per_try = instance.variant.config.per_try_timeout_s
            per_try_bound = per_try is not None and (timeout is None or per_try < timeout)
            if per_try_bound:
                timeout = per_try
            try:
                response: bytes = await await_call(instance.upstream.model_infer(
                    request, timeout=timeout, metadata=metadata
                ))
                ok = True
                code_name = "OK"
                balancer.outliers.success(instance)
                return response
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                code_name = code.name
                details = exc.details() or ""
                retry = False
                if never_reached(exc):
                    balancer.outliers.connect_failure(instance)
                    # Provably never reached Triton: safe to send elsewhere, within the
                    # per-request limit, the deadline and the endpoint's retry budget.
                    retry = True
                elif (per_try_bound and code == grpc.StatusCode.DEADLINE_EXCEEDED
                      and not client_gone(context)):
                    # The attempt outlived per_try_timeout_s, not the client's deadline:
                    # the instance did not answer in time (hung, or far behind).
                    balancer.outliers.failure(instance, "PER_TRY_TIMEOUT")
                    details = (f"upstream instance {instance.address} did not answer within "
                               f"per_try_timeout_s ({per_try:g} s)")
                    retry = retry_on_timeout
                else:
                    balancer.outliers.failure(instance, code.name)
                # A sequence is pinned to its instance, so it is never moved.
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
                failed = (code, details, tuple(exc.trailing_metadata() or ()))
            finally:
                balancer.release(instance, cost)
                ended = time.perf_counter()
                instance.observe(ended - started, ok, ahead, cost)
                stats.finished(code_name, ended - started, started - attempted, queued_s)
            # Only now: abort() sends the status before it raises, and a client that has
            # its answer must find the request released (its count back, its outcome seen).
            assert failed is not None
            await context.abort(*failed)

    async def model_stream_infer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> None:
        await StreamSession(self.balancer, context, self.stream_limit, self.floor_s).run(requests)
