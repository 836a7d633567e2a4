"""The router process: a grpc.aio server speaking Triton's protocol, plus its control plane.

``inference.GRPCInferenceService`` is served by a generic handler keyed by method
name, with no (de)serializers: ModelInfer and ModelStreamInfer bytes go to
:mod:`tritonmesh.proxy` untouched, the server-wide RPCs to
:mod:`tritonmesh.fanout`. Beside it on the same port: ``grpc.health.v1`` and server
reflection. tritonmesh's admin service has a listener of its own (``admin_listen``),
so that whoever can send inference cannot change the fleet (docs/security.md).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.registry import Collector
from tritonmesh._pb import tritonmesh_admin_pb2, tritonmesh_admin_pb2_grpc
from tritonmesh.admin import AdminService
from tritonmesh.auth import (
    HEALTH_PREFIX,
    ControlAccess,
    TokenInterceptor,
    Tokens,
    admin_plane_message,
    data_plane_message,
)
from tritonmesh.balancer import Balancer, Variant
from tritonmesh.config import EndpointConfig, LimitsConfig
from tritonmesh.discovery import Discovery
from tritonmesh.fanout import Fanout
from tritonmesh.health import HealthChecker, probe_ready
from tritonmesh.housekeeping import Housekeeper
from tritonmesh.loadreport import LoadReporter
from tritonmesh.logfilter import quiet_client_gone
from tritonmesh.membership import Drains, active, reconcile
from tritonmesh.metrics import (
    AutoscalerCollector,
    BalancerCollector,
    DiscoveryCollector,
    LoadReportCollector,
)
from tritonmesh.native_config import DataPath, choose_data_path
from tritonmesh.native_front import NativePort
from tritonmesh.native_tls import PortCertificates
from tritonmesh.proxy import Proxy
from tritonmesh.shadow import ShadowCollector, Shadows
from tritonmesh.strict import StrictRegistrar
from tritonmesh.tls import ServerCertificates
from tritonmesh.workers.upstream import SERVICE, channel_options

if TYPE_CHECKING:
    from tritonmesh.autoscaler import Autoscaler
    from tritonmesh.processconfig import ProcessRole

__all__ = ["Router", "server_options"]

log = logging.getLogger("tritonmesh.server")

def server_options(limits: LimitsConfig, reuse_port: bool = False
                   ) -> tuple[tuple[str, Any], ...]:
    """The port's gRPC options: what one client may make the router hold
    (docs/config.md, "Limits"). A message over ``max_message_bytes`` is refused by gRPC
    itself with RESOURCE_EXHAUSTED before the router reads it. ``reuse_port``: several
    router processes share the port (SO_REUSEPORT; the kernel spreads connections)."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_concurrent_streams", limits.max_concurrent_streams),
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        # Accept client keepalive pings as Triton does, without GOAWAY for an idle client;
        # a client pinging more often than every 10 s without data gets GOAWAY after
        # max_ping_strikes such pings (gRPC's keepalive enforcement).
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.so_reuseport", int(reuse_port)),
        # gRPC refuses calls at random (CANCELLED) past 1,000 waiting for the event loop to
        # take them up, and all past 3,000: a burst of opens would fail here, not in Triton.
        ("grpc.server.max_pending_requests", limits.max_pending_calls),
        ("grpc.server.max_pending_requests_hard_limit", limits.max_pending_calls),
    ]
    if limits.connection_idle_timeout_s > 0:
        options.append(("grpc.max_connection_idle_ms",
                        max(1, round(limits.connection_idle_timeout_s * 1000))))
    if limits.connection_max_age_s > 0:
        options.append(("grpc.max_connection_age_ms",
                        max(1, round(limits.connection_max_age_s * 1000))))
    return tuple(options)


class Router:
    """One endpoint: its variants' instances behind one Triton-compatible gRPC port.

    ``instances`` maps each variant name to the Triton gRPC addresses behind it (static
    ones from the config plus any local workers already started by the caller);
    ``metrics_addresses`` maps such an address to its Triton's metrics HOST:PORT, where
    known (local workers), for variants with ``load_report``.
    ``role``: with several router processes, whether this one serves the port or runs the
    control plane, and its shared tables (:mod:`tritonmesh.processconfig`).
    """

    def __init__(self, config: EndpointConfig, instances: Mapping[str, Sequence[str]],
                 *, seed: int | None = None, metrics_addresses: Mapping[str, str] | None = None,
                 role: ProcessRole | None = None):
        self.config = config
        self.role = role
        self._instances = instances
        self._metrics_addresses = metrics_addresses or {}
        self.load_reporters: list[LoadReporter] = []
        self._seed = seed
        self.balancer: Balancer | None = None
        self.server: grpc.aio.Server | None = None
        self.data_path = DataPath("grpc", "not started")  # what serves the port, and why
        self.native: NativePort | None = None  # data_path: native; then `server` is private
        self.health: HealthChecker | None = None
        self.shadows: Shadows | None = None
        self.port = 0
        self._metrics_server: Any = None
        # With tls: replaceable (gRPC's, or the native port's ssl context).
        self.certificates: ServerCertificates | PortCertificates | None = None
        self.metrics_port: int | None = None
        self.admin_server: grpc.aio.Server | None = None
        self.admin_service: AdminService | None = None
        self.admin_certificates: ServerCertificates | None = None  # one per port
        self.admin_port = 0
        self.data_tokens = Tokens(config.auth.data_tokens)
        self.admin_tokens = Tokens(config.auth.admin_tokens)
        self.discoveries: list[Discovery] = []
        self.autoscalers: list[Autoscaler] = []  # local workers' (tritonmesh.endpoint)
        self.drains = Drains()  # RemoveInstance's and reloads', waited for at stop
        self.housekeeper: Housekeeper
        quiet_client_gone()

    @property
    def address(self) -> str:
        host = self.config.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    @property
    def admin_address(self) -> str | None:
        """Where the admin API listens (``unix:PATH`` as configured); None when off."""
        listen = self.config.admin_listen
        if listen is None or listen.startswith("unix:"):
            return listen
        return f"{listen.rpartition(':')[0]}:{self.admin_port}"

    async def start(self) -> None:
        self.data_path = choose_data_path(self.config)
        balancer = self.balancer = self._balancer()
        role = self.role
        if role is not None:
            role.on_balancer(balancer)
            if not role.serves_data:  # the supervisor: the control plane only
                self.shadows = Shadows(balancer)
                await self._start_control(balancer, None)
                log.info("tritonmesh supervisor running (admin API: %s)",
                         self.admin_address or "off")
                return

        self.shadows = Shadows(balancer)
        proxy = Proxy(balancer, self.config, self.shadows)
        fanout = Fanout(balancer, access=ControlAccess(self.admin_tokens))
        handlers: dict[str, grpc.RpcMethodHandler] = {
            name: grpc.unary_unary_rpc_method_handler(fn)
            for name, fn in fanout.handlers().items()
        }
        handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(proxy.model_infer)
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            proxy.model_stream_infer
        )
        # No interceptor without tokens: an open data plane costs nothing per call.
        interceptors = [] if not self.data_tokens.configured else [TokenInterceptor(
            (self.data_tokens, self.admin_tokens), data_plane_message(), (HEALTH_PREFIX,),
            strip=True)]
        if self.data_path.path == "native":  # tokens and shadows: ModelInfer relayed too
            self.native = NativePort(balancer, self.config, native_infer=not (
                self.data_tokens.configured or self.shadows))
        server = self.server = grpc.aio.server(options=server_options(
            self.config.limits if self.native is None else self.native.relay_limits,
            reuse_port=role is not None),
            interceptors=interceptors)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

        health_servicer = health.aio.HealthServicer()
        strict = StrictRegistrar(server)  # malformed bytes: INVALID_ARGUMENT, not a traceback
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, strict)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer((
            SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )), strict)
        native = self.native
        if native is not None:
            self.drains.removed = native.instance_removed
        if native is None:
            self.port, self.certificates = self._listen(server, self.config.listen)
        else:  # the relay's socket is private: TLS is the native port's
            self.port, _ = self._listen(server, native.internal, tls=False)
            self.certificates = native.certificates
        if role is not None:  # a router process: the supervisor runs the control plane
            self.health = HealthChecker(balancer, self.config.health_check, health_servicer)
            self.housekeeper.start()
            await server.start()
            if native is not None:  # beside the other router processes (SO_REUSEPORT)
                self.port = await native.start(self.config.listen, reuse_port=True)
            log.info("tritonmesh router process listening on %s (data_path: %s)",
                     self.address, self.data_path.path)
            return
        await self._start_control(balancer, health_servicer)
        await server.start()
        if native is not None:
            self.port = await native.start(self.config.listen)
        log.info("tritonmesh listening on %s (data path: %s, %s; admin API: %s)", self.address,
                 *self.data_path, self.admin_address or "off")

    async def _start_control(self, balancer: Balancer,
                             health_servicer: health.aio.HealthServicer | None) -> None:
        """The control plane: admin API, health checks, discovery, load reports, metrics."""
        if self.config.admin_listen is not None:
            self._open_admin_listener(balancer, self.config.admin_listen)
        self.health = HealthChecker(balancer, self.config.health_check, health_servicer)
        await self._discover(balancer)
        await self.health.check_once()
        self.health.start()
        for variant in balancer.variants:
            if variant.config.load_report is not None:
                reporter = LoadReporter(variant, variant.config.load_report,
                                        self._metrics_addresses)
                self.load_reporters.append(reporter)
                reporter.start()
        self.housekeeper.start()
        if self.admin_server is not None:
            await self.admin_server.start()
        if self.config.metrics_listen is not None:
            self._start_metrics(balancer, self.config.metrics_listen)

    def _listen(self, server: grpc.aio.Server, address: str, *, tls: bool = True
                ) -> tuple[int, ServerCertificates | None]:
        """Open ``address`` on ``server``, over TLS when configured (and ``tls``); the port
        and, with TLS, the port's replaceable certificates."""
        certificates = None
        if self.config.tls is None or not tls:
            port = server.add_insecure_port(address)
        else:
            certificates = ServerCertificates(self.config.tls)
            port = server.add_secure_port(address, certificates.credentials)
        if not port:
            raise OSError(f"cannot listen on {address}")
        return port, certificates

    def _open_admin_listener(self, balancer: Balancer, listen: str) -> None:
        interceptors = [] if not self.admin_tokens.configured else [
            TokenInterceptor((self.admin_tokens,), admin_plane_message())]
        server = self.admin_server = grpc.aio.server(
            options=(("grpc.so_reuseport", 0),), interceptors=interceptors)
        self.admin_service = AdminService(balancer, self.config.instance_networks,
                                          self.config.health_check.timeout_s, self.drains)
        self.admin_service.load_reporters = self.load_reporters
        self.admin_service.data_path = self.data_path
        self.admin_service.processes = self.config.processes
        strict = StrictRegistrar(server)  # malformed bytes: INVALID_ARGUMENT, not a traceback
        tritonmesh_admin_pb2_grpc.add_AdminServicer_to_server(self.admin_service, strict)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer((
                tritonmesh_admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
                reflection.SERVICE_NAME,
            )), strict)
        self.admin_port, self.admin_certificates = self._listen(server, listen)

    async def _discover(self, balancer: Balancer) -> None:
        """Each DNS-discovered variant's first lookup (before the port serves), then its loop."""
        timeout = self.config.health_check.timeout_s
        for variant in balancer.variants:
            spec = variant.config.discovery
            if spec is None:
                continue
            discovery = Discovery(
                variant, spec,
                probe=functools.partial(probe_ready, models=variant.models, timeout=timeout))
            self.discoveries.append(discovery)
            await discovery.refresh(slow_start=False)
            discovery.start()

    def _balancer(self) -> Balancer:
        limits = self.config.limits
        options = channel_options(limits.max_message_bytes)
        variants = []
        for i, vc in enumerate(self.config.variants):
            variant = Variant(vc, seed=None if self._seed is None else self._seed + i,
                              channel_options=options,
                              table=None if self.role is None else self.role.table(vc))
            for address in self._instances.get(vc.name, ()):
                variant.add(variant.connect(address))
            variants.append(variant)
        balancer = Balancer(variants, work_hints=self.config.work_hints,
                            retries=self.config.retries, max_sequences=limits.max_sequences,
                            max_sequence_id_bytes=limits.max_sequence_id_bytes,
                            max_model_policies=limits.max_model_policies)
        self.housekeeper = Housekeeper(balancer, limits)
        return balancer

    def _start_metrics(self, balancer: Balancer, listen: str) -> None:
        registry = CollectorRegistry(auto_describe=True)
        counts: Collector = BalancerCollector(balancer, self.config.name)
        registry.register(counts if self.role is None else self.role.metrics(counts))
        registry.register(DiscoveryCollector(self.discoveries))
        registry.register(AutoscalerCollector(self.autoscalers))
        if self.shadows:
            registry.register(ShadowCollector(self.shadows))
        registry.register(LoadReportCollector(self.load_reporters))
        host, _, port = listen.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host, registry=registry)
        self._metrics_server = server
        self.metrics_port = server.server_port

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let in-flight ones finish up to ``grace`` seconds, then cancel.

        Cancelled calls release their instances in their own ``finally`` blocks.
        """
        for discovery in self.discoveries:
            await discovery.stop()
        for reporter in self.load_reporters:
            await reporter.stop()
        if self.health is not None:
            await self.health.stop()
        if self.balancer is not None:
            await self.housekeeper.stop()
        grace = self.config.shutdown_grace_s if grace is None else grace
        if self.native is not None:
            await self.native.stop(grace)
        await asyncio.gather(*(s.stop(grace) for s in (self.server, self.admin_server)
                               if s is not None))
        await self.drains.wait()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        if self.shadows is not None:
            await self.shadows.close()
        if self.balancer is not None:
            for variant in self.balancer.variants:
                await variant.close()
            for instance in self.balancer.instances():
                await instance.upstream.close(grace=0)

    def reload_auth(self, config: EndpointConfig) -> None:
        """Apply a re-read config's tokens, ``instance_networks`` and, on the admin listener,
        new certificates. Turning a plane's tokens on or off, or moving the admin
        listener, takes a restart: the running settings stay, with a warning."""
        for plane, tokens, new in (("data", self.data_tokens, config.auth.data_tokens),
                                   ("admin", self.admin_tokens, config.auth.admin_tokens)):
            if tokens.configured != (new is not None):
                log.warning("reload: turning auth.%s_tokens_file on or off takes a restart; "
                            "the running tokens stay", plane)
            elif new is not None:
                tokens.replace(new)
                log.info("reload: %d %s tokens", len(new), plane)
        if config.admin_listen != self.config.admin_listen:
            log.warning("reload: admin_listen is read at start; it stays %s",
                        self.admin_address or "off")
        if self.admin_service is not None:
            self.admin_service.instance_networks = config.instance_networks
        certificates = self.admin_certificates
        if certificates is not None and config.tls is not None \
                and config.tls != certificates.tls:
            certificates.replace(config.tls)

    def reconfigure(self, config: EndpointConfig) -> None:
        """A reload's endpoint keys that apply live (health checks, shutdown grace); the
        caller has checked that nothing read only at start changed."""
        self.config = config
        if self.health is not None:
            self.health.config = config.health_check

    async def update_instances(self, instances: Mapping[str, Sequence[str]],
                               drain_timeout_s: float = 30.0) -> tuple[int, int]:
        """Make each variant's instances exactly ``instances[variant]``, without restart.

        New addresses join at once; addresses no longer listed drain (no new picks,
        in-flight requests finish up to ``drain_timeout_s``) and are then removed.
        Variants not named are left alone. Returns (added, removed).
        """
        assert self.balancer is not None
        changes = []
        for name, addresses in instances.items():
            variant = self.balancer.by_name.get(name)
            if variant is None:
                log.warning("reload: variant %r is not in the running config; adding "
                            "variants needs a restart", name)
                continue
            changes.append(await reconcile(variant, addresses, active(variant),
                                           drains=self.drains,
                                           drain_timeout_s=drain_timeout_s, source="reload"))
        for change in changes:
            await change.drained()
        return sum(len(c.added) for c in changes), sum(len(c.draining) for c in changes)

    async def wait_for_termination(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()
