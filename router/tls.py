"""TLS on both sides of the router: its own port, and the channels to Triton.

The PEM contents come from the config (read and checked when it is loaded); this module
turns them into gRPC credentials. The port's certificates can be replaced while serving
(SIGHUP): gRPC asks for them at each new connection's handshake. The channels to Triton
keep the credentials they were opened with.
"""

from __future__ import annotations

import threading
from typing import Any

import grpc
from tritonmesh.config import ServerTLS, UpstreamTLS
from tritonmesh.workers.upstream import CHANNEL_OPTIONS, Upstream, name_override

__all__ = ["ServerCertificates", "connect"]


def _configuration(tls: ServerTLS) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(tls.private_key, tls.cert_chain)], root_certificates=tls.client_ca)


class ServerCertificates:
    """The credentials of the router's port, whose certificates can be replaced while it
    serves. Client certificates are required when there is a client CA.

    For one port only: gRPC asks each port's credentials separately, and only the first
    to ask after a :meth:`replace` would get the new certificates."""

    def __init__(self, tls: ServerTLS):
        self.tls = tls
        self._next: grpc.ServerCertificateConfiguration | None = None
        # gRPC calls _fetch from its own threads, at every handshake.
        self._lock = threading.Lock()
        self.credentials = grpc.dynamic_ssl_server_credentials(
            _configuration(tls), self._fetch,
            require_client_authentication=tls.client_ca is not None)

    def replace(self, tls: ServerTLS) -> bool:
        """New connections get ``tls``'s certificates (open ones keep theirs). False, and
        nothing changes, if it turns client certificates on or off: the credentials fix
        that when the port opens."""
        if (tls.client_ca is None) != (self.tls.client_ca is None):
            return False
        configuration = _configuration(tls)
        with self._lock:
            self._next = configuration
            self.tls = tls
        return True

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's question at each handshake: a new configuration, or None for no change."""
        with self._lock:
            configuration, self._next = self._next, None
        return configuration


def connect(address: str, tls: UpstreamTLS | None,
            options: tuple[tuple[str, Any], ...] = CHANNEL_OPTIONS) -> Upstream:
    """A channel to one Triton instance: plaintext, or TLS as the instance's variant says."""
    if tls is None:
        return Upstream(address, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.root_certificates,
        private_key=tls.private_key,
        certificate_chain=tls.cert_chain,
    )
    return Upstream(address, options=options + name_override(tls.server_name),
                    credentials=credentials)
