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
from typing import Any, Final

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server
from tritonmesh._pb import tritonmesh_admin_pb2, tritonmesh_admin_pb2_grpc
from tritonmesh.admin import AdminService, drain
from tritonmesh.balancer import Balancer, Variant
from tritonmesh.config import EndpointConfig
from tritonmesh.fanout import Fanout
from tritonmesh.health import HealthChecker
from tritonmesh.metrics import BalancerCollector
from tritonmesh.proxy import Proxy
from tritonmesh.tls import ServerCertificates, connect
from tritonmesh.workers.upstream import INT32_MAX, SERVICE

__all__ = ["SERVER_OPTIONS", "Router"]

log = logging.getLogger("tritonmesh.server")

SERVER_OPTIONS: Final[tuple[tuple[str, Any], ...]] = (
    ("grpc.max_send_message_length", INT32_MAX),
    ("grpc.max_receive_message_length", INT32_MAX),
    # Accept client keepalive pings as Triton does, without GOAWAY for an idle client.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),
)


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

    @property
    def address(self) -> str:
        host = self.config.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    async def start(self) -> None:
        variants = []
        for i, vc in enumerate(self.config.variants):
            variant = Variant(vc, seed=None if self._seed is None else self._seed + i)
            for address in self._instances.get(vc.name, ()):
                variant.add(connect(address, vc.upstream_tls))
            variants.append(variant)
        balancer = self.balancer = Balancer(variants, work_hints=self.config.work_hints,
                                            retries=self.config.retries)

        proxy = Proxy(balancer, self.config)
        fanout = Fanout(balancer)
        handlers: dict[str, grpc.RpcMethodHandler] = {
            name: grpc.unary_unary_rpc_method_handler(fn)
            for name, fn in fanout.handlers().items()
        }
        handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(proxy.model_infer)
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            proxy.model_stream_infer
        )
        # gRPC refuses calls at random (CANCELLED) past 1,000 waiting for the event loop to
        # take them up, and all past 3,000: a burst of opens would fail here, not in Triton.
        pending = self.config.max_pending_calls
        server = self.server = grpc.aio.server(options=(
            *SERVER_OPTIONS, ("grpc.server.max_pending_requests", pending),
            ("grpc.server.max_pending_requests_hard_limit", pending)))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        tritonmesh_admin_pb2_grpc.add_AdminServicer_to_server(AdminService(balancer), server)
        reflection.enable_server_reflection((
            SERVICE,
            tritonmesh_admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ), server)
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
        await server.start()
        if self.config.metrics_listen is not None:
            self._start_metrics(balancer, self.config.metrics_listen)
        log.info("tritonmesh listening on %s", self.address)

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
                    variant.add(connect(address, variant.config.upstream_tls),
                                slow_start=True)
                    added += 1
            drains += [drain(i, drain_timeout_s) for a, i in current.items()
                       if a not in addresses]
        if drains:
            await asyncio.gather(*drains)
        return added, len(drains)

    async def wait_for_termination(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()
