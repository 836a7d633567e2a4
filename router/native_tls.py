"""TLS for the native data path: the event loop's own (``ssl.SSLContext``), with ALPN h2.

:mod:`tritonmesh.tls` reads and checks the PEM files and makes gRPC credentials for the
grpc.aio path; this module makes stdlib contexts from the same settings, for the native
port (:class:`PortCertificates`, replaceable while serving as gRPC's are) and for its
connections to Triton instances (:func:`upstream_context`). A peer that does not choose h2
by ALPN is closed right after the handshake, as gRPC's own TLS does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Callable, Iterator
from typing import Final

from tritonmesh.configvalues import ConfigError
from tritonmesh.tls import ServerTLS, UpstreamTLS

__all__ = ["ALPN", "Handshake", "PortCertificates", "upstream_context"]

log = logging.getLogger("tritonmesh.native")

ALPN: Final = "h2"


@contextlib.contextmanager
def _in_memory(data: bytes) -> Iterator[str]:
    """A path to ``data`` that never touches a file system (a memfd): the stdlib loads
    certificates and keys only from paths, and the config holds their bytes."""
    fd = os.memfd_create("tritonmesh-pem", os.MFD_CLOEXEC)
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _load_pair(context: ssl.SSLContext, cert_chain: bytes, private_key: bytes) -> None:
    with _in_memory(cert_chain) as cert, _in_memory(private_key) as key:
        context.load_cert_chain(cert, key)


def _h2_only(context: ssl.SSLContext) -> ssl.SSLContext:
    # HTTP/2 over TLS needs TLS 1.2 or later (RFC 9113 9.2), as gRPC does.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols([ALPN])
    return context


def server_context(tls: ServerTLS) -> ssl.SSLContext:
    """The port's context for ``tls``; client certificates required with a client CA.
    Raises ConfigError (naming ``tls``) if OpenSSL refuses what the config check passed."""
    context = _h2_only(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
    try:
        _load_pair(context, tls.cert_chain, tls.private_key)
        if tls.client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cadata=tls.client_ca.decode("latin-1"))
    except ssl.SSLError as exc:
        raise ConfigError(f"tls: OpenSSL refuses the certificates: {exc.reason or exc}") \
            from None
    return context


def upstream_context(tls: UpstreamTLS) -> ssl.SSLContext:
    """A client context for a variant's ``upstream_tls``: its CA (else the system's roots),
    its own certificate for Triton's mutual TLS, the peer's name always verified."""
    context = _h2_only(ssl.create_default_context(
        cadata=None if tls.root_certificates is None
        else tls.root_certificates.decode("latin-1")))
    if tls.cert_chain is not None and tls.private_key is not None:
        _load_pair(context, tls.cert_chain, tls.private_key)
    return context


class PortCertificates:
    """The native port's certificates, which a reload can replace while it serves: new
    handshakes get the new ones (the first context's SNI callback, which OpenSSL calls at
    every ClientHello, with or without a server name, moves the connection to the current
    context); open connections keep theirs. As :class:`tritonmesh.tls.ServerCertificates`,
    turning client certificates on or off takes a restart."""

    def __init__(self, tls: ServerTLS):
        self.tls = tls
        self.context = server_context(tls)  # the one the listener holds
        self._current = self.context
        self.context.sni_callback = self._choose

    def replace(self, tls: ServerTLS) -> bool:
        """New connections get ``tls``'s certificates. False, and nothing changes, if it
        turns client certificates on or off; ConfigError, and nothing changes, if OpenSSL
        refuses them."""
        if (tls.client_ca is None) != (self.tls.client_ca is None):
            return False
        self._current = server_context(tls)
        self.tls = tls
        return True

    def _choose(self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                context: ssl.SSLContext) -> None:
        if self._current is not context:
            connection.context = self._current


class Handshake(asyncio.Protocol):
    """A TLS connection until its handshake is done: then the protocol ``serve`` makes
    takes the transport, if the client chose h2; else the connection is closed (a client
    of another protocol must not wait for an answer that never comes)."""

    def __init__(self, serve: Callable[[], asyncio.Protocol]):
        self._serve = serve

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        chosen = None if ssl_object is None else ssl_object.selected_alpn_protocol()
        if chosen != ALPN:
            log.info("native data path: closing a TLS connection from %s: it did not choose "
                     "ALPN %s (offered none, or only others)",
                     transport.get_extra_info("peername"), ALPN)
            transport.close()
            return
        protocol = self._serve()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
