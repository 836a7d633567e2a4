"""The upstream calls of a native ``ModelStreamInfer`` session (:mod:`tritonmesh.native_stream`):
an instance's ``ModelStreamInfer`` and a ``ModelInfer`` sent for a non-decoupled model, each
the message handler of its upstream stream, telling the session how it went."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote

from tritonmesh.forwarding import attempt_timeout, per_try_expired
from tritonmesh.native_call import absorb, charged, code_name, why_closed
from tritonmesh.native_infer import MODEL_INFER
from tritonmesh.stream_upstream import Pending, PendingRequests
from tritonmesh.wire import error_stream_response, stream_response_from_unary

if TYPE_CHECKING:
    from tritonmesh._core._h2 import H2Connection, Stream
    from tritonmesh.instance import Instance
    from tritonmesh.native_stream import Session

__all__ = ["StreamCall", "UnaryCall"]

_CANCEL: Final = 8  # HTTP/2


def _status(headers: list[tuple[bytes, bytes]]) -> tuple[str, str]:
    """An upstream's answer as a gRPC client reads it: the status's name and message."""
    code = status = message = b""
    for name, value in headers:
        if name == b"grpc-status":
            code = value
        elif name == b"grpc-message":
            message = value
        elif name == b":status":
            status = value
    if not code:
        message = message or b"upstream ended the stream without trailers"
    status_name = code_name(code, status)
    return status_name, unquote(message.decode(errors="replace")) or status_name


class StreamCall(PendingRequests):
    """One upstream ``ModelStreamInfer`` of a session (its stream's message handler)."""

    __slots__ = ("session", "stream")

    stream: Stream

    def __init__(self, session: Session, instance: Instance):
        super().__init__(instance)
        self.session = session

    def message(self, stream: Stream, compressed: int, response: bytes) -> None:
        self.session.on_response(self, response)

    def oversize(self, stream: Stream, length: int) -> None:
        self.session.upstream_over(self, "RESOURCE_EXHAUSTED", f"failed: [RESOURCE_EXHAUSTED] "
                                   f"response larger than max ({length} vs. "
                                   f"{self.session.policy.max_message_bytes})")

    def ended(self, stream: Stream) -> None:
        """Triton's trailers: a stream it ended before every final response came."""
        code_name, details = _status(stream.headers)
        failure = "closed the stream before the final response"
        if code_name != "OK":
            self.session.balancer.outliers.failure(self.instance, code_name)
            failure = f"failed: [{code_name}] {details}"
        self.session.upstream_over(self, code_name if code_name != "OK" else "UNAVAILABLE",
                                   failure)

    def closed(self, stream: Stream, error_code: int) -> None:
        """Reset by Triton, or its connection was lost (or retired by the router)."""
        retired = stream.connection.retired
        if retired is not None:
            self.session.upstream_over(self, "CANCELLED", f"failed: [CANCELLED] {retired}")
            return
        if charged(stream, error_code):
            self.session.balancer.outliers.failure(self.instance, "UNAVAILABLE")
        self.session.upstream_over(self, "UNAVAILABLE",
                                   f"failed: [UNAVAILABLE] {why_closed(stream, error_code)}")

    def drained(self, stream: Stream) -> None:
        return None


class UnaryCall:
    """A stream's request for a non-decoupled model, sent as a native ``ModelInfer`` (its
    stream's message handler)."""

    __slots__ = ("pending", "per_try_bound", "response", "session", "stream", "timer")

    stream: Stream

    def __init__(self, session: Session, pending: Pending):
        self.session = session
        self.pending = pending
        self.per_try_bound = False
        self.response: bytes | None = None
        self.timer: asyncio.TimerHandle | None = None

    def send(self, connection: H2Connection, request: bytes) -> None:
        """Open the call on ``connection`` (it is then one of the session's) and send
        ``request``, with the router's own timer when the call has a deadline."""
        session = self.session
        instance = self.pending.lease.instance
        config = instance.variant.config
        timeout, self.per_try_bound = attempt_timeout(session.remaining(),
                                                      config.per_try_timeout_s)
        policy = session.policy
        # Absorbing, Triton is sent no deadline (its expiry there is a cancellation too):
        # the router's timer below answers the client.
        self.stream = connection.open_message_stream(
            policy.infer.request_headers(instance, MODEL_INFER,
                                         None if config.absorbs else timeout, session.forward),
            self, policy.max_message_bytes, session.client)
        session.unary.add(self)
        self.stream.send_message(request)
        self.stream.end_messages()
        if timeout is not None:  # a hung Triton answers nothing
            self.timer = asyncio.get_running_loop().call_later(timeout, self.expired)

    def over(self, code_name: str, details: str, release: bool = True) -> None:
        """Answered (``code_name``), or broken (not ``release``: its time was up, and the
        call releases its lease as it leaves): the client gets the answer in-stream."""
        session = self.session
        session.unary.discard(self)
        self.stream.handler = None
        if self.timer is not None:
            self.timer.cancel()
        lease = self.pending.lease
        instance = lease.instance
        response = self.response
        if code_name == "OK" and response is None:
            code_name, details = "INTERNAL", "upstream answered with no response message"
        if code_name == "OK" and response is not None:
            lease.responded()
            lease.succeeded()
            lease.release(True)
            out = stream_response_from_unary(response)
        else:
            lease.code = code_name
            if self.per_try_bound and code_name == "DEADLINE_EXCEEDED":
                details = per_try_expired(lease.outliers, instance)
            elif code_name != "CANCELLED":  # CANCELLED: the router retired the instance
                lease.outliers.failure(instance, code_name)
            if code_name == "UNIMPLEMENTED" and "decoupled" in details:
                # Reloaded behind the router's back as decoupled: ask again next time.
                session.balancer.decoupled.forget()
            if release:
                lease.release(False)
            # Triton's in-stream error for a non-decoupled request: message and id.
            out = error_stream_response(details, self.pending.id)
        session.answered(out)

    def expired(self) -> None:
        """Its attempt's time (the client's deadline, or ``per_try_timeout_s``) is up: the
        client is answered, the upstream call absorbed or reset."""
        self.timer = None
        self.over("DEADLINE_EXCEEDED", "Deadline Exceeded", release=False)
        self.leave()

    def leave(self) -> None:
        """Its client left (its lease's code says how): the upstream call is absorbed
        (:func:`tritonmesh.native_call.absorb`), or else reset and its lease released."""
        stream = self.stream
        lease = self.pending.lease
        if absorb(stream, lease):
            return
        stream.handler = None
        stream.reset(_CANCEL)
        lease.release(False)

    def message(self, stream: Stream, compressed: int, response: bytes) -> None:
        self.response = response

    def oversize(self, stream: Stream, length: int) -> None:
        stream.reset(_CANCEL)
        self.over("RESOURCE_EXHAUSTED", f"response larger than max "
                  f"({length} vs. {self.session.policy.max_message_bytes})")

    def ended(self, stream: Stream) -> None:
        self.over(*_status(stream.headers))

    def closed(self, stream: Stream, error_code: int) -> None:
        retired = stream.connection.retired
        address = self.pending.lease.instance.address
        if retired is not None:
            self.over("CANCELLED", retired)
            return
        self.over("UNAVAILABLE", f"upstream instance {address}: {why_closed(stream, error_code)}")

    def drained(self, stream: Stream) -> None:
        return None
