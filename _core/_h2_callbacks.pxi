# Included by _h2.pyx: what nghttp2 calls back while it reads and writes frames (headers,
# DATA, frames received and sent, stream closes), the policing of a client's PINGs and
# RST_STREAMs, and the callbacks' setup.

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t


cdef extern from "dlfcn.h" nogil:
    ctypedef struct Dl_info:
        const char *dli_fname
    int dladdr(const void *addr, Dl_info *info)
    void *dlopen(const char *filename, int flags)
    void *dlsym(void *handle, const char *symbol)
    int RTLD_NOW
    int RTLD_NOLOAD

ctypedef void (*_reset_limit_t)(nghttp2_option *, uint64_t, uint64_t) noexcept nogil


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
            stream.opened = _monotonic()
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
                stream.grpc_status = None
                stream.http_status = b""
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
    cdef bint request = stream.received_trailers is None
    cdef list block = stream.headers if request else stream.received_trailers
    if len(block) >= MAX_HEADERS:  # the stream is reset, the connection lives
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE
    try:
        header = (PyBytes_FromStringAndSize(<const char *>name, namelen),
                  PyBytes_FromStringAndSize(<const char *>value, valuelen))
        block.append(header)
        if not conn.server:
            _read_answer_header(stream, header, name, namelen)
        elif request:
            _read_request_header(conn, stream, header, name, namelen, value, valuelen)
    except Exception:
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef inline int _read_answer_header(Stream stream, tuple header, const uint8_t *name,
                                    size_t namelen) except -1:
    """What a paired call's handler is told of an upstream's answer (``trailers``): the
    first grpc-status of its last block, and the :status before it (gRPC's reading of an
    answer without grpc-status: an HTTP proxy's 503 is UNAVAILABLE)."""
    if stream.grpc_status is not None:
        return 0
    if namelen == 11 and memcmp(name, b"grpc-status", 11) == 0:
        stream.grpc_status = header[1]
    elif namelen == 7 and memcmp(name, b":status", 7) == 0:
        stream.http_status = header[1]
    return 0


cdef int _read_request_header(H2Connection conn, Stream stream, tuple header,
                              const uint8_t *name, size_t namelen, const uint8_t *value,
                              size_t valuelen) except -1:
    """What the policy reads of a request's headers, taken as each comes, so that it never
    scans them itself (docs/native.md): the last :path, content-type and grpc-timeout, the
    first grpc-encoding, the policy keys' values, and the metadata to forward, checked as
    grpc-core checks a client's metadata."""
    if namelen and name[0] == 0x3A:  # ':', a pseudo-header
        if namelen == 5 and memcmp(name, b":path", 5) == 0:
            stream.path = header[1]
        return 0
    if namelen == 12:
        if memcmp(name, b"content-type", 12) == 0:
            stream.grpc = valuelen >= 16 and memcmp(value, b"application/grpc", 16) == 0
        elif memcmp(name, b"grpc-timeout", 12) == 0:
            stream.timeout = _grpc_timeout(value, valuelen)
            if stream.timeout < 0:
                stream.timeout_malformed = True
    elif namelen == 13 and not stream.encoding_seen and memcmp(name, b"grpc-encoding", 13) == 0:
        stream.encoding_seen = True
        stream.encoded = valuelen != 8 or memcmp(value, b"identity", 8) != 0
    key = header[0]
    if key in conn.policy_keys:
        if stream.policy_values is None:
            stream.policy_values = {}
        stream.policy_values[key] = header[1]
        return 0
    if key in conn.hop_by_hop:
        return 0
    if stream.illegal is None:
        if not _legal_key(name, namelen):
            stream.illegal = key
        elif not (namelen >= 4 and memcmp(name + namelen - 4, b"-bin", 4) == 0) \
                and not _legal_value(value, valuelen):
            stream.illegal = key
            stream.illegal_value = True
    if stream.metadata is None:
        stream.metadata = []
    stream.metadata.append(header)
    return 0


cdef inline bint _legal_key(const uint8_t *name, size_t n) noexcept:
    """grpc-core's legal header key: [0-9a-z_.-]+."""
    cdef size_t i
    cdef uint8_t c
    if n == 0:
        return False
    for i in range(n):
        c = name[i]
        if not (0x30 <= c <= 0x39 or 0x61 <= c <= 0x7A or c == 0x5F or c == 0x2E or c == 0x2D):
            return False
    return True


cdef inline bint _legal_value(const uint8_t *value, size_t n) noexcept:
    """grpc-core's legal non-binary header value: printable ASCII."""
    cdef size_t i
    for i in range(n):
        if value[i] < 0x20 or value[i] > 0x7E:
            return False
    return True


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
        if conn.server and not _reset_is_free(_stream_of(session, frame.hd.stream_id)) \
                and not _take_reset(conn):
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
                if conn.peek_path is not None and not end and stream.grpc \
                        and not stream.timeout_malformed and stream.path == conn.peek_path:
                    # The call whose first message the policy reads (ModelInfer) needs no
                    # policy call before it is whole.
                    _await_message(stream, conn.peek_limit)
                    return 0
                conn.owner.request(stream, end)
                return 0
            if not conn.server:
                if stream.peer is not None:
                    _forward_headers(stream, end)
                elif end and stream.message_mode:  # its trailers
                    _deliver(stream)
                return 0
            # a client's trailers: only their END_STREAM matters
        if end:  # the last DATA (or a client's trailers)
            peer = stream.peer
            if not conn.server and peer is not None:
                # An upstream's DATA ended the stream: there are no trailers to forward, so
                # the client is told (a gRPC call always ends with a grpc-status).
                stream.headers = [(b"grpc-status", b"13"),
                                  (b"grpc-message", b"upstream ended the stream without trailers")]
                stream.grpc_status = b"13"
                _forward_headers(stream, True)
                return 0
            if peer is not None:
                peer.out_eof = True
                conn_resume(peer)
            elif stream.peek_limit >= 0:
                stream._check_message()
            elif stream.message_mode:
                _deliver(stream)
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


cdef inline double _grpc_timeout(const uint8_t *value, size_t n) noexcept:
    """A grpc-timeout value in seconds (1-8 digits and a unit); -1 when malformed."""
    cdef double amount = 0
    cdef size_t i
    if n < 2 or n > 9:
        return -1
    for i in range(n - 1):
        if value[i] < 48 or value[i] > 57:
            return -1
        amount = amount * 10 + (value[i] - 48)
    cdef uint8_t unit = value[n - 1]
    if unit == 72:  # H
        return amount * 3600
    if unit == 77:  # M
        return amount * 60
    if unit == 83:  # S
        return amount
    if unit == 109:  # m
        return amount * 1e-3
    if unit == 117:  # u
        return amount * 1e-6
    if unit == 110:  # n
        return amount * 1e-9
    return -1


cdef inline bint _reset_is_free(Stream stream) noexcept:
    """Whether a client's reset of ``stream`` is left out of the rapid-reset bucket: rapid
    reset (CVE-2023-44487) is starting upstream work and freeing the stream slot at once,
    so a stream that started nothing upstream yet (its first message awaited, or waiting
    for an instance; a message-mode stream until it handed a message over) is free, and
    so is one the router has closed already (a client whose deadline fired as the
    router's answer was on its way resets a stream that is over); so is one reset once it
    has lived 90% of its own grpc-timeout (gRPC clients cancel a call whose deadline is
    up; it held its slot under the stream limit for that long; 90%: the client's clock
    started before its HEADERS reached the router)."""
    if stream is None or stream.peer is None and not stream.delivered:
        return True  # closed already, or nothing sent yet
    return stream.timeout > 0 and _monotonic() - stream.opened >= 0.9 * stream.timeout


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
            handler.trailers(b"" if upstream.grpc_status is None else upstream.grpc_status,
                             upstream.http_status)
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
        stream.last_frame = (flags & NGHTTP2_FLAG_END_STREAM) != 0
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
        elif stream.message_mode:
            _deliver(stream)
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
    stream.peek_limit = -1
    cdef Stream peer = stream.peer
    cdef size_t unsent
    # A client's stream counts in its own connection, an upstream's in its client's.
    cdef H2Connection counted = connection if connection.server else stream.source
    if stream.peeked:  # first-message bytes it held outside flow control are dropped
        _unreserve(counted, stream)
    if not connection.streams:
        connection.idle_since = _monotonic()
    if stream.window:
        stream.window_of.window_bytes -= stream.window
        stream.window = 0
    stream.window_of = None
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


cdef void _lift_nghttp2_reset_limit(nghttp2_option *option) noexcept:
    """nghttp2 1.57+ (and Debian's 1.52 backport) limit a client's RST_STREAMs on their own
    (1000 at once, 33 per s) and charge every one, a call its own deadline cancelled
    included; the router's bucket (_take_reset, _reset_is_free) is the limit, so nghttp2's
    is raised out of its way. Looked up at run time: older builds lack the function."""
    cdef Dl_info info
    if dladdr(<const void *>nghttp2_option_new, &info) == 0 or info.dli_fname == NULL:
        return
    cdef void *lib = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD)
    if lib == NULL:
        return
    cdef _reset_limit_t set_limit = <_reset_limit_t>dlsym(
        lib, b"nghttp2_option_set_stream_reset_rate_limit")
    if set_limit != NULL:
        set_limit(option, 1 << 40, 1 << 20)


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
    _lift_nghttp2_reset_limit(_server_option)
    return 0


_setup()
