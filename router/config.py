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

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tritonmesh.autoscale_config import AUTOSCALING_KEYS, Autoscaling, parse_autoscaling
from tritonmesh.configvalues import (
    ConfigError,
    _address,
    _expect,
    _no_unknown,
    _non_negative,
    _positive_int,
    _weight,
)
from tritonmesh.dnsname import DnsDiscovery, _discovery
from tritonmesh.loadconfig import LoadReportConfig, parse_load_report
from tritonmesh.native_config import NativeConfig, choose_data_path, parse_data_path, parse_native
from tritonmesh.processconfig import (
    DEFAULT_SHARED_TABLE_SLOTS,
    check_processes,
    fit_auto,
    parse_processes,
    parse_shared_table_slots,
)
from tritonmesh.routing import QueueOrder, RoutingStrategy, WorkHint, _strategy, _work_hints
from tritonmesh.sagemaker import _from_sagemaker
from tritonmesh.security import (
    _SECURITY_KEYS,
    LOOPBACK_NETWORKS,
    AuthConfig,
    IPNetwork,
    LimitsConfig,
    _admin_listen,
    _auth,
    _limits,
    _networks,
)
from tritonmesh.tls import ServerTLS, UpstreamTLS, _server_tls, _upstream_tls

__all__ = [
    "LOOPBACK_NETWORKS",
    "AuthConfig",
    "ConfigError",
    "DnsDiscovery",
    "EndpointConfig",
    "HealthCheckConfig",
    "IPNetwork",
    "LimitsConfig",
    "LocalWorkers",
    "QueueOrder",
    "RetryConfig",
    "RoutingStrategy",
    "ServerTLS",
    "ShadowConfig",
    "UpstreamTLS",
    "VariantConfig",
    "WorkHint",
    "load_config",
    "parse_config",
]

# A variant's upstream_cancellation values (VariantConfig).
CANCELLATIONS: Final = ("absorb", "forward")


@dataclass(frozen=True)
class LocalWorkers:
    count: int
    model_repository: str | None = None  # None: the bundled demo repository
    autoscaling: Autoscaling | None = None  # tritonmesh.autoscale_config; count is min


@dataclass(frozen=True)
class ShadowConfig:
    """This variant takes no live traffic: a ``sample`` share of the ``of`` variant's
    ``ModelInfer`` requests is copied to it, answered, measured and discarded; at most
    ``max_in_flight`` copies at once (a slow shadow holds their bytes), the rest skipped."""

    of: str
    sample: float
    max_in_flight: int = 256


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
    # What a ModelInfer whose client left (cancelled, or its deadline passed) does upstream:
    # "absorb" lets Triton finish it (at most absorb_timeout_s more) and drops the answer,
    # and sends Triton no deadline; "forward" resets it. Triton's gRPC frontend can crash
    # on a cancellation racing a completion (server#7368, #8034), so absorb is the default.
    upstream_cancellation: str = "absorb"
    absorb_timeout_s: float = 60.0
    # Late binding's queue by Triton's request priority (1 first): the class of requests
    # without one, and how long a request waits before it goes ahead of new requests of the
    # class above (so none starves).
    default_priority: int = 1
    priority_aging_s: float = 1.0
    shadow: ShadowConfig | None = None
    # Triton's own load blended into picks (tritonmesh.loadreport); None: local counts only.
    load_report: LoadReportConfig | None = None

    @property
    def absorbs(self) -> bool:
        return self.upstream_cancellation == "absorb"


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
    # grpc | native; None: TRITONMESH_DATA_PATH, else the default (native_config.choose_data_path)
    data_path: str | None = None
    native: NativeConfig = field(default_factory=NativeConfig)
    # Router processes on `listen` (tritonmesh.processconfig), and their tables' slots.
    processes: int = 1
    shared_table_slots: int = DEFAULT_SHARED_TABLE_SLOTS


def _variant(data: Any, where: str, base: Path) -> VariantConfig:
    _expect(data, dict, where.rstrip("."))
    _no_unknown(data, {"name", "weight", "routing_strategy", "models", "instances",
                       "local_workers", "max_concurrency_per_instance", "max_queue",
                       "queue_order", "default_deadline_s", "slow_start_s",
                       "dispatch_ahead_s", "upstream_tls", "discovery",
                       "per_try_timeout_s", "upstream_cancellation", "absorb_timeout_s",
                       "default_priority", "priority_aging_s", "shadow", "load_report"},
               where)
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
            _no_unknown(lw, {"count", "model_repository", *AUTOSCALING_KEYS}, f"{key}.")
            scaling = parse_autoscaling(lw, key)
            if "count" not in lw and scaling is None:
                raise ConfigError(f"{key}.count: required")
            repo = lw.get("model_repository")
            if repo is not None:
                _expect(repo, str, f"{key}.model_repository")
            local = LocalWorkers(scaling.min if scaling is not None else
                                 _positive_int(lw["count"], f"{key}.count"), repo, scaling)
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
    cancellation = _expect(data.get("upstream_cancellation", "absorb"), str,
                           f"{where}upstream_cancellation").lower()
    if cancellation not in CANCELLATIONS:
        raise ConfigError(f"{where}upstream_cancellation: expected one of "
                          f"{', '.join(CANCELLATIONS)}, got {data['upstream_cancellation']!r}")
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
        upstream_cancellation=cancellation,
        absorb_timeout_s=_weight(data.get("absorb_timeout_s", 60.0), f"{where}absorb_timeout_s"),
        default_priority=_positive_int(data.get("default_priority", 1),
                                       f"{where}default_priority"),
        priority_aging_s=_weight(data.get("priority_aging_s", 1.0), f"{where}priority_aging_s"),
        shadow=None if data.get("shadow") is None else _shadow(data["shadow"], f"{where}shadow"),
        load_report=parse_load_report(data.get("load_report"), f"{where}load_report"),
    )


def _shadow(data: Any, key: str) -> ShadowConfig:
    _expect(data, dict, key)
    _no_unknown(data, {"of", "sample", "max_in_flight"}, f"{key}.")
    if "of" not in data:
        raise ConfigError(f"{key}.of: required (the live variant to copy requests from)")
    of = _expect(data["of"], str, f"{key}.of")
    sample = float(_expect(data.get("sample", 1.0), (int, float), f"{key}.sample"))
    if not 0.0 < sample <= 1.0:
        raise ConfigError(f"{key}.sample: the share of requests copied, in (0, 1], "
                          f"got {data.get('sample')!r}")
    return ShadowConfig(of, sample, _positive_int(data.get("max_in_flight", 256),
                                                  f"{key}.max_in_flight"))


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


_ENDPOINT_KEYS: Final = frozenset({"endpoint", "listen", "metrics_listen", "variants",
                                   "health_check", "retries", "shutdown_grace_s",
                                   "work_hints", "tls", "limits", "data_path",
                                   "native", "processes",
                                   "shared_table_slots"}) | _SECURITY_KEYS


def parse_config(data: Any, base: str | os.PathLike[str] | None = None) -> EndpointConfig:
    """Validate a parsed document (YAML, TOML or SageMaker JSON) into an EndpointConfig.

    Relative certificate paths are read from ``base`` (the config file's directory when
    it comes from :func:`load_config`; otherwise the working directory)."""
    _expect(data, dict, "the configuration")
    root = Path(base) if base is not None else Path()
    if "ProductionVariants" in data:
        data = _from_sagemaker(data, _ENDPOINT_KEYS)
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
    live = {v.name for v in variants if v.shadow is None}
    for i, v in enumerate(variants):
        if v.shadow is not None and v.shadow.of not in live:
            raise ConfigError(f"variants[{i}].shadow.of: {v.shadow.of!r} is not a live variant "
                              f"of this endpoint (live: {', '.join(sorted(live)) or 'none'})")
    if not live:
        raise ConfigError("variants: at least one variant must take live traffic (not shadow)")
    metrics = data.get("metrics_listen", EndpointConfig.metrics_listen)
    listen = _address(data.get("listen", EndpointConfig.listen), "listen", listen=True)
    config = EndpointConfig(
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
        data_path=parse_data_path(data.get("data_path")),
        native=parse_native(data.get("native")),
        processes=parse_processes(data.get("processes", 1)),
        shared_table_slots=parse_shared_table_slots(
            data.get("shared_table_slots", DEFAULT_SHARED_TABLE_SLOTS)),
    )
    if data.get("processes") == "auto":
        config = fit_auto(config)
    choose_data_path(config)  # an explicit native it cannot serve is refused here
    check_processes(config)
    return config


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
