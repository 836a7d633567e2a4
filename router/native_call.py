"""One native ``ModelInfer`` sent upstream, and how each of its endings releases its lease
once (docs/native.md, "What serves what"): Triton's trailers, an early close of either
stream of the pair, the per-try or deadline timer, and a wait the client gives up; and
an upstream call whose client left, absorbed (left to Triton to finish).
:class:`tritonmesh.native_infer.NativeInfer` makes them; a retry goes back to it.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Final

import grpc

if TYPE_CHECKING:
    from tritonmesh._core._h2 import Stream
    from tritonmesh.lease import Lease
    from tritonmesh.native_infer import NativeInfer
    from tritonmesh.wire import RequestInfo

__all__ = ["AbsorbedCall", "Call", "Request", "Waiting", "abandon_if_cancelled", "absorb",
           "charged", "code_name",
           "grpc_message", "refuse", "why_closed"]

_CANCEL: Final = 8  # HTTP/2 CANCEL
_REFUSED_STREAM: Final = 7
# Upstream resets that say the request was refused or malformed, not that the instance
# failed (HTTP/2 PROTOCOL_ERROR, REFUSED_STREAM, ENHANCE_YOUR_CALM): not charged to it.
_NOT_THE_INSTANCES: Final = frozenset((1, 7, 11))
_CODE_NAMES: Final[dict[bytes, str]] = {
    str(code.value[0]).encode(): code.name for code in grpc.StatusCode}
_CODES: Final = {code.name: code.value[0] for code in grpc.StatusCode}
# gRPC's HTTP-to-status mapping (doc/http-grpc-status-mapping.md) for answers without
# grpc-status (others UNKNOWN); a 200 without one broke the protocol (INTERNAL).
_HTTP_CODES: Final = {b"400": "INTERNAL", b"401": "UNAUTHENTICATED", b"403": "PERMISSION_DENIED",
                      b"404": "UNIMPLEMENTED", b"429": "UNAVAILABLE", b"502": "UNAVAILABLE",
                      b"503": "UNAVAILABLE", b"504": "UNAVAILABLE"}


def grpc_message(text: str) -> bytes:
    """``text`` as a ``grpc-message`` value (percent-encoded UTF-8)."""
    raw = text.encode()
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return raw
    return b"".join(bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b
                    for b in raw)


def refuse(stream: Stream, code_name: str, text: str) -> None:
    """End ``stream``'s call with the status ``code_name`` and ``text``."""
    stream.finish(_CODES[code_name], grpc_message(text))


def code_name(grpc_status: bytes, http_status: bytes) -> str:
    """What a gRPC client makes of an upstream's answer: its ``grpc-status``; without one,
    its HTTP status (an HTTP proxy's 503 in front of Triton is UNAVAILABLE)."""
    if grpc_status:
        return _CODE_NAMES.get(grpc_status, "UNKNOWN")
    return _HTTP_CODES.get(http_status, "INTERNAL" if http_status == b"200" else "UNKNOWN")


def charged(stream: Stream, error_code: int) -> bool:
    """Whether an upstream stream's close before its answer is its instance's failure."""
    return stream.connection.lost or error_code not in _NOT_THE_INSTANCES


def why_closed(stream: Stream, error_code: int) -> str:
    """Why an upstream stream closed before its answer, in an answer's words."""
    return "the connection was lost" if stream.connection.lost \
        else f"it reset the stream (HTTP/2 error code {error_code})"


class Request:
    """A ModelInfer as the peek found it: what each attempt sends. The first message stays
    held so that a request that provably never reached Triton can go to another instance."""

    __slots__ = ("attempt", "deadline", "forward", "info", "message", "priority",
                 "retry_on_timeout", "sent", "stream", "target")

    def __init__(self, stream: Stream, info: RequestInfo, message: bytes, target: str | None,
                 priority: int, forward: list[tuple[bytes, bytes]] | None,
                 deadline: float | None, retry_on_timeout: bool):
        self.stream = stream
        self.info = info
        self.message = message
        self.target = target
        self.priority = priority
        self.forward = forward
        self.deadline = deadline
        self.retry_on_timeout = retry_on_timeout  # x-tritonmesh-retry-on: timeout
        self.attempt = 0  # retries so far
        self.sent = False  # its first message left the client's stream (to an upstream's)

    @classmethod
    def plain(cls, stream: Stream, info: RequestInfo, message: bytes) -> Request:
        """A call with no metadata the router acts on and no deadline."""
        return cls(stream, info, message, None, 0, stream.metadata, None, False)

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


class Call:
    """One ModelInfer sent upstream: what ends it releases its lease, once.

    A call whose client left (it cancelled, or its deadline passed) is answered at once,
    and its upstream stream absorbed (:func:`absorb`) where its variant says so. A plain
    call's first try (``request`` None: no metadata the router acts on, no deadline) makes
    its :class:`Request` only if a retry needs one, one object per call fewer.
    """

    __slots__ = ("client", "infer", "info", "lease", "message", "request", "timer", "upstream")

    def __init__(self, lease: Lease, infer: NativeInfer, client: Stream, info: RequestInfo,
                 message: bytes, request: Request | None):
        self.lease = lease
        self.infer = infer
        self.client = client
        self.info = info
        self.message = message
        self.request = request
        self.upstream: Stream | None = None
        self.timer: asyncio.TimerHandle | None = None

    def attempt(self) -> Request:
        """What this call's next try sends (its first message left with this one)."""
        request = self.request
        if request is None:
            request = self.request = Request.plain(self.client, self.info, self.message)
            request.sent = True
        return request

    def trailers(self, code: bytes, http_status: bytes) -> None:
        """Triton answered (its trailers are on their way to the client): ``grpc-status``
        and the ``:status`` before it, as the engine read them."""
        lease = self.lease
        # _done, less the upstream stream's handler: the engine let go of it first.
        self.client.handler = None
        if self.timer is not None:
            self.timer.cancel()
        if code == b"0":
            lease.outliers.success(lease.instance)
            lease.release(True)
            return
        lease.code = failed = code_name(code, http_status)
        lease.outliers.failure(lease.instance, failed)
        lease.release(False)

    def closed(self, stream: Stream, error_code: int) -> None:
        """One side of the pair closed before Triton's trailers came."""
        lease = self.lease
        if not lease.held:
            return
        if stream is self.client:  # the client cancelled, or its connection was lost
            lease.code = "CANCELLED"
            if self._absorb():
                return
            self._done()
            if self.upstream is not None:
                self.upstream.reset(_CANCEL)
            lease.release(False)
            return
        self._done()
        instance = lease.instance
        retired = stream.connection.retired
        if retired is not None:  # the router closed it: the instance left the fleet
            lease.release(False)
            refuse(self.client, "CANCELLED", retired)
            return
        lease.code = "UNAVAILABLE"
        lost = stream.connection.lost
        if charged(stream, error_code):
            lease.outliers.failure(instance, "UNAVAILABLE")
        lease.release(False)
        details = f"upstream instance {instance.address}: {why_closed(stream, error_code)}"
        # Provably never reached Triton: refused (REFUSED_STREAM, also what nghttp2 reports
        # for streams past an upstream's GOAWAY), or lost before its HEADERS left. It goes
        # elsewhere if the client sent nothing beyond the first message (held, it can be
        # sent again whole), as on the grpc.aio path.
        if (error_code == _REFUSED_STREAM or (lost and not stream.headers_sent)) \
                and not self.client.sent_more:
            self.infer.retry(self.attempt(), instance, details, "UNAVAILABLE")
            return
        refuse(self.client, "UNAVAILABLE", details)

    def per_try_expired(self) -> None:
        """The variant's ``per_try_timeout_s`` passed: charged to the instance, and sent
        again elsewhere when the client marked it safe (as on the grpc.aio path)."""
        lease = self.lease
        if not lease.held:
            return
        instance = lease.instance
        request = self.request  # a plain call (None) is not marked safe to send again
        details = (f"upstream instance {instance.address} did not answer within "
                   f"per_try_timeout_s ({instance.variant.config.per_try_timeout_s:g} s)")
        if request is None or not request.retry_on_timeout \
                or request.info.sequence_id is not None:
            self._expired("PER_TRY_TIMEOUT", details)
            return
        self._give_up("PER_TRY_TIMEOUT")
        client = self.client
        client.unpair()  # the reset upstream stream must not reset the client's with it
        # This path forwards an answer as it comes (grpc.aio's holds it whole), and holds
        # only the first message: past either, the request cannot go again whole.
        if client.responded or client.sent_more:
            why = "its answer had begun" if client.responded \
                else "the client sent more than one message"
            refuse(client, "DEADLINE_EXCEEDED", f"{details} (not retried: {why})")
            return
        self.infer.retry(request, instance, details, "DEADLINE_EXCEEDED")

    def deadline_expired(self) -> None:
        """The client's ``grpc-timeout`` passed: the router answers it, whether or not the
        client resets its stream or Triton answers (grpc.aio's charge and words)."""
        self._expired("DEADLINE_EXCEEDED", "Deadline Exceeded")

    def _expired(self, charge: str, text: str) -> None:
        if not self.lease.held:
            return
        self._give_up(charge)
        refuse(self.client, "DEADLINE_EXCEEDED", text)

    def _give_up(self, charge: str) -> None:
        """Its timer fired: the instance is charged ``charge``, and the upstream stream
        absorbed, or else reset (Triton sees the cancellation) and the lease released."""
        lease = self.lease
        self.timer = None
        lease.code = "DEADLINE_EXCEEDED"
        lease.outliers.failure(lease.instance, charge)
        if self._absorb():
            return
        self._done()
        if self.upstream is not None:
            self.upstream.reset(_CANCEL)
        lease.release(False)

    def _absorb(self) -> bool:
        """Hand the upstream stream, its client gone, to :func:`absorb`; False: it is to be
        reset."""
        if self.upstream is None or not absorb(self.upstream, self.lease):
            return False
        client = self.client
        client.handler = None
        client.unpair()  # Triton's answer goes nowhere; the client's end does not reset it
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        return True

    def _done(self) -> None:
        self.client.handler = None
        if self.upstream is not None:
            self.upstream.handler = None
        if self.timer is not None:
            self.timer.cancel()


def absorb(stream: Stream, lease: Lease) -> bool:
    """Leave Triton the call on ``stream`` (an upstream ``ModelInfer``) whose client left,
    if its variant absorbs cancellations (``upstream_cancellation: absorb``: Triton's gRPC
    frontend can crash on a cancellation that races the request's completion) and the
    whole request went upstream (Triton cannot be completing one it has not all of, so a
    reset races nothing, and the bytes the router holds go); False: it is to be reset."""
    if stream.closed or not lease.instance.variant.config.absorbs or not stream.request_sent:
        return False
    AbsorbedCall(stream, lease)
    return True


class AbsorbedCall:
    """An upstream ``ModelInfer`` left to Triton (:func:`absorb`), its stream's handler:
    its answer is dropped, its lease held until Triton ends the call (Triton is still
    working on it), at most ``absorb_timeout_s``, when it is reset after all."""

    __slots__ = ("lease", "stream", "timer")

    def __init__(self, stream: Stream, lease: Lease):
        self.stream = stream
        self.lease = lease
        stream.handler = self
        lease.instance.absorbed += 1
        self.timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            lease.instance.variant.config.absorb_timeout_s, self.expired)

    def expired(self) -> None:
        """Triton kept it ``absorb_timeout_s``: reset it after all."""
        self.timer = None
        self.stream.reset(_CANCEL)
        self._over()

    # A paired stream (a client's ModelInfer) was unpaired first: only its close comes.
    def closed(self, stream: Stream, error_code: int) -> None:
        self._over()

    # A message-mode stream (a stream's request sent as ModelInfer):
    def message(self, stream: Stream, compressed: int, response: bytes) -> None:
        return None  # its client left: nobody reads it

    def oversize(self, stream: Stream, length: int) -> None:
        self.expired()

    def ended(self, stream: Stream) -> None:
        self._over()

    def drained(self, stream: Stream) -> None:
        return None

    def _over(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.stream.handler = None
        self.lease.release(False)


def abandon_if_cancelled(lease: Lease, task: asyncio.Task[None]) -> None:
    if task.cancelled():
        lease.abandon("CANCELLED")


class Waiting:
    """A call waiting (late binding's queue, or a connection being made): a client that
    goes cancels the wait, and the task gives back whatever it holds."""

    __slots__ = ("task",)

    def __init__(self, task: asyncio.Task[None]):
        self.task = task

    def closed(self, stream: Stream, error_code: int) -> None:
        self.task.cancel()

    def trailers(self, code: bytes, http_status: bytes) -> None:
        pass
