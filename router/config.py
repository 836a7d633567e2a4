"""Endpoint configuration, shaped like SageMaker's ``CreateEndpointConfig``.

An endpoint has production variants. Each variant serves some (or all) models,
takes a share of traffic by weight, routes within itself by a strategy, and is
backed by instances: static Triton addresses, local workers started by
tritonmesh, or both. Three spellings are accepted:

* tritonmesh YAML or TOML (snake_case keys, documented in ``docs/config.md``);
* SageMaker's own ``CreateEndpointConfig`` JSON (``ProductionVariants``...), as is:
  ``InitialInstanceCount`` becomes that many local workers.

Every error names the offending key, e.g. ``variants[1].routing_strategy``.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from tritonmesh.loadconfig import LoadReportConfig

__all__ = [
    "AuthConfig",
    "ConfigError",
    "DnsDiscovery",
    "EndpointConfig",
    "HealthCheckConfig",
    "LimitsConfig",
    "LocalWorkers",
    "QueueOrder",
    "RetryConfig",
    "RoutingStrategy",
    "ServerTLS",
    "UpstreamTLS",
    "VariantConfig",
    "WorkHint",
    "load_config",
    "parse_config",
]


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


class RoutingStrategy(enum.StrEnum):
    RANDOM = "RANDOM"
    LEAST_OUTSTANDING_REQUESTS = "LEAST_OUTSTANDING_REQUESTS"
    ROUND_ROBIN = "ROUND_ROBIN"
    POWER_OF_TWO_CHOICES = "POWER_OF_TWO_CHOICES"
    LEAST_OUTSTANDING_WORK = "LEAST_OUTSTANDING_WORK"


class QueueOrder(enum.StrEnum):
    """How late binding serves the requests waiting for a free instance."""

    FIFO = "FIFO"
    LEAST_SLACK = "LEAST_SLACK"


@dataclass(frozen=True)
class WorkHint:
    """Where LEAST_OUTSTANDING_WORK reads a model's request cost: ``base`` plus the sum of
    input tensor ``input``'s elements, or plus request parameter ``parameter``. Requests
    without it cost ``base`` (at least 1)."""

    input: str | None = None
    parameter: str | None = None
    base: float = 0.0


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


@dataclass(frozen=True)
class LocalWorkers:
    count: int
    model_repository: str | None = None  # None: the bundled demo repository


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


@dataclass(frozen=True)
class VariantConfig:
    name: str
    weight: float = 1.0
    routing_strategy: RoutingStrategy = RoutingStrategy.RANDOM
    models: frozenset[str] | None = None  # None: serves every model
    instances: tuple[str, ...] = ()
    local_workers: LocalWorkers | None = None
    # Late binding: at most this many requests in flight per instance; the rest wait in the
    # router (FIFO, up to max_queue, within their deadline) for the first free instance.
    max_concurrency: int | None = None
    max_queue: int = 1024
    queue_order: QueueOrder = QueueOrder.FIFO
    # LEAST_SLACK: the deadline of a request that carries none (or a later one).
    default_deadline_s: float = 60.0
    # Instances joining at run time ramp from a tenth of their weight over this; 0: off.
    slow_start_s: float = 5.0
    # Late binding, one request per instance: send an instance its next waiting request
    # this long before its running one is expected to end; 0: off.
    dispatch_ahead_s: float = 0.0
    # TLS to this variant's instances; None: plaintext.
    upstream_tls: UpstreamTLS | None = None
    # Instances from DNS, beside the static ones; None: static only.
    discovery: DnsDiscovery | None = None
    # Data path under faults: a ModelInfer attempt gets at most this long upstream; None: off.
    per_try_timeout_s: float | None = None
    # Triton's own load blended into picks (tritonmesh.loadreport); None: local counts only.
    load_report: LoadReportConfig | None = None


@dataclass(frozen=True)
class HealthCheckConfig:
    interval_s: float = 2.0
    timeout_s: float = 1.0
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1


@dataclass(frozen=True)
class RetryConfig:
    """ModelInfer retries for requests that provably never reached Triton (tritonmesh.retry)."""
    max_per_request: int = 2
    budget_ratio: float = 0.2  # retries per request, over the last ttl_s
    min_per_s: float = 10.0    # ... plus this many per second, however quiet the endpoint
    ttl_s: float = 10.0


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


@dataclass(frozen=True)
class EndpointConfig:
    name: str = "tritonmesh"
    listen: str = "127.0.0.1:8001"
    metrics_listen: str | None = "127.0.0.1:8002"
    variants: tuple[VariantConfig, ...] = ()
    health_check: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    retries: RetryConfig = field(default_factory=RetryConfig)
    shutdown_grace_s: float = 5.0
    # model name -> where its requests' cost is read (LEAST_OUTSTANDING_WORK variants)
    work_hints: Mapping[str, WorkHint] = field(default_factory=dict)
    # TLS on `listen` and `admin_listen`; None: plaintext.
    tls: ServerTLS | None = None
    # -- security (docs/security.md) --
    # The admin API's own listener (HOST:PORT or unix:PATH); None: no admin API.
    admin_listen: str | None = "127.0.0.1:8003"
    auth: AuthConfig = field(default_factory=AuthConfig)
    # Admin AddInstance accepts only addresses in these networks.
    instance_networks: tuple[IPNetwork, ...] = LOOPBACK_NETWORKS
    limits: LimitsConfig = field(default_factory=LimitsConfig)


def _expect(value: Any, kind: type | tuple[type, ...], key: str) -> Any:
    # bool is an int in Python; a weight of `true` is a typo, not 1.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(f"{key}: expected {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{key}: expected {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", float: "a number", list: "a list",
             dict: "a mapping", bool: "true or false"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _no_unknown(data: Mapping[str, Any], allowed: set[str] | frozenset[str],
                where: str) -> None:
    for key in data:
        if key not in allowed:
            known = ", ".join(sorted(allowed))
            raise ConfigError(f"{where}{key}: unknown key (known keys: {known})")


def _address(value: Any, key: str, *, listen: bool = False) -> str:
    """HOST:PORT; a listening address may use port 0 for any free port."""
    text: str = _expect(value, str, key)
    host, sep, port = text.rpartition(":")
    lowest = 0 if listen else 1
    # isdecimal() alone would take "1²" or Arabic-Indic digits, which int() then refuses.
    if not sep or not host or not (port.isascii() and port.isdigit()) \
            or not lowest <= int(port) < 65536:
        raise ConfigError(f"{key}: expected HOST:PORT, got {text!r}")
    return text


def _strategy(value: Any, key: str) -> RoutingStrategy:
    text = _expect(value, str, key)
    try:
        return RoutingStrategy(text.upper())
    except ValueError:
        options = ", ".join(s.value for s in RoutingStrategy)
        raise ConfigError(f"{key}: unknown strategy {text!r} (expected one of {options})") from None


def _weight(value: Any, key: str) -> float:
    number = float(_expect(value, (int, float), key))
    if not number > 0 or number != number or number == float("inf"):
        raise ConfigError(f"{key}: must be a positive number, got {value!r}")
    return number


def _non_negative(value: Any, key: str) -> float:
    number = float(_expect(value, (int, float), key))
    if not 0 <= number < float("inf"):
        raise ConfigError(f"{key}: must be a finite number >= 0, got {value!r}")
    return number


def _positive_int(value: Any, key: str) -> int:
    number = _expect(value, int, key)
    if number < 1:
        raise ConfigError(f"{key}: must be at least 1, got {number}")
    return int(number)


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


def _variant(data: Any, where: str, base: Path) -> VariantConfig:
    _expect(data, dict, where.rstrip("."))
    _no_unknown(data, {"name", "weight", "routing_strategy", "models", "instances",
                       "local_workers", "max_concurrency_per_instance", "max_queue",
                       "queue_order", "default_deadline_s", "slow_start_s",
                       "dispatch_ahead_s", "upstream_tls", "discovery",
                       "per_try_timeout_s", "load_report"}, where)
    if "name" not in data:
        raise ConfigError(f"{where}name: required")
    name = _expect(data["name"], str, f"{where}name")
    if not name:
        raise ConfigError(f"{where}name: must not be empty")
    models = None
    if "models" in data:
        items = _expect(data["models"], list, f"{where}models")
        models = frozenset(_expect(m, str, f"{where}models[{i}]") for i, m in enumerate(items))
    instances = tuple(
        _address(a, f"{where}instances[{i}]")
        for i, a in enumerate(_expect(data.get("instances", []), list, f"{where}instances"))
    )
    local = None
    if "local_workers" in data:
        lw = data["local_workers"]
        key = f"{where}local_workers"
        if isinstance(lw, int) and not isinstance(lw, bool):
            local = LocalWorkers(_positive_int(lw, key))
        else:
            _expect(lw, dict, key)
            _no_unknown(lw, {"count", "model_repository"}, f"{key}.")
            if "count" not in lw:
                raise ConfigError(f"{key}.count: required")
            repo = lw.get("model_repository")
            if repo is not None:
                _expect(repo, str, f"{key}.model_repository")
            local = LocalWorkers(_positive_int(lw["count"], f"{key}.count"), repo)
    discovery = None if data.get("discovery") is None \
        else _discovery(data["discovery"], f"{where}discovery")
    if not instances and local is None and discovery is None:
        raise ConfigError(f"{where}instances: a variant needs instances, local_workers or "
                          "discovery")
    strategy = _strategy(data.get("routing_strategy", "RANDOM"), f"{where}routing_strategy")
    order_text = _expect(data.get("queue_order", "FIFO"), str, f"{where}queue_order")
    try:
        order = QueueOrder(order_text.upper())
    except ValueError:
        options = ", ".join(o.value for o in QueueOrder)
        raise ConfigError(f"{where}queue_order: unknown order {order_text!r} "
                          f"(expected one of {options})") from None
    if order is QueueOrder.LEAST_SLACK and (
            strategy is not RoutingStrategy.LEAST_OUTSTANDING_WORK
            or data.get("max_concurrency_per_instance") is None):
        raise ConfigError(f"{where}queue_order: LEAST_SLACK orders waiting requests by their "
                          "expected service time, so it needs routing_strategy "
                          "LEAST_OUTSTANDING_WORK and max_concurrency_per_instance")
    ahead = _non_negative(data.get("dispatch_ahead_s", 0.0), f"{where}dispatch_ahead_s")
    if ahead > 0.0 and (strategy is not RoutingStrategy.LEAST_OUTSTANDING_WORK
                        or data.get("max_concurrency_per_instance") != 1):
        raise ConfigError(f"{where}dispatch_ahead_s: sending the next request before the "
                          "running one ends needs to know when that is, so it needs "
                          "routing_strategy LEAST_OUTSTANDING_WORK and "
                          "max_concurrency_per_instance: 1")
    upstream_tls = None
    if data.get("upstream_tls") is not None and data["upstream_tls"] is not False:
        if local is not None:
            raise ConfigError(f"{where}upstream_tls: local workers serve plaintext on "
                              "loopback; put TLS instances in a variant of their own")
        upstream_tls = _upstream_tls(data["upstream_tls"], where, base)
    return VariantConfig(
        name=name,
        weight=_weight(data.get("weight", 1.0), f"{where}weight"),
        routing_strategy=strategy,
        models=models,
        instances=instances,
        local_workers=local,
        max_concurrency=None if data.get("max_concurrency_per_instance") is None
        else _positive_int(data["max_concurrency_per_instance"],
                           f"{where}max_concurrency_per_instance"),
        max_queue=_positive_int(data.get("max_queue", 1024), f"{where}max_queue"),
        queue_order=order,
        default_deadline_s=_weight(data.get("default_deadline_s", 60.0),
                                   f"{where}default_deadline_s"),
        slow_start_s=_non_negative(data.get("slow_start_s", 5.0), f"{where}slow_start_s"),
        dispatch_ahead_s=ahead,
        upstream_tls=upstream_tls,
        discovery=discovery,
        per_try_timeout_s=None if data.get("per_try_timeout_s") is None
        else _weight(data["per_try_timeout_s"], f"{where}per_try_timeout_s"),
        load_report=_load_report(data.get("load_report"), f"{where}load_report"),
    )


def _load_report(data: Any, key: str) -> LoadReportConfig | None:
    from tritonmesh.loadconfig import parse_load_report  # it imports this module's helpers

    return parse_load_report(data, key)


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


def _health(data: Any) -> HealthCheckConfig:
    _expect(data, dict, "health_check")
    _no_unknown(data, {"interval_s", "timeout_s", "unhealthy_threshold", "healthy_threshold"},
                "health_check.")
    defaults = HealthCheckConfig()
    return HealthCheckConfig(
        interval_s=_weight(data.get("interval_s", defaults.interval_s), "health_check.interval_s"),
        timeout_s=_weight(data.get("timeout_s", defaults.timeout_s), "health_check.timeout_s"),
        unhealthy_threshold=_positive_int(
            data.get("unhealthy_threshold", defaults.unhealthy_threshold),
            "health_check.unhealthy_threshold"),
        healthy_threshold=_positive_int(
            data.get("healthy_threshold", defaults.healthy_threshold),
            "health_check.healthy_threshold"),
    )


def _retries(data: Any) -> RetryConfig:
    _expect(data, dict, "retries")
    _no_unknown(data, {"max_per_request", "budget_ratio", "min_per_s", "ttl_s"}, "retries.")
    defaults = RetryConfig()
    max_per_request = _expect(data.get("max_per_request", defaults.max_per_request), int,
                              "retries.max_per_request")
    if max_per_request < 0:
        raise ConfigError(f"retries.max_per_request: must be >= 0, got {max_per_request}")
    return RetryConfig(
        max_per_request=max_per_request,
        budget_ratio=_non_negative(data.get("budget_ratio", defaults.budget_ratio),
                                   "retries.budget_ratio"),
        min_per_s=_non_negative(data.get("min_per_s", defaults.min_per_s), "retries.min_per_s"),
        ttl_s=_weight(data.get("ttl_s", defaults.ttl_s), "retries.ttl_s"),
    )


def _work_hints(data: Any) -> dict[str, WorkHint]:
    _expect(data, dict, "work_hints")
    hints = {}
    for model, spec in data.items():
        where = f"work_hints.{model}"
        _expect(spec, dict, where)
        _no_unknown(spec, {"input", "parameter", "base"}, f"{where}.")
        if ("input" in spec) == ("parameter" in spec):
            raise ConfigError(f"{where}: give exactly one of input or parameter")
        source = "input" if "input" in spec else "parameter"
        name = _expect(spec[source], str, f"{where}.{source}")
        if not name:
            raise ConfigError(f"{where}.{source}: must not be empty")
        base = float(_expect(spec.get("base", 0.0), (int, float), f"{where}.base"))
        if not 0 <= base < float("inf"):
            raise ConfigError(f"{where}.base: must be a finite number >= 0, got {base!r}")
        hints[model] = WorkHint(**{source: name}, base=base)
    return hints


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


_ENDPOINT_KEYS: Final = frozenset({"endpoint", "listen", "metrics_listen", "variants",
                                   "health_check", "retries", "shutdown_grace_s",
                                   "work_hints", "tls", "limits"}) | _SECURITY_KEYS


def _from_sagemaker(data: Mapping[str, Any]) -> dict[str, Any]:
    """Translate ``CreateEndpointConfig`` JSON into tritonmesh's own keys."""
    variants = []
    pvs = _expect(data["ProductionVariants"], list, "ProductionVariants")
    for i, pv in enumerate(pvs):
        where = f"ProductionVariants[{i}]"
        _expect(pv, dict, where)
        if "VariantName" not in pv:
            raise ConfigError(f"{where}.VariantName: required")
        routing = pv.get("RoutingConfig", {})
        _expect(routing, dict, f"{where}.RoutingConfig")
        variant: dict[str, Any] = {
            "name": pv["VariantName"],
            "weight": pv.get("InitialVariantWeight", 1.0),
            "routing_strategy": routing.get("RoutingStrategy", "RANDOM"),
            "local_workers": pv.get("InitialInstanceCount", 1),
        }
        variants.append(variant)
    out: dict[str, Any] = {"variants": variants}
    # tritonmesh's own endpoint keys beside SageMaker's: a `tls` dropped here would serve
    # plaintext without a word.
    for key in _ENDPOINT_KEYS - {"endpoint", "variants"}:
        if key in data:
            out[key] = data[key]
    if "EndpointConfigName" in data:
        out["endpoint"] = data["EndpointConfigName"]
    return out


def parse_config(data: Any, base: str | os.PathLike[str] | None = None) -> EndpointConfig:
    """Validate a parsed document (YAML, TOML or SageMaker JSON) into an EndpointConfig.

    Relative certificate paths are read from ``base`` (the config file's directory when
    it comes from :func:`load_config`; otherwise the working directory)."""
    _expect(data, dict, "the configuration")
    root = Path(base) if base is not None else Path()
    if "ProductionVariants" in data:
        data = _from_sagemaker(data)
    _no_unknown(data, _ENDPOINT_KEYS, "")
    items = _expect(data.get("variants"), list, "variants") if "variants" in data else None
    if not items:
        raise ConfigError("variants: at least one production variant is required")
    variants = tuple(_variant(v, f"variants[{i}].", root) for i, v in enumerate(items))
    seen: set[str] = set()
    for i, v in enumerate(variants):
        if v.name in seen:
            raise ConfigError(f"variants[{i}].name: duplicate variant name {v.name!r}")
        seen.add(v.name)
    metrics = data.get("metrics_listen", EndpointConfig.metrics_listen)
    listen = _address(data.get("listen", EndpointConfig.listen), "listen", listen=True)
    return EndpointConfig(
        name=_expect(data.get("endpoint", "tritonmesh"), str, "endpoint"),
        listen=listen,
        metrics_listen=None if metrics is None else _address(metrics, "metrics_listen",
                                                             listen=True),
        variants=variants,
        health_check=_health(data["health_check"]) if "health_check" in data
        else HealthCheckConfig(),
        retries=_retries(data.get("retries", {})),
        shutdown_grace_s=_weight(data.get("shutdown_grace_s", 5.0), "shutdown_grace_s"),
        work_hints=_work_hints(data.get("work_hints", {})),
        tls=None if data.get("tls") is None or data["tls"] is False
        else _server_tls(data["tls"], root),
        admin_listen=_admin_listen(data.get("admin_listen", EndpointConfig.admin_listen),
                                   listen),
        auth=AuthConfig() if data.get("auth") is None else _auth(data["auth"], root),
        instance_networks=_networks(data["instance_networks"]) if "instance_networks" in data
        else LOOPBACK_NETWORKS,
        limits=_limits(data.get("limits", {})),
    )


def load_config(path: str | os.PathLike[str]) -> EndpointConfig:
    """Read and validate a YAML, TOML or JSON configuration file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except ConfigError:
        raise
    except Exception as exc:  # each parser raises its own error type
        # One line: parsers point at the spot over several (and it is logged as one).
        raise ConfigError(f"{p}: cannot parse: {' '.join(str(exc).split())}") from exc
    try:
        return parse_config(data, p.parent)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
