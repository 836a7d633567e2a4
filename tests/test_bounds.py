"""What one client can make the router hold is bounded: sequence pins, remembered model
policies, message size, connections and streams; and the control plane stays right as
members come and go (statistics, health state, metrics scrapes). Real Triton, real router.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import sys
import threading
import time
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from harness import RouterHandle, generate_inputs
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException
from tritonmesh._pb import tritonmesh_admin_pb2 as apb
from tritonmesh._pb import tritonmesh_admin_pb2_grpc as apb_grpc
from tritonmesh.metrics import BalancerCollector
from tritonmesh.workers.upstream import Upstream

pytestmark = pytest.mark.triton


def _ones(n: int = 1) -> list[Any]:
    x = grpcclient.InferInput("INPUT0", [n], "FP32")
    x.set_data_from_numpy(np.ones(n, np.float32))
    return [x]


def _served(router: RouterHandle) -> dict[str, int]:
    return {i.address: i.requests for i in router.instances()}


# -- sequences -----------------------------------------------------------------------


def test_a_sequence_keeps_its_variant_and_instance(make_router: Any) -> None:
    """Two variants serve the model: the variant is pinned with the instance, not drawn
    again for each request of the sequence."""
    router = make_router(variants=[("a", 1.0, "ROUND_ROBIN", 0), ("b", 1.0, "ROUND_ROBIN", 1)])
    with grpcclient.InferenceServerClient(router.address) as client:
        for seq in (21, 22, 23):
            before = _served(router)
            for k in range(12):
                client.infer("identity", _ones(), sequence_id=seq, sequence_start=k == 0,
                             sequence_end=k == 11)
            gained = {a: n - before[a] for a, n in _served(router).items() if n > before[a]}
            assert list(gained.values()) == [12], gained
    assert not router.balancer.sequences


def test_open_sequences_and_id_size_are_capped(make_router: Any) -> None:
    router = make_router(limits={"max_sequences": 3, "max_sequence_id_bytes": 16}, workers=1)
    with grpcclient.InferenceServerClient(router.address) as client:
        for seq in (1, 2, 3):
            client.infer("identity", _ones(), sequence_id=seq, sequence_start=True)
        with pytest.raises(InferenceServerException) as full:
            client.infer("identity", _ones(), sequence_id=4, sequence_start=True)
        assert full.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "limits.max_sequences" in full.value.message()
        # Open sequences go on; an ended one makes room.
        client.infer("identity", _ones(), sequence_id=2)
        client.infer("identity", _ones(), sequence_id=1, sequence_end=True)
        client.infer("identity", _ones(), sequence_id=4, sequence_start=True)
        with pytest.raises(InferenceServerException) as long_id:
            client.infer("identity", _ones(), sequence_id="x" * 17, sequence_start=True)
        assert long_id.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "limits.max_sequence_id_bytes" in long_id.value.message()
        client.infer("identity", _ones(), sequence_id=2, sequence_end=True)
        client.infer("identity", _ones(), sequence_id="x" * 16, sequence_start=True)
    assert len(router.balancer.sequences) == 3


def test_idle_sequences_are_forgotten_by_the_control_plane(make_router: Any) -> None:
    router = make_router(limits={"sequence_idle_timeout_s": 0.3}, workers=2)
    with grpcclient.InferenceServerClient(router.address) as client:
        for seq in range(1, 41):
            client.infer("identity", _ones(), sequence_id=seq, sequence_start=True)
    assert router.balancer.sequences  # nobody ended them
    deadline = time.monotonic() + 10
    while router.balancer.sequences:
        assert time.monotonic() < deadline, f"{len(router.balancer.sequences)} still pinned"
        time.sleep(0.05)


# -- the decoupled-policy cache ------------------------------------------------------


def _stream(address: str, requests: list[tuple[str, str]]) -> list[Any]:
    """Each (model, version) on one stream, in order; the results or errors, in order."""
    results: queue.Queue[Any] = queue.Queue()
    with grpcclient.InferenceServerClient(address) as client:
        client.start_stream(callback=lambda result, error: results.put(error or result))
        for i, (model, version) in enumerate(requests):
            inputs = _ones() if model == "identity" else generate_inputs(1)
            client.async_stream_infer(model, inputs, model_version=version, request_id=str(i))
        out = [results.get(timeout=30) for _ in requests]
        client.stop_stream()
    return out


def test_model_policies_are_keyed_by_the_version_triton_reads(make_router: Any) -> None:
    router = make_router(workers=1)
    versions = ["0" * n + "1" for n in range(0, 60_000, 2_000)]  # all of them version 1
    answers = _stream(router.address, [("identity", v) for v in versions])
    assert all(not isinstance(a, InferenceServerException) for a in answers), answers
    assert len(router.balancer.decoupled) == 1  # one entry, not one per spelling
    # A version Triton cannot read gets Triton's own answer, and is not remembered.
    (bad,) = _stream(router.address, [("identity", "abc")])
    assert isinstance(bad, InferenceServerException)
    assert "failed to get model version from specified version string 'abc'" in bad.message()
    assert len(router.balancer.decoupled) == 1


def test_model_policies_are_bounded(make_router: Any) -> None:
    router = make_router(limits={"max_model_policies": 2}, workers=1)
    _stream(router.address, [("identity", ""), ("identity", "1"), ("generate_unary", "")])
    assert len(router.balancer.decoupled) == 2


# -- messages, connections, streams --------------------------------------------------


def test_a_message_over_max_message_bytes_is_refused_by_grpc(make_router: Any) -> None:
    router = make_router(limits={"max_message_bytes": 2**20}, workers=1)
    before = _served(router)
    with grpcclient.InferenceServerClient(router.address) as client:
        with pytest.raises(InferenceServerException) as big:
            client.infer("identity", _ones(2**18 + 1024))  # just over 1 MiB of FP32
        assert big.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert _served(router) == before  # refused before the router read it
        out = client.infer("identity", _ones(2**17)).as_numpy("OUTPUT0")  # half: served
        assert out is not None and out.shape == (2**17,)


def test_an_idle_connection_is_closed_after_the_idle_timeout(make_router: Any) -> None:
    router = make_router(limits={"connection_idle_timeout_s": 0.5}, workers=1)
    states: queue.Queue[grpc.ChannelConnectivity] = queue.Queue()
    with grpc.insecure_channel(router.address) as channel:
        channel.subscribe(states.put, try_to_connect=False)
        channel.unary_unary("/inference.GRPCInferenceService/ServerLive")(
            pb.ServerLiveRequest().SerializeToString(), timeout=10)
        seen = []
        deadline = time.monotonic() + 15
        # READY while the call ran; the router's GOAWAY after 0.5 s idle takes it to IDLE.
        while not (grpc.ChannelConnectivity.READY in seen
                   and seen[-1] is grpc.ChannelConnectivity.IDLE):
            seen.append(states.get(timeout=max(0.0, deadline - time.monotonic())))
        channel.unsubscribe(states.put)


def test_connections_past_max_connections_are_refused_at_once(make_router: Any) -> None:
    router = make_router(limits={"max_connections": 2}, workers=1)
    live = pb.ServerLiveRequest().SerializeToString()
    own = [("grpc.use_local_subchannel_pool", 1)]  # a connection per channel
    channels = [grpc.insecure_channel(router.address, options=own) for _ in range(3)]
    try:
        path = "/inference.GRPCInferenceService/ServerLive"
        for channel in channels[:2]:
            channel.unary_unary(path)(live, timeout=10)
        with pytest.raises(grpc.RpcError) as third:
            channels[2].unary_unary(path)(live, timeout=10)
        assert third.value.code() == grpc.StatusCode.UNAVAILABLE
        channels[0].close()  # a connection closes: room for a new one
        channels[2].unary_unary(path)(live, timeout=20, wait_for_ready=True)
    finally:
        for channel in channels:
            channel.close()


def test_streams_past_the_per_connection_limit_wait_their_turn(make_router: Any) -> None:
    """HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: a third stream on a connection that holds two
    is not opened; its deadline ends it cleanly, and it is served once one closes. Another
    connection is not held up."""
    router = make_router(limits={"max_concurrent_streams": 2}, workers=1)
    path = "/inference.GRPCInferenceService/ModelStreamInfer"
    request = pb.ModelInferRequest(model_name="identity", id="x")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1])
    tensor.contents.fp32_contents.append(1.0)
    raw = request.SerializeToString()
    with grpc.insecure_channel(router.address) as channel:
        stream = channel.stream_stream(path)
        held = [queue.Queue[bytes]() for _ in range(2)]
        calls = [stream(iter(q.get, b"")) for q in held]
        for q, call in zip(held, calls, strict=True):
            q.put(raw)
            next(call)  # answered: the stream is open
        with pytest.raises(grpc.RpcError) as third:
            list(stream(iter([raw]), timeout=1.0))
        assert third.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # A connection of its own (channels in one process share connections otherwise).
        with grpc.insecure_channel(router.address,
                                   options=[("grpc.use_local_subchannel_pool", 1)]) as other:
            assert len(list(other.stream_stream(path)(iter([raw]), timeout=10))) == 1
        held[0].put(b"")  # half-close one: room for the next
        list(calls[0])
        assert len(list(stream(iter([raw]), timeout=10))) == 1
        held[1].put(b"")
        list(calls[1])


# -- the control plane as members come and go ---------------------------------------


def test_statistics_count_ejected_instances_too(make_router: Any) -> None:
    router = make_router(workers=2)

    def total() -> int:
        with grpcclient.InferenceServerClient(router.address) as client:
            stats = client.get_inference_statistics("identity", as_json=True)
        return sum(int(s.get("inference_count", 0)) for s in stats["model_stats"])

    before = total()
    with grpcclient.InferenceServerClient(router.address) as client:
        for _ in range(8):
            client.infer("identity", _ones())
    counted = total()
    assert counted >= before + 8
    # An instance out of the pick set (ejected) still counts: counters never go back.
    first = router.instances()[0]
    router.loop.run(_set_healthy(first, False))
    try:
        assert total() == counted
    finally:
        router.loop.run(_set_healthy(first, True))


async def _set_healthy(instance: Any, healthy: bool) -> None:
    instance.healthy = healthy  # as the health checker does
    instance.variant.sync(instance)


def test_removed_instances_leave_nothing_behind(make_router: Any,
                                                worker_addresses: list[str]) -> None:
    """Add and remove instances through the admin API, with a health round in between:
    health streaks, pins and channels of removed instances are all freed."""
    router = make_router(workers=2)
    health = router.router.health
    assert health is not None
    with grpc.insecure_channel(router.admin_address) as channel:
        admin = apb_grpc.AdminStub(channel)
        for i in range(300):
            admin.AddInstance(apb.AddInstanceRequest(variant="AllTraffic",
                                                     address=worker_addresses[2]), timeout=10)
            router.loop.run(health.check_once())
            admin.RemoveInstance(apb.RemoveInstanceRequest(
                variant="AllTraffic", address=worker_addresses[2]), timeout=30)
            if i == 20:
                router.loop.run(health.check_once())
                baseline = _count(Upstream)
    router.loop.run(health.check_once())
    assert len(health._streak) == 2
    assert _count(Upstream) <= baseline


def _count(kind: type) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))


def test_a_scrape_while_instances_come_and_go_never_fails(make_router: Any,
                                                          worker_addresses: list[str]) -> None:
    router = make_router(workers=2)
    variant = router.balancer.by_name["AllTraffic"]
    collector = BalancerCollector(router.balancer)
    stop = threading.Event()
    failures: list[BaseException] = []

    def scrape() -> None:
        while not stop.is_set():
            try:
                list(collector.collect())
            except BaseException as exc:  # the test reports it
                failures.append(exc)
                return

    async def churn() -> None:
        for _ in range(1000):
            instance = variant.add(variant.connect(worker_addresses[2]))
            variant.remove(instance)
            await instance.upstream.close(grace=0)
            await asyncio.sleep(0)

    scraper = threading.Thread(target=scrape)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # interleave the two threads as finely as CPython can
    scraper.start()
    try:
        router.loop.run(churn(), timeout=120)
    finally:
        stop.set()
        scraper.join()
        sys.setswitchinterval(interval)
    assert not failures, failures


# -- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "/grpc.health.v1.Health/Check",
    "/tritonmesh.admin.v1.Admin/ListInstances",
    "/tritonmesh.admin.v1.Admin/AddInstance",
    "/inference.GRPCInferenceService/ModelStatistics",
    "/inference.GRPCInferenceService/RepositoryIndex",
])
def test_malformed_bytes_are_invalid_argument_with_one_line_at_most(
        make_router: Any, caplog: pytest.LogCaptureFixture, path: str) -> None:
    router = make_router(workers=1)
    admin_api = path.startswith("/tritonmesh.admin")
    with caplog.at_level(logging.DEBUG), grpc.insecure_channel(router.address) as channel, \
            grpc.insecure_channel(router.admin_address) as admin:
        call = (admin if admin_api else channel).unary_unary(path)
        for _ in range(50):
            with pytest.raises(grpc.RpcError) as bad:
                call(b"\xff\xff\xff", timeout=10)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "malformed" in (bad.value.details() or "")
        # Streaming servicers too: health's Watch, and reflection.
        with pytest.raises(grpc.RpcError) as watch:
            list(channel.unary_stream("/grpc.health.v1.Health/Watch")(b"\xff\xff", timeout=10))
        assert watch.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as reflect:
            list(channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/"
                                       "ServerReflectionInfo")(iter([b"\xff\xff"]), timeout=10))
        assert reflect.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as reflect:  # the admin listener's reflection
            list(admin.stream_stream("/grpc.reflection.v1alpha.ServerReflection/"
                                     "ServerReflectionInfo")(iter([b"\xff\xff"]), timeout=10))
        assert reflect.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # And they still serve good requests.
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        listed = apb_grpc.AdminStub(admin).ListInstances(apb.ListInstancesRequest(), timeout=10)
        assert len(listed.instances) == 1
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(noisy) <= 1 and all(r.exc_info is None for r in noisy), \
        [r.getMessage() for r in noisy]


def test_a_gone_client_s_failed_write_is_not_logged_but_other_errors_are(
        make_router: Any, caplog: pytest.LogCaptureFixture) -> None:
    """What a stream's pump meets when its client disconnects mid-response (grpc.aio's
    ExecuteBatchError from context.write, in a task nobody awaits) goes through asyncio's
    own exception handler on the router's loop: that record is dropped, others are not."""
    from grpc._cython.cygrpc import ExecuteBatchError
    from tritonmesh.logfilter import ClientGoneFilter

    router = make_router(workers=1)
    dropped = ClientGoneFilter.dropped

    async def pump(error: Exception) -> None:
        raise error

    async def leave_unretrieved() -> None:
        for error in (ExecuteBatchError('Failed "execute_batch"'), RuntimeError("a real bug")):
            task = asyncio.get_running_loop().create_task(pump(error))
            await asyncio.wait([task])
            del task
            gc.collect()  # asyncio reports an unretrieved exception when the task goes

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        router.loop.run(leave_unretrieved())
    logged = [r for r in caplog.records if r.name == "asyncio"]
    assert [type(r.exc_info[1]).__name__ for r in logged if r.exc_info] == ["RuntimeError"]
    assert ClientGoneFilter.dropped == dropped + 1
