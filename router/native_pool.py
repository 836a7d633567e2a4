"""HTTP/2 connections to where the native data path sends streams: one per address, made on
first use and kept while it lives (a lost or GOAWAY-ed connection is replaced on next use).

The addresses are Triton instances (``HOST:PORT``; over TLS when their variant has
``upstream_tls``) and the router's own grpc.aio server, which serves every RPC the native
path relays (``unix:PATH``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, Any

from tritonmesh.native_tls import ALPN, upstream_context

if TYPE_CHECKING:
    from tritonmesh._core._h2 import H2Connection
    from tritonmesh.tls import UpstreamTLS

__all__ = ["UpstreamPool"]

log = logging.getLogger("tritonmesh.native")


class UpstreamPool:
    """Client-side :class:`H2Connection` objects by address."""

    def __init__(self, *, stream_window: int, connection_window: int,
                 max_header_list_bytes: int):
        self._settings: dict[str, Any] = {
            "stream_window": stream_window, "connection_window": connection_window,
            "max_header_list_bytes": max_header_list_bytes}
        self._connections: dict[str, H2Connection] = {}
        self._connecting: dict[str, asyncio.Future[H2Connection]] = {}
        self._contexts: dict[UpstreamTLS, ssl.SSLContext] = {}  # one per variant's settings
        self._closed = False
        self._keepalive: asyncio.Task[None] | None = None

    def start_keepalive(self, time_s: float, timeout_s: float) -> None:
        """PING every connection with calls open every ``time_s``; one whose ACK does not
        come within ``timeout_s`` is closed (its streams fail, their leases released)."""
        if time_s > 0:
            self._keepalive = asyncio.ensure_future(self._ping(time_s, timeout_s))

    async def _ping(self, time_s: float, timeout_s: float) -> None:
        while True:
            await asyncio.sleep(time_s)
            pinged = [c for c in self._connections.values() if c.open_streams and not c.lost]
            for connection in pinged:
                connection.ping()
            await asyncio.sleep(timeout_s)
            for connection in pinged:
                if connection.ping_sent and not connection.lost:
                    log.warning("native data path: no PING answer within %g s; closing the "
                                "connection", timeout_s)
                    connection.abort()

    def get(self, address: str) -> H2Connection | None:
        """The open connection to ``address``, or None (then :meth:`connect`)."""
        connection = self._connections.get(address)
        if connection is None or connection.goaway or connection.lost:
            return None
        return connection

    async def connect(self, address: str, tls: UpstreamTLS | None = None) -> H2Connection:
        """A connection to ``address`` (over TLS as ``tls`` says), opened now unless one
        is open or opening. Raises OSError when it cannot be made."""
        connection = self.get(address)
        if connection is not None:
            return connection
        pending = self._connecting.get(address)
        if pending is None:
            pending = self._connecting[address] = asyncio.ensure_future(
                self._open(address, tls))
            pending.add_done_callback(lambda _: self._connecting.pop(address, None))
        return await asyncio.shield(pending)

    async def _open(self, address: str, tls: UpstreamTLS | None) -> H2Connection:
        from tritonmesh._core._h2 import H2Connection

        if self._closed:
            raise OSError("the router is stopping")
        loop = asyncio.get_running_loop()

        def protocol() -> Any:
            return H2Connection(self, False, **self._settings)

        if address.startswith("unix:"):
            _, connection = await loop.create_unix_connection(protocol, address[5:])
        else:
            host, _, port = address.rpartition(":")
            host = host.strip("[]")
            if tls is None:
                _, connection = await loop.create_connection(protocol, host, int(port))
            else:
                transport, connection = await loop.create_connection(
                    protocol, host, int(port), ssl=self._context(tls),
                    server_hostname=tls.server_name or host)
                ssl_object = transport.get_extra_info("ssl_object")
                if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN:
                    transport.close()
                    raise OSError(f"its TLS server did not choose ALPN {ALPN}")
        self._connections[address] = connection
        return connection  # type: ignore[no-any-return]

    def _context(self, tls: UpstreamTLS) -> ssl.SSLContext:
        context = self._contexts.get(tls)
        if context is None:
            context = self._contexts[tls] = upstream_context(tls)
        return context

    def connection_lost(self, connection: H2Connection) -> None:
        for address, known in list(self._connections.items()):
            if known is connection:
                del self._connections[address]

    def retire(self, address: str, why: str) -> None:
        """Close the connection to ``address`` now (its instance left: drained, or its
        drain timed out): GOAWAY, then the streams still open, if any, end saying ``why``."""
        connection = self._connections.pop(address, None)
        if connection is not None:
            connection.retired = why
            connection.shutdown()  # with no stream open, it closes once GOAWAY is written
            if connection.open_streams:
                connection.flush()
                connection.close()

    async def close(self) -> None:
        """Close every connection (their streams end as reset)."""
        self._closed = True
        if self._keepalive is not None:
            self._keepalive.cancel()
        for pending in list(self._connecting.values()):
            pending.cancel()
        for connection in list(self._connections.values()):
            connection.close()
        self._connections.clear()
