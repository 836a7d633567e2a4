"""Requests for non-decoupled models inside a client stream go upstream as ModelInfer.

Triton 2.51 crashes when non-decoupled and decoupled models answer on streams at the
same time (bench/triton_stream_race.py reproduces it against Triton alone), so the
router keeps non-decoupled requests off upstream streams. These tests check that the
client cannot tell (answers and errors the same messages Triton sends on a stream),
that the choice follows each model's transaction policy, and that mixed streaming
through the router leaves real Triton standing.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from harness import RecordingTriton, make_config, start_pool, start_router, wait_for
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonmesh.config import AuthConfig


def _identity_request(request_id: str, datatype: str = "FP32",
                      model: str = "identity") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "INPUT0", datatype
    tensor.shape.extend([3])
    request.raw_input_contents.append(np.arange(3, dtype=np.float32).tobytes())
    return request


def _one_on_stream(address: str, request: pb.ModelInferRequest) -> list[Any]:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return list(stub.ModelStreamInfer(iter([request]), timeout=30))


@pytest.mark.triton
def test_answers_and_errors_are_what_triton_sends_on_a_stream(make_router: Any,
                                                               worker_addresses: list[str]) -> None:
    router = make_router()
    cases = [
        _identity_request("ok"),
        _identity_request("bad-type", datatype="INT32"),  # Triton: an in-stream error
        _identity_request("no-model", model="no_such_model"),
    ]
    for request in cases:
        # One request at a time is safe to send to Triton's own stream.
        direct = _one_on_stream(worker_addresses[0], request)
        routed = _one_on_stream(router.address, request)
        assert routed == direct, (request.id, routed, direct)
        assert len(routed) == 1
    ok, bad, missing = (_one_on_stream(router.address, r)[0] for r in cases)
    assert ok.infer_response.parameters["triton_final_response"].bool_param
    assert np.frombuffer(ok.infer_response.raw_output_contents[0], np.float32).tolist() == [0, 1, 2]
    assert "data-type is 'INT32'" in bad.error_message
    assert "no_such_model" in missing.error_message


@pytest.mark.triton
def test_a_half_close_while_an_answer_is_being_written_ends_the_stream_ok(
        make_router: Any, worker_addresses: list[str]) -> None:
    """The client half-closes while the router is still writing it an answer (8 MiB, and the
    client reads nothing yet, so the write waits on flow control): the stream still ends
    with that answer and OK. A handler that returned while a write was in progress left
    gRPC unable to send the status (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS), and the client
    waited until its deadline."""
    router = make_router(workers=1)
    request = pb.ModelInferRequest(model_name="identity", id="big")
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "INPUT0", "FP32"
    tensor.shape.extend([2**23])
    request.raw_input_contents.append(np.ones(2**23, np.float32).tobytes())
    close = threading.Event()

    def requests() -> Iterator[pb.ModelInferRequest]:
        yield request
        close.wait(30)

    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(router.address, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        answers = stub.ModelStreamInfer(requests(), timeout=20)
        # The lease is released (the request counted) right before the answer is written.
        wait_for(lambda: sum(i.requests for i in router.instances()) == 1,
                 "the answer back at the router", timeout=20)
        close.set()
        got = list(answers)
    assert [a.infer_response.id for a in got] == ["big"], [a.error_message for a in got]
    assert len(got[0].infer_response.raw_output_contents[0]) == 2**25


def test_each_request_takes_the_rpc_its_model_policy_allows(
        loop_thread: Any, recording_triton: RecordingTriton) -> None:
    fake = recording_triton
    config, instances = make_config([fake.address],
                                    auth=AuthConfig(admin_tokens=frozenset({"admin-token"})))
    router = start_router(loop_thread, config, instances)

    def requests(*specs: tuple[str, str, int]) -> Iterator[pb.ModelInferRequest]:
        for model, rid, sequence in specs:
            request = pb.ModelInferRequest(model_name=model, id=rid)
            if sequence:
                request.parameters["sequence_id"].int64_param = sequence
            yield request

    try:
        with grpc.insecure_channel(router.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            answers = list(stub.ModelStreamInfer(requests(
                ("identity", "i1", 0), ("generate", "g1", 0), ("identity", "i2", 0),
                ("identity", "seq", 7), ("unknown", "u1", 0),
            ), timeout=10))
            assert sorted(a.infer_response.id for a in answers) == ["g1", "i1", "i2", "seq", "u1"]
            assert all(a.infer_response.parameters["triton_final_response"].bool_param
                       for a in answers)
            by_id = {rid: rpc for rpc, rid in fake.seen}
            assert by_id == {
                "i1": "ModelInfer", "i2": "ModelInfer",  # non-decoupled: off the stream
                "g1": "ModelStreamInfer",                  # decoupled: needs the stream
                "seq": "ModelStreamInfer",                 # a sequence keeps its order
                "u1": "ModelStreamInfer",                  # unknown: Triton answers in-stream
            }
            # Asked once per model and remembered, except the unknown one.
            assert fake.config_asks.count("identity") == 1
            assert fake.config_asks.count("generate") == 1

            # A model loaded through the router may come back with a new policy: ask again.
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="identity"),
                                     timeout=10,
                                     metadata=(("authorization", "Bearer admin-token"),))
            fake.DECOUPLED = {"generate": True, "identity": True}
            list(stub.ModelStreamInfer(requests(("identity", "i3", 0)), timeout=10))
            assert fake.seen[-1] == ("ModelStreamInfer", "i3")
            assert fake.config_asks.count("identity") == 2
        router.wait_idle()
    finally:
        router.stop()


@pytest.mark.triton
def test_mixed_streams_through_the_router_leave_triton_standing(loop_thread: Any) -> None:
    """The pattern that crashes Triton 2.51 within seconds when sent to it directly:
    streams carrying a non-decoupled and a decoupled model at once. Its own workers,
    so a crash could not hurt other tests; every answer must come, none an error, and
    no worker may exit."""
    pool = start_pool(loop_thread, 1)
    config, instances = make_config(pool.addresses)
    router = start_router(loop_thread, config, instances)
    failures: list[str] = []
    # The same traffic as the reproduction script, so the two cannot drift apart.
    spec = importlib.util.spec_from_file_location(
        "triton_stream_race", Path(__file__).parents[1] / "bench" / "triton_stream_race.py")
    assert spec is not None and spec.loader is not None
    race = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(race)

    try:
        for _ in range(60):  # Triton alone crashed within 0-40 such rounds in 4 of 4 tries
            threads = [threading.Thread(target=race.one_stream,
                                        args=(router.address, k, failures))
                       for k in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            assert not failures, failures[:3]
            assert pool.exits.empty(), "a Triton worker exited"
        router.wait_idle()
    finally:
        router.stop()
        loop_thread.run(pool.stop(grace=5.0), timeout=60)


def test_a_client_gone_while_the_policy_is_asked_leaves_no_count(loop_thread: Any) -> None:
    """The router asks Triton for the model's policy after picking the instance; a client
    that cancels its stream during that question must not leave the pick counted."""

    class SlowConfig(RecordingTriton):
        answer = asyncio.Event()

        async def model_config(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self.config_asks.append(pb.ModelConfigRequest.FromString(request).name)
            await self.answer.wait()  # until the test lets it go
            return await super().model_config(request, context)

    fake = SlowConfig(loop_thread)
    config, instances = make_config([fake.address])
    router = start_router(loop_thread, config, instances)
    release = threading.Event()

    def requests() -> Iterator[pb.ModelInferRequest]:
        yield pb.ModelInferRequest(model_name="identity", id="i1")
        release.wait(30)  # hold the stream open

    try:
        with grpc.insecure_channel(router.address) as channel:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests(),
                                                                              timeout=30)
            deadline = time.monotonic() + 10
            while "identity" not in fake.config_asks:  # the router is waiting for the answer
                assert time.monotonic() < deadline, "the router never asked for the policy"
                time.sleep(0.005)
            assert router.total_outstanding() == 1
            call.cancel()
            release.set()
            router.wait_idle()
            assert fake.seen == []  # the request never went anywhere
    finally:
        release.set()
        loop_thread.run(_set(SlowConfig.answer))
        router.stop()
        fake.stop()


async def _set(event: asyncio.Event) -> None:
    event.set()
