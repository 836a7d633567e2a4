"""The native data path's port: HTTP/2 on ``listen`` (h2c, or h2 over TLS), by ``_core._h2``.

``ModelInfer`` calls go to :class:`tritonmesh.native_infer.NativeInfer`, ``ModelStreamInfer``
to :class:`tritonmesh.native_stream.NativeStreams`. Every other stream (the other RPCs, a
compressed ``ModelStreamInfer``, ``grpc.health.v1``, reflection, and anything that is not
gRPC at all) is relayed frame by frame to the router's grpc.aio server,
which listens on a private Unix socket: it answers exactly as it does on ``data_path: grpc``.
With ``tls``, the port speaks TLS (ALPN h2; :mod:`tritonmesh.native_tls`); the relay does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from tritonmesh._core._segment import running
from tritonmesh.native_infer import (
    HOP_BY_HOP,
    MODEL_INFER,
    POLICY_KEYS,
    NativeInfer,
    grpc_message,
)
from tritonmesh.native_pool import UpstreamPool
from tritonmesh.native_stream import MODEL_STREAM_INFER, NativeStreams
from tritonmesh.native_tls import Handshake, PortCertificates

if TYPE_CHECKING:
    from tritonmesh._core._h2 import H2Connection, Stream
    from tritonmesh.balancer import Balancer, Instance
    from tritonmesh.config import EndpointConfig

__all__ = ["NativePort"]

log = logging.getLogger("tritonmesh.native")

_DEADLINE_EXCEEDED: Final = 4
_RESOURCE_EXHAUSTED: Final = 8
_INTERNAL_ERROR: Final = 2  # HTTP/2
# The relay's socket is in a private directory named for its process, so that one a killed
# process left behind is found and removed by the next router process to start.
_RELAY_PREFIX: Final = "tritonmesh-relay-"


def _relay_directory() -> Path:
    """A new directory for this process's relay socket, after removing those of router
    processes that are no longer running."""
    for path in Path(tempfile.gettempdir()).glob(f"{_RELAY_PREFIX}*-*"):
        pid = path.name[len(_RELAY_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{_RELAY_PREFIX}{os.getpid()}-"))


class NativePort:
    """The listener, its client connections, and the relay to the grpc.aio server."""

    def __init__(self, balancer: Balancer, config: EndpointConfig, *, native_infer: bool):
        self.balancer = balancer
        # TLS is the event loop's; the relay behind stays plaintext on its private socket.
        self.certificates = None if config.tls is None else PortCertificates(config.tls)
        limits = self.limits = config.limits
        # The grpc.aio server behind the relay: one connection carries every client's
        # streams, so the per-connection bounds are this port's, not the relay's.
        self.relay_limits = dataclasses.replace(
            limits, max_concurrent_streams=2**31 - 1, connection_idle_timeout_s=0.0,
            connection_max_age_s=0.0)
        native = config.native
        self.h2_settings = {"stream_window": native.stream_window_bytes,
                            "connection_window": native.connection_window_bytes,
                            "max_header_list_bytes": native.max_header_list_bytes}
        self.pool = UpstreamPool(**self.h2_settings)
        # Peeked first messages may be larger than a stream window, so their bytes leave
        # flow control; what all of one connection's streams hold so is one message's worth.
        self.client_settings: dict[str, Any] = {
            "peek_budget": limits.max_message_bytes,
            "stream_reset_burst": native.stream_reset_burst,
            "stream_reset_rate": native.stream_reset_rate,
            "buffer_cap": native.connection_buffer_bytes,
            "max_concurrent_streams": limits.max_concurrent_streams, **self.h2_settings}
        self.native = native
        self.infer = NativeInfer(balancer, self.pool, limits.min_upstream_deadline_ms / 1000.0) \
            if native_infer else None
        self.streams = None if self.infer is None else NativeStreams(
            self.infer, limits.max_stream_requests_in_flight, limits.max_message_bytes,
            native.stream_window_bytes)
        if self.infer is not None:
            # A ModelInfer's HEADERS need no policy call: the engine awaits its first
            # message and hands it, uncompressed, to the policy (else to `message`).
            self.client_settings.update(peek_path=MODEL_INFER,
                                        peek_limit=limits.max_message_bytes,
                                        on_message=self.infer.start)
        self.relayed = 0  # streams handed to the grpc.aio server
        self._dir = _relay_directory()
        self.internal = f"unix:{self._dir / 'grpc.sock'}"  # the grpc.aio server's address
        self.connections: dict[H2Connection, float] = {}  # when each opened (monotonic)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()  # set when the last client connection is gone
        self._aging: asyncio.Task[None] | None = None
        self._peeks: asyncio.Task[None] | None = None

    async def start(self, listen: str, *, reuse_port: bool = False) -> int:
        """Listen on ``listen`` (HOST:PORT), beside other processes with ``reuse_port``
        (SO_REUSEPORT); returns the port."""
        host, _, port = listen.rpartition(":")
        loop = asyncio.get_running_loop()
        certificates = self.certificates
        self._server = await loop.create_server(
            self._protocol if certificates is None else functools.partial(
                Handshake, self._protocol),
            host.strip("[]"), int(port), reuse_address=True, reuse_port=reuse_port,
            backlog=1024, ssl=None if certificates is None else certificates.context)
        await self.pool.connect(self.internal)
        self.pool.start_keepalive(self.native.upstream_keepalive_time_s,
                                  self.native.upstream_keepalive_timeout_s)
        if self.limits.connection_idle_timeout_s > 0 or self.limits.connection_max_age_s > 0:
            self._aging = asyncio.ensure_future(self._close_old())
        if self.infer is not None and self.native.first_message_timeout_s > 0:
            self._peeks = asyncio.ensure_future(self._expire_slow_peeks())
        return int(self._server.sockets[0].getsockname()[1])

    def _protocol(self) -> Any:
        from tritonmesh._core._h2 import H2Connection

        if len(self.connections) >= self.limits.max_connections:
            return _Refused()
        connection = H2Connection(self, True, policy_keys=POLICY_KEYS, hop_by_hop=HOP_BY_HOP,
                                  **self.client_settings)
        self.connections[connection] = time.monotonic()
        return connection

    # -- what a client connection reports (H2Connection's owner) --

    def request(self, stream: Stream, end_stream: bool) -> None:
        """A request's HEADERS are here, but for a ModelInfer served natively (the engine
        awaits its first message: ``peek_path``). What the policy reads of them, the engine
        read as they came: ``stream.path``, ``grpc``, ``timeout_malformed``, ``encoded``."""
        # A compressed stream's messages are grpc.aio's to decompress.
        if self.streams is not None and not end_stream and stream.grpc \
                and not stream.timeout_malformed and stream.path == MODEL_STREAM_INFER \
                and not stream.encoded:
            self.streams.start(stream)
            return
        self.relay(stream)

    def message(self, stream: Stream, compressed: int, message: bytes) -> None:
        """A compressed first message of a ModelInfer (an uncompressed one goes to
        ``NativeInfer.start``): the peek reads plain protobuf; grpc.aio decompresses."""
        self.relay(stream)

    def oversize(self, stream: Stream, length: int) -> None:
        stream.finish(_RESOURCE_EXHAUSTED, grpc_message(
            f"SERVER: Received message larger than max ({length} vs. "
            f"{self.limits.max_message_bytes})"))  # grpc.aio's words

    def incomplete(self, stream: Stream) -> None:
        self.relay(stream)

    def instance_removed(self, instance: Instance) -> None:
        """A drain removed ``instance``: calls still on it are cancelled, as they are on
        the grpc.aio path when its channel closes."""
        address = instance.address
        if not any(i.address == address for i in self.balancer.instances()):
            self.pool.retire(address, f"upstream instance {address} was removed from the "
                                      "router")

    def connection_lost(self, connection: H2Connection) -> None:
        self.connections.pop(connection, None)
        if not self.connections:
            self._idle.set()

    # -- the relay --

    def relay(self, stream: Stream) -> None:
        """Hand the stream to the grpc.aio server, as it came."""
        self.relayed += 1
        connection = self.pool.get(self.internal)
        if connection is not None:
            connection.open_stream(stream.headers, stream, None)
            return
        task = asyncio.ensure_future(self._relay_later(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay_later(self, stream: Stream) -> None:
        try:
            connection = await self.pool.connect(self.internal)
            if not stream.closed:
                connection.open_stream(stream.headers, stream, None)
        except Exception as exc:  # no stream may stay open with no owner
            log.error("native data path: cannot relay to the grpc.aio server: %s", exc)
            stream.reset(_INTERNAL_ERROR)

    async def _close_old(self) -> None:
        """GOAWAY to connections with no stream for ``limits.connection_idle_timeout_s``
        (gRPC clients reconnect on their next call), and to those older than
        ``limits.connection_max_age_s`` (their calls finish); checked every half of the
        shorter."""
        idle_s = self.limits.connection_idle_timeout_s or float("inf")
        age_s = self.limits.connection_max_age_s or float("inf")
        while True:
            await asyncio.sleep(min(idle_s, age_s) / 2)
            now = time.monotonic()
            for connection, opened in list(self.connections.items()):
                if now - opened >= age_s or (not connection.open_streams
                                             and now - connection.idle_since >= idle_s):
                    connection.shutdown()

    async def _expire_slow_peeks(self) -> None:
        """Answer the first-message peeks that outlived ``native.first_message_timeout_s``
        (their reservations go to the connection's other peeks); checked every half of it."""
        timeout = self.native.first_message_timeout_s
        message = grpc_message(f"the request's first message did not arrive within "
                               f"native.first_message_timeout_s ({timeout:g} s)")
        while True:
            await asyncio.sleep(timeout / 2)
            before = time.monotonic() - timeout
            for connection in list(self.connections):
                for stream in connection.expire_peeks(before):
                    stream.finish(_DEADLINE_EXCEEDED, message)

    async def stop(self, grace: float) -> None:
        """Stop accepting, GOAWAY every client, wait up to ``grace`` s for their streams to
        end, then close what is left (and the relay's connection)."""
        for task in (self._aging, self._peeks):
            if task is not None:
                task.cancel()
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.shutdown()
        if self.connections:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)
        for connection in list(self.connections):
            connection.close()
        for task in list(self._tasks):
            task.cancel()
        await self.pool.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        shutil.rmtree(self._dir, ignore_errors=True)


class _Refused(asyncio.Protocol):
    """A connection past ``limits.max_connections``: closed at once, as gRPC does."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()
