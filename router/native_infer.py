"""``ModelInfer`` on the native data path: the policy around the engine in ``_core._h2``.

Per call, Python runs three times: when the first message is whole (peek, acquire, open the
upstream stream paired with the client's), when Triton's trailers come (judge, release), and
only if the call breaks, when a stream of the pair closes early (reset, connection lost).
Everything between (request DATA up, response HEADERS and DATA down) stays in C.

What the grpc.aio path does that this slice does not (such calls are relayed to it, see
:meth:`tritonmesh.native_front.NativePort.request`): retries after a per-try timeout
(``x-tritonmesh-retry-on``), shadow copies, tokens.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from typing import TYPE_CHECKING, Final

import grpc
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
from tritonmesh.proxy import _NOT_RETRIED
from tritonmesh.wire import RequestInfo, WireError, peek_request

if TYPE_CHECKING:
    from tritonmesh._core._h2 import Stream
    from tritonmesh.instance import Instance
    from tritonmesh.lease import Lease
    from tritonmesh.native_pool import UpstreamPool

__all__ = ["MODEL_INFER", "NativeInfer", "call_metadata", "grpc_message", "parse_timeout"]

log = logging.getLogger("tritonmesh.native")

MODEL_INFER: Final = b"/inference.GRPCInferenceService/ModelInfer"
_CANCEL: Final = 8  # HTTP/2 CANCEL
_REFUSED_STREAM: Final = 7
# Upstream resets that say the request was refused or malformed, not that the instance
# failed (HTTP/2 PROTOCOL_ERROR, REFUSED_STREAM, ENHANCE_YOUR_CALM): not charged to it.
_NOT_THE_INSTANCES: Final = frozenset((1, 7, 11))
_CODE_NAMES: Final = {str(code.value[0]).encode(): code.name for code in grpc.StatusCode}
_CODES: Final = {code.name: code.value[0] for code in grpc.StatusCode}
# gRPC's HTTP-to-status mapping (doc/http-grpc-status-mapping.md) for answers without
# grpc-status (others UNKNOWN); a 200 without one broke the protocol (INTERNAL).
_HTTP_CODES: Final = {b"400": "INTERNAL", b"401": "UNAUTHENTICATED", b"403": "PERMISSION_DENIED",
                      b"404": "UNIMPLEMENTED", b"429": "UNAVAILABLE", b"502": "UNAVAILABLE",
                      b"503": "UNAVAILABLE", b"504": "UNAVAILABLE"}
_UNITS: Final = {ord("H"): 3600.0, ord("M"): 60.0, ord("S"): 1.0, ord("m"): 1e-3,
                 ord("u"): 1e-6, ord("n"): 1e-9}
_DROPPED: Final = frozenset(k.encode() for k in _HOP_BY_HOP)
_TARGET: Final = TARGET_VARIANT_KEY.encode()
_PRIORITY: Final = PRIORITY_KEY.encode()
_RETRY_ON: Final = RETRY_ON_KEY.encode()
_TIMEOUT: Final = b"grpc-timeout"
# What grpc-core takes as metadata (its legal header key / non-binary value).
_LEGAL_KEY: Final = re.compile(rb"[0-9a-z_.\-]+")
_LEGAL_VALUE: Final = re.compile(rb"[\x20-\x7e]*")


def parse_timeout(value: bytes) -> float | None:
    """A ``grpc-timeout`` value in seconds; None when malformed."""
    if not 2 <= len(value) <= 9 or not value[:-1].isdigit() or value[-1] not in _UNITS:
        return None
    return int(value[:-1]) * _UNITS[value[-1]]


def _encode_timeout(seconds: float) -> bytes:
    micros = max(1, int(seconds * 1e6))
    if micros < 100_000_000:
        return b"%du" % micros
    millis = micros // 1000
    if millis < 100_000_000:
        return b"%dm" % millis
    return b"%dS" % min(micros // 1_000_000, 99_999_999)


def grpc_message(text: str) -> bytes:
    """``text`` as a ``grpc-message`` value (percent-encoded UTF-8)."""
    raw = text.encode()
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return raw
    return b"".join(bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b
                    for b in raw)


def _refuse(stream: Stream, code_name: str, text: str) -> None:
    stream.finish(_CODES[code_name], grpc_message(text))


def call_metadata(stream: Stream) -> tuple[list[tuple[bytes, bytes]], str | None, int,
                                          float | None] | None:
    """A call's metadata to forward, ``x-target-variant``, priority and deadline (monotonic),
    from its HEADERS; None when the stream was answered instead (metadata a gRPC server
    refuses, or a malformed priority)."""
    forward: list[tuple[bytes, bytes]] = []
    target = priority_value = None
    deadline = None
    for name, value in stream.headers:
        if name == _TIMEOUT:
            timeout = parse_timeout(value)
            if timeout is not None:
                deadline = time.monotonic() + timeout
        elif name == _TARGET:
            target = value.decode(errors="replace")
        elif name == _PRIORITY:
            priority_value = value.decode(errors="replace")
        elif name[0] != 0x3A and name not in _DROPPED:  # 0x3A: ':' pseudo-headers
            # Checked as grpc.aio checks a client's metadata, so that Triton (and the
            # instance's standing) never sees what a gRPC server would refuse.
            if _LEGAL_KEY.fullmatch(name) is None:
                _refuse(stream, "INTERNAL", "Illegal header key: "
                        + name.decode(errors="backslashreplace"))
                return None
            if not name.endswith(b"-bin") and _LEGAL_VALUE.fullmatch(value) is None:
                _refuse(stream, "INTERNAL", "Illegal header value for key " + name.decode())
                return None
            forward.append((name, value))
    priority = priority_of(priority_value)
    if isinstance(priority, str):
        _refuse(stream, "INVALID_ARGUMENT", priority)
        return None
    return forward, target, priority, deadline


class _Request:
    """A ModelInfer as the peek found it: what each attempt sends. The first message stays
    held so that a request that provably never reached Triton can go to another instance."""

    __slots__ = ("attempt", "deadline", "forward", "info", "message", "priority", "sent",
                 "stream", "target")

    def __init__(self, stream: Stream, info: RequestInfo, message: bytes, target: str | None,
                 priority: int, forward: list[tuple[bytes, bytes]], deadline: float | None):
        self.stream = stream
        self.info = info
        self.message = message
        self.target = target
        self.priority = priority
        self.forward = forward
        self.deadline = deadline
        self.attempt = 0  # retries so far
        self.sent = False  # its first message left the client's stream (to an upstream's)

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


class _Call:
    """One ModelInfer sent upstream: what ends it releases its lease, once."""

    __slots__ = ("client", "infer", "lease", "request", "timer", "upstream")

    def __init__(self, lease: Lease, request: _Request, infer: NativeInfer):
        self.lease = lease
        self.request = request
        self.infer = infer
        self.client = request.stream
        self.upstream: Stream | None = None
        self.timer: asyncio.TimerHandle | None = None

    def trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Triton answered (its trailers are on their way to the client)."""
        code = status = b""
        for name, value in headers:
            if name == b"grpc-status":
                code = value
                break
            if name == b":status":
                status = value
        lease = self.lease
        self._done()
        if code == b"0":
            lease.succeeded()
            lease.release(True)
            return
        # No grpc-status: what a gRPC client makes of the HTTP status (an HTTP proxy's 503
        # in front of Triton is UNAVAILABLE, and the instance's failure).
        if code:
            code_name = _CODE_NAMES.get(code, "UNKNOWN")
        else:
            code_name = _HTTP_CODES.get(status, "INTERNAL" if status == b"200" else "UNKNOWN")
        lease.code = code_name
        lease.outliers.failure(lease.instance, code_name)
        lease.release(False)

    def closed(self, stream: Stream, error_code: int) -> None:
        """One side of the pair closed before Triton's trailers came."""
        lease = self.lease
        if not lease.held:
            return
        self._done()
        if stream is self.client:  # the client cancelled, or its connection was lost
            if self.upstream is not None:
                self.upstream.reset(_CANCEL)
            lease.code = "CANCELLED"
            lease.release(False)
            return
        instance = lease.instance
        retired = stream.connection.retired
        if retired is not None:  # the router closed it: the instance left the fleet
            lease.release(False)
            _refuse(self.client, "CANCELLED", retired)
            return
        lease.code = "UNAVAILABLE"
        lost = stream.connection.lost
        if lost or error_code not in _NOT_THE_INSTANCES:
            lease.outliers.failure(instance, "UNAVAILABLE")
        lease.release(False)
        why = "the connection was lost" if lost \
            else f"it reset the stream (HTTP/2 error code {error_code})"
        details = f"upstream instance {instance.address}: {why}"
        # Provably never reached Triton: refused (REFUSED_STREAM, also what nghttp2 reports
        # for streams past an upstream's GOAWAY), or lost before its HEADERS left. It goes
        # elsewhere if the client sent nothing beyond the first message (held, it can be
        # sent again whole), as on the grpc.aio path.
        if (error_code == _REFUSED_STREAM or (lost and not stream.headers_sent)) \
                and not self.client.sent_more:
            self.infer.retry(self.request, instance, details)
            return
        _refuse(self.client, "UNAVAILABLE", details)

    def per_try_expired(self) -> None:
        per_try = self.lease.instance.variant.config.per_try_timeout_s
        self._expired("PER_TRY_TIMEOUT", f"upstream instance {self.lease.instance.address} "
                      f"did not answer within per_try_timeout_s ({per_try:g} s)")

    def deadline_expired(self) -> None:
        """The client's ``grpc-timeout`` passed: the router answers it, whether or not the
        client resets its stream or Triton answers (grpc.aio's charge and words)."""
        self._expired("DEADLINE_EXCEEDED", "Deadline Exceeded")

    def _expired(self, charge: str, text: str) -> None:
        lease = self.lease
        if not lease.held:
            return
        self.timer = None
        self._done()
        if self.upstream is not None:
            self.upstream.reset(_CANCEL)
        lease.code = "DEADLINE_EXCEEDED"
        lease.outliers.failure(lease.instance, charge)
        lease.release(False)
        _refuse(self.client, "DEADLINE_EXCEEDED", text)

    def _done(self) -> None:
        self.client.handler = None
        if self.upstream is not None:
            self.upstream.handler = None
        if self.timer is not None:
            self.timer.cancel()


def _abandon_if_cancelled(lease: Lease, task: asyncio.Task[None]) -> None:
    if task.cancelled():
        lease.abandon("CANCELLED")


class _Waiting:
    """A call waiting (late binding's queue, or a connection being made): a client that
    goes cancels the wait, and the task gives back whatever it holds."""

    __slots__ = ("task",)

    def __init__(self, task: asyncio.Task[None]):
        self.task = task

    def closed(self, stream: Stream, error_code: int) -> None:
        self.task.cancel()

    def trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        pass


class NativeInfer:
    """The ModelInfer policy of the native path over a :class:`Balancer`."""

    def __init__(self, balancer: Balancer, pool: UpstreamPool, floor_s: float):
        self.balancer = balancer
        self.pool = pool
        self.floor_s = floor_s
        # Per address: its :scheme and :authority fields (https for upstream_tls).
        self._origin: dict[str, tuple[tuple[bytes, bytes], tuple[bytes, bytes]]] = {}

    def request_headers(self, instance: Instance, path: bytes, remaining: float | None,
                        forward: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The HEADERS of a call to ``instance`` at ``path`` (``grpc-timeout``: ``remaining``
        seconds), with the client's metadata ``forward``."""
        address = instance.address
        origin = self._origin.get(address)
        if origin is None:
            scheme = b"http" if instance.variant.config.upstream_tls is None else b"https"
            origin = self._origin[address] = ((b":scheme", scheme),
                                              (b":authority", address.encode()))
        headers = [(b":method", b"POST"), origin[0], (b":path", path), origin[1],
                   (b"te", b"trailers"), (b"content-type", b"application/grpc")]
        if remaining is not None:
            headers.append((_TIMEOUT, _encode_timeout(remaining)))
        return headers + forward

    def wants(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """Whether this path serves a call with these headers (else it is relayed)."""
        for name, value in headers:
            if name == _RETRY_ON or (name == _TIMEOUT and parse_timeout(value) is None):
                return False
        return True

    def start(self, stream: Stream, message: bytes) -> None:
        """The first message of a ModelInfer is here: choose an instance and send it."""
        try:
            info = peek_request(message)
        except WireError as exc:
            _refuse(stream, "INVALID_ARGUMENT", f"malformed ModelInferRequest: {exc}")
            return
        metadata = call_metadata(stream)
        if metadata is None:
            return
        forward, target, priority, deadline = metadata
        remaining = None if deadline is None else deadline - time.monotonic()
        late = too_late(remaining, self.floor_s)
        if late is not None:
            _refuse(stream, "DEADLINE_EXCEEDED", late)
            return
        self.balancer.retry_budget.deposit()
        request = _Request(stream, info, message, target, priority, forward, deadline)
        try:
            lease = self.balancer.try_acquire(info, message, target)
        except NoInstanceError as exc:
            _refuse(stream, exc.code_name, str(exc))
            return
        if lease is None or self.pool.get(lease.instance.address) is None:
            self._wait_then_send(request, lease, None)
            return
        self._send(request, lease)

    def retry(self, request: _Request, failed: Instance, details: str) -> None:
        """Send ``request``, which provably never reached ``failed``, to another instance
        within ``retries.*`` and its deadline (never a sequence's); else answer UNAVAILABLE
        with ``details`` and why it was not retried."""
        if self._may_retry(request, details):
            self._wait_then_send(request, None, failed)

    def _may_retry(self, request: _Request, details: str) -> bool:
        request.attempt += 1
        refused = "per_request" if request.info.sequence_id is not None \
            else self.balancer.retry_budget.withdraw(request.attempt, request.remaining())
        if refused is None:
            return True
        _refuse(request.stream, "UNAVAILABLE", f"{details} (not retried: {_NOT_RETRIED[refused]})")
        return False

    def _wait_then_send(self, request: _Request, lease: Lease | None,
                        avoid: Instance | None) -> None:
        task = asyncio.ensure_future(self._wait(request, lease, avoid))
        if lease is not None:  # a task cancelled before its first step runs no finally
            task.add_done_callback(functools.partial(_abandon_if_cancelled, lease))
        request.stream.handler = _Waiting(task)

    async def _wait(self, request: _Request, lease: Lease | None,
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
                        _refuse(stream, exc.code_name, str(exc))
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
                                           f"cannot connect: {exc.strerror or exc}"):
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
            _refuse(stream, "INTERNAL", f"the router failed to send the request: {exc!r}")
            return
        if stream.closed:
            lease.abandon("CANCELLED")
            return
        stream.handler = None
        self._send(request, lease)

    def _send(self, request: _Request, lease: Lease) -> None:
        stream = request.stream
        instance = lease.instance
        remaining = None
        if request.deadline is not None:
            remaining = request.deadline - time.monotonic()
            late = too_late(remaining, self.floor_s)
            if late is not None:  # its deadline went by in the queue
                lease.abandon()
                _refuse(stream, "DEADLINE_EXCEEDED", late)
                return
        timeout, per_try_bound = attempt_timeout(remaining,
                                                 instance.variant.config.per_try_timeout_s)
        address = instance.address
        # Triton gets the client's budget; a per-try timeout is the router's to enforce (its
        # timer resets the stream), so that Triton's own expiry of the same instant does
        # not answer in its place.
        headers = self.request_headers(instance, MODEL_INFER, remaining, request.forward)
        connection = self.pool.get(address)
        call = _Call(lease, request, self)
        # A request sent again: its first message left the client's stream with the first try.
        first = None if not request.sent else \
            b"\0" + len(request.message).to_bytes(4, "big") + request.message
        lease.sending()
        try:
            if connection is None:
                raise OSError("the upstream connection closed")
            call.upstream = connection.open_stream(headers, stream, call, first)
            request.sent = True
        except Exception as exc:
            lease.code = "UNAVAILABLE"
            lease.release(False)
            _refuse(stream, "UNAVAILABLE", f"upstream instance {address}: {exc}")
            return
        if timeout is not None:  # one timer, only for calls with a deadline
            call.timer = asyncio.get_running_loop().call_later(
                timeout, call.per_try_expired if per_try_bound else call.deadline_expired)
