"""TLS on both sides of the router: its own port, and the channels to Triton.

The PEM files are read and checked when the config is loaded (``tls`` and a variant's
``upstream_tls``), so that a wrong path or a mismatched key fails at start with the key's
name; this module reads them and turns them into gRPC credentials. The port's
certificates can be replaced while serving (SIGHUP): gRPC asks for them at each new
connection's handshake. The channels to Triton keep the credentials they were opened with.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc
from tritonmesh.configvalues import ConfigError, _expect, _no_unknown
from tritonmesh.workers.upstream import CHANNEL_OPTIONS, Upstream, name_override

__all__ = ["ServerCertificates", "ServerTLS", "UpstreamTLS", "connect"]


@dataclass(frozen=True)
class ServerTLS:
    """The router's own port over TLS (PEM contents, read when the config is loaded). With
    ``client_ca``, every client must present a certificate that CA signed (mutual TLS)."""

    # Out of reprs: a certificate file may bundle its private key.
    cert_chain: bytes = field(repr=False)
    private_key: bytes = field(repr=False)
    client_ca: bytes | None = None


@dataclass(frozen=True)
class UpstreamTLS:
    """How a variant reaches its Triton instances over TLS (Triton's ``--grpc-use-ssl``).

    ``root_certificates`` None: the system's roots. ``cert_chain`` with ``private_key``:
    the router's own certificate, for Triton's ``--grpc-use-ssl-mutual``. ``server_name``:
    the name to verify instead of the address's host (an IP that is not in the
    certificate)."""

    root_certificates: bytes | None = None
    cert_chain: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)
    server_name: str | None = None


_CERTIFICATE: Final = b"-----BEGIN CERTIFICATE-----"
_PRIVATE_KEY: Final = b"PRIVATE KEY-----"  # PKCS#8, or the RSA/EC-specific header


def _pem(value: Any, key: str, base: Path, marker: bytes) -> bytes:
    """The PEM file at ``value`` (relative to ``base``), read now so that a wrong path
    fails at start with the key's name, not at the first TLS handshake."""
    path: Path = base / _expect(value, str, key)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    if marker not in data:
        what = "certificate" if marker is _CERTIFICATE else "private key"
        raise ConfigError(f"{key}: {path} holds no PEM {what}")
    if marker is _PRIVATE_KEY and b"ENCRYPTED" in data:
        raise ConfigError(f"{key}: {path} is encrypted; gRPC needs the key unencrypted "
                          "(e.g. openssl pkey -in KEY -out KEY.plain), readable only by "
                          "the router")
    return data


def _key_pair(data: Mapping[str, Any], where: str, base: Path,
              required: bool) -> tuple[bytes | None, bytes | None]:
    """``cert_file`` and ``key_file``: both or (unless ``required``) neither, and a match."""
    # null is the same as absent, as for every other key.
    has_cert, has_key = data.get("cert_file") is not None, data.get("key_file") is not None
    if has_cert and not has_key:
        raise ConfigError(f"{where}key_file: required with cert_file")
    if has_key and not has_cert:
        raise ConfigError(f"{where}cert_file: required with key_file")
    if not has_cert:
        if required:
            raise ConfigError(f"{where}cert_file: required")
        return None, None
    cert = _pem(data["cert_file"], f"{where}cert_file", base, _CERTIFICATE)
    key = _pem(data["key_file"], f"{where}key_file", base, _PRIVATE_KEY)
    # The stdlib checks that the key belongs to the certificate; gRPC would only fail the
    # first handshake (and, on a reload, keep the old pair with a line in its own log).
    # It reads the files again, so they must still hold what was read above: a renewal
    # landing in between could pair a checked certificate with an unchecked key.
    cert_path, key_path = base / data["cert_file"], base / data["key_file"]
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path,
                                                                password=_no_password)
        unchanged = cert_path.read_bytes() == cert and key_path.read_bytes() == key
    except ssl.SSLError as exc:  # before OSError, its base class
        raise ConfigError(f"{where}key_file: does not match {where}cert_file "
                          f"({exc.reason or exc})") from None
    except OSError:  # gone since
        unchanged = False
    if not unchanged:
        raise ConfigError(f"{where}cert_file: {cert_path} or its key changed while being "
                          "read; read the configuration again")
    return cert, key


def _no_password() -> bytes:
    raise ConfigError("the private key asks for a password")  # never prompt on a terminal


def _server_tls(data: Any, base: Path) -> ServerTLS:
    _expect(data, dict, "tls")
    _no_unknown(data, {"cert_file", "key_file", "client_ca_file"}, "tls.")
    cert, key = _key_pair(data, "tls.", base, required=True)
    assert cert is not None and key is not None
    ca = None if data.get("client_ca_file") is None else _pem(
        data["client_ca_file"], "tls.client_ca_file", base, _CERTIFICATE)
    return ServerTLS(cert, key, ca)


def _upstream_tls(data: Any, where: str, base: Path) -> UpstreamTLS:
    key = f"{where}upstream_tls"
    if data is True:  # TLS with the system's roots and nothing else
        return UpstreamTLS()
    _expect(data, dict, key)
    _no_unknown(data, {"ca_file", "cert_file", "key_file", "server_name"}, f"{key}.")
    cert, private = _key_pair(data, f"{key}.", base, required=False)
    ca = None if data.get("ca_file") is None else _pem(
        data["ca_file"], f"{key}.ca_file", base, _CERTIFICATE)
    name = data.get("server_name")
    if name is not None and not _expect(name, str, f"{key}.server_name"):
        raise ConfigError(f"{key}.server_name: must not be empty")
    return UpstreamTLS(ca, cert, private, name)


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
