"""The router process: a grpc.aio server speaking Triton's protocol, plus its control plane.

``inference.GRPCInferenceService`` is served by a generic handler keyed by method
name, with no (de)serializers: ModelInfer and ModelStreamInfer bytes go to
:mod:`tritonmesh.proxy` untouched, the server-wide RPCs to
:mod:`tritonmesh.fanout`. Beside it on the same port: ``grpc.health.v1``,
server reflection and tritonmesh's admin service.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server
from tritonmesh._pb import tritonmesh_admin_pb2, tritonmesh_admin_pb2_grpc
from tritonmesh.admin import AdminService, drain
from tritonmesh.balancer import Balancer, Variant
from tritonmesh.config import EndpointConfig, LimitsConfig
from tritonmesh.fanout import Fanout
from tritonmesh.health import HealthChecker
from tritonmesh.housekeeping import Housekeeper
from tritonmesh.logfilter import quiet_client_gone
from tritonmesh.metrics import BalancerCollector
from tritonmesh.proxy import Proxy
from tritonmesh.strict import StrictRegistrar
from tritonmesh.tls import ServerCertificates
from tritonmesh.workers.upstream import SERVICE, channel_options

__all__ = ["Router", "server_options"]

log = logging.getLogger("tritonmesh.server")

def server_options(limits: LimitsConfig) -> tuple[tuple[str, Any], ...]:
    """The port's gRPC options: what one client may make the router hold
    (docs/config.md, "Limits"). A message over ``max_message_bytes`` is refused by gRPC
    itself with RESOURCE_EXHAUSTED before the router reads it."""
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
        ("grpc.so_reuseport", 0),
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
    ones from the config plus any local workers already started by the caller).
    """

    def __init__(self, config: EndpointConfig, instances: Mapping[str, Sequence[str]],
                 *, seed: int | None = None):
        self.config = config
        self._instances = instances
        self._seed = seed
        self.balancer: Balancer | None = None
        self.server: grpc.aio.Server | None = None
        self.health: HealthChecker | None = None
        self.port = 0
        self._metrics_server: Any = None
        self.certificates: ServerCertificates | None = None  # with tls: replaceable
        self.metrics_port: int | None = None
        self.housekeeper: Housekeeper
        quiet_client_gone()

    @property
    def address(self) -> str:
        host = self.config.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    async def start(self) -> None:
        balancer = self.balancer = self._balancer()

        proxy = Proxy(balancer)
        fanout = Fanout(balancer)
        handlers: dict[str, grpc.RpcMethodHandler] = {
            name: grpc.unary_unary_rpc_method_handler(fn)
            for name, fn in fanout.handlers().items()
        }
        handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(proxy.model_infer)
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            proxy.model_stream_infer
        )
        server = self.server = grpc.aio.server(options=server_options(self.config.limits))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

        health_servicer = health.aio.HealthServicer()
        strict = StrictRegistrar(server)  # malformed bytes: INVALID_ARGUMENT, not a traceback
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, strict)
        tritonmesh_admin_pb2_grpc.add_AdminServicer_to_server(AdminService(balancer), strict)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer((
            SERVICE,
            tritonmesh_admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )), strict)
        if self.config.tls is None:
            self.port = server.add_insecure_port(self.config.listen)
        else:
            self.certificates = ServerCertificates(self.config.tls)
            self.port = server.add_secure_port(self.config.listen, self.certificates.credentials)
        if not self.port:
            raise OSError(f"cannot listen on {self.config.listen}")

        self.health = HealthChecker(balancer, self.config.health_check, health_servicer)
        await self.health.check_once()
        self.health.start()
        self.housekeeper.start()
        await server.start()
        if self.config.metrics_listen is not None:
            self._start_metrics(balancer, self.config.metrics_listen)
        log.info("tritonmesh listening on %s", self.address)

    def _balancer(self) -> Balancer:
        limits = self.config.limits
        options = channel_options(limits.max_message_bytes)
        variants = []
        for i, vc in enumerate(self.config.variants):
            variant = Variant(vc, seed=None if self._seed is None else self._seed + i,
                              channel_options=options)
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
        registry.register(BalancerCollector(balancer))
        host, _, port = listen.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host, registry=registry)
        self._metrics_server = server
        self.metrics_port = server.server_port

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let in-flight ones finish up to ``grace`` seconds, then cancel.

        Cancelled calls release their instances in their own ``finally`` blocks.
        """
        if self.health is not None:
            await self.health.stop()
        if self.balancer is not None:
            await self.housekeeper.stop()
        if self.server is not None:
            await self.server.stop(self.config.shutdown_grace_s if grace is None else grace)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        if self.balancer is not None:
            for variant in self.balancer.variants:
                await variant.close()
            for instance in self.balancer.instances():
                await instance.upstream.close(grace=0)

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
        added = 0
        drains = []
        for name, addresses in instances.items():
            variant = self.balancer.by_name.get(name)
            if variant is None:
                log.warning("reload: variant %r is not in the running config; adding "
                            "variants needs a restart", name)
                continue
            current = {i.address: i for i in variant.live_instances() if i.state == "ACTIVE"}
            for address in addresses:
                if address not in current:
                    variant.add(variant.connect(address), slow_start=True)
                    added += 1
            drains += [drain(i, drain_timeout_s) for a, i in current.items()
                       if a not in addresses]
        if drains:
            await asyncio.gather(*drains)
        return added, len(drains)

    async def wait_for_termination(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()
