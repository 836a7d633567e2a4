"""``ModelStreamInfer`` on the native data path (``router/native_stream.py`` over the
message mode of ``_core._h2``): served there, not relayed to grpc.aio; the unary fallback as a
native ``ModelInfer``; a client's cancel with requests on two instances; a client that does
not read."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import h2.settings
import test_native_path
import tritonclient.grpc as grpcclient
from harness import (
    LoopThread,
    RecordingTriton,
    generate_inputs,
    make_config,
    start_router,
    wait_for,
)
from test_native_path import RawClient
from tritonclient.grpc import service_pb2 as pb
from tritonmesh.native_config import NativeConfig
from tritonmesh.native_stream import MODEL_STREAM_INFER

# Triton tests, only where the extension is built; the `native` fixture: routers serve
# data_path native, and a ModelInfer or ModelStreamInfer reaching grpc.aio fails the test.
pytestmark = test_native_path.pytestmark
native = test_native_path.native


class Collector:
    def __init__(self) -> None:
        self.results: list[Any] = []

    def __call__(self, result: Any, error: Any) -> None:
        self.results.append(error if error is not None else result)


def _generate_message(request_id: str, max_tokens: int) -> bytes:
    request = pb.ModelInferRequest(model_name="generate", id=request_id)
    for name, value in (("PROMPT_TOKENS", 1), ("MAX_TOKENS", max_tokens)):
        tensor = request.inputs.add(name=name, datatype="INT32", shape=[1])
        tensor.contents.int_contents.append(value)
    body = request.SerializeToString()
    return b"\0" + len(body).to_bytes(4, "big") + body


def test_streams_are_served_natively_not_relayed(native: None, make_router: Any) -> None:
    """A decoupled model's tokens and empty final, and a non-decoupled model's answer, on
    one stream; the port relays nothing to grpc.aio (its handler would fail the test)."""
    router = make_router()
    port = router.router.native
    assert port is not None and port.streams is not None
    relayed = port.relayed
    collect = Collector()
    with grpcclient.InferenceServerClient(router.address) as client:
        client.start_stream(callback=collect)
        client.async_stream_infer("generate", generate_inputs(5), request_id="g",
                                  enable_empty_final_response=True)
        client.async_stream_infer("generate_unary", generate_inputs(3), request_id="u")
        client.stop_stream()  # half-close: waits for every final
    assert not [r for r in collect.results if isinstance(r, Exception)], collect.results
    by_id: dict[str, list[Any]] = {}
    for result in collect.results:
        by_id.setdefault(result.get_response().id, []).append(result)
    assert [r.as_numpy("TOKEN") is not None for r in by_id["g"]] == [True] * 5 + [False]
    assert by_id["g"][-1].get_response().parameters["triton_final_response"].bool_param
    assert [int(v) for v in by_id["u"][0].as_numpy("TOKENS")] == [0, 1, 2]
    assert port.relayed == relayed
    router.wait_idle()


def test_non_decoupled_request_goes_as_native_model_infer(native: None, loop_thread: LoopThread,
                                                          recording_triton: RecordingTriton
                                                          ) -> None:
    """On a stream, a request for a model that is not decoupled reaches Triton as
    ModelInfer (the router's own HTTP/2 call), a decoupled one on ModelStreamInfer; the
    answer comes back as Triton's stream response, marked final."""
    config, instances = make_config([recording_triton.address])
    router = start_router(loop_thread, config, instances)
    try:
        collect = Collector()
        with grpcclient.InferenceServerClient(router.address) as client:
            client.start_stream(callback=collect)
            for request_id in ("u1", "u2"):  # the first asks ModelConfig, the second knows
                client.async_stream_infer("identity", [], request_id=request_id)
            client.async_stream_infer("generate", [], request_id="d1")
            client.stop_stream()
        assert sorted(r.get_response().id for r in collect.results) == ["d1", "u1", "u2"]
        assert all(r.get_response().parameters["triton_final_response"].bool_param
                   for r in collect.results)
        assert sorted(recording_triton.seen) == [("ModelInfer", "u1"), ("ModelInfer", "u2"),
                                                 ("ModelStreamInfer", "d1")]
        assert router.router.native is not None and router.router.native.relayed == 0
        router.wait_idle()
    finally:
        router.stop()


def test_cancel_with_requests_on_two_instances(native: None, make_router: Any) -> None:
    """A client cancels its stream while two long generations run, one on each instance:
    both upstream streams are reset and both leases released."""
    router = make_router(workers=2)
    port = router.router.native
    assert port is not None
    collect = Collector()
    addresses = [i.address for i in router.instances()]
    with grpcclient.InferenceServerClient(router.address) as client:
        client.start_stream(callback=collect)
        client.async_stream_infer("generate", generate_inputs(5000), request_id="a")
        client.async_stream_infer("generate", generate_inputs(5000), request_id="b")
        wait_for(lambda: {r.get_response().id for r in collect.results} == {"a", "b"},
                 "tokens of both")
        assert [i.outstanding for i in router.instances()] == [1, 1]

        def upstream_streams() -> list[int]:
            connections = [port.pool.get(a) for a in addresses]
            return [0 if c is None else c.open_streams for c in connections]

        assert upstream_streams() == [1, 1]  # one ModelStreamInfer per instance, natively
        client.stop_stream(cancel_requests=True)
    router.wait_idle()
    wait_for(lambda: upstream_streams() == [0, 0], "the upstream streams' resets")


def test_a_client_that_does_not_read_holds_the_upstreams_back(native: None,
                                                              loop_thread: LoopThread,
                                                              worker_addresses: list[str]
                                                              ) -> None:
    """A client that never opens its window asks for 4 x 2,000 tokens on one stream: the
    router holds about a stream window of answers for it (then takes no more from Triton,
    whose flow control then stops it), not every token; its requests stay outstanding
    until it goes, and then every lease is released."""
    window = 64 * 1024
    config, instances = make_config(worker_addresses[:1])
    config = dataclasses.replace(config, native=NativeConfig(stream_window_bytes=window))
    router = start_router(loop_thread, config, instances)
    port = router.router.native
    assert port is not None
    slow = RawClient(router.address)
    try:
        slow.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        slow.send()
        slow.conn.send_headers(1, slow.headers(MODEL_STREAM_INFER.decode(), "application/grpc"))
        for n in range(4):
            slow.conn.send_data(1, _generate_message(f"t{n}", 2000))
        slow.send()

        def buffered() -> int:
            return sum(c.buffered_bytes for c in port.connections)

        # Until what the router holds for the client stops growing (a bounded wait).
        last, since, start = -1, time.monotonic(), time.monotonic()
        while time.monotonic() - since < 2.0 and time.monotonic() - start < 60:
            now = buffered()
            if now != last:
                last, since = now, time.monotonic()
            time.sleep(0.05)
        # One token's response is ~100 bytes: all 8,000 of them would be ~800 KiB.
        assert window <= last < 2 * window, last
        assert router.total_outstanding() == 4
        slow.close()
        router.wait_idle()
    finally:
        slow.close()
        router.stop()


def test_a_stream_whose_deadline_passes_is_answered_by_the_router(native: None,
                                                                  make_router: Any) -> None:
    """A client sets a deadline on its stream and sends nothing: the router's own timer
    answers DEADLINE_EXCEEDED (the stream is not relayed to grpc.aio, whose deadline it
    would be)."""
    router = make_router()
    port = router.router.native
    assert port is not None
    client = RawClient(router.address)
    try:
        client.conn.send_headers(1, [*client.headers(MODEL_STREAM_INFER.decode(),
                                                     "application/grpc"),
                                     ("grpc-timeout", "300m")])
        client.send()
        answer = client.answer(1)
        assert (answer.get("grpc-status"), answer.get("grpc-message")) \
            == ("4", "Deadline Exceeded"), answer
        assert port.relayed == 0
    finally:
        client.close()
    router.wait_idle()
