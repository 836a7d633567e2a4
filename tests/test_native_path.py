"""``data_path: native``: unmodified tritonclient through the libnghttp2 engine against real
Triton, the relay of every other RPC, endings (deadline, cancel, reset, lost connection),
and raw HTTP/2 from a hostile client."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from harness import (
    LoopThread,
    RecordingTriton,
    admin_stub,
    generate_inputs,
    identity_inputs,
    make_config,
    serve_on,
    start_router,
    wait_for,
)
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException
from tritonmesh._pb import tritonmesh_admin_pb2 as apb
from tritonmesh.config import HealthCheckConfig
from tritonmesh.native_config import NativeConfig, native_available

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not native_available(), reason=(
        "the native data path's extension (tritonmesh._core._h2) is not built here: no "
        "libnghttp2 header at install time, or TRITONMESH_NO_EXTENSIONS=1")),
]

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture
def native(monkeypatch: pytest.MonkeyPatch) -> None:
    """Routers made from here on serve ``data_path: native``, and a ModelInfer that reached
    the grpc.aio path fails the test."""
    serve_on(monkeypatch, "native")


@pytest.fixture
def holding_triton(loop_thread: LoopThread) -> Iterator[Holding]:
    fake = Holding(loop_thread)
    yield fake
    fake.stop()


# The tests of what a reset does upstream: Triton sees the cancellation at once
# (tests/test_absorb.py has the default, absorbing).
_FORWARD = {"upstream_cancellation": "forward"}


class Holding(RecordingTriton):
    """A Triton that never answers ModelInfer, and records the calls its client cancelled."""

    def __init__(self, loop: LoopThread):
        self.cancelled: list[str] = []
        self.arrived = threading.Event()
        super().__init__(loop)

    async def model_infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        parsed = pb.ModelInferRequest.FromString(request)
        self.seen.append(("ModelInfer", parsed.id))
        self.arrived.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.append(parsed.id)
            raise
        raise AssertionError("unreachable")


def test_sync_and_aio_infer(native: None, make_router: Any) -> None:
    router = make_router()
    assert router.router.native is not None and router.router.native.infer is not None
    with grpcclient.InferenceServerClient(router.address) as client:
        for i in range(20):
            result = client.infer("identity", identity_inputs(), request_id=f"s{i}")
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.arange(3))
            assert result.get_response().id == f"s{i}"

    async def aio() -> list[Any]:
        async with aioclient.InferenceServerClient(router.address) as client:
            return await asyncio.gather(*(client.infer("identity", identity_inputs(),
                                                       request_id=f"a{i}") for i in range(16)))

    results = asyncio.run(aio())
    assert [r.get_response().id for r in results] == [f"a{i}" for i in range(16)]
    router.wait_idle()


def test_an_answer_ends_a_run_of_failures(native: None, make_router: Any) -> None:
    """Triton's OK tells the outlier detector: an instance's run of consecutive failures
    ends at an answer (else failures far apart would add up to an ejection)."""
    router = make_router(workers=1)
    (instance,) = router.balancer.instances()
    instance.failures = 2  # the router is idle: its loop does not touch the count now
    with grpcclient.InferenceServerClient(router.address) as client:
        client.infer("identity", identity_inputs())
    assert instance.failures == 0
    router.wait_idle()


def test_other_rpcs_are_relayed_beside_streams(native: None, make_router: Any) -> None:
    router = make_router()
    with grpcclient.InferenceServerClient(router.address) as client:
        assert client.is_server_live() and client.is_model_ready("identity")
        assert client.get_model_metadata("identity").name == "identity"
        with pytest.raises(InferenceServerException, match="unknown model"):
            client.get_model_metadata("no_such_model")
        responses: list[Any] = []
        client.start_stream(callback=lambda result, error: responses.append(error or result))
        client.async_stream_infer("generate", generate_inputs(5), request_id="g",
                                  enable_empty_final_response=True)
        wait_for(lambda: len(responses) == 6, "five tokens and the empty final")
        client.stop_stream()
    assert not [r for r in responses if isinstance(r, Exception)], responses
    assert [r.as_numpy("TOKEN") is not None for r in responses] == [True] * 5 + [False]
    assert responses[-1].get_response().parameters["triton_final_response"].bool_param
    health = grpc.insecure_channel(router.address)
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    answer = health_pb2_grpc.HealthStub(health).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    health.close()
    router.wait_idle()


def test_stream_limit_is_per_client_connection(monkeypatch: pytest.MonkeyPatch,
                                               make_router: Any) -> None:
    """``limits.max_concurrent_streams`` bounds each client connection; the relay's one
    connection to grpc.aio, which carries every client's streams, is not held to it
    (compressed streams are relayed: grpc.aio's handler serves them, so not `native`)."""
    monkeypatch.setenv("TRITONMESH_DATA_PATH", "native")
    router = make_router(limits={"max_concurrent_streams": 1}, workers=1)
    relayed = router.router.native.relayed
    path = "/inference.GRPCInferenceService/ModelStreamInfer"
    request = pb.ModelInferRequest(model_name="identity", id="x")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1]).contents.fp32_contents.append(1)
    raw = request.SerializeToString()
    gzip = grpc.Compression.Gzip
    with grpc.insecure_channel(router.address, compression=gzip) as first, \
            grpc.insecure_channel(router.address, compression=gzip,
                                  options=[("grpc.use_local_subchannel_pool", 1)]) as second:
        held: queue.Queue[bytes] = queue.Queue()
        call = first.stream_stream(path)(iter(held.get, b""))
        held.put(raw)
        next(call)  # answered: the stream is open, and stays so
        assert len(list(second.stream_stream(path)(iter([raw]), timeout=10))) == 1
        held.put(b"")
        list(call)
    assert router.router.native.relayed == relayed + 2
    router.wait_idle()


def test_target_variant_is_honoured(native: None, make_router: Any) -> None:
    router = make_router(variants=[("A", 1.0, "RANDOM", 0), ("B", 1.0, "RANDOM", 1)])
    (b,) = [i for i in router.instances() if i.variant.name == "B"]
    with grpcclient.InferenceServerClient(router.address) as client:
        for _ in range(10):
            client.infer("identity", identity_inputs(), headers={"x-target-variant": "B"})
        with pytest.raises(InferenceServerException) as caught:
            client.infer("identity", identity_inputs(), headers={"x-target-variant": "C"})
    assert b.requests == 10
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'C'" in caught.value.message()
    router.wait_idle()


def test_unknown_model_gets_tritons_status(native: None, make_router: Any) -> None:
    router = make_router()
    with grpcclient.InferenceServerClient(router.address) as client, \
            pytest.raises(InferenceServerException) as caught:
        client.infer("no_such_model", identity_inputs())
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    assert "Request for unknown model: 'no_such_model' is not found" in caught.value.message()
    router.wait_idle()


def test_deadline_expiring_upstream(native: None, make_router: Any) -> None:
    router = make_router()
    with grpcclient.InferenceServerClient(router.address) as client, \
            pytest.raises(InferenceServerException) as caught:
        client.infer("generate_unary", generate_inputs(200), client_timeout=0.3)  # ~1 s of work
    assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    router.wait_idle()
    with grpcclient.InferenceServerClient(router.address) as client:
        assert client.infer("identity", identity_inputs()).as_numpy("OUTPUT0") is not None


def test_client_cancel_resets_upstream(native: None, loop_thread: LoopThread,
                                       holding_triton: Holding) -> None:
    config, instances = make_config([holding_triton.address], variant_options=_FORWARD)
    router = start_router(loop_thread, config, instances)
    try:
        async def cancel_one() -> None:
            async with aioclient.InferenceServerClient(router.address) as client:
                call = asyncio.ensure_future(client.infer("identity", identity_inputs(),
                                                          request_id="c1"))
                assert await asyncio.to_thread(holding_triton.arrived.wait, 30)
                assert router.total_outstanding() == 1
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call

        asyncio.run(cancel_one())
        wait_for(lambda: holding_triton.cancelled == ["c1"], "the upstream call's cancellation")
        router.wait_idle()
    finally:
        router.stop()


def test_metadata_forwarded_hop_by_hop_not(native: None, loop_thread: LoopThread,
                                           recording_triton: RecordingTriton) -> None:
    """The client's keys reach the instance unchanged, hop-by-hop and routing keys do not
    (gRPC servers take connection-specific headers; so does this port), and the deadline
    goes upstream as the remaining budget."""
    config, instances = make_config([recording_triton.address], variant_options=_FORWARD)
    router = start_router(loop_thread, config, instances)
    user = {"authorization": "Bearer t", "x-trace": "7", "x-tenant": "a b,c"}
    hop_by_hop = {"connection": "v", "upgrade": "v", "transfer-encoding": "v",
                  "x-target-variant": "AllTraffic", "x-tritonmesh-priority": "2"}
    try:
        with grpcclient.InferenceServerClient(router.address) as client:
            result = client.infer("identity", identity_inputs(), headers={**user, **hop_by_hop},
                                  client_timeout=5.0, request_id="m1")
        assert result.get_response().id == "m1"
        ((_, metadata, remaining),) = [c for c in recording_triton.calls if c[0] == "ModelInfer"]
        assert {k: metadata.get(k) for k in user} == user
        assert not set(hop_by_hop) & set(metadata), metadata
        # The deadline went upstream: the client's gRPC rounds its grpc-timeout up by a few
        # ms (test_router's twin of this test has the same bound).
        assert remaining is not None and 0 < remaining <= 5.5
        router.wait_idle()
    finally:
        router.stop()


def test_unreachable_instance_is_retried_elsewhere(native: None, loop_thread: LoopThread,
                                                   worker_addresses: list[str]) -> None:
    """A connection that cannot be made: the request provably never left, so it goes to
    another instance, and the one that refused is ejected."""
    with socket.create_server(("127.0.0.1", 0)) as reserved:  # a port nobody listens on
        dead = f"127.0.0.1:{reserved.getsockname()[1]}"
    config, instances = make_config(worker_addresses[:1], strategy="ROUND_ROBIN")
    # No health check finds the dead instance first (it joins healthy, as after an admin
    # add): only a request does.
    config = dataclasses.replace(config, health_check=HealthCheckConfig(interval_s=600.0))
    router = start_router(loop_thread, config, instances)
    loop_thread.run(router.router.update_instances({"AllTraffic": [worker_addresses[0], dead]}))
    try:
        with grpcclient.InferenceServerClient(router.address) as client:
            for i in range(20):
                assert client.infer("identity", identity_inputs(),
                                    request_id=str(i)).get_response().id == str(i)
        (refused,) = [i for i in router.instances() if i.address == dead]
        assert refused.ejected and router.balancer.retry_budget.retried == 1
        router.wait_idle()
    finally:
        router.stop()


def test_per_try_timeout_resets_upstream(native: None, loop_thread: LoopThread,
                                         holding_triton: Holding) -> None:
    config, instances = make_config([holding_triton.address],
                                    variant_options={"per_try_timeout_s": 0.3, **_FORWARD})
    router = start_router(loop_thread, config, instances)
    try:
        with grpcclient.InferenceServerClient(router.address) as client, \
                pytest.raises(InferenceServerException) as caught:
            client.infer("identity", identity_inputs(), request_id="t1", client_timeout=30)
        assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert f"upstream instance {holding_triton.address} did not answer within " \
            "per_try_timeout_s (0.3 s)" in caught.value.message()
        wait_for(lambda: holding_triton.cancelled == ["t1"], "the upstream call's cancellation")
        router.wait_idle()
    finally:
        router.stop()


def test_cancel_while_queued(native: None, loop_thread: LoopThread,
                             holding_triton: Holding) -> None:
    """Late binding's queue: a client that goes while queued gives back what it holds, and
    the call ahead of it, ended by its server, is released too."""
    config, instances = make_config([holding_triton.address], max_concurrency=1)
    router = start_router(loop_thread, config, instances)
    try:
        async def run() -> InferenceServerException:
            async with aioclient.InferenceServerClient(router.address) as client:
                first = asyncio.ensure_future(client.infer("identity", identity_inputs(),
                                                           request_id="held"))
                assert await asyncio.to_thread(holding_triton.arrived.wait, 30)
                queued = asyncio.ensure_future(client.infer("identity", identity_inputs(),
                                                            request_id="queued"))
                variant = router.balancer.variants[0]
                await asyncio.to_thread(wait_for, lambda: len(variant.waiters) == 1,
                                        "the second request to queue")
                queued.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await queued
                await asyncio.to_thread(wait_for, lambda: not variant.waiters,
                                        "the queue to empty")
                assert router.total_outstanding() == 1
                holding_triton.stop()  # it answers its held call UNAVAILABLE as it stops
                with pytest.raises(InferenceServerException) as caught:
                    await first
                return caught.value

        assert asyncio.run(run()).status() == "StatusCode.UNAVAILABLE"
        assert [r for _, r in holding_triton.seen] == ["held"]
        router.wait_idle()
    finally:
        router.stop()


def test_instance_connection_lost_mid_call(native: None, loop_thread: LoopThread) -> None:
    """An instance whose connection drops with a call on it (no trailers, no reset)."""
    listener = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{listener.getsockname()[1]}"

    def take_and_drop() -> None:  # each connection: read up to a request, then drop it
        with contextlib.suppress(OSError):
            while True:
                connection, _ = listener.accept()
                server = h2.connection.H2Connection(h2.config.H2Configuration(
                    client_side=False))
                server.initiate_connection()
                connection.sendall(server.data_to_send())
                while data := connection.recv(65536):
                    events = server.receive_data(data)
                    connection.sendall(server.data_to_send())
                    if any(isinstance(e, h2.events.RequestReceived) for e in events):
                        break
                connection.close()

    threading.Thread(target=take_and_drop, daemon=True).start()
    config, instances = make_config([address])
    router = start_router(loop_thread, config, instances)
    try:
        with grpcclient.InferenceServerClient(router.address) as client, \
                pytest.raises(InferenceServerException) as caught:
            client.infer("identity", identity_inputs())
        assert caught.value.status() == "StatusCode.UNAVAILABLE"
        assert f"upstream instance {address}: the connection was lost" in caught.value.message()
        router.wait_idle()
    finally:
        router.stop()
        listener.close()


def test_removed_instance_cancels_its_calls(native: None, loop_thread: LoopThread,
                                            holding_triton: Holding) -> None:
    """A drain that times out removes the instance: the call still on it is cancelled
    upstream and answered CANCELLED, as on the grpc.aio path when the channel closes."""
    config, instances = make_config([holding_triton.address])
    router = start_router(loop_thread, config, instances)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            def infer() -> Any:
                with grpcclient.InferenceServerClient(router.address) as client:
                    return client.infer("identity", identity_inputs(), request_id="r")

            held = pool.submit(infer)
            assert holding_triton.arrived.wait(30)
            removed = admin_stub(router.admin_address).RemoveInstance(
                apb.RemoveInstanceRequest(variant="AllTraffic", address=holding_triton.address,
                                          drain_timeout_s=0.2), timeout=30)
            assert not removed.drained
            with pytest.raises(InferenceServerException) as caught:
                held.result(timeout=30)
        assert caught.value.status() == "StatusCode.CANCELLED"
        assert f"upstream instance {holding_triton.address} was removed from the router" \
            in caught.value.message()
        wait_for(lambda: holding_triton.cancelled == ["r"], "the upstream call's cancellation")
        router.wait_idle()
    finally:
        router.stop()


def test_oversize_message_answers_as_grpc_does(make_router: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    tensor = grpcclient.InferInput("INPUT0", [4096], "FP32")
    tensor.set_data_from_numpy(np.zeros(4096, dtype=np.float32))
    errors = []
    for data_path in ("grpc", "native"):
        monkeypatch.setenv("TRITONMESH_DATA_PATH", data_path)
        router = make_router(limits={"max_message_bytes": 8192})
        with grpcclient.InferenceServerClient(router.address) as client, \
                pytest.raises(InferenceServerException) as caught:
            client.infer("identity", [tensor])
        errors.append((caught.value.status(), caught.value.message()))
        with grpcclient.InferenceServerClient(router.address) as client:
            assert client.infer("identity", identity_inputs()).as_numpy("OUTPUT0") is not None
    assert errors[0] == errors[1]
    assert errors[1][0] == "StatusCode.RESOURCE_EXHAUSTED"


def test_twenty_megabytes_both_ways(native: None, make_router: Any) -> None:
    router = make_router()
    tensor = grpcclient.InferInput("INPUT0", [5 * 2**20], "FP32")
    data = np.random.default_rng(1).random(5 * 2**20, dtype=np.float32)
    tensor.set_data_from_numpy(data)
    with grpcclient.InferenceServerClient(router.address) as client:
        for _ in range(2):
            result = client.infer("identity", [tensor], client_timeout=60)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
    router.wait_idle()


def test_small_windows_carry_large_messages(native: None, loop_thread: LoopThread,
                                            worker_addresses: list[str]) -> None:
    """Windows far smaller than the messages: each side waits for the other's reader, and
    4 MiB goes both ways in 16 KiB steps."""
    config, instances = make_config(worker_addresses[:1])
    config = dataclasses.replace(config, native=NativeConfig(
        stream_window_bytes=16384, connection_window_bytes=65535))
    router = start_router(loop_thread, config, instances)
    tensor = grpcclient.InferInput("INPUT0", [2**20], "FP32")
    data = np.random.default_rng(2).random(2**20, dtype=np.float32)
    tensor.set_data_from_numpy(data)
    try:
        with grpcclient.InferenceServerClient(router.address) as client:
            result = client.infer("identity", [tensor], client_timeout=60)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
        router.wait_idle()
    finally:
        router.stop()


# -- raw HTTP/2 --

class RawClient:
    """A blocking HTTP/2 client (h2) on one connection to the router."""

    def __init__(self, address: str, **config: bool):
        """``config``: more H2Configuration settings (what h2 itself refuses to send)."""
        host, _, port = address.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                         **config))
        self.conn.initiate_connection()
        self.send()

    def send(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def events(self) -> list[Any]:
        data = self.sock.recv(65536)
        if not data:
            return [None]
        found = self.conn.receive_data(data)
        with contextlib.suppress(OSError):  # the router may have closed after its GOAWAY
            self.send()
        return list(found)

    def headers(self, path: str, content_type: str) -> list[tuple[str, str]]:
        return [(":method", "POST"), (":scheme", "http"), (":path", path),
                (":authority", "router"), ("te", "trailers"), ("content-type", content_type)]

    def answer(self, stream_id: int) -> dict[str, str]:
        """Every header and trailer the router sent on the stream, until it ended."""
        seen: dict[str, str] = {}
        while True:
            for event in self.events():
                assert event is not None, "the connection closed"
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    if event.stream_id == stream_id:
                        seen.update((k.decode(), v.decode()) for k, v in event.headers)
                if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)) \
                        and event.stream_id == stream_id:
                    return seen

    def close(self) -> None:
        self.sock.close()


def _identity_message() -> bytes:
    request = pb.ModelInferRequest(model_name="identity", id="raw")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[3])
    tensor.contents.fp32_contents.extend([0.0, 1.0, 2.0])
    body = request.SerializeToString()
    return b"\0" + len(body).to_bytes(4, "big") + body


def test_non_grpc_content_type_answers_as_grpc_does(make_router: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    answers = []
    for data_path in ("grpc", "native"):
        monkeypatch.setenv("TRITONMESH_DATA_PATH", data_path)
        router = make_router()
        client = RawClient(router.address)
        client.conn.send_headers(1, client.headers(MODEL_INFER, "text/plain"))
        client.conn.send_data(1, b"hello", end_stream=True)
        client.send()
        answers.append(client.answer(1))
        client.close()
    assert answers[0] == answers[1]
    assert answers[1].get(":status") != "200" or answers[1].get("grpc-status") not in (None, "0")


def test_a_unary_call_costs_its_client_no_window_update(native: None,
                                                        make_router: Any) -> None:
    """A ModelInfer whose message comes with END_STREAM (a unary gRPC call's usual last frame)
    is answered with no WINDOW_UPDATE for its stream: raising the window of a request that
    has sent everything lets nothing more through and costs a write to the client per call.
    Two calls to one instance: the first waits for the upstream connection to be made, the
    second finds it (and is sent while its client stream is still being read)."""
    router = make_router(workers=1)
    client = RawClient(router.address)
    updates: list[tuple[int, int]] = []
    for stream_id in (1, 3):
        client.conn.send_headers(stream_id, client.headers(MODEL_INFER, "application/grpc"))
        client.conn.send_data(stream_id, _identity_message(), end_stream=True)
        client.send()
        trailers: dict[bytes, bytes] = {}
        ended = False
        while not ended:
            for event in client.events():
                assert event is not None, "the connection closed"
                if isinstance(event, h2.events.WindowUpdated) and event.stream_id:
                    updates.append((event.stream_id, event.delta))
                if isinstance(event, h2.events.TrailersReceived):
                    trailers = dict(event.headers)
                ended = ended or isinstance(event, (h2.events.StreamEnded,
                                                    h2.events.StreamReset))
        assert trailers.get(b"grpc-status") == b"0"
    client.close()
    assert updates == []
    router.wait_idle()


def test_malformed_frame_closes_only_that_connection(native: None, make_router: Any) -> None:
    router = make_router()
    client = RawClient(router.address)
    # A SETTINGS frame five bytes long: its length must be a multiple of six.
    client.sock.sendall(b"\x00\x00\x05\x04\x00\x00\x00\x00\x00" + b"\0" * 5)
    goaway = None
    while goaway is None:
        events = client.events()
        if events == [None]:
            break
        goaway = next((e for e in events if isinstance(e, h2.events.ConnectionTerminated)), None)
    assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.FRAME_SIZE_ERROR
    client.close()
    with grpcclient.InferenceServerClient(router.address) as good:
        assert good.infer("identity", identity_inputs()).as_numpy("OUTPUT0") is not None
    router.wait_idle()


def test_connection_bounds(native: None, make_router: Any) -> None:
    """``limits.max_connections``: one more is closed at once; ``connection_idle_timeout_s``:
    a connection with no stream gets GOAWAY, and its client reconnects."""
    router = make_router(limits={"max_connections": 1, "connection_idle_timeout_s": 0.5})
    idle = RawClient(router.address)
    host, _, port = router.address.rpartition(":")
    refused = socket.create_connection((host, int(port)), timeout=10)
    assert refused.recv(1) == b""  # closed, not served
    refused.close()
    goaway = None
    while goaway is None:
        events = idle.events()
        assert events != [None], "closed without GOAWAY"
        goaway = next((e for e in events if isinstance(e, h2.events.ConnectionTerminated)), None)
    assert goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    idle.close()
    wait_for(lambda: not router.router.native.connections, "the idle connection to close")
    with grpcclient.InferenceServerClient(router.address) as client:
        assert client.infer("identity", identity_inputs()).as_numpy("OUTPUT0") is not None
    router.wait_idle()


def test_connection_max_age(native: None, make_router: Any) -> None:
    """``limits.connection_max_age_s`` with no idle timeout: GOAWAY by age alone."""
    router = make_router(limits={"connection_max_age_s": 0.5, "connection_idle_timeout_s": 0})
    client = RawClient(router.address)
    goaway = None
    while goaway is None:
        events = client.events()
        assert events != [None], "closed without GOAWAY"
        goaway = next((e for e in events if isinstance(e, h2.events.ConnectionTerminated)), None)
    assert goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    client.close()


def test_header_flood_resets_only_that_stream(native: None, make_router: Any) -> None:
    router = make_router()
    client = RawClient(router.address)
    flood = [(f"x-flood-{i}", "v") for i in range(300)]
    client.conn.send_headers(1, client.headers(MODEL_INFER, "application/grpc") + flood)
    client.send()
    reset = None
    while reset is None:
        events = client.events()
        assert events != [None], "the connection closed"
        reset = next((e for e in events if isinstance(e, h2.events.StreamReset)), None)
    assert reset.stream_id == 1
    client.conn.send_headers(3, client.headers(MODEL_INFER, "application/grpc"))
    client.conn.send_data(3, _identity_message(), end_stream=True)
    client.send()
    assert client.answer(3).get("grpc-status") == "0"
    client.close()
    router.wait_idle()


def test_rapid_reset_loop(native: None, make_router: Any) -> None:
    router = make_router()
    client = RawClient(router.address)
    message = _identity_message()
    for i in range(300):
        stream_id = 1 + 2 * i
        client.conn.send_headers(stream_id, client.headers(MODEL_INFER, "application/grpc"))
        if i % 2:  # half reset mid-message, half after the whole request (a lease taken)
            client.conn.send_data(stream_id, message[:7])
        else:
            client.conn.send_data(stream_id, message)
        client.conn.reset_stream(stream_id)
        client.send()
    client.conn.send_headers(601, client.headers(MODEL_INFER, "application/grpc"))
    client.conn.send_data(601, message, end_stream=True)
    client.send()
    assert client.answer(601).get("grpc-status") == "0"
    client.close()
    with grpcclient.InferenceServerClient(router.address) as good:
        assert good.infer("identity", identity_inputs()).as_numpy("OUTPUT0") is not None
    router.wait_idle()


# -- endings that once went wrong --

_PING = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"\0" * 8


def test_per_try_expiry_keeps_its_answer_behind_other_writes(native: None,
                                                             loop_thread: LoopThread,
                                                             holding_triton: Holding) -> None:
    """The per-try timer fires in the loop iteration that also read a frame from the same
    client (here a PING): the client's connection is written after the upstream's RST, and
    the client must still get DEADLINE_EXCEEDED, not the upstream stream's reset."""
    config, instances = make_config([holding_triton.address],
                                    variant_options={"per_try_timeout_s": 60.0, **_FORWARD})
    router = start_router(loop_thread, config, instances)
    client = RawClient(router.address)
    try:
        client.conn.send_headers(1, client.headers(MODEL_INFER, "application/grpc"))
        client.conn.send_data(1, _identity_message(), end_stream=True)
        client.send()
        assert holding_triton.arrived.wait(30)

        async def expire_after_a_ping() -> None:
            native = router.router.native
            assert native is not None
            (connection,) = native.connections
            call = connection.streams[1].handler
            connection.data_received(_PING)  # its answer is now pending on that connection
            call.per_try_expired()

        loop_thread.run(expire_after_a_ping())
        answer = client.answer(1)
        assert answer.get("grpc-status") == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
        assert "per_try_timeout_s" in answer.get("grpc-message", "")
        wait_for(lambda: holding_triton.cancelled == ["raw"], "the upstream call's cancellation")
        router.wait_idle()
    finally:
        client.close()
        router.stop()


def test_client_trailers_do_not_replace_the_request_headers(make_router: Any,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """HEADERS, half a message, then trailers ending the stream: relayed with the request's
    own headers (its ``grpc-timeout`` included), so grpc.aio answers as it answers half a
    message ended by empty DATA: at the deadline. The relay, shared by every client, keeps
    serving."""
    answers = []
    for data_path in ("grpc", "native"):
        monkeypatch.setenv("TRITONMESH_DATA_PATH", data_path)
        router = make_router()
        client = RawClient(router.address)
        client.conn.send_headers(1, [*client.headers(MODEL_INFER, "application/grpc"),
                                     ("grpc-timeout", "1S")])
        client.conn.send_data(1, _identity_message()[:7])
        if data_path == "grpc":  # grpc.aio waits past the deadline after a client's trailers
            client.conn.send_data(1, b"", end_stream=True)
        else:
            client.conn.send_headers(1, [("x-trailer", "t")], end_stream=True)
        client.send()
        answers.append(client.answer(1))
        client.close()
        with grpcclient.InferenceServerClient(router.address) as good:
            assert good.is_model_ready("identity")
    assert answers[1] == answers[0]
    assert answers[1].get("grpc-status") not in (None, "0")


def test_connect_failing_unexpectedly_answers_and_releases(native: None, make_router: Any,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """An exception other than OSError while a connection is made (a bug) answers INTERNAL
    and gives the lease back; the next call is served."""
    from tritonmesh.native_pool import UpstreamPool

    router = make_router()
    real_connect = UpstreamPool.connect
    failed = []

    async def connect_once_broken(self: UpstreamPool, address: str, tls: Any = None) -> Any:
        if not failed:
            failed.append(address)
            raise RuntimeError("broken on purpose")
        return await real_connect(self, address, tls)

    monkeypatch.setattr(UpstreamPool, "connect", connect_once_broken)
    with grpcclient.InferenceServerClient(router.address) as client:
        with pytest.raises(InferenceServerException) as caught:
            client.infer("identity", identity_inputs(), client_timeout=30)
        assert caught.value.status() == "StatusCode.INTERNAL"
        assert "broken on purpose" in caught.value.message()
        router.wait_idle()
        assert client.infer("identity", identity_inputs()).as_numpy("OUTPUT0") is not None
    router.wait_idle()


# -- flow control against a reader that does not read --

def _send_flow_controlled(client: RawClient, stream_id: int, payload: bytes,
                          events: list[Any]) -> None:
    """All of ``payload`` on the stream, as the router's windows allow, then END_STREAM;
    the events read meanwhile are added to ``events``."""
    sent = 0
    while sent < len(payload):
        room = min(client.conn.local_flow_control_window(stream_id),
                   client.conn.max_outbound_frame_size, len(payload) - sent)
        if room <= 0:
            events += client.events()
            assert events[-1] is not None, "the connection closed"
            continue
        client.conn.send_data(stream_id, payload[sent:sent + room],
                              end_stream=sent + room == len(payload))
        sent += room
        client.send()


def test_slow_reader_stalls_only_its_own_streams(native: None, loop_thread: LoopThread,
                                                 worker_addresses: list[str]) -> None:
    """A client that never gives a window back (its initial window is 0) holds four 1 MiB
    answers from the only instance, twice the router's connection window to it; another
    client's call to the same instance is answered meanwhile."""
    config, instances = make_config(worker_addresses[:1])
    config = dataclasses.replace(config, native=NativeConfig(
        stream_window_bytes=256 * 1024, connection_window_bytes=512 * 1024))
    router = start_router(loop_thread, config, instances)
    request = pb.ModelInferRequest(model_name="identity", id="slow")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[2**18])
    tensor.contents.fp32_contents.extend(np.arange(2**18, dtype=np.float32).tolist())
    body = request.SerializeToString()
    message = b"\0" + len(body).to_bytes(4, "big") + body
    slow = RawClient(router.address)
    try:
        slow.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        slow.send()
        streams = [1, 3, 5, 7]
        events: list[Any] = []
        for stream_id in streams:
            slow.conn.send_headers(stream_id, slow.headers(MODEL_INFER, "application/grpc"))
            _send_flow_controlled(slow, stream_id, message, events)
        answered: set[int] = set()
        while True:  # until Triton is sending all four answers
            for event in events:
                assert event is not None, "the connection closed"
                assert not isinstance(event, (h2.events.StreamReset, h2.events.DataReceived))
                if isinstance(event, h2.events.ResponseReceived):
                    answered.add(event.stream_id)
            if len(answered) == len(streams):
                break
            events = slow.events()
        good = grpcclient.InferInput("INPUT0", [2**18], "FP32")
        data = np.random.default_rng(3).random(2**18, dtype=np.float32)
        good.set_data_from_numpy(data)
        with grpcclient.InferenceServerClient(router.address) as client:
            for _ in range(3):
                result = client.infer("identity", [good], client_timeout=30)
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
        slow.close()
        router.wait_idle()
    finally:
        slow.close()
        router.stop()


def test_header_list_limit_counts_decoded_bytes(native: None, make_router: Any) -> None:
    """HPACK: one 4000-byte field enters the dynamic table and is then named by one byte, 200
    times: ~800 KB of headers for ~4 KB on the wire. The decoded size is held to
    ``native.max_header_list_bytes``: RESOURCE_EXHAUSTED, and the connection serves on."""
    router = make_router()
    client = RawClient(router.address)
    flood = [("x-big", "a" * 4000)] * 200
    client.conn.send_headers(1, client.headers(MODEL_INFER, "application/grpc") + flood)
    client.conn.send_data(1, _identity_message(), end_stream=True)
    client.send()
    answer = client.answer(1)
    assert answer.get("grpc-status") == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    assert "native.max_header_list_bytes (65536 bytes)" in answer.get("grpc-message", "")
    client.conn.send_headers(3, client.headers(MODEL_INFER, "application/grpc"))
    client.conn.send_data(3, _identity_message(), end_stream=True)
    client.send()
    assert client.answer(3).get("grpc-status") == "0"
    client.close()
    router.wait_idle()


def test_spent_stream_ids_replace_the_connection(native: None, loop_thread: LoopThread,
                                                 worker_addresses: list[str]) -> None:
    """A pooled connection that used the last stream ID HTTP/2 allows (2**31 - 1) is
    replaced for the next call, and closes once its streams are done."""
    address = worker_addresses[0]
    config, instances = make_config([address])
    router = start_router(loop_thread, config, instances)
    try:
        native = router.router.native
        assert native is not None
        with grpcclient.InferenceServerClient(router.address) as client:
            assert client.infer("identity", identity_inputs()).as_numpy("OUTPUT0") is not None
            spent = native.pool.get(address)
            assert spent is not None

            async def skip() -> None:
                spent.skip_stream_ids(2**31 - 1)

            loop_thread.run(skip())
            for _ in range(3):
                result = client.infer("identity", identity_inputs())
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.arange(3))
        assert native.pool.get(address) not in (None, spent)
        wait_for(lambda: spent.lost, "the spent connection to close")
        router.wait_idle()
    finally:
        router.stop()


class RefusingUpstream:
    """An HTTP/2 server (h2) that resets every stream with one error code, or answers each
    with ``answer(connection, stream_id)``."""

    def __init__(self, error_code: h2.errors.ErrorCodes,
                 answer: Callable[[h2.connection.H2Connection, int], None] | None = None):
        self.error_code = error_code
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.refused = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                sock, _ = self.listener.accept()
                threading.Thread(target=self._connection, args=(sock,), daemon=True).start()

    def _connection(self, sock: socket.socket) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        with sock, contextlib.suppress(OSError):
            sock.sendall(conn.data_to_send())
            while data := sock.recv(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        if self.answer is not None:
                            self.answer(conn, event.stream_id)
                        else:
                            conn.reset_stream(event.stream_id, self.error_code)
                        self.refused += 1
                sock.sendall(conn.data_to_send())

    def stop(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("error_code", [h2.errors.ErrorCodes.REFUSED_STREAM,
                                        h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                                        h2.errors.ErrorCodes.PROTOCOL_ERROR])
def test_refusing_resets_are_not_charged_to_the_instance(native: None, loop_thread: LoopThread,
                                                         error_code: h2.errors.ErrorCodes
                                                         ) -> None:
    """An upstream that refuses streams (or calls them malformed) fails the calls UNAVAILABLE
    but is not ejected for it: five in a row would eject an instance that failed them."""
    upstream = RefusingUpstream(error_code)
    config, instances = make_config([upstream.address])
    router = start_router(loop_thread, config, instances)
    try:
        with grpcclient.InferenceServerClient(router.address) as client:
            for _ in range(6):
                with pytest.raises(InferenceServerException) as caught:
                    client.infer("identity", identity_inputs(), client_timeout=30)
                assert caught.value.status() == "StatusCode.UNAVAILABLE"
                assert f"HTTP/2 error code {int(error_code)}" in caught.value.message()
        (instance,) = router.balancer.instances()
        assert upstream.refused >= 6 and instance.failures == 0 and not instance.ejected
        router.wait_idle()
    finally:
        router.stop()
        upstream.stop()


def _send_until_blocked(client: RawClient, left: dict[int, int]) -> int:
    """Zeros on each stream (``left``: how many more each may send) while the router's
    windows allow; returns how many went. Blocked: two PING round trips in a row with no
    window to send in (the router writes the WINDOW_UPDATEs a read earns no later than the
    PING ACK it answers to the next read)."""
    sent = quiet = 0
    while quiet < 2:
        progressed = False
        for stream_id in left:
            room = min(client.conn.local_flow_control_window(stream_id),
                       client.conn.max_outbound_frame_size, left[stream_id])
            if room > 0:
                client.conn.send_data(stream_id, bytes(room))
                left[stream_id] -= room
                sent += room
                progressed = True
        client.conn.ping(b"barrier!")
        client.send()
        acked = False
        while not acked:
            for event in client.events():
                assert event is not None, "the connection closed"
                acked = acked or isinstance(event, h2.events.PingAckReceived)
        quiet = 0 if progressed else quiet + 1
    return sent


def test_first_message_peeks_share_one_message_budget(native: None, loop_thread: LoopThread,
                                                      worker_addresses: list[str]) -> None:
    """Six streams each start a 700 KiB first message and never finish it. Their bytes leave
    flow control only within one message's worth per connection (``max_message_bytes``, 1
    MiB here): one stream sends all of it, the others a stream window each. When the first
    message ends, the next stream gets the budget."""
    config, instances = make_config(worker_addresses[:1], limits={"max_message_bytes": 2**20})
    window = 64 * 1024
    config = dataclasses.replace(config, native=NativeConfig(stream_window_bytes=window))
    router = start_router(loop_thread, config, instances)
    client = RawClient(router.address)
    try:
        length = 700 * 1024
        streams = [1, 3, 5, 7, 9, 11]
        for stream_id in streams:
            client.conn.send_headers(stream_id, client.headers(MODEL_INFER, "application/grpc"))
            client.conn.send_data(stream_id, b"\0" + length.to_bytes(4, "big"))
        client.send()
        left = dict.fromkeys(streams, length - 1)
        sent = _send_until_blocked(client, left)
        assert left[1] == 0  # the first reserved the budget and sent all but its last byte
        assert sent <= 2**20 + len(streams) * window
        client.conn.send_data(1, b"\0", end_stream=True)  # a malformed request, now whole
        client.send()
        opened = False
        while not opened:
            for event in client.events():
                assert event is not None, "the connection closed"
                opened = opened or (isinstance(event, h2.events.WindowUpdated)
                                    and event.stream_id == 3)
        client.close()
        router.wait_idle()
    finally:
        client.close()
        router.stop()


_UNCHECKED = {"validate_outbound_headers": False, "normalize_outbound_headers": False,
              "validate_inbound_headers": False}


def test_illegal_metadata_is_refused_as_grpc_does(make_router: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """An uppercase metadata key gets grpc.aio's answer on both paths, never reaching
    Triton from the native one. A control character in a value: INTERNAL naming the key
    (grpc.aio leaves that call unanswered)."""
    answers = []
    for data_path in ("grpc", "native"):
        monkeypatch.setenv("TRITONMESH_DATA_PATH", data_path)
        router = make_router()
        client = RawClient(router.address, **_UNCHECKED)
        client.conn.send_headers(1, [*client.headers(MODEL_INFER, "application/grpc"),
                                     ("X-Upper", "v")])
        client.conn.send_data(1, _identity_message(), end_stream=True)
        client.send()
        answers.append(client.answer(1))
        if data_path == "native":
            client.conn.send_headers(3, [*client.headers(MODEL_INFER, "application/grpc"),
                                         ("x-ctl", "a\x01b")])
            client.conn.send_data(3, _identity_message(), end_stream=True)
            client.send()
            answer = client.answer(3)
            assert answer.get("grpc-status") == str(grpc.StatusCode.INTERNAL.value[0])
            assert answer.get("grpc-message") == "Illegal header value for key x-ctl"
        client.close()
    assert answers[0].get("grpc-status") == str(grpc.StatusCode.INTERNAL.value[0])
    assert answers[1] == answers[0]


def _http_503(conn: h2.connection.H2Connection, stream_id: int) -> None:
    conn.send_headers(stream_id, [(":status", "503"), ("content-type", "text/plain")],
                      end_stream=True)


def _no_trailers(conn: h2.connection.H2Connection, stream_id: int) -> None:
    conn.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc")])
    conn.send_data(stream_id, b"\0\0\0\0\0", end_stream=True)


@pytest.mark.parametrize(("answer", "status", "text"), [
    (_http_503, "StatusCode.UNAVAILABLE", None),
    (_no_trailers, "StatusCode.INTERNAL", "upstream ended the stream without trailers")])
def test_answers_without_grpc_status(native: None, loop_thread: LoopThread, answer: Any,
                                     status: str, text: str | None) -> None:
    """An upstream (an HTTP proxy in front of Triton, say) that answers 503 without
    grpc-status, or ends its DATA without trailers: the client gets a gRPC status, and each
    call counts against the instance (UNAVAILABLE / INTERNAL, not UNKNOWN, which would end
    its run of failures)."""
    upstream = RefusingUpstream(h2.errors.ErrorCodes.NO_ERROR, answer)
    config, instances = make_config([upstream.address])
    router = start_router(loop_thread, config, instances)
    try:
        with grpcclient.InferenceServerClient(router.address) as client:
            for _ in range(3):
                with pytest.raises(InferenceServerException) as caught:
                    client.infer("identity", identity_inputs(), client_timeout=30)
                assert caught.value.status() == status
                if text is not None:
                    assert text in caught.value.message()
        (instance,) = router.balancer.instances()
        assert instance.failures == 3
        router.wait_idle()
    finally:
        router.stop()
        upstream.stop()


def test_a_full_header_block_is_forwarded(native: None, make_router: Any) -> None:
    """A request of 256 fields (the most a block may have): no ``te`` nor ``:authority``,
    and 252 metadata entries. It is forwarded with the router's own headers added (258),
    and Triton answers it: at ~8.5 KB of metadata, past grpc-core's 8 KiB soft limit, that
    is OK or, by grpc-core's random draw, its own RESOURCE_EXHAUSTED; never the router's
    UNAVAILABLE."""
    router = make_router()
    client = RawClient(router.address, **_UNCHECKED)
    headers = [(":method", "POST"), (":scheme", "http"), (":path", MODEL_INFER),
               ("content-type", "application/grpc")]
    headers += [(f"x{i}", "") for i in range(252)]
    client.conn.send_headers(1, headers)
    client.conn.send_data(1, _identity_message(), end_stream=True)
    client.send()
    answer = client.answer(1)
    assert answer.get("grpc-status") == "0" or (
        answer.get("grpc-status") == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
        and "metadata size exceeds" in answer.get("grpc-message", "")), answer
    client.close()
    router.wait_idle()


def test_a_flush_that_cannot_be_scheduled_stops_nothing(native: None,
                                                        make_router: Any) -> None:
    """A connection whose loop is closed cannot schedule its write; every other
    connection's writes still go out (the engine's flush flag is process-wide)."""
    from tritonmesh._core._h2 import H2Connection

    dead_loop = asyncio.new_event_loop()
    dead_loop.close()
    orphan = H2Connection(None, False)
    orphan.loop = dead_loop
    orphan.reset(1)  # marks it to be written: call_soon on the closed loop raises
    router = make_router()
    with grpcclient.InferenceServerClient(router.address) as client:
        result = client.infer("identity", identity_inputs(), client_timeout=30)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.arange(3))
    router.wait_idle()
