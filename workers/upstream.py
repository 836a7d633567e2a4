"""One gRPC channel per Triton instance, with every multicallable bound once.

The router forwards request bytes untouched, so no multicallable has a
serializer: requests and responses stay ``bytes`` end to end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final

import grpc
import grpc.aio

try:  # the concrete base of grpc.aio's calls; see cancel_in_core()
    from grpc.aio._call import Call as _CoreCall
except ImportError:  # pragma: no cover (a grpcio that moved it: plain cancel, leak and all)
    _CoreCall = None

__all__ = [
    "CHANNEL_OPTIONS",
    "SERVICE",
    "Upstream",
    "await_call",
    "being_cancelled",
    "cancel_in_core",
    "channel_options",
    "method_path",
    "name_override",
    "upstream_cancelled",
]

SERVICE: Final = "inference.GRPCInferenceService"
INT32_MAX: Final = 2**31 - 1


def channel_options(max_message_bytes: int = INT32_MAX) -> tuple[tuple[str, Any], ...]:
    """Options for a channel to Triton. The router's ``limits.max_message_bytes`` bounds
    what Triton may answer too: a larger response fails here (RESOURCE_EXHAUSTED) instead
    of being held whole only to be refused on the way to the client. Keepalive pings stay
    within Triton's defaults (min ping interval without data 5 min, pings only with calls
    open) so that Triton never answers with GOAWAY too_many_pings."""
    return (
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        *_KEEPALIVE,
    )


_KEEPALIVE: Final[tuple[tuple[str, Any], ...]] = (
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 2),
    # Each instance gets its own channel even when two addresses resolve alike.
    ("grpc.use_local_subchannel_pool", 1),
)

# tritonclient lifts message limits to INT32_MAX; without a router limit, so does this hop.
CHANNEL_OPTIONS: Final = channel_options()

UNARY_METHODS: Final = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
    "TraceSetting",
    "LogSettings",
)


def name_override(server_name: str | None) -> tuple[tuple[str, Any], ...]:
    """Channel options that make TLS verify ``server_name`` instead of the address's host
    (an IP that is not in the certificate); none for None."""
    return () if server_name is None else (("grpc.ssl_target_name_override", server_name),)


def method_path(name: str) -> str:
    return f"/{SERVICE}/{name}"


# Cancelling an upstream call the grpc.aio way leaks native memory: Call.cancel() also
# cancels the asyncio task that awaits the call's batch, and a batch whose awaiter is
# cancelled never frees its grpc_op array (grpc/grpc#43360, open in grpcio 1.85). Measured
# here: about 2.4 KiB per cancelled unary call, and about 1 KiB per client-cancelled request
# through the router (bench/soak.py --mix unary-cancels). Cancelling in the gRPC core only
# ends the call just the same, and grpc.aio's own task then consumes the batch and frees it.
def cancel_in_core(call: grpc.aio.Call) -> None:
    """End ``call`` (Triton sees the cancellation) without leaking its native batch."""
    if _CoreCall is not None and isinstance(call, _CoreCall):
        _CoreCall.cancel(call)
    else:  # pragma: no cover
        call.cancel()


async def await_call(call: grpc.aio.UnaryUnaryCall[Any, Any],
                     absorb: Callable[[grpc.aio.Call, asyncio.Future[Any]], None] | None = None
                     ) -> bytes:
    """``await call``, except that if the awaiting task is cancelled (the router's client
    went away), the call is cancelled in the core only (see :func:`cancel_in_core`)
    instead of through its asyncio task, or, with ``absorb``, handed to it (with the task
    that runs it) to be left to finish."""
    # The call runs in a task of its own that a cancellation here does not reach, so it
    # always consumes its batch, and every await stays an ordinary asyncio await: a waiter
    # woken by the call's done callback instead can stall until its deadline (gRPC may
    # run that callback off the loop).
    inner = asyncio.ensure_future(call)
    inner.add_done_callback(_consume)
    try:
        response: bytes = await asyncio.shield(inner)  # this router's multicallables move bytes
    except asyncio.CancelledError:
        if not inner.done():
            if absorb is None:
                cancel_in_core(call)
            else:
                absorb(call, inner)
            raise
        if inner.cancelled() and not being_cancelled():
            # Cancelled under us, not by our caller: its channel was closed (the instance
            # was removed). A CancelledError would end the caller as if it were cancelled,
            # and its client would get no status until its deadline.
            raise upstream_cancelled() from None
        raise
    return response


def being_cancelled() -> bool:
    """Whether the running task was asked to cancel (as opposed to a CancelledError that
    came up from something it awaited being cancelled by someone else)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def upstream_cancelled() -> grpc.aio.AioRpcError:
    """The error for an upstream call that its closed channel cancelled."""
    return grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, grpc.aio.Metadata(),
                                grpc.aio.Metadata(),
                                details="the call to the instance was cancelled: the instance "
                                        "was removed from the router")


def _consume(task: asyncio.Future[Any]) -> None:
    # After a cancel the call's own error has no reader; fetching it keeps asyncio from
    # logging "exception was never retrieved".
    if not task.cancelled():
        task.exception()


class Upstream:
    """A Triton instance as the router sees it: an address and a ready-bound channel.

    ``unary[name]`` is the bytes-in, bytes-out multicallable for each unary RPC of
    ``GRPCInferenceService``; ``stream_infer`` opens a ``ModelStreamInfer`` stream.
    """

    __slots__ = ("address", "channel", "model_infer", "stream_infer", "unary")

    def __init__(self, address: str, *, options: tuple[tuple[str, Any], ...] = CHANNEL_OPTIONS,
                 credentials: grpc.ChannelCredentials | None = None):
        self.address = address
        self.channel = (grpc.aio.insecure_channel(address, options=options)
                        if credentials is None
                        else grpc.aio.secure_channel(address, credentials, options=options))
        self.unary: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {
            name: self.channel.unary_unary(method_path(name)) for name in UNARY_METHODS
        }
        self.model_infer = self.unary["ModelInfer"]
        self.stream_infer: grpc.aio.StreamStreamMultiCallable = self.channel.stream_stream(
            method_path("ModelStreamInfer")
        )

    async def close(self, grace: float | None = None) -> None:
        await self.channel.close(grace)

    def __repr__(self) -> str:
        return f"Upstream({self.address!r})"
