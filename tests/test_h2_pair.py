"""A call through the native engine (``_core._h2``) alone: a client's connection and an
upstream's, paired by a policy of a few lines, on the stdlib event loop with in-memory
transports, and real HTTP/2 peers (the ``h2`` package) on either side. What the engine tells
the policy of an answer (``trailers``), against the scan in Python it replaced, and when
an answer is written."""

from __future__ import annotations

import asyncio
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tritonmesh.native_config import native_available

pytestmark = pytest.mark.skipif(not native_available(), reason=(
    "the native data path's extension (tritonmesh._core._h2) is not built here"))

PATH = b"/inference.GRPCInferenceService/ModelInfer"
MESSAGE = b"\0\0\0\0\x03abc"


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.writes = 0

    def write(self, data: Any) -> None:
        self.written += data
        self.writes += 1

    def take(self) -> bytes:
        data = bytes(self.written)
        self.written.clear()
        return data

    def is_closing(self) -> bool:
        return False


class Owner:
    """The client connection's owner: nothing but ModelInfer (at ``peek_path``) comes."""

    def __init__(self) -> None:
        self.requests = 0

    def request(self, stream: Any, end_stream: bool) -> None:
        self.requests += 1
        stream.finish(12, b"")

    def connection_lost(self, connection: Any) -> None:
        pass


class Call:
    """What ``native_call.Call`` is told: the answer's statuses, or an early close."""

    def __init__(self) -> None:
        self.answer: tuple[bytes, bytes] | None = None

    def trailers(self, grpc_status: bytes, http_status: bytes) -> None:
        self.answer = (grpc_status, http_status)

    def closed(self, stream: Any, error_code: int) -> None:
        raise AssertionError(f"the upstream stream closed early ({error_code})")


def scan(block: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes]:
    """How ``Call.trailers`` read an answer's last block itself: its first grpc-status, and
    the :status before it."""
    code = status = b""
    for name, value in block:
        if name == b"grpc-status":
            code = value
            break
        if name == b":status":
            status = value
    return code, status


def request(client: h2.connection.H2Connection) -> bytes:
    """A client connection's preface and a ModelInfer with its message."""
    client.initiate_connection()
    client.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":authority", "a"),
                            (":path", PATH.decode()), ("content-type", "application/grpc")])
    client.send_data(1, MESSAGE, end_stream=True)
    return client.data_to_send()


async def one_call(answer: list[list[tuple[bytes, bytes]]]) -> tuple[Call, list[int], Owner]:
    """A ModelInfer through the engine, answered by ``answer``'s HEADERS blocks (the last
    ends the stream); returns its handler, the deferred writes (``flush_pending``) the
    answer scheduled, and the client connection's owner."""
    from tritonmesh._core._h2 import H2Connection, flush_pending

    loop = asyncio.get_running_loop()
    scheduled: list[int] = []
    call_soon = loop.call_soon

    def counting(callback: Any, *args: Any, **kwargs: Any) -> Any:
        if callback is flush_pending:
            scheduled.append(1)
        return call_soon(callback, *args, **kwargs)

    loop.call_soon = counting  # type: ignore[method-assign]
    call = Call()
    upstream = H2Connection(Owner(), False)
    to_triton = Transport()
    upstream.connection_made(to_triton)

    def start(stream: Any, message: bytes) -> None:
        assert message == MESSAGE[5:]
        upstream.open_stream([(b":method", b"POST"), (b":scheme", b"http"),
                              (b":path", PATH), (b":authority", b"t")], stream, call)

    owner = Owner()
    front = H2Connection(owner, True, peek_path=PATH, peek_limit=1 << 20, on_message=start)
    to_client = Transport()
    front.connection_made(to_client)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    front.data_received(request(client))
    assert to_triton.writes == 1  # a lone call: written at the end of the read

    triton = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=False, validate_outbound_headers=False, normalize_outbound_headers=False))
    triton.initiate_connection()
    events = triton.receive_data(to_triton.take())
    assert any(isinstance(e, h2.events.RequestReceived) for e in events)
    upstream.data_received(triton.data_to_send())  # its SETTINGS (to be acknowledged)
    await asyncio.sleep(0)
    for i, block in enumerate(answer):
        triton.send_headers(1, block, end_stream=i == len(answer) - 1)
        if i == 0 and len(answer) > 1:
            triton.send_data(1, MESSAGE)
    scheduled.clear()
    upstream.data_received(triton.data_to_send())
    for _ in range(3):  # whatever the answer scheduled runs (and what that schedules)
        await asyncio.sleep(0)
    ended = [e for e in client.receive_data(to_client.take())
             if isinstance(e, h2.events.StreamEnded | h2.events.StreamReset)]
    assert ended, "the client's call did not end"
    front.connection_lost(None)
    upstream.connection_lost(None)
    loop.call_soon = call_soon  # type: ignore[method-assign]
    return call, scheduled, owner


# Regular fields only: a pseudo-header past the first makes the answer malformed, and
# nghttp2 resets such a stream instead of reporting it.
BLOCK = st.lists(st.tuples(
    st.sampled_from([b"grpc-status", b"grpc-message", b"content-type", b"x"]),
    st.sampled_from([b"200", b"503", b"0", b"13", b"", b"text/plain"])), max_size=6)
TRAILERS = BLOCK.filter(bool)  # HTTP/2 has no empty block


@settings(max_examples=60, deadline=None)
@given(headers=st.tuples(st.sampled_from([b"200", b"503", b"404"]), BLOCK),
       trailers=st.none() | TRAILERS)
@example(headers=(b"503", [(b"content-type", b"text/plain")]), trailers=None)
@example(headers=(b"200", []), trailers=[(b"grpc-status", b""), (b"grpc-status", b"5")])
def test_an_answer_reads_as_the_scan_it_replaced(
        headers: tuple[bytes, list[tuple[bytes, bytes]]],
        trailers: list[tuple[bytes, bytes]] | None) -> None:
    """Response HEADERS (trailers-only when no trailers follow), then trailers: the policy is
    told the last block's first grpc-status and the :status before it, as its own scan of
    that block found them."""
    answer = [[(b":status", headers[0]), *headers[1]]]
    if trailers is not None:
        answer.append(trailers)
    call, _, _ = asyncio.run(one_call(answer))
    assert call.answer == scan(answer[-1])


def test_an_answer_is_written_in_the_event_that_brought_it() -> None:
    """Triton's answer is written to the client at the end of the read that brought it, not
    in another turn of the event loop (a callback per call), and giving the response's
    window back to the closed upstream stream marks nothing to write. The request's HEADERS
    reach no policy (``peek_path``): only its first message does."""
    call, scheduled, owner = asyncio.run(one_call([
        [(b":status", b"200"), (b"content-type", b"application/grpc")],
        [(b"grpc-status", b"0")]]))
    assert call.answer == (b"0", b"")
    assert scheduled == []
    assert owner.requests == 0


def test_requests_to_a_busy_upstream_share_one_write() -> None:
    """A lone call goes upstream at the end of the read that brought it; once the upstream
    connection has a call open, requests read in one loop turn from several clients wait
    for the deferred pass and go in one write."""
    from tritonmesh._core._h2 import H2Connection

    async def run() -> None:
        upstream = H2Connection(Owner(), False)
        to_triton = Transport()
        upstream.connection_made(to_triton)

        def start(stream: Any, message: bytes) -> None:
            upstream.open_stream([(b":method", b"POST"), (b":scheme", b"http"),
                                  (b":path", PATH), (b":authority", b"t")], stream, Call())

        fronts = [H2Connection(Owner(), True, peek_path=PATH, peek_limit=1 << 20,
                               on_message=start) for _ in range(3)]
        for front in fronts:
            front.connection_made(Transport())
        fronts[0].data_received(request(h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True))))
        assert to_triton.writes == 1
        for front in fronts[1:]:
            front.data_received(request(h2.connection.H2Connection(
                h2.config.H2Configuration(client_side=True))))
        assert to_triton.writes == 1
        await asyncio.sleep(0)
        assert to_triton.writes == 2
        triton = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        triton.initiate_connection()
        events = triton.receive_data(to_triton.take())
        assert len([e for e in events if isinstance(e, h2.events.RequestReceived)]) == 3
        for front in fronts:
            front.connection_lost(None)
        upstream.connection_lost(None)

    asyncio.run(run())
