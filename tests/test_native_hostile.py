"""``data_path: native`` against hostile peers and broken deadlines: the router's own
deadline timer, retries of what provably never left, the first-message peek's time bound,
the router's own rapid-reset limit, and keepalive PINGs, each on real parts (raw ``h2``
clients, ``h2`` servers standing in for a misbehaving upstream, real Triton)."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import pytest
import tritonclient.grpc as grpcclient
from harness import (
    LoopThread,
    RouterHandle,
    identity_inputs,
    make_config,
    start_router,
    wait_for,
)
from test_native_path import (  # noqa: F401 (native: a fixture)
    MODEL_INFER,
    RawClient,
    RefusingUpstream,
    _identity_message,
    native,
)
from tritonclient.utils import InferenceServerException
from tritonmesh.config import HealthCheckConfig
from tritonmesh.native_config import NativeConfig, native_available

pytestmark = [
    pytest.mark.triton,
    pytest.mark.usefixtures("native"),  # data_path: native; ModelInfer on grpc.aio fails
    pytest.mark.skipif(not native_available(), reason=(
        "the native data path's extension (tritonmesh._core._h2) is not built here: no "
        "libnghttp2 header at install time, or TRITONMESH_NO_EXTENSIONS=1")),
]

CANCEL = h2.errors.ErrorCodes.CANCEL


class H2Upstream(RefusingUpstream):
    """An HTTP/2 server (h2) standing in for Triton: ``answer(connection, stream_id)`` for
    each ModelInfer (by default nothing: it never answers); records the resets of those."""

    def __init__(self, answer: Callable[[h2.connection.H2Connection, int], None]
                 = lambda conn, stream_id: None,
                 more: Callable[[h2.connection.H2Connection], None] = lambda conn: None):
        """``more(connection)``: after each read, whatever else it sends."""
        self.more = more
        self.requests = 0
        self.resets: list[int] = []
        super().__init__(h2.errors.ErrorCodes.NO_ERROR, answer)

    def _connection(self, sock: socket.socket) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        infers: set[int] = set()
        with sock, contextlib.suppress(OSError):
            sock.sendall(conn.data_to_send())
            while data := sock.recv(65536):
                if conn.state_machine.state == h2.connection.ConnectionState.CLOSED:
                    return  # after its GOAWAY
                for event in conn.receive_data(data):
                    # Only ModelInfer: the router's health checks come here too, unanswered.
                    if isinstance(event, h2.events.RequestReceived) \
                            and (b":path", MODEL_INFER.encode()) in event.headers:
                        infers.add(event.stream_id)
                        self.requests += 1
                        self.answer(conn, event.stream_id)
                    elif isinstance(event, h2.events.StreamReset) and event.stream_id in infers:
                        self.resets.append(event.error_code)
                self.more(conn)
                sock.sendall(conn.data_to_send())

    def stop(self) -> None:
        self.listener.close()


def _send_infer(client: RawClient, stream_id: int, *extra: tuple[str, str]) -> None:
    client.conn.send_headers(stream_id, client.headers(MODEL_INFER, "application/grpc")
                             + list(extra))
    client.conn.send_data(stream_id, _identity_message(), end_stream=True)
    client.send()


@pytest.mark.parametrize("cancellation", ["absorb", "forward"])
def test_deadline_is_the_routers_to_enforce(loop_thread: LoopThread, cancellation: str) -> None:
    """A client that sets a deadline and then neither resets nor closes, in front of an
    upstream that never answers: the router answers DEADLINE_EXCEEDED when the deadline
    passes, cancels the upstream stream (absorbing, once ``absorb_timeout_s`` has passed
    too), and releases the lease."""
    upstream = H2Upstream()
    config, instances = make_config([upstream.address], variant_options={
        "upstream_cancellation": cancellation, "absorb_timeout_s": 0.5})
    router = start_router(loop_thread, config, instances)
    try:
        client = RawClient(router.address)
        _send_infer(client, 1, ("grpc-timeout", "300m"))
        answer = client.answer(1)
        assert answer.get("grpc-status") == "4", answer
        assert answer.get("grpc-message") == "Deadline Exceeded"
        wait_for(lambda: upstream.resets == [CANCEL], "the upstream stream's cancellation")
        router.wait_idle()
        client.close()
    finally:
        router.stop()
        upstream.stop()


def _refuse_stream(conn: h2.connection.H2Connection, stream_id: int) -> None:
    conn.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)


def _goaway(conn: h2.connection.H2Connection, stream_id: int) -> None:
    """GOAWAY below the request's stream: nghttp2 reports the stream as refused."""
    conn.close_connection(last_stream_id=0)


@pytest.mark.parametrize("refuse", [_refuse_stream, _goaway])
def test_refused_requests_go_to_another_instance(loop_thread: LoopThread,
                                                 worker_addresses: list[str],
                                                 refuse: Callable[..., None]) -> None:
    """A request an upstream refused (REFUSED_STREAM, or a stream past its GOAWAY) provably
    never reached it: it goes to another instance, and the client sees only the answer."""
    upstream = H2Upstream(refuse)
    config, instances = make_config(worker_addresses[:1], strategy="ROUND_ROBIN")
    # No health check finds the stand-in (it answers no health RPC) before the requests do.
    config = dataclasses.replace(config, health_check=HealthCheckConfig(interval_s=600.0))
    router = start_router(loop_thread, config, instances)
    loop_thread.run(router.router.update_instances(
        {"AllTraffic": [worker_addresses[0], upstream.address]}))
    try:
        with grpcclient.InferenceServerClient(router.address) as client:
            for i in range(6):
                assert client.infer("identity", identity_inputs(), request_id=str(i),
                                    client_timeout=30).get_response().id == str(i)
        assert upstream.requests >= 3
        assert router.balancer.retry_budget.retried == upstream.requests
        router.wait_idle()
    finally:
        router.stop()
        upstream.stop()


def test_refused_sequence_request_is_not_moved(loop_thread: LoopThread) -> None:
    """A request in a sequence stays on its instance: refused, it fails UNAVAILABLE saying
    why it was not retried; the same request outside a sequence is tried again."""
    upstream = H2Upstream(_refuse_stream)
    config, instances = make_config([upstream.address])
    router = start_router(loop_thread, config, instances)
    try:
        with grpcclient.InferenceServerClient(router.address) as client:
            with pytest.raises(InferenceServerException) as caught:
                client.infer("identity", identity_inputs(), sequence_id=7, sequence_start=True,
                             client_timeout=30)
            assert caught.value.status() == "StatusCode.UNAVAILABLE"
            assert "not retried: this request's retries are used up" in caught.value.message()
            assert upstream.requests == 1
            with pytest.raises(InferenceServerException) as caught:
                client.infer("identity", identity_inputs(), client_timeout=30)
            assert caught.value.status() == "StatusCode.UNAVAILABLE"
            assert upstream.requests > 2  # tried again (on the only instance there is)
        router.wait_idle()
    finally:
        router.stop()
        upstream.stop()


def _answers(client: RawClient, *stream_ids: int) -> dict[int, dict[str, str]]:
    """Every header and trailer the router sent on each stream, until all ended."""
    seen: dict[int, dict[str, str]] = {i: {} for i in stream_ids}
    ended: set[int] = set()
    while ended != set(stream_ids):
        for event in client.events():
            assert event is not None, "the connection closed"
            stream_id = getattr(event, "stream_id", None)
            if stream_id not in seen:
                continue
            if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                seen[stream_id].update((k.decode(), v.decode()) for k, v in event.headers)
            if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                ended.add(stream_id)
    return seen


def test_a_first_message_that_never_ends_is_answered(loop_thread: LoopThread,
                                                     worker_addresses: list[str]) -> None:
    """A client that starts its first message and never finishes it holds the connection's
    peek budget only until ``native.first_message_timeout_s``: it is answered
    DEADLINE_EXCEEDED naming the key; the connection's other calls go on."""
    limit = 1 << 16
    config, instances = make_config(worker_addresses[:1], limits={"max_message_bytes": limit})
    config = dataclasses.replace(config, native=NativeConfig(first_message_timeout_s=0.5))
    router = start_router(loop_thread, config, instances)
    try:
        client = RawClient(router.address)
        client.conn.send_headers(1, client.headers(MODEL_INFER, "application/grpc"))
        # A length prefix that reserves nearly the whole budget, then two bytes, then nothing.
        client.conn.send_data(1, b"\0" + (limit - 40).to_bytes(4, "big") + b"\n\x08")
        _send_infer(client, 3)
        answers = _answers(client, 1, 3)
        assert answers[1].get("grpc-status") == "4", answers
        assert "native.first_message_timeout_s (0.5 s)" in answers[1]["grpc-message"]
        assert answers[3].get("grpc-status") == "0", answers
        client.close()
        router.wait_idle()
    finally:
        router.stop()


def _small_reset_bucket(loop_thread: LoopThread, worker_addresses: list[str], *,
                        warm: bool) -> RouterHandle:
    """A router on one worker whose rapid-reset bucket takes 20 resets, refilled at 1 per s;
    ``warm``: its upstream connection made by one call first."""
    config, instances = make_config(worker_addresses[:1])
    config = dataclasses.replace(config, native=NativeConfig(stream_reset_burst=20,
                                                             stream_reset_rate=1))
    router = start_router(loop_thread, config, instances)
    if warm:
        try:
            with grpcclient.InferenceServerClient(router.address) as client:
                assert client.infer("identity", identity_inputs()).as_numpy("OUTPUT0") \
                    is not None
        except BaseException:
            router.stop()
            raise
    return router


@pytest.mark.parametrize("path", [MODEL_INFER, "/inference.GRPCInferenceService/ModelStreamInfer"])
def test_rapid_reset_past_the_routers_limit(loop_thread: LoopThread,
                                            worker_addresses: list[str], path: str) -> None:
    """Client-sent RST_STREAMs past ``native.stream_reset_burst`` (refilled at
    ``native.stream_reset_rate`` per s) get GOAWAY ENHANCE_YOUR_CALM, whatever limit the
    nghttp2 build has of its own (Debian's 1.52 backport and 1.57+ allow 1000); the router
    keeps serving other connections. A native stream that handed a request over counts as
    a ModelInfer sent upstream does."""
    router = _small_reset_bucket(loop_thread, worker_addresses, warm=True)
    try:
        client = RawClient(router.address)
        for i in range(60):  # each sent upstream, then reset at once
            stream_id = 1 + 2 * i
            client.conn.send_headers(stream_id, client.headers(path, "application/grpc"))
            client.conn.send_data(stream_id, _identity_message())
            client.conn.reset_stream(stream_id)
        client.send()
        goaway = None
        while goaway is None:
            events = client.events()
            assert events != [None], "closed without GOAWAY"
            goaway = next((e for e in events if isinstance(e, h2.events.ConnectionTerminated)),
                          None)
        assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        client.close()
        with grpcclient.InferenceServerClient(router.address) as good:
            assert good.infer("identity", identity_inputs()).as_numpy("OUTPUT0") is not None
        router.wait_idle()
    finally:
        router.stop()


def _barrier(client: RawClient, data: bytes) -> None:
    """A PING's ACK, with no GOAWAY before it: the router has read every frame sent before
    it and still serves the connection."""
    client.conn.ping(data)
    client.send()
    acked = False
    while not acked:
        for event in client.events():
            assert event is not None, "the connection closed"
            assert not isinstance(event, h2.events.ConnectionTerminated), event
            acked = acked or isinstance(event, h2.events.PingAckReceived)


def test_resets_the_clients_deadline_explains_are_not_rapid_reset(
        loop_thread: LoopThread, worker_addresses: list[str]) -> None:
    """gRPC clients reset a call whose deadline is up: many calls timing out together (an
    overloaded fleet, short deadlines) must not read as rapid reset and lose the client its
    connection. A reset once the stream has lived 90% of its grpc-timeout is not charged to
    the bucket, even for a call already sent upstream, nor one of a call not sent anywhere
    yet; the connection still serves."""
    router = _small_reset_bucket(loop_thread, worker_addresses, warm=True)
    try:
        client = RawClient(router.address)
        streams = [1 + 2 * i for i in range(60)]
        headers = [*client.headers(MODEL_INFER, "application/grpc"), ("grpc-timeout", "200m")]
        for stream_id in streams:
            client.conn.send_headers(stream_id, headers)

        _barrier(client, b"headers!")
        # Calls not sent anywhere yet (their messages not in): resetting them starts and
        # frees nothing upstream, so it is not charged either.
        waiting = [streams[-1] + 2 * (i + 1) for i in range(60)]
        for stream_id in waiting:
            client.conn.send_headers(stream_id, client.headers(MODEL_INFER, "application/grpc"))
            client.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        threading.Event().wait(0.19)  # 95% of each stream's 200 ms, as the client counts it
        for stream_id in streams:  # each sent upstream (a fresh 200 ms), then reset
            client.conn.send_data(stream_id, _identity_message())
            client.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        _barrier(client, b"resets!!")  # answered, not a GOAWAY: the connection serves on
        client.close()
        router.wait_idle()
    finally:
        router.stop()


def test_resets_of_calls_already_answered_are_free(loop_thread: LoopThread,
                                                   worker_addresses: list[str]) -> None:
    """A client whose deadline fires while the router's answer is on its way resets a
    stream that is already over: that starts and frees nothing, so it is not charged."""
    router = _small_reset_bucket(loop_thread, worker_addresses, warm=False)
    try:
        client = RawClient(router.address)
        # 1 ms left is below limits.min_upstream_deadline_ms: the router answers at once.
        headers = [*client.headers(MODEL_INFER, "application/grpc"), ("grpc-timeout", "1m")]
        streams = [1 + 2 * i for i in range(60)]
        for stream_id in streams:
            client.conn.send_headers(stream_id, headers)
            client.conn.send_data(stream_id, _identity_message(), end_stream=True)
            client.send()
            assert client.answer(stream_id)["grpc-status"] == "4"  # DEADLINE_EXCEEDED
        # h2 refuses to reset a closed stream, so the frames are written as they are.
        client.sock.sendall(b"".join(
            (4).to_bytes(3, "big") + b"\x03\x00" + stream_id.to_bytes(4, "big")
            + (8).to_bytes(4, "big") for stream_id in streams))
        _barrier(client, b"resets!!")  # answered, not a GOAWAY: the connection serves on
        client.close()
        router.wait_idle()
    finally:
        router.stop()


def test_the_routers_reset_limit_is_the_only_one(loop_thread: LoopThread,
                                                worker_addresses: list[str]) -> None:
    """nghttp2 1.57+ and Debian's 1.52 backport would end a connection after 1000 client
    resets of any kind (GOAWAY INTERNAL_ERROR); the router's own bucket decides instead, so
    1,200 resets it does not charge (calls not sent anywhere yet) leave the connection
    serving."""
    config, instances = make_config(worker_addresses[:1])
    router = start_router(loop_thread, config, instances)
    try:
        client = RawClient(router.address)
        for i in range(1200):
            stream_id = 1 + 2 * i
            client.conn.send_headers(stream_id, client.headers(MODEL_INFER, "application/grpc"))
            client.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            if i % 100 == 99:
                client.send()
        _barrier(client, b"resets!!")  # answered, not a GOAWAY: the connection serves on
        client.close()
        router.wait_idle()
    finally:
        router.stop()


@pytest.mark.parametrize("data_path", ["grpc", "native"])
def test_too_many_pings_as_grpc_does(make_router: Any, monkeypatch: pytest.MonkeyPatch,
                                     data_path: str) -> None:
    """A client that PINGs faster than every 10 s with nothing served in between gets
    GOAWAY ENHANCE_YOUR_CALM "too_many_pings" after two strikes, on either data path."""
    monkeypatch.setenv("TRITONMESH_DATA_PATH", data_path)
    router = make_router()
    client = RawClient(router.address)
    goaway = None
    for i in range(6):
        client.conn.ping(b"%8d" % i)
        client.send()
        for event in client.events():
            assert event is not None, "closed without GOAWAY"
            if isinstance(event, h2.events.ConnectionTerminated):
                goaway = event
        if goaway is not None:
            break
    assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert goaway.additional_data == b"too_many_pings"
    client.close()


def test_dead_upstream_connection_is_noticed_by_ping(loop_thread: LoopThread
                                                     ) -> None:
    """An upstream that stops reading (no PING ACK) within
    ``native.upstream_keepalive_timeout_s`` is closed: its calls fail UNAVAILABLE and are
    released, with no deadline to end them."""
    stuck = threading.Event()
    upstream = H2Upstream(lambda conn, stream_id: stuck.wait(60))
    config, instances = make_config([upstream.address])
    config = dataclasses.replace(
        config, native=NativeConfig(upstream_keepalive_time_s=0.3,
                                    upstream_keepalive_timeout_s=0.3),
        health_check=HealthCheckConfig(interval_s=600.0))
    router = start_router(loop_thread, config, instances)
    try:
        client = RawClient(router.address)
        _send_infer(client, 1)
        answer = client.answer(1)
        assert answer.get("grpc-status") == "14", answer
        assert "the connection was lost" in answer.get("grpc-message", "")
        client.close()
        router.wait_idle()
    finally:
        stuck.set()
        router.stop()
        upstream.stop()


class Flood:
    """An upstream's answers that never end: response HEADERS, then DATA as fast as flow
    control lets it; ``blocked``: the streams with no window left."""

    def __init__(self) -> None:
        self.streams: list[int] = []
        self.blocked: set[int] = set()

    def answer(self, conn: h2.connection.H2Connection, stream_id: int) -> None:
        conn.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc")])
        conn.send_data(stream_id, b"\0" + (1 << 30).to_bytes(4, "big"))
        self.streams.append(stream_id)

    def more(self, conn: h2.connection.H2Connection) -> None:
        for stream_id in list(self.streams):
            try:
                while room := min(conn.local_flow_control_window(stream_id),
                                  conn.max_outbound_frame_size):
                    conn.send_data(stream_id, bytes(room))
            except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):  # reset
                self.streams.remove(stream_id)
        self.blocked = set(self.streams)


def test_slow_reader_holds_at_most_the_connection_buffer(loop_thread: LoopThread) -> None:
    """A client that opens windows it never reads into: what its streams make the router
    hold is bounded by ``native.connection_buffer_bytes`` (plus a base 64 KiB window per
    stream past it), not a stream window per stream; flow control holds the rest upstream."""
    flood = Flood()
    upstream = H2Upstream(flood.answer, flood.more)
    # Cancelled at once when the client goes: an absorbed call would read the flood.
    config, instances = make_config([upstream.address],
                                    variant_options={"upstream_cancellation": "forward"})
    cap, streams = 2 << 20, 16
    config = dataclasses.replace(
        config, native=NativeConfig(connection_buffer_bytes=cap),  # stream windows: 1 MiB
        health_check=HealthCheckConfig(interval_s=600.0))
    router = start_router(loop_thread, config, instances)
    client = RawClient(router.address)
    try:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
        client.conn.increment_flow_control_window(2**31 - 1 - 65535)
        for i in range(streams):
            _send_infer(client, 1 + 2 * i)  # and never reads another byte

        async def buffered() -> int:
            assert router.router.native is not None
            return sum(c.buffered_bytes for c in router.router.native.connections)

        bound = cap + streams * 65535
        seen = [-1]

        def settled() -> bool:
            """Past the bound, or every upstream stream out of window with the router's
            count still (its streams then hold what flow control lets them: at least half
            their windows, as nghttp2 sends WINDOW_UPDATE for half a window at a time)."""
            held, seen[0] = seen[0], loop_thread.run(buffered())
            return seen[0] > bound or (len(flood.blocked) == streams
                                       and held == seen[0] >= cap // 2)

        wait_for(settled, "every upstream stream to run out of window")
        assert seen[0] <= bound, seen[0]
        client.close()
        wait_for(lambda: upstream.resets.count(CANCEL) == streams, "the upstream cancels")
        router.wait_idle()
    finally:
        client.close()
        router.stop()
        upstream.stop()


def test_relayed_calls_keep_grpc_aios_deadline(make_router: Any) -> None:
    """A relayed call (here ModelConfig) whose client sets a deadline and then sends
    nothing more: grpc.aio behind the relay enforces it, and the answer comes through."""
    router = make_router()
    client = RawClient(router.address)
    model_config = "/inference.GRPCInferenceService/ModelConfig"
    client.conn.send_headers(1, [*client.headers(model_config, "application/grpc"),
                                 ("grpc-timeout", "300m")])
    client.send()
    answer = client.answer(1)
    assert answer.get("grpc-status") == "4", answer
    client.close()
    router.wait_idle()
