# Included by _h2.pyx: Stream, the first-message peek and its budget, pairing, and what a
# paired stream sends (nghttp2 reads it through _read_data).

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int32_t, uint8_t, uint32_t
from libc.string cimport memcpy


@cython.final
cdef class Stream:
    """One HTTP/2 stream of a :class:`H2Connection`: its headers, the bytes waiting to be
    sent on it, and the stream it is paired with."""

    cdef readonly H2Connection connection
    cdef readonly int32_t id
    cdef readonly list headers  # the last HEADERS block: [(name, value), ...]
    cdef readonly bint closed
    cdef readonly bint remote_ended  # the peer sent END_STREAM
    # The DATA frame being received carries END_STREAM (remote_ended is set once it is
    # whole): nothing beyond it will come.
    cdef bint last_frame
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
    # Of its client connection's peek budget, reserved for its first message while the router
    # holds those bytes outside flow control (moved to the upstream stream with them)
    cdef size_t peeked
    cdef size_t first_size  # the peeked first message, prefix included
    cdef double peek_since  # _monotonic() at its HEADERS, then at its reservation
    cdef bint out_eof
    cdef bint ended  # the call ended normally (trailers went through)
    cdef bint discard
    cdef bint reset_after_answer
    cdef size_t header_bytes  # of the block being received, as SETTINGS_MAX_HEADER_LIST_SIZE counts
    # An upstream stream's window, counted in its client's window_bytes; a client's stream's
    # window once raised (_raise_window), counted in its own connection's
    cdef uint32_t window
    cdef list trailers
    cdef list received_trailers  # a client's trailers (dropped: gRPC requests carry none)
    cdef double opened  # _monotonic() at a request's HEADERS (server side)
    # What a request's HEADERS say to the policy, read once as they come (server side):
    # its :path, whether its content-type is gRPC's, its grpc-timeout in seconds (-1: none;
    # the last one, as the policy reads it), whether any grpc-timeout was malformed,
    # whether its first grpc-encoding compresses, the values of the connection's
    # policy_keys, its metadata to forward (None: none), and the first of those a gRPC
    # server refuses (its name; `illegal_value`: for its value, else for the name).
    cdef readonly object path
    cdef readonly bint grpc
    cdef readonly double timeout
    cdef readonly bint timeout_malformed
    cdef readonly bint encoded
    cdef bint encoding_seen
    cdef readonly dict policy_values
    cdef readonly list metadata
    cdef readonly object illegal
    cdef readonly bint illegal_value
    # Message mode (not paired): whole gRPC messages to the handler, one call each.
    cdef bint message_mode
    cdef bint messages_paused
    cdef bint delivering
    cdef bint end_reported
    cdef bint delivered  # it handed a message over (upstream work may have started)
    cdef size_t message_limit
    cdef size_t low_water  # tell the handler `drained` once `out` is below this (0: off)
    cdef H2Connection window_of  # the client connection whose window_bytes count `window`
    # An upstream's answer, read as its last HEADERS block comes (client side): its first
    # grpc-status (None: none), and its :status before that (b"": none), for `trailers`.
    cdef bytes grpc_status
    cdef bytes http_status

    def __cinit__(self, H2Connection connection):
        self.connection = connection
        self.peek_limit = -1
        self.timeout = -1
        self.http_status = b""

    def __dealloc__(self):
        buf_free(&self.inbuf)
        buf_free(&self.out)

    @property
    def paired(self) -> bool:
        return self.peer is not None

    def await_message(self, Py_ssize_t limit) -> None:
        """Collect DATA until the first gRPC message is whole (up to ``limit`` bytes), then
        call the owner's ``message(stream, compressed, bytes)`` (its connection's
        ``on_message(stream, bytes)`` for an uncompressed one, where it has one);
        ``oversize`` / ``incomplete`` when it is too large or the client ended without
        one."""
        _await_message(self, limit)

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
                # Its reservation stays until its bytes leave for the upstream (_pair,
                # _read_data) or the stream closes: a message waiting for an instance, or
                # for a slow Triton to take it, still counts against the peek budget.
                self.peek_limit = -1
                message = PyBytes_FromStringAndSize(<const char *>p + MESSAGE_PREFIX, length)
                if p[0] == 0 and self.connection.on_message is not None:
                    self.connection.on_message(self, message)
                else:
                    owner.message(self, p[0], message)
                return 0
        if self.remote_ended:
            _end_peek(self)
            owner.incomplete(self)
        return 0

    def read_messages(self, handler, size_t limit) -> None:
        """Message mode: from now on every whole gRPC message received is handed to
        ``handler.message(stream, compressed, bytes)`` (``oversize(stream, length)`` for one
        larger than ``limit``; ``ended(stream)`` once the peer ended and every message went).
        A message's window is given back as it is handed over (and while it is the one
        being collected, as its bytes come): a paused stream holds the peer back."""
        self.handler = handler
        self.message_mode = True
        self.message_limit = limit
        _deliver(self)

    def pause_messages(self) -> None:
        """Hand over no more messages until :meth:`resume_messages`."""
        self.messages_paused = True

    def resume_messages(self) -> None:
        if self.messages_paused:
            self.messages_paused = False
            _deliver(self)

    def send_message(self, bytes message) -> int:
        """Queue ``message`` length-prefixed on this stream; returns the bytes queued and
        not yet taken by nghttp2 (what the peer's flow control holds back)."""
        cdef unsigned char prefix[MESSAGE_PREFIX]
        cdef size_t n = PyBytes_GET_SIZE(message)
        if self.closed or self.ended or self.out_eof:
            return 0
        prefix[0] = 0
        prefix[1] = (n >> 24) & 0xFF
        prefix[2] = (n >> 16) & 0xFF
        prefix[3] = (n >> 8) & 0xFF
        prefix[4] = n & 0xFF
        buf_append(&self.out, <const char *>prefix, MESSAGE_PREFIX)
        buf_append(&self.out, PyBytes_AS_STRING(message), n)
        conn_resume(self)
        return buf_len(&self.out)

    def end_messages(self) -> None:
        """END_STREAM after the messages queued (a request's end)."""
        if not self.closed and not self.out_eof:
            self.out_eof = True
            conn_resume(self)

    def notify_drained(self, size_t below) -> None:
        """Call the handler's ``drained(stream)`` once fewer than ``below`` bytes wait to
        be sent on it."""
        self.low_water = below if below else 1
        if buf_len(&self.out) < self.low_water:
            self.low_water = 0
            self.handler.drained(self)

    @property
    def unsent(self) -> int:
        """Bytes queued on it that nghttp2 has not taken yet."""
        return buf_len(&self.out)

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

    @property
    def request_sent(self) -> bool:
        """Everything this (client-side) stream is to send went to nghttp2, and its
        END_STREAM goes with the last of it: the peer can have the whole request."""
        return self.out_eof and buf_len(&self.out) == 0

    def unpair(self) -> None:
        """End its pairing (a client's stream whose upstream stream was given up on: the
        call goes to another); what either holds stays, and neither's end reaches the other."""
        cdef Stream peer = self.peer
        if peer is not None:
            peer.peer = None
            self.peer = None


cdef inline int _await_message(Stream stream, Py_ssize_t limit) except -1:
    stream.peek_limit = limit
    stream.peek_since = _monotonic()
    stream._check_message()
    return 0


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
        if need > conn.initial_window:
            _raise_window(stream)  # its bytes come at a stream window's pace
    if stream.held:
        nghttp2_session_consume_stream(conn.session, stream.id, stream.held)
        stream.held = 0
        _mark(conn)


cdef void _end_peek(Stream stream) noexcept:
    """The stream's first message will never be whole: its reservation goes to the streams
    that wait for one."""
    stream.peek_limit = -1
    _unreserve(stream.connection, stream)


cdef void _unreserve(H2Connection conn, Stream stream) noexcept:
    """``stream`` (a client's, or the upstream stream its first message moved to) holds no
    more bytes of a first message outside flow control: its reservation of ``conn``'s peek
    budget goes to the streams that wait for one."""
    if not stream.peeked:
        return
    cdef Stream other
    conn.peek_bytes -= stream.peeked
    stream.peeked = 0
    if conn.peek_stalled and not conn.lost:
        conn.peek_stalled = False
        for value in list(conn.streams.values()):
            other = <Stream>value
            if other.peek_limit >= 0 and not other.peeked:
                _reserve(other)


cdef void _raise_window(Stream stream) noexcept:
    """A client's stream: its window raised from the base window to a stream window while
    its connection's windows stay within ``buffer_cap`` (the request direction's bound, as
    _grant_window is the response's): request bytes a slow Triton has not taken wait in the
    router within that cap, plus a base window per stream past it."""
    cdef H2Connection conn = stream.connection
    if stream.window or conn.stream_window <= conn.initial_window \
            or conn.window_bytes + conn.stream_window > conn.buffer_cap:
        return
    if nghttp2_session_set_local_window_size(conn.session, NGHTTP2_FLAG_NONE, stream.id,
                                             conn.stream_window) == 0:
        stream.window = conn.stream_window
        conn.window_bytes += conn.stream_window
        stream.window_of = conn
        _mark(conn)


cdef int _deliver(Stream stream) except -1:
    """Hand over every whole message a message-mode stream holds, unless paused (an
    upstream's, once it ended, goes whatever: its stream is closing), then ``ended``."""
    cdef size_t have, length, need, consumed, owed
    cdef const unsigned char *p
    cdef H2Connection conn = stream.connection
    if stream.delivering or stream.closed:
        return 0
    stream.delivering = True
    try:
        while not stream.closed and not stream.discard:
            if stream.messages_paused and (conn.server or not stream.remote_ended):
                return 0
            have = buf_len(&stream.inbuf)
            if have < MESSAGE_PREFIX:
                break
            p = <const unsigned char *>stream.inbuf.data + stream.inbuf.start
            length = (<size_t>p[1] << 24) | (<size_t>p[2] << 16) | (<size_t>p[3] << 8) | p[4]
            if length > stream.message_limit:
                stream.discard = True
                stream.handler.oversize(stream, length)
                return 0
            need = MESSAGE_PREFIX + length
            consumed = have - stream.held  # the head's bytes whose window went back
            if need > have:
                # The message being collected takes its bytes as they come: it may be
                # larger than a window, and it is bounded by message_limit.
                if stream.held:
                    nghttp2_session_consume_stream(conn.session, stream.id, stream.held)
                    stream.held = 0
                    _mark(conn)
                break
            if need > consumed:
                owed = need - consumed
                nghttp2_session_consume_stream(conn.session, stream.id, owed)
                stream.held -= owed
                _mark(conn)
            message = PyBytes_FromStringAndSize(<const char *>p + MESSAGE_PREFIX, length)
            stream.inbuf.start += need
            if stream.inbuf.start == stream.inbuf.end:
                stream.inbuf.start = stream.inbuf.end = 0
            stream.delivered = True
            stream.handler.message(stream, p[0], message)
        if stream.remote_ended and not stream.end_reported and not stream.closed \
                and (not stream.messages_paused or not conn.server):
            stream.end_reported = True
            if not conn.server:  # an upstream's answer is over: a close says nothing new
                stream.ended = True
            stream.handler.ended(stream)
    finally:
        stream.delivering = False
    return 0


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
    upstream.window_of = client


cdef void _pair(Stream client, Stream upstream) noexcept:
    """From now on, bytes received on each go out on the other."""
    client.peer = upstream
    upstream.peer = client
    client.source = upstream.connection
    client.source_id = upstream.id
    upstream.source = client.connection
    upstream.source_id = client.id
    # The peeked bytes move over whole (no copy); their window was given back as they came,
    # so their reservation moves with them, until they are sent (_read_data).
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
    client.peek_limit = -1
    upstream.peeked = client.peeked
    client.peeked = 0
    if not upstream.preconsumed:
        _unreserve(client.connection, upstream)
    if client.remote_ended:
        upstream.out_eof = True
    elif client.connection.server and not client.last_frame:
        # More may come (a relayed stream): a stream window. Not for a request whose last
        # frame is being read (a unary call's usual one): its WINDOW_UPDATE would cost a
        # write to the client per call and let nothing more through.
        _raise_window(client)


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
            if not stream.preconsumed and stream.peeked:
                _unreserve(stream.source, stream)
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
    if stream.low_water and buf_len(&stream.out) < stream.low_water:
        stream.low_water = 0
        try:
            stream.connection.drained.append(stream)
        except Exception:
            return NGHTTP2_ERR_CALLBACK_FAILURE
    return <ssize_t>n


cdef inline void _give_back(H2Connection connection, int32_t stream_id, size_t n) noexcept:
    """``n`` bytes received on that stream were sent on (or dropped): open its windows."""
    if connection is not None and not connection.lost:
        nghttp2_session_consume_stream(connection.session, stream_id, n)
        # A WINDOW_UPDATE, unless the stream has closed (an answer's, once written)
        if nghttp2_session_want_write(connection.session):
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
