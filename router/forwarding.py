"""What unary and streamed forwarding share: metadata rules, deadlines, failure wording."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import grpc
import grpc.aio
from tritonmesh.workers.upstream import cancel_in_core

if TYPE_CHECKING:
    from tritonmesh.instance import Instance
    from tritonmesh.lease import Lease
    from tritonmesh.outlier import OutlierDetector

__all__ = [
    "PRIORITY_KEY",
    "RETRY_ON_KEY",
    "TARGET_VARIANT_KEY",
    "Absorbed",
    "CallMetadata",
    "Metadata",
    "attempt_timeout",
    "client_gone",
    "forwardable_metadata",
    "judge",
    "never_reached",
    "per_try_expired",
    "priority_of",
    "split_metadata",
    "status",
    "too_late",
]

TARGET_VARIANT_KEY: Final = "x-target-variant"
# A client marks a ModelInfer safe to send again after a per-try timeout (it may have run
# once already): only the client knows whether its request is idempotent.
RETRY_ON_KEY: Final = "x-tritonmesh-retry-on"
RETRY_ON_VALUES: Final = frozenset({"timeout"})
# For clients that cannot set Triton's ``priority`` request parameter: the priority class of
# the call's requests (the parameter, where a request has it, wins). It orders the router's
# late-binding queue; Triton does not see it.
PRIORITY_KEY: Final = "x-tritonmesh-priority"
# Connection-level and routing keys stay at this hop; everything else the client
# sent (auth tokens, tracing headers) goes upstream as is.
_HOP_BY_HOP: Final = frozenset({
    "te", "content-type", "user-agent", "grpc-timeout", "grpc-encoding",
    "grpc-accept-encoding", "grpc-internal-encoding-request", "connection", "keep-alive",
    "host", "proxy-connection", "transfer-encoding", "upgrade", TARGET_VARIANT_KEY,
    RETRY_ON_KEY, PRIORITY_KEY,
})

Metadata = tuple[tuple[str, str | bytes], ...]


class CallMetadata(NamedTuple):
    """What the router reads from a call's metadata, and what it forwards."""

    forward: Metadata  # what goes upstream
    target: str | None  # x-target-variant
    retry_on: str | None  # x-tritonmesh-retry-on
    priority: str | None  # x-tritonmesh-priority, as sent (see priority_of)


def split_metadata(context: grpc.aio.ServicerContext) -> CallMetadata:
    """The client's metadata: what goes upstream, and the router's own keys."""
    forward = []
    target = retry_on = priority = None
    for key, value in context.invocation_metadata() or ():
        if key == TARGET_VARIANT_KEY:
            target = value if isinstance(value, str) else value.decode()
        elif key == RETRY_ON_KEY:
            retry_on = value if isinstance(value, str) else value.decode()
        elif key == PRIORITY_KEY:
            priority = value if isinstance(value, str) else value.decode()
        elif key not in _HOP_BY_HOP and not key.startswith(":"):
            forward.append((key, value))
    return CallMetadata(tuple(forward), target, retry_on, priority)


class Absorbed:
    """An upstream ModelInfer whose client left (it cancelled, or its deadline passed), left
    to finish when its variant absorbs cancellations (``upstream_cancellation``): Triton's
    gRPC frontend can crash on a cancellation that races the request's completion. The
    lease stays held (Triton is still working) until Triton answers, or at most
    ``absorb_timeout_s``, when the call is cancelled after all."""

    __slots__ = ("active", "lease")

    def __init__(self, lease: Lease):
        self.lease = lease
        self.active = False  # it took the call: the call releases the lease, not its caller

    def take(self, call: grpc.aio.Call, running: asyncio.Future[Any]) -> None:
        lease = self.lease
        self.active = True
        lease.instance.absorbed += 1
        timer = asyncio.get_running_loop().call_later(
            lease.instance.variant.config.absorb_timeout_s, cancel_in_core, call)

        def finished(_: asyncio.Future[Any]) -> None:
            timer.cancel()
            lease.release(False)

        running.add_done_callback(finished)


def priority_of(value: str | None) -> int | str:
    """The priority class an ``x-tritonmesh-priority`` value names (0: none), or why it is
    refused."""
    if value is None:
        return 0
    try:
        priority = int(value.strip())
    except ValueError:
        priority = -1
    if not 0 < priority < 1 << 63:
        return f"{PRIORITY_KEY}: expected a positive integer (1 is the highest), got {value!r}"
    return priority


def forwardable_metadata(context: grpc.aio.ServicerContext) -> tuple[Metadata, str | None]:
    """Split the client's metadata into what goes upstream and the target variant."""
    call = split_metadata(context)
    return call.forward, call.target


def attempt_timeout(remaining: float | None, per_try_s: float | None) -> tuple[float | None, bool]:
    """The timeout of one upstream attempt, and whether ``per_try_timeout_s`` set it (rather
    than the client's own deadline)."""
    if per_try_s is not None and (remaining is None or per_try_s < remaining):
        return per_try_s, True
    return remaining, False


def judge(outliers: OutlierDetector, instance: Instance, exc: grpc.aio.AioRpcError,
          per_try_bound: bool, context: grpc.aio.ServicerContext) -> tuple[str, str | None]:
    """Tell the outlier detector what a failed upstream call says about its instance.

    Returns the details to answer with, and why the request may go elsewhere: "unreached"
    (it provably never reached Triton), "timeout" (the attempt outlived
    ``per_try_timeout_s``, not the client's deadline: the instance did not answer in time),
    or None.
    """
    code = exc.code()
    if never_reached(exc):
        outliers.connect_failure(instance)
        return exc.details() or code.name, "unreached"
    if per_try_bound and code == grpc.StatusCode.DEADLINE_EXCEEDED and not client_gone(context):
        return per_try_expired(outliers, instance), "timeout"
    outliers.failure(instance, code.name)
    return exc.details() or code.name, None


def per_try_expired(outliers: OutlierDetector, instance: Instance) -> str:
    """An attempt outlived its variant's ``per_try_timeout_s``: charged to the instance;
    the details to answer with."""
    outliers.failure(instance, "PER_TRY_TIMEOUT")
    return (f"upstream instance {instance.address} did not answer within "
            f"per_try_timeout_s ({instance.variant.config.per_try_timeout_s:g} s)")


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
