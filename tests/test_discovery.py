"""DNS discovery against a real DNS server (dnsmasq on loopback) and real Triton workers.

The multi-host rehearsal binds Tritons to different loopback addresses (127.0.0.11, .12,
.13) on one port, as pods of a headless Service would be, and changes the records while
traffic flows.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from dnsmasq import Dnsmasq
from harness import LoopThread, RouterHandle, start_router, wait_for
from tritonmesh.config import (
    ConfigError,
    EndpointConfig,
    HealthCheckConfig,
    RoutingStrategy,
    VariantConfig,
    parse_config,
)
from tritonmesh.discovery import resolve
from tritonmesh.workers.launcher import TritonWorker, free_ports
from tritonmesh.workers.tritonserver import default_model_repository


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[Dnsmasq]:
    server = Dnsmasq(tmp_path)
    yield server
    server.stop()


def _discovery(dns: str, resolver: str, interval_s: float = 0.5) -> Any:
    config = parse_config({"variants": [{"name": "v", "discovery": {
        "dns": dns, "resolver": resolver, "interval_s": interval_s, "drain_timeout_s": 10}}]})
    return config.variants[0].discovery


# -- configuration --------------------------------------------------------------------


@pytest.mark.parametrize(("dns", "name", "port"), [
    ("_grpc._tcp.triton.ns.svc.cluster.local", "_grpc._tcp.triton.ns.svc.cluster.local", None),
    ("triton.ns.svc.cluster.local:8001", "triton.ns.svc.cluster.local", 8001),
])
def test_dns_forms(dns: str, name: str, port: int | None) -> None:
    spec = _discovery(dns, "10.96.0.10")
    assert (spec.name, spec.port, spec.resolver) == (name, port, ("10.96.0.10", 53))


@pytest.mark.parametrize(("discovery", "message"), [
    ({"dns": "triton.ns.svc.cluster.local"}, "expected an SRV name"),
    ({"dns": "triton:0"}, "expected NAME:PORT"),
    ({"dns": "_grpc._tcp.x", "resolver": "dns.example"}, "by its IP address"),
    ({"dns": "_grpc._tcp.x", "resolver": "10.0.0.1:abc"}, "expected IP, IP:PORT"),
    ({"dns": "_grpc._tcp.x", "interval_s": 0}, "interval_s: must be a positive number"),
    ({"dns": "_grpc._tcp.x", "ttl": 3}, "discovery.ttl: unknown key"),
    ({}, "discovery.dns: required"),
])
def test_bad_discovery_is_refused_naming_the_key(discovery: dict[str, Any],
                                                 message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        parse_config({"variants": [{"name": "v", "discovery": discovery}]})
    assert "variants[0].discovery" in str(raised.value)


def test_ipv6_resolver_with_port() -> None:
    assert _discovery("_grpc._tcp.x", "[::1]:5353").resolver == ("::1", 5353)


# -- lookups against a real DNS server ------------------------------------------------


def test_a_and_aaaa_records_at_a_fixed_port(dnsmasq: Dnsmasq) -> None:
    dnsmasq.set_hosts([("127.0.0.11", "triton.test"), ("127.0.0.12", "triton.test"),
                       ("::1", "triton.test")])
    dnsmasq.start()
    lookup = asyncio.run(resolve(_discovery("triton.test:8001", dnsmasq.resolver)))
    assert lookup.addresses == {"127.0.0.11:8001", "127.0.0.12:8001", "[::1]:8001"}
    assert lookup.ttl_s == 1  # dnsmasq --local-ttl


def test_srv_records_lowest_priority_only(dnsmasq: Dnsmasq) -> None:
    dnsmasq.set_hosts([("127.0.0.11", "w0.triton.test"), ("127.0.0.12", "w1.triton.test"),
                       ("127.0.0.13", "backup.triton.test")])
    dnsmasq.start(srv=[("_grpc._tcp.triton.test", "w0.triton.test", 9001, 0),
                       ("_grpc._tcp.triton.test", "w1.triton.test", 9002, 0),
                       ("_grpc._tcp.triton.test", "backup.triton.test", 9003, 5)])
    lookup = asyncio.run(resolve(_discovery("_grpc._tcp.triton.test", dnsmasq.resolver)))
    assert lookup.addresses == {"127.0.0.11:9001", "127.0.0.12:9002"}


def test_unknown_name_is_a_failed_lookup(dnsmasq: Dnsmasq) -> None:
    import dns.exception

    dnsmasq.start()
    with pytest.raises(dns.exception.DNSException):
        asyncio.run(resolve(_discovery("_grpc._tcp.missing.test", dnsmasq.resolver)))


# -- the router, its instances from DNS -------------------------------------------------


def _router(loop: LoopThread, dns: str, resolver: str) -> RouterHandle:
    spec = _discovery(dns, resolver)
    config = EndpointConfig(
        name="test", listen="127.0.0.1:0", metrics_listen=None, admin_listen=None,
        variants=(VariantConfig("AllTraffic", routing_strategy=RoutingStrategy.
                                LEAST_OUTSTANDING_REQUESTS, slow_start_s=1.0, discovery=spec),),
        health_check=HealthCheckConfig(interval_s=0.5, timeout_s=1.0), shutdown_grace_s=1.0)
    return start_router(loop, config, {})


class _Traffic:
    """Closed-loop identity requests from two threads until stopped; counts outcomes."""

    def __init__(self, address: str, users: int = 2):
        self.address = address
        self.stopping = threading.Event()
        self.ok = 0
        self.failed: list[str] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(users)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        client = grpcclient.InferenceServerClient(self.address)
        x = grpcclient.InferInput("INPUT0", [4], "FP32")
        x.set_data_from_numpy(np.arange(4, dtype=np.float32))
        deadline = time.monotonic() + 120  # bounded whatever the test does
        try:
            while not self.stopping.is_set() and time.monotonic() < deadline:
                try:
                    client.infer("identity", [x], client_timeout=10)
                    with self._lock:
                        self.ok += 1
                except Exception as exc:
                    with self._lock:
                        self.failed.append(repr(exc))
        finally:
            client.close()

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=30)


def _addresses(handle: RouterHandle) -> set[str]:
    return {i.address for i in handle.instances() if i.state == "ACTIVE"}


@pytest.mark.triton
def test_srv_discovery_serves_the_session_workers(loop_thread: LoopThread,
                                                  worker_addresses: list[str],
                                                  dnsmasq: Dnsmasq) -> None:
    """SRV records give each pod its own port: the session's three workers on 127.0.0.1."""
    ports = [int(a.rpartition(":")[2]) for a in worker_addresses]
    dnsmasq.set_hosts([("127.0.0.1", f"w{i}.triton.test") for i in range(3)])
    dnsmasq.start(srv=[("_grpc._tcp.triton.test", f"w{i}.triton.test", p, 0)
                       for i, p in enumerate(ports[:2])])
    handle = _router(loop_thread, "_grpc._tcp.triton.test", dnsmasq.resolver)
    try:
        assert _addresses(handle) == set(worker_addresses[:2])
        client = grpcclient.InferenceServerClient(handle.address)
        x = grpcclient.InferInput("INPUT0", [4], "FP32")
        x.set_data_from_numpy(np.arange(4, dtype=np.float32))
        for _ in range(20):
            out = client.infer("identity", [x]).as_numpy("OUTPUT0")
            assert out is not None and out.tolist() == [0.0, 1.0, 2.0, 3.0]
        client.close()
        assert sum(i.requests for i in handle.instances()) == 20
        # A record that changes port: SRV is read again; the new port joins, the old drains.
        dnsmasq.stop()
        dnsmasq.start(srv=[("_grpc._tcp.triton.test", "w0.triton.test", ports[0], 0),
                           ("_grpc._tcp.triton.test", "w2.triton.test", ports[2], 0)])
        wait_for(lambda: _addresses(handle) == {worker_addresses[0], worker_addresses[2]},
                 "the SRV change reached the router")
    finally:
        handle.wait_idle()
        handle.stop()


def _common_port(hosts: list[str]) -> int:
    """A TCP port free on every one of ``hosts``."""
    for _ in range(100):
        port = free_ports(1, hosts[0])[0]
        try:
            with contextlib.ExitStack() as stack:
                for host in hosts:
                    stack.enter_context(socket.socket()).bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError(f"no port free on all of {hosts}")


@pytest.fixture
def three_hosts(loop_thread: LoopThread, tmp_path: Path) -> Iterator[list[TritonWorker]]:
    """Three Tritons on 127.0.0.11/12/13, one gRPC port for all (a headless Service's pods)."""
    hosts = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
    port = _common_port(hosts)
    workers = []
    for i, host in enumerate(hosts):
        w = TritonWorker(i, default_model_repository(), tmp_path / f"triton-{i}.log", host=host)
        w.grpc_port = port
        w.http_port, w.metrics_port = free_ports(2, host)
        workers.append(w)

    async def start() -> None:
        await asyncio.gather(*(w.start(180) for w in workers))

    async def stop() -> None:
        await asyncio.gather(*(w.stop(5.0) for w in workers))

    try:
        loop_thread.run(start(), timeout=240)
        yield workers
    finally:
        loop_thread.run(stop(), timeout=60)


@pytest.mark.triton
def test_records_change_under_load_and_nothing_fails(loop_thread: LoopThread,
                                                     three_hosts: list[TritonWorker],
                                                     dnsmasq: Dnsmasq) -> None:
    """Instances appear, drain and disappear as the records change; a DNS outage and an
    empty answer keep the last good set; no request fails; counts return to 0."""
    a, b, c = (w.address for w in three_hosts)
    port = three_hosts[0].grpc_port
    dnsmasq.set_hosts([("127.0.0.11", "triton.test"), ("127.0.0.12", "triton.test")])
    dnsmasq.start()
    handle = _router(loop_thread, f"triton.test:{port}", dnsmasq.resolver)
    discovery = handle.router.discoveries[0]
    traffic = None
    try:
        assert _addresses(handle) == {a, b}
        traffic = _Traffic(handle.address)
        wait_for(lambda: traffic.ok > 50, "traffic flows")

        dnsmasq.set_hosts([("127.0.0.12", "triton.test"), ("127.0.0.13", "triton.test")])
        wait_for(lambda: _addresses(handle) == {b, c}, "c joined and a drained")
        wait_for(lambda: a not in {i.address for i in handle.instances()}, "a removed")
        served = traffic.ok
        wait_for(lambda: next((i.requests for i in handle.instances() if i.address == c), 0)
                 > 20, "c takes traffic")

        failures = discovery.failures
        dnsmasq.stop()  # an outage: lookups time out or are refused
        wait_for(lambda: discovery.failures >= failures + 2, "lookups failed")
        assert _addresses(handle) == {b, c}
        dnsmasq.set_hosts([])
        dnsmasq.start()  # answering again, with no record: an empty answer
        failures = discovery.failures
        wait_for(lambda: discovery.failures >= failures + 2, "empty answers seen")
        assert _addresses(handle) == {b, c}
        assert traffic.ok > served
    finally:
        if traffic is not None:
            traffic.stop()
        handle.wait_idle()
        handle.stop()
    assert traffic.failed == []
