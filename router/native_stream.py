"""``ModelStreamInfer`` on the native data path: :mod:`tritonmesh.stream`'s policy over the
message-mode streams of ``_core._h2``.

The client's stream and one upstream ``ModelStreamInfer`` per instance it uses are message
streams: the engine cuts their DATA into whole gRPC messages and hands each to a callback
here (no coroutine per message). Each request is routed on its own, as on the grpc.aio path:
the wire peek, ``Balancer.try_acquire`` (late binding and the first ``ModelConfig`` ask for
its model wait in a task of their own), a :class:`~tritonmesh.stream_upstream.Pending` per
request settled by its final response (``triton_enable_empty_final_response`` injected),
requests for non-decoupled models sent as a native ``ModelInfer`` (see
:mod:`tritonmesh.decoupled`), one pick one release on every ending.

Memory per client stream: ``limits.max_stream_requests_in_flight`` requests in flight (at
the bound the client's messages are not taken, so its window closes), and responses the
client has not read up to about a stream window (``native.stream_window_bytes``): past it
the upstream streams' messages are not taken either until the client reads.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import TYPE_CHECKING, Final

from tritonmesh.balancer import NoInstanceError
from tritonmesh.forwarding import too_late
from tritonmesh.native_call import refuse
from tritonmesh.native_infer import call_metadata
from tritonmesh.native_stream_calls import StreamCall, UnaryCall
from tritonmesh.stream_upstream import Pending
from tritonmesh.wire import (
    RequestInfo,
    WireError,
    error_stream_response,
    inject_empty_final,
    peek_request,
    peek_stream_response,
)

if TYPE_CHECKING:
    from tritonmesh._core._h2 import Stream
    from tritonmesh.instance import Instance
    from tritonmesh.lease import Lease
    from tritonmesh.native_infer import NativeInfer

__all__ = ["MODEL_STREAM_INFER", "NativeStreams", "Session"]

log = logging.getLogger("tritonmesh.native")

MODEL_STREAM_INFER: Final = b"/inference.GRPCInferenceService/ModelStreamInfer"
_CANCEL: Final = 8  # HTTP/2
_NO_ERROR: Final = 0
_RESPONSE_HEADERS: Final = [(b":status", b"200"), (b"content-type", b"application/grpc")]


class NativeStreams:
    """The ``ModelStreamInfer`` policy of the native path: one session per client stream."""

    def __init__(self, infer: NativeInfer, limit: int, max_message_bytes: int,
                 window: int):
        self.infer = infer
        self.balancer = infer.balancer
        self.pool = infer.pool
        self.floor_s = infer.floor_s
        self.limit = limit  # limits.max_stream_requests_in_flight
        self.max_message_bytes = max_message_bytes
        self.window = window  # responses a client has not read, before upstreams wait

    def start(self, stream: Stream) -> None:
        """A client's ``ModelStreamInfer`` HEADERS are here: serve the stream."""
        metadata = call_metadata(stream)
        if metadata is not None:  # x-tritonmesh-retry-on is ModelInfer's (grpc.aio's too)
            forward, target, priority, deadline, _ = metadata
            Session(self, stream, forward, target, priority, deadline)


class _Waiter:
    """A request waiting in a task of its own, with the lease it holds until it is sent."""

    __slots__ = ("info", "lease", "request", "sent")

    def __init__(self, request: bytes, info: RequestInfo, lease: Lease | None):
        self.request = request
        self.info = info
        self.lease = lease
        self.sent = False


class Session:
    """One client ``ModelStreamInfer`` stream (the client stream's message handler)."""

    __slots__ = ("balancer", "blocked", "client", "deadline", "forward", "half_closed",
                 "in_flight", "over", "policy", "priority", "target", "timer", "unary",
                 "upstreams", "waiting")

    def __init__(self, policy: NativeStreams, client: Stream,
                 forward: list[tuple[bytes, bytes]] | None, target: str | None,
                 priority: int, deadline: float | None):
        self.policy = policy
        self.balancer = policy.balancer
        self.client = client
        self.forward = forward
        self.target = target
        self.priority = priority
        self.deadline = deadline
        self.upstreams: dict[Instance, StreamCall] = {}
        self.unary: set[UnaryCall] = set()
        self.waiting: set[asyncio.Task[None]] = set()
        self.in_flight = 0
        self.half_closed = False  # the client ended its requests
        self.over = False  # the client was answered, or is gone
        self.blocked = False  # the client is not reading: upstreams' messages wait
        self.timer: asyncio.TimerHandle | None = None
        if deadline is not None:
            self.timer = asyncio.get_running_loop().call_later(
                deadline - time.monotonic(), self._deadline_expired)
        client.read_messages(self, policy.max_message_bytes)

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    # -- the client's stream --

    def message(self, stream: Stream, compressed: int, request: bytes) -> None:
        if compressed:  # streams that declare an encoding are relayed to grpc.aio
            self._close("CANCELLED")
            refuse(stream, "INTERNAL", "a compressed message without grpc-encoding")
            return
        try:
            info = peek_request(request)
        except WireError as exc:
            # Triton answers a bad request inside a stream in-stream and keeps it open.
            self._write(error_stream_response(f"malformed ModelInferRequest: {exc}"))
            return
        late = too_late(self.remaining(), self.policy.floor_s)
        if late is not None:
            self._write(error_stream_response(late, info.id, info.model_name))
            return
        try:
            lease = self.balancer.try_acquire(info, request, self.target)
        except NoInstanceError as exc:
            self._write(error_stream_response(str(exc), info.id, info.model_name))
            return
        self.in_flight += 1
        if self.in_flight >= self.policy.limit:
            stream.pause_messages()
        on_stream = self._on_stream(info)
        if lease is None or on_stream is None \
                or self.policy.pool.get(lease.instance.address) is None:
            self._later(request, info, lease)
            return
        self._send(request, info, lease, on_stream)

    def oversize(self, stream: Stream, length: int) -> None:
        self._close("CANCELLED")
        refuse(stream, "RESOURCE_EXHAUSTED", f"SERVER: Received message larger than max "
                f"({length} vs. {self.policy.max_message_bytes})")  # grpc.aio's words

    def ended(self, stream: Stream) -> None:
        """The client half-closed: once no request still waits to be sent, so do the
        upstream streams; the client's trailers go once every one has ended."""
        self.half_closed = True
        self._end_upstreams()
        self._maybe_finish()

    def closed(self, stream: Stream, error_code: int) -> None:
        """The client reset its stream, or its connection was lost."""
        self._close("CANCELLED")

    def drained(self, stream: Stream) -> None:
        """The client read what waited: the upstreams' messages are taken again."""
        self.blocked = False
        for up in list(self.upstreams.values()):
            if self.blocked:
                return
            up.stream.resume_messages()
        if not self.blocked and self.in_flight < self.policy.limit:
            stream.resume_messages()

    # -- sending a request --

    def _on_stream(self, info: RequestInfo) -> bool | None:
        """Whether the request goes on the instance's stream (else as ModelInfer); None
        while its model's policy is unknown. Sequences stay on the stream: Triton keeps
        their order there, concurrent calls would not."""
        if info.sequence_id is not None:
            return True
        decoupled = self.balancer.decoupled.get(info.model_name, info.model_version)
        return None if decoupled is None else decoupled

    def _later(self, request: bytes, info: RequestInfo, lease: Lease | None) -> None:
        waiter = _Waiter(request, info, lease)
        task = asyncio.get_running_loop().create_task(self._wait(waiter))
        self.waiting.add(task)
        task.add_done_callback(functools.partial(self._waited, waiter))

    async def _wait(self, waiter: _Waiter) -> None:
        """The slow way: late binding's queue, the model's policy asked of Triton, a
        connection to the instance; each only if need be."""
        info = waiter.info
        if waiter.lease is None:
            try:
                waiter.lease = await self.balancer.acquire(
                    info, waiter.request, self.target, self.remaining(),
                    priority=self.priority)
            except NoInstanceError as exc:
                self._write(error_stream_response(str(exc), info.id, info.model_name))
                return
        lease = waiter.lease
        instance = lease.instance
        on_stream = self._on_stream(info)
        if on_stream is None:
            # Unknown after asking (no such model, say): Triton answers in-stream.
            on_stream = await self.balancer.decoupled.ask(
                instance.upstream, info.model_name, info.model_version) is not False
        try:
            await self.policy.pool.connect(instance.address,
                                           instance.variant.config.upstream_tls)
        except OSError as exc:
            waiter.lease = None
            lease.outliers.connect_failure(instance)
            lease.code = "UNAVAILABLE"
            lease.release(False)
            self._write(error_stream_response(
                f"upstream instance {instance.address}: cannot connect: {exc.strerror or exc}",
                info.id, info.model_name))
            return
        late = too_late(self.remaining(), self.policy.floor_s)
        if late is not None:  # its deadline went by while it waited
            self._write(error_stream_response(late, info.id, info.model_name))
            return
        waiter.lease = None
        waiter.sent = True
        self._send(waiter.request, info, lease, on_stream)

    def _waited(self, waiter: _Waiter, task: asyncio.Task[None]) -> None:
        self.waiting.discard(task)
        if waiter.lease is not None:  # not sent: cancelled, or its deadline went by
            waiter.lease.abandon("CANCELLED" if task.cancelled() else "DEADLINE_EXCEEDED")
        if not task.cancelled() and task.exception() is not None:
            log.error("native data path: a stream request failed", exc_info=task.exception())
        if not waiter.sent:
            self._answered()
        self._end_upstreams()
        self._maybe_finish()

    def _send(self, request: bytes, info: RequestInfo, lease: Lease, on_stream: bool) -> None:
        pending = Pending(info, lease)
        instance = lease.instance
        lease.sending()
        connection = self.policy.pool.get(instance.address)
        try:
            if connection is None:
                raise OSError("the upstream connection closed")
            if not on_stream:
                UnaryCall(self, pending).send(connection, request)
                return
            up = self.upstreams.get(instance)
            if up is None:
                up = StreamCall(self, instance)
                up.stream = connection.open_message_stream(
                    self.policy.infer.request_headers(instance, MODEL_STREAM_INFER,
                                                      self.remaining(), self.forward),
                    up, self.policy.max_message_bytes, self.client)
                self.upstreams[instance] = up
                if self.blocked:
                    up.stream.pause_messages()
        except Exception as exc:
            lease.code = "UNAVAILABLE"
            lease.release(False)
            self._write(error_stream_response(f"upstream instance {instance.address}: {exc}",
                                              info.id, info.model_name))
            self._answered()
            return
        up.pending.append(pending)
        up.stream.send_message(request if info.empty_final else inject_empty_final(request))

    # -- answers --

    def on_response(self, up: StreamCall, response: bytes) -> None:
        """A message of ``up``'s answer: settle its request at its final response."""
        try:
            info = peek_stream_response(response)
        except WireError:
            self._write(response)
            return
        if not info.terminal:
            # A decoupled model's error need not be its final response: the request is
            # judged now, once, and never as a success at its (empty) final.
            up.responded(info.id, info.error_message)
            self._write(response)
            return
        pending = up.settle(info.id, info.error_message,
                            info.has_outputs or bool(info.error_message))
        if pending is not None:
            self._answered()
        if (
            info.final and not info.has_outputs and not info.error_message
            and pending is not None and not pending.client_wants_empty_final
        ):
            return  # an empty final the router asked for; the client did not
        self._write(response)

    def upstream_over(self, up: StreamCall, code_name: str, failure: str | None) -> None:
        """``up`` ended (``failure``: how, for the requests it leaves unanswered)."""
        if self.upstreams.get(up.instance) is up:
            del self.upstreams[up.instance]
        up.stream.handler = None
        if not up.stream.closed:  # Triton answered before the router ended its requests
            up.stream.reset(_NO_ERROR)
        for p in up.settle_all(code_name):
            self._answered()
            if failure is not None:
                self._write(error_stream_response(
                    f"upstream instance {up.instance.address} {failure}", p.id, p.model_name))
        self._maybe_finish()

    def _write(self, response: bytes) -> None:
        """A response to the client; past a window it has not read, upstreams wait."""
        if self.over:
            return
        client = self.client
        if not client.responded:
            client.respond(_RESPONSE_HEADERS)
        if client.send_message(response) > self.policy.window and not self.blocked:
            # Neither more answers nor more requests (whose answers would wait too).
            self.blocked = True
            client.pause_messages()
            for up in self.upstreams.values():
                up.stream.pause_messages()
            client.notify_drained(self.policy.window)

    def answered(self, response: bytes) -> None:
        """A request sent as ``ModelInfer`` is answered with ``response``."""
        self._write(response)
        self._answered()
        self._maybe_finish()

    def _answered(self) -> None:
        """One request of this stream is no longer in flight."""
        self.in_flight -= 1
        if not (self.over or self.blocked) and self.in_flight < self.policy.limit:
            self.client.resume_messages()

    # -- endings --

    def _end_upstreams(self) -> None:
        if self.half_closed and not self.waiting:
            for up in self.upstreams.values():
                up.stream.end_messages()

    def _maybe_finish(self) -> None:
        if self.half_closed and not (self.over or self.waiting or self.upstreams
                                     or self.unary):
            self.over = True
            if self.timer is not None:
                self.timer.cancel()
            self.client.finish(0, b"")

    def _deadline_expired(self) -> None:
        self.timer = None
        if not self.over:
            self._close("DEADLINE_EXCEEDED")
            refuse(self.client, "DEADLINE_EXCEEDED", "Deadline Exceeded")

    def _close(self, code_name: str) -> None:
        """The client went (or is answered now, ``code_name``): end every upstream call
        and release everything still held."""
        if self.over:
            return
        self.over = True
        if self.timer is not None:
            self.timer.cancel()
        for task in self.waiting:
            task.cancel()  # _waited gives back what each holds
        ups = list(self.upstreams.values())
        self.upstreams.clear()
        for up in ups:
            up.stream.handler = None
            up.stream.reset(_CANCEL)
            for _ in up.settle_all(code_name):
                self._answered()
        calls = list(self.unary)
        self.unary.clear()
        for call in calls:
            if call.timer is not None:
                call.timer.cancel()
            call.pending.lease.code = code_name
            call.leave()  # absorbed, or reset
            self._answered()
