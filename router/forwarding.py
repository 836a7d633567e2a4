"""What unary and streamed forwarding share: metadata rules, deadlines, failure wording."""

from __future__ import annotations

from typing import Final

import grpc
import grpc.aio

__all__ = [
    "QUEUE_TIMEOUT",
    "RETRY_ON_KEY",
    "TARGET_VARIANT_KEY",
    "Metadata",
    "client_gone",
    "forwardable_metadata",
    "never_reached",
    "split_metadata",
    "status",
    "too_late",
]

TARGET_VARIANT_KEY: Final = "x-target-variant"
# A client marks a ModelInfer safe to send again after a per-try timeout (it may have run
# once already): only the client knows whether its request is idempotent.
RETRY_ON_KEY: Final = "x-tritonmesh-retry-on"
RETRY_ON_VALUES: Final = frozenset({"timeout"})
# Connection-level and routing keys stay at this hop; everything else the client
# sent (auth tokens, tracing headers) goes upstream as is.
_HOP_BY_HOP: Final = frozenset({
    "te", "content-type", "user-agent", "grpc-timeout", "grpc-encoding",
    "grpc-accept-encoding", "grpc-internal-encoding-request", "connection", "keep-alive",
    "host", "proxy-connection", "transfer-encoding", "upgrade", TARGET_VARIANT_KEY,
    RETRY_ON_KEY,
})

Metadata = tuple[tuple[str, str | bytes], ...]

QUEUE_TIMEOUT: Final = ("deadline exceeded while waiting in tritonmesh's queue for an instance "
                        "below its concurrency limit")


def split_metadata(
    context: grpc.aio.ServicerContext,
) -> tuple[Metadata, str | None, str | None]:
    """The client's metadata as (what goes upstream, the target variant, ``retry-on``)."""
    forward = []
    target = retry_on = None
    for key, value in context.invocation_metadata() or ():
        if key == TARGET_VARIANT_KEY:
            target = value if isinstance(value, str) else value.decode()
        elif key == RETRY_ON_KEY:
            retry_on = value if isinstance(value, str) else value.decode()
        elif key not in _HOP_BY_HOP and not key.startswith(":"):
            forward.append((key, value))
    return tuple(forward), target, retry_on


def forwardable_metadata(context: grpc.aio.ServicerContext) -> tuple[Metadata, str | None]:
    """Split the client's metadata into what goes upstream and the target variant."""
    forward, target, _ = split_metadata(context)
    return forward, target


def never_reached(exc: grpc.aio.AioRpcError) -> bool:
    """Whether the call failed before any byte could reach Triton (no connection)."""
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    details = exc.details() or ""
    return "failed to connect" in details or "Connection refused" in details


def client_gone(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return context.cancelled() or (remaining is not None and remaining <= 0)


def status(code_name: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, code_name)


def too_late(remaining: float | None, floor_s: float) -> str | None:
    """Why a request with ``remaining`` seconds left is not sent to Triton, or None.

    Triton 2.51 dies (SIGSEGV) under requests that arrive with almost no deadline left,
    so below ``limits.min_upstream_deadline_ms`` the router answers DEADLINE_EXCEEDED itself.
    """
    if remaining is None or remaining >= floor_s:
        return None
    return (f"deadline exceeded: {max(remaining, 0.0) * 1000:.2f} ms left, below "
            f"limits.min_upstream_deadline_ms ({floor_s * 1000:g}); not sent to Triton")
