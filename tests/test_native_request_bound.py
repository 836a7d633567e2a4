"""The request direction's bound per client connection on the native data path: what a
client sends for an upstream that takes nothing is held in the router within the peek budget
(``limits.max_message_bytes``) and ``native.connection_buffer_bytes``, plus a base window per
stream past them, whatever its number of streams."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import h2.errors
import pytest
from harness import LoopThread, make_config, start_router, wait_for
from test_native_hostile import H2Upstream, _barrier
from test_native_path import (  # noqa: F401 (native: a fixture)
    MODEL_INFER,
    RawClient,
    native,
)
from tritonclient.grpc import service_pb2 as pb
from tritonmesh.config import HealthCheckConfig
from tritonmesh.native_config import NativeConfig, native_available

pytestmark = [
    pytest.mark.triton,
    pytest.mark.usefixtures("native"),  # data_path: native; ModelInfer on grpc.aio fails
    pytest.mark.skipif(not native_available(), reason=(
        "the native data path's extension (tritonmesh._core._h2) is not built here")),
]

_BASE_WINDOW = 65535


def _rss_mib() -> int:
    found = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())
    assert found is not None
    return int(found.group(1)) // 1024


def _big_message(size: int) -> bytes:
    request = pb.ModelInferRequest(model_name="identity", id="big")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[size // 4])
    request.raw_input_contents.append(bytes(size))
    body = request.SerializeToString()
    return b"\0" + len(body).to_bytes(4, "big") + body


def _send_what_the_windows_allow(client: RawClient, sent: dict[int, int],
                                 message: bytes) -> int:
    """One round: each stream's message as far as its window lets it, then a PING barrier
    (the router has read it all, and its WINDOW_UPDATEs before the ACK are in); returns the
    bytes sent."""
    total = 0
    frame = client.conn.max_outbound_frame_size
    for stream_id, offset in sent.items():
        while offset < len(message) and (room := client.conn.local_flow_control_window(
                stream_id)) > 0:
            n = min(room, frame, len(message) - offset)
            client.conn.send_data(stream_id, message[offset:offset + n],
                                  end_stream=offset + n == len(message))
            offset += n
            total += n
        sent[stream_id] = offset
    client.send()
    _barrier(client, b"settled?")
    return total


def test_requests_for_an_upstream_that_takes_nothing_hold_a_bounded_amount(
        loop_thread: LoopThread) -> None:
    """24 streams of 6 MiB first messages for an upstream that never opens a window: the
    router takes one message whole (the peek budget, which its reservation holds until
    Triton takes the bytes) and a base window of each other stream, not every message
    (unbounded, 144 MiB and a copy of each for the peek)."""
    upstream = H2Upstream()  # never answers, never acknowledges a byte (h2's windows stay shut)
    budget, streams, size = 8 << 20, 24, 6 << 20
    config, instances = make_config([upstream.address], limits={"max_message_bytes": budget})
    config = dataclasses.replace(
        config, native=NativeConfig(first_message_timeout_s=0.0),
        health_check=HealthCheckConfig(interval_s=600.0))
    router = start_router(loop_thread, config, instances)
    client = RawClient(router.address)
    try:
        message = _big_message(size)
        sent = {}
        for i in range(streams):
            stream_id = 1 + 2 * i
            client.conn.send_headers(stream_id, client.headers(MODEL_INFER, "application/grpc"))
            sent[stream_id] = 0
        client.send()
        base = _rss_mib()
        # Until a round sends nothing though the first message had reached the upstream
        # before it began (its barrier then saw every window opened since): what the
        # router takes from then on, it holds for good. Idle rounds are few in a row, as
        # the router takes PINGs without data between for abuse, as grpc-core does.
        while True:
            reached = upstream.requests > 0
            if _send_what_the_windows_allow(client, sent, message):
                assert sum(sent.values()) <= streams * len(message) // 2, \
                    "the router took most of every message"
            elif reached:
                break
            else:
                wait_for(lambda: upstream.requests > 0, "the first message to go upstream")
        taken = sum(sent.values())
        grown = _rss_mib() - base
        assert len(message) <= taken <= budget + streams * _BASE_WINDOW, taken
        assert grown < 64, grown
        assert upstream.requests == 1
        client.close()
        wait_for(lambda: upstream.resets == [h2.errors.ErrorCodes.CANCEL],
                 "the upstream stream's cancellation")
        router.wait_idle()
    finally:
        client.close()
        router.stop()
        upstream.stop()


def test_a_message_waiting_for_the_peek_budget_is_not_expired(loop_thread: LoopThread) -> None:
    """A first message whose length is known but that waits for the connection's peek
    budget, held by a message Triton has not taken, is not slow on its client's part:
    ``native.first_message_timeout_s`` does not end it (the bound is the budget's holder's
    deadline, or the client's)."""
    upstream = H2Upstream()
    budget = 1 << 20
    config, instances = make_config([upstream.address], limits={"max_message_bytes": budget})
    config = dataclasses.replace(config, health_check=HealthCheckConfig(interval_s=600.0))
    router = start_router(loop_thread, config, instances)
    client = RawClient(router.address)
    try:
        held = _big_message(budget - 1024)  # the budget's holder: whole, sent, never taken
        client.conn.send_headers(1, client.headers(MODEL_INFER, "application/grpc"))
        client.conn.send_data(1, held[:4096])  # its length: it reserves the budget
        _barrier(client, b"reserved")
        client.conn.send_headers(3, client.headers(MODEL_INFER, "application/grpc"))
        client.conn.send_data(3, _big_message(budget // 2)[:4096])  # its length, some bytes
        sent = {1: 4096}
        while sent[1] < len(held):
            assert _send_what_the_windows_allow(client, sent, held), "the holder was stalled"
        wait_for(lambda: upstream.requests == 1, "the holder to go upstream")

        async def expire_everything_old() -> list[int]:
            native = router.router.native
            assert native is not None
            (connection,) = native.connections
            return [s.id for s in connection.expire_peeks(time.monotonic() + 3600.0)]

        assert loop_thread.run(expire_everything_old()) == []
        client.close()
        wait_for(lambda: upstream.resets == [h2.errors.ErrorCodes.CANCEL],
                 "the holder's upstream cancellation")
        router.wait_idle()
    finally:
        client.close()
        router.stop()
        upstream.stop()
