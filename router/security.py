"""The keys that bound who reaches the router and what one client can make it hold:
``admin_listen``, ``auth``, ``instance_networks`` (docs/security.md) and ``limits``
(docs/config.md, "Limits")."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tritonmesh.configvalues import (
    ConfigError,
    _address,
    _expect,
    _no_unknown,
    _non_negative,
    _positive_int,
)

__all__ = ["LOOPBACK_NETWORKS", "AuthConfig", "IPNetwork", "LimitsConfig"]


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AuthConfig:
    """Bearer tokens the router accepts (tritonmesh.auth; docs/security.md), read from
    the token files when the config is loaded. None: that plane takes no token."""

    data_tokens: frozenset[str] | None = field(default=None, repr=False)
    admin_tokens: frozenset[str] | None = field(default=None, repr=False)


LOOPBACK_NETWORKS: Final[tuple[IPNetwork, ...]] = (
    ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@dataclass(frozen=True)
class LimitsConfig:
    """What one client can make the router hold: messages, connections, streams, sequence
    pins and remembered model policies (docs/config.md, "Limits")."""

    max_message_bytes: int = 128 * 2**20
    max_connections: int = 10_000
    max_concurrent_streams: int = 10_000  # per connection (HTTP/2 SETTINGS)
    connection_idle_timeout_s: float = 300.0  # 0: none
    connection_max_age_s: float = 0.0  # 0: no limit
    sequence_idle_timeout_s: float = 10.0
    max_sequences: int = 100_000
    max_sequence_id_bytes: int = 256
    max_model_policies: int = 1_024
    memory_trim_interval_s: float = 10.0  # 0: off
    # Requests of one client stream in flight at once (the router stops reading that stream
    # beyond it), and the least deadline worth sending to Triton.
    max_stream_requests_in_flight: int = 64
    min_upstream_deadline_ms: float = 5.0
    # Calls gRPC has received but the router's event loop has not taken up yet (a burst).
    max_pending_calls: int = 10_000


# -- security keys: admin_listen, auth, instance_networks --

_SECURITY_KEYS: Final = frozenset({"admin_listen", "auth", "instance_networks"})


def _admin_listen(value: Any, listen: str) -> str | None:
    if value is None:
        return None
    text: str = _expect(value, str, "admin_listen")
    if text.startswith("unix:"):
        if len(text) == len("unix:"):
            raise ConfigError("admin_listen: unix: needs a path, e.g. unix:/run/tritonmesh/admin")
        return text
    if text == listen and not text.endswith(":0"):  # port 0: two free ports
        raise ConfigError(f"admin_listen: must differ from listen ({listen}): the admin API "
                          "has a listener of its own")
    return _address(text, "admin_listen", listen=True)


def _tokens(value: Any, key: str, base: Path) -> frozenset[str]:
    """One token per line; blank lines and lines starting with # are skipped."""
    path: Path = base / _expect(value, str, key)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{key}: cannot read {path}: {reason or exc}") from None
    tokens = set()
    for number, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        # What a client can send in an `authorization` header: visible ASCII, no spaces.
        if not token.isascii() or not token.isprintable() or " " in token:
            raise ConfigError(f"{key}: {path} line {number}: a token is printable ASCII "
                              "without spaces")
        tokens.add(token)
    if not tokens:
        raise ConfigError(f"{key}: {path} holds no token (one per line)")
    return frozenset(tokens)


def _auth(data: Any, base: Path) -> AuthConfig:
    _expect(data, dict, "auth")
    _no_unknown(data, {"data_tokens_file", "admin_tokens_file"}, "auth.")
    return AuthConfig(**{
        plane + "_tokens": _tokens(data[f"{plane}_tokens_file"], f"auth.{plane}_tokens_file",
                                   base)
        for plane in ("data", "admin") if data.get(f"{plane}_tokens_file") is not None
    })


def _networks(value: Any) -> tuple[IPNetwork, ...]:
    items = _expect(value, list, "instance_networks")
    networks = []
    for i, item in enumerate(items):
        key = f"instance_networks[{i}]"
        try:
            networks.append(ipaddress.ip_network(_expect(item, str, key)))
        except ValueError as exc:
            raise ConfigError(f"{key}: expected a network such as 10.0.0.0/8 or "
                              f"fd00::/8 ({exc})") from None
    return tuple(networks)


def _limits(data: Any) -> LimitsConfig:
    _expect(data, dict, "limits")
    defaults = LimitsConfig()
    _no_unknown(data, set(defaults.__dataclass_fields__), "limits.")
    values: dict[str, Any] = {}
    for key in defaults.__dataclass_fields__:
        value = data.get(key, getattr(defaults, key))
        if key.endswith(("_s", "_ms")):
            number = _non_negative(value, f"limits.{key}")
            if key == "sequence_idle_timeout_s" and number == 0:
                raise ConfigError(f"limits.{key}: must be a positive number, got {value!r}")
            values[key] = number
        else:
            values[key] = _positive_int(value, f"limits.{key}")
    if values["max_message_bytes"] > 2**31 - 1:
        raise ConfigError("limits.max_message_bytes: gRPC's largest is 2147483647, got "
                          f"{values['max_message_bytes']}")
    return LimitsConfig(**values)
