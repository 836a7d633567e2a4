"""A variant's ``discovery`` key: the DNS name to watch, and the resolver to ask
(tritonmesh.discovery does the watching)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from tritonmesh.configvalues import ConfigError, _expect, _no_unknown, _non_negative, _weight

__all__ = ["DnsDiscovery"]


@dataclass(frozen=True)
class DnsDiscovery:
    """Instances from DNS (tritonmesh.discovery): an SRV name (``port`` None), or a name
    whose A/AAAA records are served at ``port``."""

    dns: str  # as written in the config
    name: str
    port: int | None
    interval_s: float = 5.0
    resolver: tuple[str, int] | None = None  # None: the system's resolvers
    drain_timeout_s: float = 30.0


def _discovery(data: Any, key: str) -> DnsDiscovery:
    _expect(data, dict, key)
    _no_unknown(data, {"dns", "interval_s", "resolver", "drain_timeout_s"}, f"{key}.")
    if "dns" not in data:
        raise ConfigError(f"{key}.dns: required")
    text: str = _expect(data["dns"], str, f"{key}.dns")
    name, sep, port_text = text.rpartition(":")
    if sep:
        if not name or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"{key}.dns: expected NAME:PORT or an SRV name, got {text!r}")
        port: int | None = int(port_text)
    elif text.startswith("_") and "." in text:
        name, port = text, None
    else:
        raise ConfigError(f"{key}.dns: expected an SRV name (_service._proto.name, e.g. "
                          f"_grpc._tcp.triton.ns.svc.cluster.local) or NAME:PORT for A/AAAA "
                          f"records, got {text!r}")
    resolver = None
    if data.get("resolver") is not None:
        resolver = _resolver_address(_expect(data["resolver"], str, f"{key}.resolver"),
                                     f"{key}.resolver")
    return DnsDiscovery(
        dns=text, name=name, port=port,
        interval_s=_weight(data.get("interval_s", 5.0), f"{key}.interval_s"),
        resolver=resolver,
        drain_timeout_s=_non_negative(data.get("drain_timeout_s", 30.0),
                                      f"{key}.drain_timeout_s"),
    )


def _resolver_address(text: str, key: str) -> tuple[str, int]:
    """A DNS server: IP, IP:PORT or [IPv6]:PORT (port 53 when not given)."""
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ConfigError(f"{key}: expected IP, IP:PORT or [IPv6]:PORT, got {text!r}")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text.isdigit():
            raise ConfigError(f"{key}: expected IP, IP:PORT or [IPv6]:PORT, got {text!r}")
        port = int(port_text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{key}: a DNS server is given by its IP address, got {text!r}") \
            from None
    if not 0 < port < 65536:
        raise ConfigError(f"{key}: port out of range in {text!r}")
    return host, port
