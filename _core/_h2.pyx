# cython: language_level=3
"""HTTP/2 sessions over libnghttp2, driven by asyncio transports.

The protocol engine of the native data path (docs/native.md). A :class:`H2Connection` is
an ``asyncio.Protocol``; bytes go into ``nghttp2_session_mem_recv`` and come out of
``nghttp2_session_mem_send`` to the transport. Headers become Python objects once per
HEADERS frame; DATA never does, except the first message of a stream whose owner asked to
see it (the wire peek). Two streams can be paired (a client's and an upstream's): from then
on their DATA, response headers and trailers go from one to the other in C, and Python hears
of the pair only when the call ends (trailers) or breaks (a reset, a lost connection).

The engine's parts: ``_h2_buf.pxi`` (byte buffers, the clock), ``_h2_stream.pxi`` (Stream,
the first-message peek, pairing, what a stream sends), ``_h2_callbacks.pxi`` (what nghttp2
calls back, the policing of a client's PINGs and resets); the connection is here.

Flow control is end to end per stream: automatic WINDOW_UPDATE is off, and bytes received on
one stream are consumed from its window only when its peer has sent them on. The connection's
window is given back as bytes arrive: every client's calls to one instance share a connection.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int32_t, uint8_t, uint32_t

import asyncio
import logging

include "_nghttp2.pxi"


log = logging.getLogger("tritonmesh.native")

# A gRPC message: a compressed flag, a 4-byte big-endian length, then the bytes.
cdef enum:
    MESSAGE_PREFIX = 5
    MAX_HEADERS = 256  # per block (SETTINGS_MAX_HEADER_LIST_SIZE bounds them first)
    RESOURCE_EXHAUSTED = 8  # gRPC status
    MAX_STREAM_ID = 0x7FFFFFFF
    MAX_REQUEST_HEADERS = MAX_HEADERS + 16
    # A client's PINGs, policed as the grpc.aio port's options set grpc-core's (server.py:
    # min_ping_interval_without_data_ms 10000, max_ping_strikes 2, permitted without calls).
    MIN_PING_INTERVAL_S = 10
    MAX_PING_STRIKES = 2
    # What an upstream stream may send before the router raises its window (HTTP/2's
    # default): the floor of what a client connection's streams hold past its buffer cap.
    BASE_STREAM_WINDOW = 65535


class H2Error(Exception):
    """An nghttp2 call failed (the stream or the connection is gone)."""


include "_h2_buf.pxi"


cdef list _dirty = []  # connections with frames to write once the current event is handled
cdef int _depth = 0  # inside data_received: flush at its end, not per change
cdef bint _scheduled = False


cdef void _mark(H2Connection conn) noexcept:
    global _scheduled
    if conn.dirty:
        return
    conn.dirty = True
    _dirty.append(conn)
    if _depth == 0 and not _scheduled and conn.loop is not None:
        _call_flush(conn.loop)


cdef inline void _schedule_flush() noexcept:
    """Write what every connection has pending once this loop iteration's reads are all
    handled: requests from many clients to one instance share one write."""
    if _depth == 0 and _dirty and not _scheduled:
        _call_flush((<H2Connection>_dirty[-1]).loop)


cdef void _call_flush(loop) noexcept:
    global _scheduled
    try:
        loop.call_soon(flush_pending)
    except Exception:  # a closed loop (a connection outliving it): the next mark retries
        return
    _scheduled = True


def flush_pending() -> None:
    """Write every connection's pending frames (after changes made outside its events)."""
    global _scheduled
    # What writing marks joins this pass: another loop iteration would find it too.
    _scheduled = True
    try:
        while _dirty:
            _flush_now(<H2Connection>_dirty.pop())
    finally:
        _scheduled = False


cdef void _flush_unshared() noexcept:
    """At the end of a read, write now the connections no other read of this loop turn
    would share a write with: a client's (its answers; a client's reads are one per turn)
    and an upstream's with one stream open (a lone call). Requests from many clients to a
    busy instance wait for the deferred pass (flush_pending) and share one write; waiting
    costs a callback and a loop turn, which a lone call would pay for nothing."""
    cdef Py_ssize_t i = len(_dirty) - 1
    cdef H2Connection conn
    while i >= 0:
        conn = <H2Connection>_dirty[i]
        if conn.server or len(conn.streams) <= 1:
            del _dirty[i]
            _flush_now(conn)  # what it marks is appended: past i
        i -= 1


cdef void _flush_now(H2Connection conn) noexcept:
    conn.dirty = False
    try:
        conn.flush()
    except Exception:  # one broken connection must not leave the others unwritten
        log.exception("native data path: writing to a connection")
        conn.close()


cdef inline bint _has_writes(H2Connection conn) noexcept:
    """Whether flush() has something to do: frames to write, or the connection to close
    (GOAWAY written, or nothing more either way), or drained streams to tell."""
    return nghttp2_session_want_write(conn.session) or conn.close_after_flush \
        or not nghttp2_session_want_read(conn.session) or len(conn.drained) > 0


include "_h2_stream.pxi"
include "_h2_callbacks.pxi"


@cython.final
cdef class H2Connection:
    """One HTTP/2 connection, server side (a client of the router) or client side (to an
    upstream). ``owner`` hears of new requests (server side: ``request``, ``message``,
    ``oversize``, ``incomplete``; not of those at ``peek_path``, whose first message is
    awaited on its own) and of the connection's end (``connection_lost``)."""

    cdef nghttp2_session *session
    cdef readonly object owner
    cdef readonly bint server
    cdef readonly bint goaway  # the peer sent GOAWAY, or its stream IDs ran out: no new streams
    cdef readonly bint lost
    cdef readonly dict streams
    cdef public object loop
    cdef public object retired  # why the router closed it (its instance left), or None
    cdef readonly double idle_since  # time.monotonic() when its last stream closed
    cdef object transport
    cdef bint dirty
    cdef bint paused
    cdef Buf wbuf
    cdef list settings
    cdef int32_t connection_window
    cdef size_t max_header_list
    cdef uint32_t stream_window  # what a stream's window is (upstream: raised to, within cap)
    cdef uint32_t initial_window  # what SETTINGS says it is
    # A client's: the windows of its upstream streams and its own raised ones, all together
    cdef size_t buffer_cap
    cdef readonly size_t window_bytes  # a client's: what they are now
    cdef size_t peek_budget  # bytes all its streams' first-message peeks may hold unwindowed
    cdef size_t peek_bytes
    cdef bint peek_stalled  # a peeking stream holds bytes the budget did not cover
    # The client's RST_STREAMs: a token bucket of reset_burst, refilled at reset_rate per s.
    cdef double reset_tokens
    cdef double reset_at
    cdef double reset_burst
    cdef double reset_rate
    cdef double ping_at  # a client's last PING
    cdef int ping_strikes
    cdef bint close_after_flush  # GOAWAY is submitted: close once it is written
    cdef readonly double ping_sent  # our keepalive PING's time, until its ACK (else 0)
    cdef list drained  # message-mode streams whose `out` fell below their low water
    # A client's request headers (server side): those whose values the policy reads
    # (Stream.policy_values) and those not forwarded (Stream.metadata leaves both out).
    cdef frozenset policy_keys
    cdef frozenset hop_by_hop
    # A client's requests at peek_path (gRPC, with a message to come) have their first
    # message awaited without asking the owner (up to peek_limit bytes); an uncompressed
    # one goes to on_message(stream, bytes), others to the owner's `message`.
    cdef bytes peek_path
    cdef Py_ssize_t peek_limit
    cdef object on_message

    def __cinit__(self, owner, bint server, *, uint32_t max_concurrent_streams=100,
                  uint32_t stream_window=1 << 20, int32_t connection_window=1 << 24,
                  uint32_t max_header_list_bytes=1 << 16, size_t peek_budget=0,
                  uint32_t stream_reset_burst=1000, uint32_t stream_reset_rate=33,
                  size_t buffer_cap=<size_t>-1, frozenset policy_keys=frozenset(),
                  frozenset hop_by_hop=frozenset(), bytes peek_path=None,
                  Py_ssize_t peek_limit=0, on_message=None):
        self.owner = owner
        self.peek_path = peek_path
        self.peek_limit = peek_limit
        self.on_message = on_message
        self.policy_keys = policy_keys
        self.hop_by_hop = hop_by_hop
        self.server = server
        self.streams = {}
        self.drained = []
        cdef int rv
        if server:
            rv = nghttp2_session_server_new2(&self.session, _callbacks, <void *>self,
                                             _server_option)
        else:
            rv = nghttp2_session_client_new2(&self.session, _callbacks, <void *>self, _option)
        if rv != 0:
            raise MemoryError()
        # Streams start with the base window both ways, raised to stream_window within
        # buffer_cap: a client's requests by _raise_window, an upstream's answers by
        # _grant_window.
        self.settings = [(NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, max_concurrent_streams),
                         (NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE,
                          min(stream_window, BASE_STREAM_WINDOW)),
                         (NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, max_header_list_bytes),
                         (NGHTTP2_SETTINGS_ENABLE_PUSH, 0)]
        self.connection_window = connection_window
        self.max_header_list = max_header_list_bytes
        self.stream_window = stream_window
        self.initial_window = min(stream_window, BASE_STREAM_WINDOW)
        self.buffer_cap = buffer_cap
        self.peek_budget = peek_budget
        self.idle_since = _monotonic()
        self.reset_tokens = self.reset_burst = stream_reset_burst
        self.reset_rate = stream_reset_rate
        self.reset_at = self.idle_since

    def __dealloc__(self):
        nghttp2_session_del(self.session)
        buf_free(&self.wbuf)

    # -- asyncio.Protocol --

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        cdef nghttp2_settings_entry iv[4]
        cdef int i = 0
        for key, value in self.settings:
            if not self.server and key == NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS:
                continue
            iv[i].settings_id = key
            iv[i].value = value
            i += 1
        nghttp2_submit_settings(self.session, NGHTTP2_FLAG_NONE, iv, i)
        nghttp2_session_set_local_window_size(self.session, NGHTTP2_FLAG_NONE, 0,
                                              self.connection_window)
        _mark(self)

    def data_received(self, bytes data) -> None:
        global _depth
        cdef ssize_t rv
        _depth += 1
        try:
            rv = nghttp2_session_mem_recv(self.session, <const uint8_t *>PyBytes_AS_STRING(data),
                                          PyBytes_GET_SIZE(data))
        finally:
            _depth -= 1
        if rv < 0:
            log.info("native data path: closing a connection: %s",
                     nghttp2_strerror(<int>rv).decode())
            self.flush()
            self.transport.close()
            return
        if _has_writes(self):  # what reading made nghttp2 queue (ACKs, window updates)
            _mark(self)
        _flush_unshared()
        _schedule_flush()

    def eof_received(self) -> None:
        return None

    def connection_lost(self, exc) -> None:
        if self.lost:
            return
        self.lost = True
        self.transport = None
        for stream in list(self.streams.values()):
            try:
                _closed(stream, NGHTTP2_INTERNAL_ERROR)
            except Exception:  # the other streams' owners must still hear of it
                log.exception("native data path: closing stream %d", stream.id)
        self.streams.clear()
        try:
            self.owner.connection_lost(self)
        finally:
            _schedule_flush()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.flush()

    # -- what the owner does --

    cpdef flush(self):
        """Hand every frame nghttp2 has ready to the transport, in one write."""
        cdef const uint8_t *chunk
        cdef ssize_t n
        if self.transport is None or self.paused or self.transport.is_closing():
            return
        while True:
            n = nghttp2_session_mem_send(self.session, &chunk)
            if n < 0:
                log.info("native data path: closing a connection: %s",
                         nghttp2_strerror(<int>n).decode())
                self.transport.close()
                return
            if n == 0:
                break
            buf_append(&self.wbuf, <const char *>chunk, n)
        if buf_len(&self.wbuf):
            self.transport.write(PyBytes_FromStringAndSize(self.wbuf.data + self.wbuf.start,
                                                           buf_len(&self.wbuf)))
            self.wbuf.start = self.wbuf.end = 0
        if self.close_after_flush or not nghttp2_session_want_read(self.session) and \
                not nghttp2_session_want_write(self.session):
            self.transport.close()
        cdef Stream stream
        while self.drained:
            stream = <Stream>self.drained.pop()
            if stream.handler is not None and not stream.closed:
                stream.handler.drained(stream)

    def open_stream(self, list headers, Stream client, handler, bytes first=None) -> Stream:
        """Send a request on this (client-side) connection, paired with ``client``: its
        held bytes go first (or ``first``, a request sent again), then everything it
        receives."""
        if client.closed:
            raise H2Error("the client's stream is closed")
        cdef Stream stream = self._submit(headers, handler)
        client.handler = handler
        if first is not None:  # its window was given back when it first came
            buf_append(&stream.out, PyBytes_AS_STRING(first), PyBytes_GET_SIZE(first))
            stream.preconsumed = PyBytes_GET_SIZE(first)
        _pair(client, stream)
        _grant_window(client.connection, stream)
        self._opened()
        return stream

    def open_message_stream(self, list headers, handler, size_t limit,
                            Stream client=None) -> Stream:
        """Send a request in message mode (not paired): :meth:`Stream.send_message` queues
        its messages, and its answer's messages go to ``handler`` as
        :meth:`Stream.read_messages` says (up to ``limit`` bytes each). ``client``: the
        client stream it serves, whose connection's buffer cap its window counts in."""
        cdef Stream stream = self._submit(headers, handler)
        stream.message_mode = True
        stream.message_limit = limit
        if client is not None:
            _grant_window(client.connection, stream)
        self._opened()
        return stream

    cdef Stream _submit(self, list headers, handler):
        """A request's HEADERS, with DATA to come from the new stream's ``out``."""
        # Room for a full client block (MAX_HEADERS fields, its pseudo-headers among them)
        # plus what the router adds in their place.
        cdef nghttp2_nv nva[MAX_REQUEST_HEADERS]
        cdef size_t count = _fill_nv(nva, headers, MAX_REQUEST_HEADERS)
        cdef nghttp2_data_provider provider
        if self.lost or self.goaway:
            raise H2Error("the upstream connection is closing")
        stream = Stream(self)
        provider.source.ptr = <void *>stream
        provider.read_callback = _read_data
        cdef int32_t stream_id = nghttp2_submit_request(self.session, NULL, nva, count,
                                                        &provider, <void *>stream)
        if stream_id < 0:
            raise H2Error(nghttp2_strerror(stream_id).decode())
        stream.id = stream_id
        self.streams[stream_id] = stream
        stream.handler = handler
        return stream

    cdef int _opened(self) except -1:
        if nghttp2_session_get_next_stream_id(self.session) > MAX_STREAM_ID:
            # Its stream IDs are spent: the pool opens another for the next request, and
            # this one closes when its last stream ends.
            self.goaway = True
            self.shutdown()
        _mark(self)
        return 0

    def expire_peeks(self, double before) -> list:
        """End the first-message peeks that waited since before ``before`` (monotonic
        seconds) for their length prefix, or for the rest once reserved; returns their
        streams, for the owner to answer. One whose length is known and that waits for the
        peek budget is not ended: other messages hold it (waiting for an instance, or for
        Triton to take them), not its client."""
        cdef Stream stream
        expired = []
        for value in self.streams.values():
            stream = <Stream>value
            if stream.peek_limit >= 0 and stream.peek_since < before \
                    and (stream.peeked or buf_len(&stream.inbuf) < MESSAGE_PREFIX):
                expired.append(stream)
        for stream in expired:
            _end_peek(stream)
        return expired

    def skip_stream_ids(self, int32_t next_stream_id) -> None:
        """Make ``next_stream_id`` the next stream's ID (client side; to test exhaustion)."""
        if nghttp2_session_set_next_stream_id(self.session, next_stream_id) != 0:
            raise H2Error(f"cannot use stream ID {next_stream_id} next")

    cdef int _respond(self, Stream stream, list headers, bint end_stream) except -1:
        cdef nghttp2_nv nva[MAX_HEADERS]
        cdef size_t count = _fill_nv(nva, headers)
        cdef nghttp2_data_provider provider
        cdef int rv
        provider.source.ptr = <void *>stream
        provider.read_callback = _read_data
        rv = nghttp2_submit_response(self.session, stream.id, nva, count,
                                     NULL if end_stream else &provider)
        if rv != 0:
            raise H2Error(nghttp2_strerror(rv).decode())
        _mark(self)
        return 0

    cdef void _resume(self, Stream stream) noexcept:
        conn_resume(stream)

    def reset(self, int32_t stream_id, uint32_t error_code=NGHTTP2_CANCEL) -> None:
        if not self.lost:
            nghttp2_submit_rst_stream(self.session, NGHTTP2_FLAG_NONE, stream_id, error_code)
            _mark(self)

    def shutdown(self) -> None:
        """GOAWAY: streams open now finish, no new ones are accepted, and the connection
        closes when the last one ends."""
        if not self.lost:
            nghttp2_submit_goaway(self.session, NGHTTP2_FLAG_NONE,
                                  nghttp2_session_get_last_proc_stream_id(self.session),
                                  NGHTTP2_NO_ERROR, NULL, 0)
            _mark(self)

    def ping(self) -> None:
        """Send a keepalive PING; ``ping_sent`` says when, until its ACK comes."""
        if not self.lost and nghttp2_submit_ping(self.session, NGHTTP2_FLAG_NONE, NULL) == 0:
            self.ping_sent = _monotonic()
            _mark(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close now, dropping unwritten bytes (a peer that stopped reading)."""
        if self.transport is not None:
            self.transport.abort()

    @property
    def open_streams(self) -> int:
        return len(self.streams)

    @property
    def buffered_bytes(self) -> int:
        """Bytes waiting in the router to be sent on its streams."""
        cdef size_t total = 0
        for value in self.streams.values():
            total += buf_len(&(<Stream>value).out)
        return total
