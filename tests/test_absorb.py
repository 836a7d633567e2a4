"""``upstream_cancellation``: a ModelInfer whose client left is absorbed (Triton finishes it,
its answer dropped, its count held until then, at most ``absorb_timeout_s``) or forwarded
(the upstream call is cancelled). Triton's gRPC frontend can crash on a cancellation that
races a completion, so absorbing is the default. Both data paths, for ModelInfer and for a
stream's request sent upstream as ModelInfer."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from harness import (
    LoopThread,
    RecordingTriton,
    generate_inputs,
    identity_inputs,
    make_config,
    start_router,
    wait_for,
)
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException


class Answering(RecordingTriton):
    """A Triton that answers ModelInfer only once the test sets ``release``, and records
    when its client (the router) cancelled a call, and which calls it answered."""

    def __init__(self, loop: LoopThread):
        self.cancelled: dict[str, float] = {}
        self.answered: list[str] = []
        self.arrived = threading.Event()
        super().__init__(loop)
        self.hold = loop.run(_event())

    def release(self) -> None:
        self.loop.run(self._release())

    async def _release(self) -> None:
        assert self.hold is not None
        self.hold.set()

    async def model_infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        request_id = pb.ModelInferRequest.FromString(request).id
        self.arrived.set()
        try:
            response = await super().model_infer(request, context)
        except asyncio.CancelledError:
            self.cancelled[request_id] = time.monotonic()
            raise
        self.answered.append(request_id)
        return response


async def _event() -> asyncio.Event:
    return asyncio.Event()


@pytest.fixture
def answering(loop_thread: LoopThread) -> Iterator[Answering]:
    fake = Answering(loop_thread)
    yield fake
    fake.stop()


def _router(loop_thread: LoopThread, address: str, **options: Any) -> Any:
    config, instances = make_config([address], variant_options=options)
    return start_router(loop_thread, config, instances)


# A stream's request for ``identity`` (not decoupled) goes upstream as ModelInfer: its
# client leaves by resetting the stream, and it is absorbed as a ModelInfer's is.
RPCS = ("ModelInfer", "ModelStreamInfer")


def _stream_request(request_id: str) -> bytes:
    request = pb.ModelInferRequest(model_name="identity", id=request_id)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "INPUT0", "FP32"
    tensor.shape.extend([1])
    request.raw_input_contents.append(b"\0\0\0\0")
    return bytes(request.SerializeToString())


async def _stream(address: str, fake: Answering, request_id: str, end: asyncio.Event,
                  timeout: float | None = None) -> Any:
    """A client stream (its call) whose one request reached ``fake``; it half-closes once
    ``end`` is set."""
    channel = grpc.aio.insecure_channel(address)

    async def requests() -> Any:
        yield _stream_request(request_id)
        await end.wait()

    call = channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        response_deserializer=pb.ModelStreamInferResponse.FromString)(requests(),
                                                                      timeout=timeout)
    call.add_done_callback(lambda _: asyncio.ensure_future(channel.close()))
    assert await asyncio.to_thread(fake.arrived.wait, 30)
    return call


def _leave_after_arrival(rpc: str, address: str, fake: Answering, request_id: str) -> None:
    """The client leaves once its request reached ``fake``: it cancels its ModelInfer, or
    resets its stream."""
    async def leave() -> None:
        if rpc == "ModelStreamInfer":
            stream = await _stream(address, fake, request_id, asyncio.Event())
            stream.cancel()
            with pytest.raises(asyncio.CancelledError):
                await stream.read()
            return
        async with aioclient.InferenceServerClient(address) as client:
            call = asyncio.ensure_future(client.infer("identity", identity_inputs(),
                                                      request_id=request_id))
            assert await asyncio.to_thread(fake.arrived.wait, 30)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

    asyncio.run(leave())


def _absorbed_until_answered(router: Any, fake: Answering, request_id: str) -> None:
    """The router absorbed the call: it stays counted, and Triton sees no cancellation,
    until Triton answers it."""
    (instance,) = router.instances()
    wait_for(lambda: instance.absorbed == 1, "the router to absorb the call")
    assert router.total_outstanding() == 1
    assert fake.cancelled == {}
    fake.release()
    wait_for(lambda: fake.answered == [request_id], "Triton's answer")
    router.wait_idle()
    assert fake.cancelled == {}


@pytest.mark.parametrize("rpc", RPCS)
def test_a_client_that_leaves_leaves_triton_its_call(rpc: str, data_path: str,
                                                     loop_thread: LoopThread,
                                                     answering: Answering) -> None:
    """Absorbed: Triton sees no cancellation and answers; the call stays counted on the
    instance until then, and its answer goes nowhere."""
    router = _router(loop_thread, answering.address)
    try:
        _leave_after_arrival(rpc, router.address, answering, "c1")
        _absorbed_until_answered(router, answering, "c1")
        # The router keeps serving, on the same connection to Triton.
        with grpcclient.InferenceServerClient(router.address) as client:
            assert client.infer("identity", identity_inputs(),
                                request_id="c2").get_response().id == "c2"
        router.wait_idle()
    finally:
        router.stop()


@pytest.mark.parametrize("rpc", RPCS)
def test_an_absorbed_call_is_cancelled_after_absorb_timeout(
        rpc: str, data_path: str, loop_thread: LoopThread, answering: Answering) -> None:
    """A Triton that does not answer an absorbed call within ``absorb_timeout_s`` gets its
    cancellation then, not before, and the count comes back."""
    router = _router(loop_thread, answering.address, absorb_timeout_s=1.0)
    try:
        left = time.monotonic()
        _leave_after_arrival(rpc, router.address, answering, "c1")
        wait_for(lambda: "c1" in answering.cancelled, "the cancellation after absorb_timeout_s")
        # The router's timer started after the client left: never earlier than that.
        assert answering.cancelled["c1"] - left >= 0.99, answering.cancelled["c1"] - left
        router.wait_idle()
    finally:
        answering.release()
        router.stop()


@pytest.mark.parametrize("rpc", RPCS)
def test_forward_cancels_triton_at_once(rpc: str, data_path: str, loop_thread: LoopThread,
                                        answering: Answering) -> None:
    router = _router(loop_thread, answering.address, upstream_cancellation="forward")
    try:
        _leave_after_arrival(rpc, router.address, answering, "c1")
        wait_for(lambda: "c1" in answering.cancelled, "the upstream call's cancellation")
        router.wait_idle()
        (instance,) = router.instances()
        assert instance.absorbed == 0
    finally:
        answering.release()
        router.stop()


@pytest.mark.parametrize("rpc", RPCS)
@pytest.mark.parametrize("cancellation", ["absorb", "forward"])
def test_triton_gets_the_clients_deadline_only_when_forwarding(
        rpc: str, data_path: str, loop_thread: LoopThread, recording_triton: RecordingTriton,
        cancellation: str) -> None:
    """Triton's own expiry of a deadline is a cancellation too: absorbing, the router
    keeps the deadline (it answers the client) and sends Triton none."""
    router = _router(loop_thread, recording_triton.address, upstream_cancellation=cancellation)
    try:
        if rpc == "ModelStreamInfer":
            with grpc.insecure_channel(router.address) as channel:
                stream = channel.stream_stream(
                    "/inference.GRPCInferenceService/ModelStreamInfer")
                assert len(list(stream(iter([_stream_request("s1")]), timeout=5.0))) == 1
        else:
            with grpcclient.InferenceServerClient(router.address) as client:
                client.infer("identity", identity_inputs(), client_timeout=5.0)
        ((_, _, remaining),) = [c for c in recording_triton.calls if c[0] == "ModelInfer"]
        if cancellation == "absorb":
            assert remaining is None
        else:
            assert remaining is not None and 0 < remaining <= 5.5
        router.wait_idle()
    finally:
        router.stop()


def test_a_stream_deadline_leaves_triton_its_unary_call(data_path: str, loop_thread: LoopThread,
                                                        answering: Answering) -> None:
    """The stream's deadline passes with a request in flight: the client is answered
    DEADLINE_EXCEEDED as before, and Triton, sent no deadline, is left to finish."""
    router = _router(loop_thread, answering.address)

    async def expire() -> list[Any]:
        call = await _stream(router.address, answering, "s1", asyncio.Event(), timeout=3.0)
        read = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for response in call:
                read.append(response)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        return read

    try:
        read = asyncio.run(expire())
        # Any answer that came first is the request's in-stream error.
        assert all("Deadline Exceeded" in r.error_message for r in read), read
        _absorbed_until_answered(router, answering, "s1")
    finally:
        router.stop()


def test_a_stream_requests_per_try_timeout_answers_in_stream_and_absorbs(
        data_path: str, loop_thread: LoopThread, answering: Answering) -> None:
    """``per_try_timeout_s`` expires for a stream's request: its in-stream error names the
    instance, the stream goes on (it ends OK), and Triton is left the call."""
    router = _router(loop_thread, answering.address, per_try_timeout_s=1.0)

    async def run() -> list[Any]:
        end = asyncio.Event()
        call = await _stream(router.address, answering, "s1", end)
        read = [await call.read()]
        end.set()
        while (response := await call.read()) is not grpc.aio.EOF:
            read.append(response)
        assert await call.code() == grpc.StatusCode.OK
        return read

    try:
        (answer,) = asyncio.run(run())
        assert "per_try_timeout_s" in answer.error_message, answer
        _absorbed_until_answered(router, answering, "s1")
    finally:
        router.stop()


@pytest.mark.triton
@pytest.mark.parametrize("rpc", RPCS)
def test_a_deadline_that_passes_leaves_triton_its_request(rpc: str, data_path: str,
                                                          make_router: Any) -> None:
    """On a real Triton: the client gets DEADLINE_EXCEEDED from its deadline (a stream's
    request for a model that is not decoupled, its in-stream error or the stream's status),
    Triton finishes the request (its statistics count it a success), and the count comes
    back when it has."""
    router = make_router(workers=1)
    (instance,) = router.instances()

    def successes() -> int:
        with grpcclient.InferenceServerClient(instance.address) as direct:
            stats = direct.get_inference_statistics("generate_unary", as_json=True)
        return int(stats["model_stats"][0]["inference_stats"]["success"].get("count", 0))

    before = successes()
    with grpcclient.InferenceServerClient(router.address) as client:
        if rpc == "ModelStreamInfer":
            results: queue.Queue[Any] = queue.Queue()
            client.start_stream(callback=lambda result, error: results.put(error or result),
                                stream_timeout=1.0)
            client.async_stream_infer("generate_unary", generate_inputs(400))  # ~2 s of work
            error = results.get(timeout=30)
            client.stop_stream()
            assert isinstance(error, InferenceServerException), error
            assert "Deadline Exceeded" in str(error) \
                or error.status() == "StatusCode.DEADLINE_EXCEEDED", error
        else:
            with pytest.raises(InferenceServerException) as caught:
                client.infer("generate_unary", generate_inputs(400), client_timeout=0.3)
            assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    wait_for(lambda: instance.absorbed == 1, "the router to absorb the call")
    router.wait_idle(timeout=60)
    # Triton's Python backend counts a request just after its response goes.
    wait_for(lambda: successes() == before + 1, "Triton to count the request a success")
    with grpcclient.InferenceServerClient(router.address) as client:
        assert client.infer("identity", identity_inputs()).as_numpy("OUTPUT0") is not None
