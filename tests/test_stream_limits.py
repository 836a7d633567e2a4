"""The data path under load and abuse: a request waiting on a stream holds up nobody,
a client that does not read cannot grow the router, a request with almost no deadline
left never reaches Triton."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import queue
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from harness import (
    LongStream,
    LoopThread,
    generate_inputs,
    identity_inputs,
    make_config,
    start_pool,
    start_router,
    wait_for,
)
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException
from tritonmesh.config import EndpointConfig, RoutingStrategy, VariantConfig

pytestmark = pytest.mark.triton


def _two_variants(addresses: list[str]) -> tuple[EndpointConfig, dict[str, list[str]]]:
    """``generate`` on one instance at most one at a time; ``identity`` on another."""
    config, _ = make_config(addresses)
    variants = (
        VariantConfig("slow", 1.0, RoutingStrategy.LEAST_OUTSTANDING_REQUESTS,
                      frozenset({"generate"}), (addresses[0],), max_concurrency=1),
        VariantConfig("fast", 1.0, RoutingStrategy.LEAST_OUTSTANDING_REQUESTS,
                      frozenset({"identity"}), (addresses[1],)),
    )
    return (dataclasses.replace(config, variants=variants),
            {"slow": [addresses[0]], "fast": [addresses[1]]})


def test_a_request_waiting_for_an_instance_holds_up_no_later_request(
        loop_thread: LoopThread, worker_addresses: list[str]) -> None:
    config, instances = _two_variants(worker_addresses)
    router = start_router(loop_thread, config, instances)
    slow = router.balancer.by_name["slow"]
    busy = LongStream(router.address, max_tokens=100_000)  # holds the one generate slot
    results: queue.Queue[Any] = queue.Queue()
    try:
        with grpcclient.InferenceServerClient(router.address) as client:
            client.start_stream(callback=lambda result, error: results.put((result, error)))
            client.async_stream_infer("generate", generate_inputs(3), request_id="waits")
            wait_for(lambda: len(slow.waiters) == 1, "the generate request to queue")
            client.async_stream_infer("identity", identity_inputs(), request_id="later")
            # Answered while the first request still waits (it waits until `busy` ends,
            # which is not before this answer).
            result, error = results.get(timeout=60)
            assert error is None, error
            assert result.get_response().id == "later"
            assert result.as_numpy("OUTPUT0").tolist() == [0, 1, 2]
            assert len(slow.waiters) == 1
            busy.stop()
            tokens = [results.get(timeout=60) for _ in range(3)]
            assert [e for _, e in tokens] == [None] * 3
            assert [int(r.as_numpy("TOKEN")[0]) for r, _ in tokens] == [0, 1, 2]
            client.stop_stream()
        router.wait_idle()
    finally:
        busy.stop()
        router.stop()


@pytest.mark.parametrize("ending", ["cancel", "deadline"])
def test_a_waiting_request_is_released_once_however_its_stream_ends(
        loop_thread: LoopThread, worker_addresses: list[str], ending: str) -> None:
    config, instances = _two_variants(worker_addresses)
    router = start_router(loop_thread, config, instances)
    slow = router.balancer.by_name["slow"]
    busy = LongStream(router.address, max_tokens=100_000)
    results: queue.Queue[Any] = queue.Queue()
    try:
        with grpcclient.InferenceServerClient(router.address) as client:
            client.start_stream(callback=lambda result, error: results.put((result, error)),
                                stream_timeout=None if ending == "cancel" else 3.0)
            client.async_stream_infer("generate", generate_inputs(3), request_id="waits")
            wait_for(lambda: len(slow.waiters) == 1, "the generate request to queue")
            if ending == "cancel":
                client.stop_stream(cancel_requests=True)
            wait_for(lambda: len(slow.waiters) == 0, "the waiting request to leave")
            client.stop_stream(cancel_requests=True)
        assert router.total_outstanding() == 1  # only `busy`: nothing leaked, none freed twice
        busy.stop()
        router.wait_idle()
    finally:
        busy.stop()
        router.stop()


def _tiny_deadlines(address: str, count: int, users: int) -> list[tuple[str, str]]:
    """``count`` identity requests with deadlines of 1 to 6 ms from ``users`` threads;
    the status and message of every one that failed."""
    def user(n: int) -> list[tuple[str, str]]:
        failures = []
        with grpcclient.InferenceServerClient(address) as client:
            for i in range(n):
                try:
                    client.infer("identity", identity_inputs(),
                                 client_timeout=0.001 * (1 + i % 6))
                except InferenceServerException as exc:
                    failures.append((str(exc.status()), exc.message() or ""))
        return failures

    with concurrent.futures.ThreadPoolExecutor(users) as pool:
        runs = [pool.submit(user, count // users) for _ in range(users)]
        return [m for run in runs for m in run.result(timeout=300)]


def test_requests_with_almost_no_deadline_left_never_reach_triton(
        loop_thread: LoopThread) -> None:
    pool = start_pool(loop_thread, 2)
    try:
        pids = [w.pid for w in pool.workers]
        config, instances = make_config(pool.addresses, strategy="ROUND_ROBIN")
        router = start_router(loop_thread, config, instances)
        try:
            failures = _tiny_deadlines(router.address, 2400, 16)
            assert {status for status, _ in failures} <= {
                "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED"}, failures
            assert [w.returncode for w in pool.workers] == [None, None]
            assert [w.pid for w in pool.workers] == pids
            with grpcclient.InferenceServerClient(router.address) as client:
                for _ in range(4):  # both workers still answer
                    result = client.infer("identity", identity_inputs(), client_timeout=30)
                    assert result.as_numpy("OUTPUT0").tolist() == [0, 1, 2]
            router.wait_idle()
        finally:
            router.stop()
    finally:
        loop_thread.run(pool.stop(grace=5.0), timeout=60)


def _inference_count(address: str, model: str) -> int:
    with grpcclient.InferenceServerClient(address) as client:
        stats = client.get_inference_statistics(model, as_json=True)
        return int(stats["model_stats"][0].get("inference_count", 0))


def test_below_the_deadline_floor_the_router_answers_itself(
        loop_thread: LoopThread, worker_addresses: list[str]) -> None:
    """Unary, a stream request sent as unary, and a stream request that would open an
    upstream stream: none reaches Triton with less than min_upstream_deadline_ms left."""
    config, instances = make_config(worker_addresses[:1])
    # A floor above the client's whole deadline: every request is below it from the start.
    router = start_router(loop_thread, dataclasses.replace(config, limits=dataclasses.replace(
        config.limits, min_upstream_deadline_ms=120_000.0)), instances)
    try:
        before = {m: _inference_count(worker_addresses[0], m) for m in ("identity", "generate")}
        with grpcclient.InferenceServerClient(router.address) as client:
            with pytest.raises(InferenceServerException) as unary:
                client.infer("identity", identity_inputs(), client_timeout=60)
            assert unary.value.status() == "StatusCode.DEADLINE_EXCEEDED"
            assert "below limits.min_upstream_deadline_ms (120000); not sent to Triton" in \
                (unary.value.message() or "")
            results: queue.Queue[Any] = queue.Queue()
            client.start_stream(callback=lambda result, error: results.put((result, error)),
                                stream_timeout=60)
            client.async_stream_infer("identity", identity_inputs(), request_id="u")
            client.async_stream_infer("generate", generate_inputs(2), request_id="g")
            errors = [results.get(timeout=30)[1] for _ in range(2)]
            client.stop_stream()
        assert all("below limits.min_upstream_deadline_ms" in str(e) for e in errors), errors
        after = {m: _inference_count(worker_addresses[0], m) for m in ("identity", "generate")}
        assert after == before
        router.wait_idle()
    finally:
        router.stop()


def _status_mib(pid: int, key: str) -> int:
    found = re.search(rf"{key}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert found is not None
    return int(found.group(1)) // 1024


def test_a_client_that_does_not_read_cannot_grow_the_router(tmp_path: Path,
                                                            worker_addresses: list[str]) -> None:
    """One stream sends 1,000 x 256 KiB identity requests and reads nothing until the
    router stops taking them: the router holds limits.max_stream_requests_in_flight (64) of them,
    not all 1,000 (unbounded, its peak RSS grew by about 750 MiB)."""
    config = tmp_path / "endpoint.yaml"
    config.write_text("listen: 127.0.0.1:0\nmetrics_listen: null\nadmin_listen: null\n"
                      f"variants:\n- name: v\n  instances: [{worker_addresses[0]}]\n")
    router = subprocess.Popen([str(Path(sys.executable).parent / "tritonmesh"), "serve",
                               "--config", str(config)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert router.stdout is not None
        address = None
        for line in router.stdout:
            found = re.search(r"serving Triton's gRPC protocol on (\S+)", line)
            address = found.group(1) if found else address
            if line.startswith("Stop with Ctrl-C"):
                break
        assert address is not None
        request = _identity_request(65536)  # 256 KiB of FP32
        options = [("grpc.max_receive_message_length", -1)]
        with grpc.insecure_channel(address, options=options) as channel:
            stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
            assert len(list(stream(iter([request]), timeout=60))) == 1  # warm
            base = _status_mib(router.pid, "VmRSS")
            sent = 0

            def requests() -> Iterator[bytes]:
                nonlocal sent
                for _ in range(1000):
                    sent += 1
                    yield request

            call = stream(requests(), timeout=300)
            # Until the client has sent everything or the router stopped taking more.
            last, since = -1, time.monotonic()
            while sent < 1000 and time.monotonic() - since < 3.0:
                if sent != last:
                    last, since = sent, time.monotonic()
                time.sleep(0.05)
            held_back = sent < 1000
            answers = sum(1 for _ in call)
        peak = _status_mib(router.pid, "VmHWM")
        assert answers == 1000
        assert held_back, "the router read every request of a client that reads nothing"
        assert peak - base < 200, (base, peak)
    finally:
        router.send_signal(signal.SIGINT)
        router.communicate(timeout=60)


def _identity_request(elements: int) -> bytes:
    request = pb.ModelInferRequest(model_name="identity")
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "INPUT0", "FP32"
    tensor.shape.extend([elements])
    request.raw_input_contents.append(np.ones(elements, np.float32).tobytes())
    return request.SerializeToString()


async def _open_streams(address: str, count: int) -> dict[str, int]:
    """``count`` streams opened at once, one identity request each: how each one ended."""
    request = _identity_request(3)
    ends: dict[str, int] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")

        async def one() -> None:
            try:
                answers = [pb.ModelStreamInferResponse.FromString(r)
                           async for r in stream(iter([request]), timeout=120)]
                end = "OK" if [a.error_message for a in answers] == [""] else repr(answers)
            except grpc.aio.AioRpcError as exc:
                end = f"{exc.code().name}: {exc.details()}"
            ends[end] = ends.get(end, 0) + 1

        await asyncio.gather(*(one() for _ in range(count)))
    return ends


def test_a_burst_of_stream_opens_is_served(make_router: Any, loop_thread: LoopThread) -> None:
    """2,000 streams opened at once, the client on the router's own event loop so that
    the calls pile up in gRPC before the router takes them up (as on a busy router).
    With gRPC's default pending-call limits (1,000, 3,000) about 10% were refused."""
    router = make_router()
    assert loop_thread.run(_open_streams(router.address, 2000), timeout=300) == {"OK": 2000}
