"""TLS on both sides of the router: its own port, and the channels to Triton.

The PEM contents come from the config (read and checked when it is loaded); this module
only turns them into gRPC credentials. Certificates are read once: rotating them takes a
restart (with several routers behind a load balancer, a rolling one).
"""

from __future__ import annotations

import grpc
from tritonmesh.config import ServerTLS, UpstreamTLS
from tritonmesh.workers.upstream import CHANNEL_OPTIONS, Upstream

__all__ = ["connect", "server_credentials"]


def server_credentials(tls: ServerTLS) -> grpc.ServerCredentials:
    """Credentials for the router's port; client certificates required with a client CA."""
    return grpc.ssl_server_credentials(
        [(tls.private_key, tls.cert_chain)],
        root_certificates=tls.client_ca,
        require_client_auth=tls.client_ca is not None,
    )


def connect(address: str, tls: UpstreamTLS | None) -> Upstream:
    """A channel to one Triton instance: plaintext, or TLS as the instance's variant says."""
    if tls is None:
        return Upstream(address)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.root_certificates,
        private_key=tls.private_key,
        certificate_chain=tls.cert_chain,
    )
    options = CHANNEL_OPTIONS
    if tls.server_name is not None:
        options += (("grpc.ssl_target_name_override", tls.server_name),)
    return Upstream(address, options=options, credentials=credentials)
