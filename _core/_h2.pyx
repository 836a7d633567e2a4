# cython: language_level=3
"""HTTP/2 sessions over libnghttp2, driven by asyncio transports.

The protocol engine of the native data path (docs/native.md). A :class:`H2Connection` is
an ``asyncio.Protocol``; bytes go into ``nghttp2_session_mem_recv`` and come out of
``nghttp2_session_mem_send`` to the transport. Headers become Python objects once per
HEADERS frame; DATA never does, except the first message of a stream whose owner asked to
see it (the wire peek). Two streams can be paired (a client's and an upstream's): from then
on their DATA, response headers and trailers go from one to the other in C, and Python hears
of the pair only when the call ends (trailers) or breaks (a reset, a lost connection).

Flow control is end to end per stream: automatic WINDOW_UPDATE is off, and bytes received on
one stream are consumed from its window only when its peer has sent them on. The connection's
window is given back as bytes arrive: every client's calls to one instance share a connection.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.stdint cimport int32_t, uint8_t, uint32_t
from libc.string cimport memcpy, memmove
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

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


cdef struct Buf:
    char *data
    size_t start
    size_t end
    size_t cap


cdef int buf_append(Buf *buf, const char *data, size_t n) except -1:
    cdef size_t used = buf.end - buf.start
    cdef size_t cap
    cdef char *grown
    if buf.end + n > buf.cap:
        if buf.start and used + n <= buf.cap:
            memmove(buf.data, buf.data + buf.start, used)
        else:
            cap = buf.cap * 2 if buf.cap else 16384
            while cap < used + n:
                cap *= 2
            grown = <char *>PyMem_Realloc(buf.data, cap)
            if grown == NULL:
                raise MemoryError()
            if buf.start:
                memmove(grown, grown + buf.start, used)
            buf.data = grown
            buf.cap = cap
        buf.start = 0
        buf.end = used
    memcpy(buf.data + buf.end, data, n)
    buf.end += n
    return 0


cdef inline size_t buf_len(const Buf *buf) noexcept nogil:
    return buf.end - buf.start


cdef inline void buf_free(Buf *buf) noexcept:
    PyMem_Free(buf.data)
    buf.data = NULL
    buf.start = buf.end = buf.cap = 0


cdef inline double _monotonic() noexcept nogil:
    """time.monotonic(), without a Python call."""
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    return now.tv_sec + now.tv_nsec * 1e-9


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
    _scheduled = False
    cdef H2Connection conn
    while _dirty:
        conn = _dirty.pop()
        conn.dirty = False
        try:
            conn.flush()
        except Exception:  # one broken connection must not leave the others unwritten
            log.exception("native data path: writing to a connection")
            conn.close()


@cython.final
cdef class Stream:
    """One HTTP/2 stream of a :class:`H2Connection`: its headers, the bytes waiting to be
    sent on it, and the stream it is paired with."""

    cdef readonly H2Connection connection
    cdef readonly int32_t id
    cdef readonly list headers  # the last HEADERS block: [(name, value), ...]
    cdef readonly bint closed
    cdef readonly bint remote_ended  # the peer sent END_STREAM
    cdef readonly bint responded  # response HEADERS submitted (server side)
    cdef readonly bint headers_sent  # its HEADERS went to the transport (client side)
    # A client's stream: request bytes came beyond its first message (sent on, or dropped
    # once its upstream stream closed), so the request can no longer be sent again whole.
    cdef readonly bint sent_more
    cdef public object handler  # told of trailers and abnormal closes (NativeCall)
    cdef public object tag  # whatever the owner keeps with the stream
    cdef Stream peer
    # The stream whose bytes fill `out` (kept after it closes: its connection's window is
    # given back as they are sent, or when this stream closes with them unsent).
    cdef H2Connection source
    cdef int32_t source_id
    cdef Buf inbuf  # DATA received before pairing (a first message being peeked)
    cdef Buf out  # DATA to send on this stream
    cdef size_t preconsumed  # bytes at the head of `out` whose window was already given back
    cdef size_t held  # bytes at the tail of `inbuf` whose window was not given back yet
    cdef Py_ssize_t peek_limit  # >= 0 while the first message is awaited
    cdef size_t peeked  # of the connection's peek budget, reserved for its first message
    cdef size_t first_size  # the peeked first message, prefix included
    cdef double peek_since  # _monotonic() at its HEADERS, then at its reservation
    cdef bint out_eof
    cdef bint ended  # the call ended normally (trailers went through)
    cdef bint discard
    cdef bint reset_after_answer
    cdef size_t header_bytes  # of the block being received, as SETTINGS_MAX_HEADER_LIST_SIZE counts
    cdef uint32_t window  # an upstream stream's window, counted in its client's window_bytes
    cdef list trailers
    cdef list received_trailers  # a client's trailers (dropped: gRPC requests carry none)

    def __cinit__(self, H2Connection connection):
        self.connection = connection
        self.peek_limit = -1

    def __dealloc__(self):
        buf_free(&self.inbuf)
        buf_free(&self.out)

    @property
    def paired(self) -> bool:
        return self.peer is not None

    def await_message(self, Py_ssize_t limit) -> None:
        """Collect DATA until the first gRPC message is whole (up to ``limit`` bytes), then
        call the owner's ``message(stream, bytes)``; ``oversize`` / ``incomplete`` when it
        is too large or the client ended without one."""
        self.peek_limit = limit
        self.peek_since = _monotonic()
        self._check_message()

    cdef int _check_message(self) except -1:
        cdef size_t have = buf_len(&self.inbuf)
        cdef const unsigned char *p
        cdef size_t length
        owner = self.connection.owner
        if have >= MESSAGE_PREFIX:
            p = <const unsigned char *>self.inbuf.data + self.inbuf.start
            length = (<size_t>p[1] << 24) | (<size_t>p[2] << 16) | (<size_t>p[3] << 8) | p[4]
            if <Py_ssize_t>length > self.peek_limit:
                _end_peek(self)
                owner.oversize(self, length)
                return 0
            if have >= MESSAGE_PREFIX + length:
                self.first_size = MESSAGE_PREFIX + length
                _end_peek(self)
                owner.message(self, p[0], PyBytes_FromStringAndSize(
                    <const char *>p + MESSAGE_PREFIX, length))
                return 0
        if self.remote_ended:
            _end_peek(self)
            owner.incomplete(self)
        return 0

    def respond(self, list headers, bint end_stream=False) -> None:
        """Submit the response HEADERS (``end_stream``: a trailers-only response)."""
        if self.closed or self.responded:
            return
        self.responded = True
        self.connection._respond(self, headers, end_stream)

    def finish(self, int status, bytes message) -> None:
        """End the call with gRPC ``status`` and ``message`` (percent-encoded already):
        trailers-only if nothing was sent yet, else trailers after the DATA queued. DATA
        from the client is dropped from now on."""
        if self.closed or self.ended:
            return
        self.ended = True
        self.discard = True
        trailers = [(b"grpc-status", str(status).encode()), (b"grpc-message", message)]
        if not self.responded:
            self.responded = True
            self.connection._respond(
                self, [(b":status", b"200"), (b"content-type", b"application/grpc")] + trailers,
                True)
            # The client need not send the rest: RST_STREAM(NO_ERROR) once the answer is out
            # (submitted now, it would cancel the answer).
            self.reset_after_answer = not self.remote_ended
            return
        self.trailers = trailers
        self.out_eof = True
        self.connection._resume(self)

    def reset(self, uint32_t error_code=NGHTTP2_CANCEL) -> None:
        """RST_STREAM this stream (if it is still open)."""
        if not self.closed:
            self.connection.reset(self.id, error_code)


cdef void _reserve(Stream stream) noexcept:
    """Once its length is known, a first message reserves its size from the connection's
    peek budget, whole, and its bytes' window is given back as they come: the message may
    be larger than a stream window. While the budget cannot cover it, its bytes stay under
    flow control. Whole reservations let every reserved message finish, so peeking streams
    cannot starve each other."""
    cdef H2Connection conn = stream.connection
    cdef const unsigned char *p
    cdef size_t need
    if not stream.peeked:
        if buf_len(&stream.inbuf) < MESSAGE_PREFIX:
            return
        p = <const unsigned char *>stream.inbuf.data + stream.inbuf.start
        need = MESSAGE_PREFIX + ((<size_t>p[1] << 24) | (<size_t>p[2] << 16)
                                 | (<size_t>p[3] << 8) | p[4])
        if <Py_ssize_t>need > stream.peek_limit + MESSAGE_PREFIX:
            return  # refused as oversize by _check_message
        if conn.peek_bytes + need > conn.peek_budget:
            conn.peek_stalled = True
            return
        stream.peeked = need
        stream.peek_since = _monotonic()
        conn.peek_bytes += need
    if stream.held:
        nghttp2_session_consume_stream(conn.session, stream.id, stream.held)
        stream.held = 0
        _mark(conn)


cdef void _end_peek(Stream stream) noexcept:
    """The stream's first message is whole (or never will be): its reservation goes to the
    streams that wait for one."""
    stream.peek_limit = -1
    if not stream.peeked:
        return
    cdef H2Connection conn = stream.connection
    cdef Stream other
    conn.peek_bytes -= stream.peeked
    stream.peeked = 0
    if conn.peek_stalled and not conn.lost:
        conn.peek_stalled = False
        for value in list(conn.streams.values()):
            other = <Stream>value
            if other.peek_limit >= 0 and not other.peeked:
                _reserve(other)


cdef inline void _grant_window(H2Connection client, Stream upstream) noexcept:
    """An upstream stream's window: its connection's stream window while its client's
    connection is within ``buffer_cap``, else the base window (its HEADERS go with a
    WINDOW_UPDATE when raised). A client that does not read holds at most that in the
    router, whatever its number of streams (beyond a base window each)."""
    cdef H2Connection conn = upstream.connection
    cdef size_t raised = client.window_bytes + conn.stream_window
    if raised <= client.buffer_cap:
        upstream.window = conn.stream_window
    else:
        upstream.window = conn.initial_window
    client.window_bytes += upstream.window


cdef void _pair(Stream client, Stream upstream) noexcept:
    """From now on, bytes received on each go out on the other."""
    client.peer = upstream
    upstream.peer = client
    client.source = upstream.connection
    client.source_id = upstream.id
    upstream.source = client.connection
    upstream.source_id = client.id
    # The peeked bytes move over whole (no copy); their window was given back as they came.
    # (A request sent again has none left: they moved to its first upstream stream.)
    if client.inbuf.data != NULL:
        if buf_len(&client.inbuf) > client.first_size:
            client.sent_more = True
        buf_free(&upstream.out)
        upstream.out = client.inbuf
        upstream.preconsumed = buf_len(&client.inbuf) - client.held
        client.inbuf.data = NULL
        client.inbuf.start = client.inbuf.end = client.inbuf.cap = 0
        client.held = 0
    _end_peek(client)
    if client.remote_ended:
        upstream.out_eof = True


cdef ssize_t _read_data(nghttp2_session *session, int32_t stream_id, uint8_t *buf,
                        size_t length, uint32_t *data_flags, nghttp2_data_source *source,
                        void *user_data) noexcept:
    cdef Stream stream = <Stream>source.ptr
    cdef size_t n = buf_len(&stream.out)
    cdef size_t owed
    cdef size_t count
    cdef nghttp2_nv nva[MAX_HEADERS]
    if n > length:
        n = length
    if n:
        memcpy(buf, stream.out.data + stream.out.start, n)
        stream.out.start += n
        if stream.out.start == stream.out.end:
            stream.out.start = stream.out.end = 0
        owed = n
        if stream.preconsumed:
            if stream.preconsumed >= owed:
                stream.preconsumed -= owed
                owed = 0
            else:
                owed -= stream.preconsumed
                stream.preconsumed = 0
        if owed:
            _give_back(stream.source, stream.source_id, owed)
    if buf_len(&stream.out) == 0:
        if stream.out_eof:
            data_flags[0] |= NGHTTP2_DATA_FLAG_EOF
            if stream.trailers is not None:
                data_flags[0] |= NGHTTP2_DATA_FLAG_NO_END_STREAM
                try:
                    count = _fill_nv(nva, stream.trailers)
                except Exception:
                    return NGHTTP2_ERR_CALLBACK_FAILURE
                nghttp2_submit_trailer(session, stream_id, nva, count)
                stream.trailers = None
        elif n == 0:
            return NGHTTP2_ERR_DEFERRED
    return <ssize_t>n


cdef inline void _give_back(H2Connection connection, int32_t stream_id, size_t n) noexcept:
    """``n`` bytes received on that stream were sent on (or dropped): open its windows."""
    if connection is not None and not connection.lost:
        nghttp2_session_consume_stream(connection.session, stream_id, n)
        _mark(connection)


cdef size_t _fill_nv(nghttp2_nv *nva, list headers, size_t capacity=MAX_HEADERS) except? 0:
    cdef size_t i = 0
    cdef bytes name, value
    if <size_t>len(headers) > capacity:
        raise H2Error(f"more than {capacity} headers")
    for name, value in headers:
        nva[i].name = <uint8_t *>PyBytes_AS_STRING(name)
        nva[i].namelen = PyBytes_GET_SIZE(name)
        nva[i].value = <uint8_t *>PyBytes_AS_STRING(value)
        nva[i].valuelen = PyBytes_GET_SIZE(value)
        nva[i].flags = NGHTTP2_NV_FLAG_NONE
        i += 1
    return i


cdef inline Stream _stream_of(nghttp2_session *session, int32_t stream_id):
    cdef void *p = nghttp2_session_get_stream_user_data(session, stream_id)
    return None if p == NULL else <Stream>p


cdef int _on_begin_headers(nghttp2_session *session, const nghttp2_frame *frame,
                           void *user_data) noexcept:
    cdef H2Connection conn = <H2Connection>user_data
    cdef Stream stream
    if frame.hd.type != NGHTTP2_HEADERS:
        return 0
    try:
        if frame.headers.cat == NGHTTP2_HCAT_REQUEST:
            stream = Stream(conn)
            stream.id = frame.hd.stream_id
            conn.streams[stream.id] = stream
            nghttp2_session_set_stream_user_data(session, stream.id, <void *>stream)
        else:
            stream = _stream_of(session, frame.hd.stream_id)
        if stream is not None:
            stream.header_bytes = 0
            if conn.server and stream.headers is not None:
                # A client's trailers: the request headers stay what the stream is judged
                # (and relayed) by.
                stream.received_trailers = []
            else:
                stream.headers = []
    except Exception:
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int _on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name,
                    size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                    void *user_data) noexcept:
    cdef Stream stream = _stream_of(session, frame.hd.stream_id)
    if stream is None or stream.headers is None:
        return 0
    cdef H2Connection conn = <H2Connection>user_data
    # nghttp2 only advertises the limit; HPACK lets a few bytes on the wire name a large
    # indexed field many times, so the decoded size is what is bounded.
    stream.header_bytes += namelen + valuelen + 32
    if stream.header_bytes > conn.max_header_list:
        if not conn.server:  # an upstream's answer: its stream is reset
            return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE
        return 0  # nothing more is kept; the request is answered when its block ends
    cdef list block = stream.headers if stream.received_trailers is None \
        else stream.received_trailers
    if len(block) >= MAX_HEADERS:  # the stream is reset, the connection lives
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE
    try:
        block.append((PyBytes_FromStringAndSize(<const char *>name, namelen),
                      PyBytes_FromStringAndSize(<const char *>value, valuelen)))
    except Exception:
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int _on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame,
                        void *user_data) noexcept:
    cdef H2Connection conn = <H2Connection>user_data
    cdef Stream stream
    cdef Stream peer
    cdef bint end = (frame.hd.flags & NGHTTP2_FLAG_END_STREAM) != 0
    if frame.hd.type == NGHTTP2_GOAWAY:
        conn.goaway = True
        return 0
    if frame.hd.type == NGHTTP2_PING:
        if frame.hd.flags & NGHTTP2_FLAG_ACK:
            conn.ping_sent = 0.0
        elif conn.server:
            _police_ping(conn)
        return 0
    if frame.hd.type == NGHTTP2_RST_STREAM:
        if conn.server and not _take_reset(conn):
            # Rapid reset (CVE-2023-44487), whatever the nghttp2 build limits on its own.
            nghttp2_session_terminate_session(session, NGHTTP2_ENHANCE_YOUR_CALM)
        return 0
    if frame.hd.type != NGHTTP2_HEADERS and frame.hd.type != NGHTTP2_DATA:
        return 0
    if conn.server:  # a client sending requests is not idle: its PINGs start afresh
        conn.ping_strikes = 0
        conn.ping_at = 0.0
    stream = _stream_of(session, frame.hd.stream_id)
    if stream is None:
        return 0
    try:
        if end:
            stream.remote_ended = True
        if frame.hd.type == NGHTTP2_HEADERS:
            if frame.headers.cat == NGHTTP2_HCAT_REQUEST:
                if stream.header_bytes > conn.max_header_list:
                    stream.finish(RESOURCE_EXHAUSTED, b"request header list larger than "
                                  b"native.max_header_list_bytes (%d bytes)" % conn.max_header_list)
                    return 0
                conn.owner.request(stream, end)
                return 0
            if not conn.server:
                if stream.peer is not None:
                    _forward_headers(stream, end)
                return 0
            # a client's trailers: only their END_STREAM matters
        if end:  # the last DATA (or a client's trailers)
            peer = stream.peer
            if not conn.server and peer is not None:
                # An upstream's DATA ended the stream: there are no trailers to forward, so
                # the client is told (a gRPC call always ends with a grpc-status).
                stream.headers = [(b"grpc-status", b"13"),
                                  (b"grpc-message", b"upstream ended the stream without trailers")]
                _forward_headers(stream, True)
                return 0
            if peer is not None:
                peer.out_eof = True
                conn_resume(peer)
            elif stream.peek_limit >= 0:
                stream._check_message()
    except Exception:
        log.exception("native data path: stream %d", frame.hd.stream_id)
        nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, frame.hd.stream_id,
                                  NGHTTP2_INTERNAL_ERROR)
    return 0


cdef void _police_ping(H2Connection conn) noexcept:
    """grpc-core's ping abuse policy: a PING sooner than MIN_PING_INTERVAL_S after the last
    one is a strike (strikes clear when headers or data go either way); past
    MAX_PING_STRIKES, GOAWAY ENHANCE_YOUR_CALM "too_many_pings" and close."""
    cdef double now = _monotonic()
    if now - conn.ping_at < MIN_PING_INTERVAL_S:
        conn.ping_strikes += 1
        if conn.ping_strikes > MAX_PING_STRIKES and not conn.close_after_flush:
            nghttp2_submit_goaway(conn.session, NGHTTP2_FLAG_NONE,
                                  nghttp2_session_get_last_proc_stream_id(conn.session),
                                  NGHTTP2_ENHANCE_YOUR_CALM, <const uint8_t *>b"too_many_pings",
                                  14)
            conn.close_after_flush = True
    conn.ping_at = now


cdef inline bint _take_reset(H2Connection conn) noexcept:
    """A client's RST_STREAM, from its connection's token bucket; False when it is empty."""
    cdef double now = _monotonic()
    conn.reset_tokens += (now - conn.reset_at) * conn.reset_rate
    if conn.reset_tokens > conn.reset_burst:
        conn.reset_tokens = conn.reset_burst
    conn.reset_at = now
    if conn.reset_tokens < 1.0:
        return False
    conn.reset_tokens -= 1.0
    return True


cdef int _forward_headers(Stream upstream, bint end) except -1:
    """An upstream's response HEADERS or trailers, to its client stream."""
    cdef Stream client = upstream.peer
    if client.closed or client.ended:
        return 0
    if not end:
        if client.responded:  # a second non-final block: not gRPC, drop it
            return 0
        client.responded = True
        client.connection._respond(client, upstream.headers, False)
        return 0
    handler = upstream.handler
    try:
        if not client.responded:  # trailers-only
            client.responded = True
            client.connection._respond(client, upstream.headers, True)
        else:
            client.trailers = upstream.headers
            client.out_eof = True
            conn_resume(client)
    finally:
        # Whatever happened to the answer, the call is over: its owner hears of it once
        # (the ended flags keep _closed from telling it again).
        upstream.ended = True
        client.ended = True
        if handler is not None:
            upstream.handler = None
            handler.trailers(upstream.headers)
    return 0


cdef inline void conn_resume(Stream stream) noexcept:
    if not stream.closed:
        nghttp2_session_resume_data(stream.connection.session, stream.id)
        _mark(stream.connection)


cdef int _on_frame_send(nghttp2_session *session, const nghttp2_frame *frame,
                        void *user_data) noexcept:
    cdef Stream stream
    cdef H2Connection conn = <H2Connection>user_data
    if conn.server and frame.hd.type in (NGHTTP2_DATA, NGHTTP2_HEADERS, NGHTTP2_WINDOW_UPDATE):
        # The client is being served (flow control included): its PINGs start afresh.
        conn.ping_strikes = 0
        conn.ping_at = 0.0
    if frame.hd.type != NGHTTP2_HEADERS:
        return 0
    if not conn.server:
        stream = _stream_of(session, frame.hd.stream_id)
        if stream is not None:
            stream.headers_sent = True
            if stream.window > conn.initial_window:
                nghttp2_session_set_local_window_size(session, NGHTTP2_FLAG_NONE, stream.id,
                                                      stream.window)
    elif frame.hd.flags & NGHTTP2_FLAG_END_STREAM:
        stream = _stream_of(session, frame.hd.stream_id)
        if stream is not None and stream.reset_after_answer:
            stream.reset_after_answer = False
            nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, stream.id, NGHTTP2_NO_ERROR)
    return 0


cdef int _on_data_chunk_recv(nghttp2_session *session, uint8_t flags, int32_t stream_id,
                             const uint8_t *data, size_t length, void *user_data) noexcept:
    cdef Stream stream = _stream_of(session, stream_id)
    cdef Stream peer
    # The connection's window is given back at once: it is shared by every stream on it
    # (every client's calls to one instance, every relayed call), so a reader that does
    # not read must hold only its own streams' windows.
    nghttp2_session_consume_connection(session, length)
    try:
        if stream is None or stream.discard:
            nghttp2_session_consume_stream(session, stream_id, length)
            return 0
        peer = stream.peer
        if peer is not None and not peer.closed and not peer.ended:
            stream.sent_more = True
            buf_append(&peer.out, <const char *>data, length)
            conn_resume(peer)
            return 0
        if peer is not None or stream.source is not None:  # the other side is done
            nghttp2_session_consume_stream(session, stream_id, length)
            stream.sent_more = True
            return 0
        # Not paired yet: the stream's window bounds what waits, except while the first
        # message is peeked (it may be larger than a window; see _reserve).
        buf_append(&stream.inbuf, <const char *>data, length)
        stream.held += length
        if stream.peek_limit >= 0:
            _reserve(stream)
            stream._check_message()
    except Exception:
        log.exception("native data path: DATA on stream %d", stream_id)
        nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, stream_id, NGHTTP2_INTERNAL_ERROR)
    return 0


cdef int _on_stream_close(nghttp2_session *session, int32_t stream_id, uint32_t error_code,
                          void *user_data) noexcept:
    cdef Stream stream = _stream_of(session, stream_id)
    if stream is None:
        return 0
    try:
        _closed(stream, error_code)
    except Exception:
        log.exception("native data path: closing stream %d", stream_id)
    return 0


cdef int _closed(Stream stream, uint32_t error_code) except -1:
    """A stream ended (both ways, a reset, or its connection was lost)."""
    if stream.closed:
        return 0
    stream.closed = True
    cdef H2Connection connection = stream.connection
    connection.streams.pop(stream.id, None)
    _end_peek(stream)
    if not connection.streams:
        connection.idle_since = _monotonic()
    cdef Stream peer = stream.peer
    cdef size_t unsent
    if stream.window:
        (<H2Connection>stream.source).window_bytes -= stream.window
        stream.window = 0
    handler = stream.handler
    stream.handler = None
    try:
        if not stream.ended:
            if handler is not None:
                handler.closed(stream, error_code)
            elif peer is not None and not peer.closed and not peer.ended:
                # A relayed call broke on one side: the other side is reset alike. A peer
                # that was answered already (its trailers may still wait to be written)
                # keeps that answer.
                peer.reset(error_code or NGHTTP2_CANCEL)
    finally:
        if stream.peer is not None:
            stream.peer.peer = None
            stream.peer = None
        stream.tag = None
        unsent = buf_len(&stream.out)
        if unsent > stream.preconsumed:
            _give_back(stream.source, stream.source_id, unsent - stream.preconsumed)
        if stream.held:
            _give_back(stream.connection, stream.id, stream.held)
        buf_free(&stream.inbuf)
        buf_free(&stream.out)
    return 0


cdef nghttp2_session_callbacks *_callbacks = NULL
cdef nghttp2_option *_option = NULL  # upstream connections
cdef nghttp2_option *_server_option = NULL  # clients' connections


cdef int _setup() except -1:
    global _callbacks, _option, _server_option
    if nghttp2_session_callbacks_new(&_callbacks) != 0 or nghttp2_option_new(&_option) != 0 \
            or nghttp2_option_new(&_server_option) != 0:
        raise MemoryError()
    nghttp2_session_callbacks_set_on_begin_headers_callback(_callbacks, _on_begin_headers)
    nghttp2_session_callbacks_set_on_header_callback(_callbacks, _on_header)
    nghttp2_session_callbacks_set_on_frame_recv_callback(_callbacks, _on_frame_recv)
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(_callbacks, _on_data_chunk_recv)
    nghttp2_session_callbacks_set_on_frame_send_callback(_callbacks, _on_frame_send)
    nghttp2_session_callbacks_set_on_stream_close_callback(_callbacks, _on_stream_close)
    nghttp2_option_set_no_auto_window_update(_option, 1)
    nghttp2_option_set_no_auto_window_update(_server_option, 1)
    # Requests are checked as grpc.aio checks them, not by nghttp2's stricter HTTP rules:
    # gRPC servers take connection-specific headers (`connection`, `upgrade`, ...) that
    # RFC 9113 calls malformed, and a client must not tell which path served it. What is
    # not ModelInfer goes to grpc.aio, which checks the rest.
    nghttp2_option_set_no_http_messaging(_server_option, 1)
    return 0


_setup()


@cython.final
cdef class H2Connection:
    """One HTTP/2 connection, server side (a client of the router) or client side (to an
    upstream). ``owner`` hears of new requests (server side: ``request``, ``message``,
    ``oversize``, ``incomplete``) and of the connection's end (``connection_lost``)."""

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
    cdef size_t buffer_cap  # a client's: its upstream streams' windows, all together
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

    def __cinit__(self, owner, bint server, *, uint32_t max_concurrent_streams=100,
                  uint32_t stream_window=1 << 20, int32_t connection_window=1 << 24,
                  uint32_t max_header_list_bytes=1 << 16, size_t peek_budget=0,
                  uint32_t stream_reset_burst=1000, uint32_t stream_reset_rate=33,
                  size_t buffer_cap=<size_t>-1):
        self.owner = owner
        self.server = server
        self.streams = {}
        cdef int rv
        if server:
            rv = nghttp2_session_server_new2(&self.session, _callbacks, <void *>self,
                                             _server_option)
        else:
            rv = nghttp2_session_client_new2(&self.session, _callbacks, <void *>self, _option)
        if rv != 0:
            raise MemoryError()
        self.settings = [(NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, max_concurrent_streams),
                         (NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE,
                          stream_window if server else min(stream_window, BASE_STREAM_WINDOW)),
                         (NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, max_header_list_bytes),
                         (NGHTTP2_SETTINGS_ENABLE_PUSH, 0)]
        self.connection_window = connection_window
        self.max_header_list = max_header_list_bytes
        self.stream_window = stream_window
        self.initial_window = stream_window if server else min(stream_window, BASE_STREAM_WINDOW)
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
        _mark(self)
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

    def open_stream(self, list headers, Stream client, handler, bytes first=None) -> Stream:
        """Send a request on this (client-side) connection, paired with ``client``: its
        held bytes go first (or ``first``, a request sent again), then everything it
        receives."""
        # Room for a full client block (MAX_HEADERS fields, its pseudo-headers among them)
        # plus what the router adds in their place.
        cdef nghttp2_nv nva[MAX_REQUEST_HEADERS]
        cdef size_t count = _fill_nv(nva, headers, MAX_REQUEST_HEADERS)
        cdef nghttp2_data_provider provider
        if self.lost or self.goaway:
            raise H2Error("the upstream connection is closing")
        if client.closed:
            raise H2Error("the client's stream is closed")
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
        client.handler = handler
        if first is not None:  # its window was given back when it first came
            buf_append(&stream.out, PyBytes_AS_STRING(first), PyBytes_GET_SIZE(first))
            stream.preconsumed = PyBytes_GET_SIZE(first)
        _pair(client, stream)
        _grant_window(client.connection, stream)
        if nghttp2_session_get_next_stream_id(self.session) > MAX_STREAM_ID:
            # Its stream IDs are spent: the pool opens another for the next request, and
            # this one closes when its last stream ends.
            self.goaway = True
            self.shutdown()
        _mark(self)
        return stream

    def expire_peeks(self, double before) -> list:
        """End the first-message peeks that waited since before ``before`` (monotonic
        seconds) for their length prefix, or for the rest once reserved; returns their
        streams, for the owner to answer."""
        cdef Stream stream
        expired = []
        for value in self.streams.values():
            stream = <Stream>value
            if stream.peek_limit >= 0 and stream.peek_since < before:
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
