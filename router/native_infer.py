"""``ModelInfer`` on the native data path: the policy around the engine in ``_core._h2``.

Per call, Python runs three times: when the first message is whole (peek, acquire, open the
upstream stream paired with the client's), when Triton's trailers come (judge, release), and
only if the call breaks, when a stream of the pair closes early (reset, connection lost):
those endings are :mod:`tritonmesh.native_call`'s. Everything between (request DATA up,
response HEADERS and DATA down) stays in C.

What the grpc.aio path does that this slice does not (such calls are relayed to it, see
:meth:`tritonmesh.native_front.NativePort.request`): shadow copies, tokens.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import TYPE_CHECKING, Final

from tritonmesh.balancer import Balancer, NoInstanceError
from tritonmesh.forwarding import (
    _HOP_BY_HOP,
    PRIORITY_KEY,
    RETRY_ON_KEY,
    TARGET_VARIANT_KEY,
    attempt_timeout,
    priority_of,
    too_late,
)
from tritonmesh.native_call import (
    Call,
    Request,
    Waiting,
    abandon_if_cancelled,
    grpc_message,
    refuse,
)
from tritonmesh.proxy import _NOT_RETRIED, _retry_on_error
from tritonmesh.wire import WireError, peek_request

if TYPE_CHECKING:
    from tritonmesh._core._h2 import H2Connection, Stream
    from tritonmesh.instance import Instance
    from tritonmesh.lease import Lease
    from tritonmesh.native_pool import UpstreamPool
    from tritonmesh.wire import RequestInfo

__all__ = ["HOP_BY_HOP", "MODEL_INFER", "POLICY_KEYS", "NativeInfer", "call_metadata",
           "grpc_message"]

log = logging.getLogger("tritonmesh.native")

MODEL_INFER: Final = b"/inference.GRPCInferenceService/ModelInfer"
_TARGET: Final = TARGET_VARIANT_KEY.encode()
_PRIORITY: Final = PRIORITY_KEY.encode()
_RETRY_ON: Final = RETRY_ON_KEY.encode()
_TIMEOUT: Final = b"grpc-timeout"
# The client's request headers as the engine reads them (H2Connection's policy_keys and
# hop_by_hop): the metadata the router acts on, and what stays at this hop.
POLICY_KEYS: Final = frozenset((_TARGET, _PRIORITY, _RETRY_ON))
HOP_BY_HOP: Final = frozenset(k.encode() for k in _HOP_BY_HOP)


def _encode_timeout(seconds: float) -> bytes:
    micros = max(1, int(seconds * 1e6))
    if micros < 100_000_000:
        return b"%du" % micros
    millis = micros // 1000
    if millis < 100_000_000:
        return b"%dm" % millis
    return b"%dS" % min(micros // 1_000_000, 99_999_999)


def call_metadata(stream: Stream) -> tuple[list[tuple[bytes, bytes]] | None, str | None, int,
                                          float | None, str | None] | None:
    """A call's metadata to forward (None: none), ``x-target-variant``, priority, deadline
    (monotonic) and ``x-tritonmesh-retry-on``, as the engine read them from its HEADERS;
    None when the stream was answered instead (metadata a gRPC server refuses, or a
    malformed priority)."""
    illegal = stream.illegal
    if illegal is not None:
        # Refused as grpc.aio refuses a client's metadata, so that Triton (and the
        # instance's standing) never sees what a gRPC server would not take.
        refuse(stream, "INTERNAL", "Illegal header value for key " + illegal.decode()
               if stream.illegal_value
               else "Illegal header key: " + illegal.decode(errors="backslashreplace"))
        return None
    target = retry_on = None
    priority = 0
    values = stream.policy_values
    if values is not None:
        if (value := values.get(_TARGET)) is not None:
            target = value.decode(errors="replace")
        if (value := values.get(_PRIORITY)) is not None:
            parsed = priority_of(value.decode(errors="replace"))
            if isinstance(parsed, str):
                refuse(stream, "INVALID_ARGUMENT", parsed)
                return None
            priority = parsed
        if (value := values.get(_RETRY_ON)) is not None:
            retry_on = value.decode(errors="replace")
    timeout = stream.timeout
    return (stream.metadata, target, priority,
            None if timeout < 0 else time.monotonic() + timeout, retry_on)


class NativeInfer:
    """The ModelInfer policy of the native path over a :class:`Balancer`."""

    def __init__(self, balancer: Balancer, pool: UpstreamPool, floor_s: float):
        self.balancer = balancer
        self.pool = pool
        self.floor_s = floor_s
        # Per address, per path: the HEADERS of a call there, but for the client's
        # deadline and metadata (built once; nghttp2 copies what it is given).
        self._headers: dict[str, dict[bytes, list[tuple[bytes, bytes]]]] = {}
        # Per address, a ModelInfer's of those: what most calls send, one lookup away.
        self._model_infer: dict[str, list[tuple[bytes, bytes]]] = {}

    def request_headers(self, instance: Instance, path: bytes, remaining: float | None,
                        metadata: list[tuple[bytes, bytes]] | None) -> list[tuple[bytes, bytes]]:
        """The HEADERS of a call to ``instance`` at ``path`` (``grpc-timeout``: ``remaining``
        seconds), with the client's metadata to forward."""
        address = instance.address
        paths = self._headers.get(address)
        if paths is None:
            paths = self._headers[address] = {}
        headers = paths.get(path)
        if headers is None:
            scheme = b"http" if instance.variant.config.upstream_tls is None else b"https"
            headers = paths[path] = [(b":method", b"POST"), (b":scheme", scheme),
                                     (b":path", path), (b":authority", address.encode()),
                                     (b"te", b"trailers"),
                                     (b"content-type", b"application/grpc")]
            if path == MODEL_INFER:
                self._model_infer[address] = headers
        if remaining is not None:
            headers = [*headers, (_TIMEOUT, _encode_timeout(remaining))]
        return headers if metadata is None else headers + metadata

    def start(self, stream: Stream, message: bytes) -> None:
        """The first message of a ModelInfer is here: choose an instance and send it."""
        try:
            info = peek_request(message)
        except WireError as exc:
            refuse(stream, "INVALID_ARGUMENT", f"malformed ModelInferRequest: {exc}")
            return
        request = None  # most calls: no metadata the router acts on, no deadline
        if stream.illegal is not None or stream.policy_values is not None \
                or stream.timeout >= 0:
            request = self._request(stream, info, message)
            if request is None:
                return
        self.balancer.retry_budget.deposit()
        try:
            lease = self.balancer.try_acquire(
                info, message, None if request is None else request.target)
        except NoInstanceError as exc:
            refuse(stream, exc.code_name, str(exc))
            return
        if lease is not None:
            connection = self.pool.get(lease.instance.address)
            if connection is not None:
                self._send(Call(lease, self, stream, info, message, request), connection)
                return
        self._wait_then_send(request or Request.plain(stream, info, message), lease, None)

    def _request(self, stream: Stream, info: RequestInfo, message: bytes) -> Request | None:
        """The call as :func:`call_metadata` reads it; None when it was answered instead
        (its metadata refused, or its deadline too close)."""
        metadata = call_metadata(stream)
        if metadata is None:
            return None
        forward, target, priority, deadline, retry_on = metadata
        if retry_on is not None:
            refused = _retry_on_error(retry_on)
            if refused is not None:
                refuse(stream, "INVALID_ARGUMENT", refused)
                return None
        if deadline is not None:
            late = too_late(deadline - time.monotonic(), self.floor_s)
            if late is not None:
                refuse(stream, "DEADLINE_EXCEEDED", late)
                return None
        return Request(stream, info, message, target, priority, forward, deadline,
                       retry_on is not None)

    def retry(self, request: Request, failed: Instance, details: str, code_name: str) -> None:
        """Send ``request``, whose try on ``failed`` ended as ``details`` say (it provably
        never reached Triton, or the client marked it safe to run twice), to another
        instance within ``retries.*`` and its deadline (never a sequence's); else answer
        ``code_name`` with ``details`` and why it was not retried."""
        if self._may_retry(request, details, code_name):
            self._wait_then_send(request, None, failed)

    def _may_retry(self, request: Request, details: str, code_name: str) -> bool:
        request.attempt += 1
        refused = "per_request" if request.info.sequence_id is not None \
            else self.balancer.retry_budget.withdraw(request.attempt, request.remaining())
        if refused is not None:
            refuse(request.stream, code_name,
                    f"{details} (not retried: {_NOT_RETRIED[refused]})")
            return False
        late = too_late(request.remaining(), self.floor_s)
        if late is not None:  # what is left is below the floor: the retry is not sent
            refuse(request.stream, "DEADLINE_EXCEEDED", late)
            return False
        return True

    def _wait_then_send(self, request: Request, lease: Lease | None,
                        avoid: Instance | None) -> None:
        task = asyncio.ensure_future(self._wait(request, lease, avoid))
        if lease is not None:  # a task cancelled before its first step runs no finally
            task.add_done_callback(functools.partial(abandon_if_cancelled, lease))
        request.stream.handler = Waiting(task)

    async def _wait(self, request: Request, lease: Lease | None,
                    avoid: Instance | None) -> None:
        """The slow way: wait in the variant's queue, then for a connection if need be. A
        connection that cannot be made sends the request to another instance (it provably
        never left), within ``retries.*`` as on the grpc.aio path; a sequence is not moved."""
        stream = request.stream
        try:
            while True:
                if lease is None:
                    try:
                        lease = await self.balancer.acquire(
                            request.info, request.message, request.target,
                            request.remaining(), avoid, request.priority)
                    except NoInstanceError as exc:
                        refuse(stream, exc.code_name, str(exc))
                        return
                instance = lease.instance
                try:
                    await self.pool.connect(instance.address,
                                            instance.variant.config.upstream_tls)
                    break
                except OSError as exc:
                    lease.outliers.connect_failure(instance)
                    lease.code = "UNAVAILABLE"
                    lease.release(False)
                    lease = None
                    if not self._may_retry(request, f"upstream instance {instance.address}: "
                                           f"cannot connect: {exc.strerror or exc}",
                                           "UNAVAILABLE"):
                        return
                    avoid = instance
        except asyncio.CancelledError:  # the client went while it waited
            if lease is not None:
                lease.abandon("CANCELLED")
            return
        except Exception as exc:  # a bug, not the client's doing: answer, hold nothing
            log.exception("native data path: waiting for an instance")
            if lease is not None:
                lease.abandon("INTERNAL")
            refuse(stream, "INTERNAL", f"the router failed to send the request: {exc!r}")
            return
        if stream.closed:
            lease.abandon("CANCELLED")
            return
        stream.handler = None
        self._send(Call(lease, self, stream, request.info, request.message, request),
                   self.pool.get(lease.instance.address))

    def _send(self, call: Call, connection: H2Connection | None) -> None:
        """Send ``call`` on ``connection`` (None: it closed meanwhile) to the instance its
        lease holds."""
        stream = call.client
        lease = call.lease
        request = call.request
        instance = lease.instance
        remaining = None
        if request is not None and request.deadline is not None:
            remaining = request.deadline - time.monotonic()
            late = too_late(remaining, self.floor_s)
            if late is not None:  # its deadline went by in the queue
                lease.abandon()
                refuse(stream, "DEADLINE_EXCEEDED", late)
                return
        config = instance.variant.config
        per_try_s = config.per_try_timeout_s
        timeout, per_try_bound = (None, False) if remaining is None and per_try_s is None \
            else attempt_timeout(remaining, per_try_s)
        address = instance.address
        # Triton gets the client's budget (none when the variant absorbs cancellations: its
        # expiry inside Triton is a cancellation too); a per-try timeout is the router's to
        # enforce, so that Triton's own expiry of the same instant does not answer in its
        # place.
        budget = None if remaining is None or config.absorbs else remaining
        forward = stream.metadata if request is None else request.forward
        headers = self._model_infer.get(address) \
            if budget is None and forward is None else None
        if headers is None:
            headers = self.request_headers(instance, MODEL_INFER, budget, forward)
        # A request sent again: its first message left the client's stream with the first try.
        first = None if request is None or not request.sent else \
            b"\0" + len(request.message).to_bytes(4, "big") + request.message
        lease.sent = time.perf_counter()  # Lease.sending, inlined: this runs once per call
        try:
            if connection is None:
                raise OSError("the upstream connection closed")
            call.upstream = connection.open_stream(headers, stream, call, first)
            if request is not None:
                request.sent = True
        except Exception as exc:
            lease.code = "UNAVAILABLE"
            lease.release(False)
            refuse(stream, "UNAVAILABLE", f"upstream instance {address}: {exc}")
            return
        if timeout is not None:  # one timer, only for calls with a deadline
            call.timer = asyncio.get_running_loop().call_later(
                timeout, call.per_try_expired if per_try_bound else call.deadline_expired)
