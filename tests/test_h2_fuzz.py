"""The native engine (``_core._h2``) under arbitrary frames: whatever a client sends after a
valid preface, the session answers or closes, never raises, and holds nothing afterwards."""

from __future__ import annotations

import asyncio
from typing import Any

import h2.config
import h2.connection
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tritonmesh.native_config import native_available

pytestmark = pytest.mark.skipif(not native_available(), reason=(
    "the native data path's extension (tritonmesh._core._h2) is not built here"))


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def write(self, data: Any) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


class Owner:
    """Peeks every request's first message (up to 64 KiB) and refuses it, as a policy would."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def request(self, stream: Any, end_stream: bool) -> None:
        stream.await_message(65536)

    def message(self, stream: Any, compressed: int, message: bytes) -> None:
        self.messages.append(message)
        stream.finish(3, b"fuzzed")

    def oversize(self, stream: Any, length: int) -> None:
        stream.finish(8, b"too large")

    def incomplete(self, stream: Any) -> None:
        stream.finish(13, b"incomplete")

    def connection_lost(self, connection: Any) -> None:
        pass


def _preface_and_request() -> bytes:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":authority", "a"),
                            (":path", "/inference.GRPCInferenceService/ModelInfer"),
                            ("content-type", "application/grpc")])
    return client.data_to_send()


FRAME = st.tuples(st.integers(0, 10), st.integers(0, 255), st.integers(0, 9),
                  st.binary(max_size=64))


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big")
            + payload)


@settings(max_examples=400, deadline=None)
@given(frames=st.lists(FRAME, max_size=12), tail=st.binary(max_size=32))
@example(frames=[(0, 0, 1, b"\0\0\0\0\x02ab"), (3, 0, 1, b"\0\0\0\x08")], tail=b"")
@example(frames=[(0, 1, 1, b"\0\0\0\0\x09ab")], tail=b"")  # ends mid-message
def test_arbitrary_frames_after_a_valid_start(frames: list[tuple[int, int, int, bytes]],
                                              tail: bytes) -> None:
    from tritonmesh._core._h2 import H2Connection

    async def run() -> None:
        connection = H2Connection(Owner(), True)
        transport = Transport()
        connection.connection_made(transport)
        data = _preface_and_request() + b"".join(_frame(*f) for f in frames) + tail
        for i in range(0, len(data), 7):  # in pieces, as TCP may deliver them
            if transport.closed:
                break
            connection.data_received(data[i:i + 7])
        await asyncio.sleep(0)  # the deferred flush
        connection.connection_lost(None)
        assert connection.open_streams == 0

    asyncio.run(run())
