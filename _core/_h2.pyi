"""Stub for the native data path's HTTP/2 engine (``_core/_h2.pyx``, over libnghttp2)."""

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

class H2Error(Exception): ...

class CallHandler(Protocol):
    """What a paired call tells its policy: Triton's trailers, or an early close."""

    def trailers(self, grpc_status: bytes, http_status: bytes) -> None:
        """Triton answered: the first ``grpc-status`` of its last HEADERS block, and the
        ``:status`` before it (b"": none; the block is the stream's ``headers``)."""
    def closed(self, stream: Stream, error_code: int) -> None: ...

class MessageHandler(Protocol):
    """What a message-mode stream tells its policy, one call per whole gRPC message."""

    def message(self, stream: Stream, compressed: int, message: bytes) -> None: ...
    def oversize(self, stream: Stream, length: int) -> None: ...
    def ended(self, stream: Stream) -> None:
        """The peer ended the stream and every message was handed over (an upstream's:
        ``stream.headers`` are its trailers)."""
    def drained(self, stream: Stream) -> None: ...
    def closed(self, stream: Stream, error_code: int) -> None:
        """It closed otherwise (a reset, a lost connection)."""

def flush_pending() -> None:
    """Write every connection's pending frames."""

class Stream:
    """One HTTP/2 stream: its last HEADERS block, and the stream it is paired with."""

    @property
    def connection(self) -> H2Connection: ...
    @property
    def id(self) -> int: ...
    @property
    def headers(self) -> list[tuple[bytes, bytes]]: ...
    @property
    def closed(self) -> bool: ...
    @property
    def remote_ended(self) -> bool: ...
    @property
    def responded(self) -> bool: ...
    @property
    def headers_sent(self) -> bool:
        """Its HEADERS went to the transport (an upstream stream)."""
    @property
    def sent_more(self) -> bool:
        """A client's stream: request bytes came beyond its first message."""
    @property
    def paired(self) -> bool: ...
    # What a client's request HEADERS say to the policy, read in C as they come.
    @property
    def path(self) -> bytes | None:
        """Its ``:path`` (the last one)."""
    @property
    def grpc(self) -> bool:
        """Its (last) ``content-type`` starts with ``application/grpc``."""
    @property
    def timeout(self) -> float:
        """Its (last) ``grpc-timeout`` in seconds; -1 without one."""
    @property
    def timeout_malformed(self) -> bool:
        """One of its ``grpc-timeout`` values is not one."""
    @property
    def encoded(self) -> bool:
        """Its first ``grpc-encoding`` names a compression (not ``identity``)."""
    @property
    def policy_values(self) -> dict[bytes, bytes] | None:
        """The values of its connection's ``policy_keys`` it carries (the last of each)."""
    @property
    def metadata(self) -> list[tuple[bytes, bytes]] | None:
        """Its metadata to forward, in order: not pseudo-headers, ``policy_keys`` or
        ``hop_by_hop``; None when there is none."""
    @property
    def illegal(self) -> bytes | None:
        """The first key of :attr:`metadata` that grpc-core refuses (its name outside
        ``[0-9a-z_.-]+``, or with :attr:`illegal_value`, its value outside printable ASCII
        in a key not ending ``-bin``)."""
    @property
    def illegal_value(self) -> bool: ...
    handler: Any  # a CallHandler (paired) or a MessageHandler (message mode)
    tag: Any
    def await_message(self, limit: int) -> None:
        """Collect DATA until the first gRPC message is whole (up to ``limit`` bytes), then
        call the owner's ``message(stream, compressed, bytes)`` (the connection's
        ``on_message(stream, bytes)`` for an uncompressed one, where it has one);
        ``oversize(stream, length)`` when it is larger, ``incomplete(stream)`` when the
        client ended without one."""
    def read_messages(self, handler: MessageHandler, limit: int) -> None:
        """Message mode: every whole gRPC message received goes to ``handler.message``, one
        call each (``oversize`` past ``limit`` bytes; ``ended`` once the peer ended and every
        message went). A message's window is given back as it is handed over."""
    def pause_messages(self) -> None:
        """Hand over no more messages (the peer's flow control holds it back)."""
    def resume_messages(self) -> None: ...
    def send_message(self, message: bytes) -> int:
        """Queue ``message`` length-prefixed; returns the bytes queued and not yet sent."""
    def end_messages(self) -> None:
        """END_STREAM once the queued messages are sent (a request's end)."""
    def notify_drained(self, below: int) -> None:
        """Call the handler's ``drained(stream)`` once fewer than ``below`` bytes wait."""
    @property
    def unsent(self) -> int:
        """Bytes queued on it that nghttp2 has not taken yet."""
    def respond(self, headers: list[tuple[bytes, bytes]], end_stream: bool = False) -> None: ...
    def finish(self, status: int, message: bytes) -> None:
        """End the call with a gRPC status and a percent-encoded message."""
    def reset(self, error_code: int = 8) -> None: ...
    @property
    def request_sent(self) -> bool:
        """Everything it is to send went to nghttp2, END_STREAM with the last of it."""
    def unpair(self) -> None:
        """End its pairing: neither stream's end reaches the other any more."""

class H2Connection(asyncio.Protocol):
    """One HTTP/2 connection (``server``: a client's; else one to an upstream)."""

    loop: asyncio.AbstractEventLoop | None
    retired: str | None
    def __init__(self, owner: Any, server: bool, *, max_concurrent_streams: int = 100,
                 stream_window: int = 1 << 20, connection_window: int = 1 << 24,
                 max_header_list_bytes: int = 1 << 16, peek_budget: int = 0,
                 stream_reset_burst: int = 1000, stream_reset_rate: int = 33,
                 buffer_cap: int = 2**64 - 1, policy_keys: frozenset[bytes] = frozenset(),
                 hop_by_hop: frozenset[bytes] = frozenset(), peek_path: bytes | None = None,
                 peek_limit: int = 0,
                 on_message: Callable[[Stream, bytes], None] | None = None) -> None:
        """``peek_budget``: bytes the first-message peeks of all its streams may hold
        outside flow control (server side). ``stream_reset_burst`` / ``stream_reset_rate``:
        the client's RST_STREAMs it takes (a token bucket, per s); past them, GOAWAY
        ENHANCE_YOUR_CALM (server side). ``buffer_cap``: what the windows of the upstream
        streams paired with its streams, and its own streams' raised windows, may add up
        to; past it, a new one keeps the base window (64 KiB) instead of ``stream_window``
        (server side). ``policy_keys`` / ``hop_by_hop``: request header names whose
        values the policy reads (:attr:`Stream.policy_values`) / that are not forwarded;
        neither is in :attr:`Stream.metadata` (server side). ``peek_path``: a gRPC request
        there with a message to come is not reported to the owner's ``request``: its first
        message is awaited (up to ``peek_limit`` bytes, as :meth:`Stream.await_message`)
        and, uncompressed, handed to ``on_message(stream, message)`` (server side)."""
    @property
    def owner(self) -> Any: ...
    @property
    def server(self) -> bool: ...
    @property
    def goaway(self) -> bool: ...
    @property
    def lost(self) -> bool: ...
    @property
    def streams(self) -> dict[int, Stream]: ...
    @property
    def open_streams(self) -> int: ...
    @property
    def window_bytes(self) -> int:
        """A client's connection: the windows of its upstream streams and its own raised
        ones, all together."""
    @property
    def buffered_bytes(self) -> int:
        """Bytes waiting in the router to be sent on its streams."""
    @property
    def idle_since(self) -> float:
        """``time.monotonic()`` when its last stream closed (or it opened)."""
    def flush(self) -> None: ...
    def open_stream(self, headers: list[tuple[bytes, bytes]], client: Stream,
                    handler: CallHandler | None, first: bytes | None = None) -> Stream:
        """Send a request paired with ``client`` (its held bytes first, or ``first``: a
        request sent again). After the one that takes the last stream ID, the connection
        is ``goaway`` and sends GOAWAY."""
    def open_message_stream(self, headers: list[tuple[bytes, bytes]], handler: MessageHandler,
                            limit: int, client: Stream | None = None) -> Stream:
        """Send a request in message mode: :meth:`Stream.send_message` queues its messages,
        the answer's go to ``handler`` (up to ``limit`` bytes each). ``client``: the client
        stream it serves (its window counts in that connection's buffer cap)."""
    def expire_peeks(self, before: float) -> list[Stream]:
        """End the first-message peeks waiting since before ``before`` (monotonic s), but
        not those whose length is known that wait for the peek budget."""
    def skip_stream_ids(self, next_stream_id: int) -> None:
        """Make ``next_stream_id`` the next stream's ID (client side; to test exhaustion)."""
    def reset(self, stream_id: int, error_code: int = 8) -> None: ...
    def shutdown(self) -> None:
        """GOAWAY; the connection closes when its last stream ends."""
    @property
    def ping_sent(self) -> float:
        """``time.monotonic()`` when :meth:`ping` sent a PING not answered yet, else 0."""
    def ping(self) -> None:
        """Send a keepalive PING."""
    def close(self) -> None: ...
    def abort(self) -> None:
        """Close now, dropping unwritten bytes (a peer that stopped reading)."""
