# cython: language_level=3, boundscheck=False, wraparound=False
"""Native twin of ``_wire_py``: the same peeks over a bytes buffer, without Python objects
until the result is built. Behaviour (results and errors) is identical; see _wire_py.py.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcmp, memcpy

from tritonmesh._core._wire_py import RequestInfo, ResponseInfo, WireError

cdef enum:
    VARINT = 0
    I64 = 1
    LEN = 2
    I32 = 5

cdef enum ParamKind:
    P_NONE = 0
    P_BOOL = 1
    P_INT = 2
    P_UINT = 3
    P_STR = 4

cdef struct Cursor:
    const unsigned char* buf
    Py_ssize_t pos
    Py_ssize_t end
    int err  # 0 ok; otherwise an index into ERRORS

ERRORS = (
    "",
    "truncated varint",
    "varint longer than 10 bytes",
    "field runs past the end of the message",
    "unsupported wire type",
    "field number 0",
    "a length-delimited field runs past the end of the message",
)

cdef struct Param:
    ParamKind kind
    uint64_t raw
    Py_ssize_t s     # string value span
    Py_ssize_t e
    Py_ssize_t ks    # key span
    Py_ssize_t ke

cdef struct Field:
    uint64_t number
    int wire
    Py_ssize_t s
    Py_ssize_t e


cdef inline void _open(Cursor* c, const unsigned char* buf, Py_ssize_t pos,
                       Py_ssize_t end) noexcept nogil:
    c.buf = buf
    c.pos = pos
    c.end = end
    c.err = 0


cdef inline uint64_t _varint(Cursor* c) noexcept nogil:
    cdef uint64_t result = 0
    cdef int shift = 0
    cdef unsigned char b
    while True:
        if c.pos >= c.end:
            c.err = 1
            return 0
        b = c.buf[c.pos]
        c.pos += 1
        if shift < 64:
            result |= (<uint64_t>(b & 0x7F)) << shift
        if not (b & 0x80):
            return result
        shift += 7
        if shift >= 70:
            c.err = 2
            return 0


cdef inline bint _next(Cursor* c, Field* f) noexcept nogil:
    """Read the next field header and value span; False at the end or on error."""
    cdef uint64_t key, length
    if c.pos >= c.end or c.err:
        return False
    key = _varint(c)
    if c.err:
        return False
    f.number = key >> 3
    f.wire = key & 7
    if f.number == 0:
        c.err = 5
        return False
    if f.wire == LEN:
        length = _varint(c)
        if c.err:
            return False
        if length > <uint64_t>(c.end - c.pos):
            c.err = 6
            return False
        f.s = c.pos
        c.pos += <Py_ssize_t>length
        f.e = c.pos
        return True
    f.s = c.pos
    if f.wire == VARINT:
        _varint(c)
        if c.err:
            return False
    elif f.wire == I64:
        c.pos += 8
    elif f.wire == I32:
        c.pos += 4
    else:
        c.err = 4
        return False
    if c.pos > c.end:
        c.err = 3
        return False
    f.e = c.pos
    return True


cdef inline int _param(const unsigned char* buf, Py_ssize_t s, Py_ssize_t e,
                       Param* p) noexcept nogil:
    """Decode one map<string, InferParameter> entry in buf[s:e]; returns an error index."""
    cdef Cursor c, v
    cdef Field f, g
    _open(&c, buf, s, e)
    p.kind = P_NONE
    p.ks = p.ke = 0
    while _next(&c, &f):
        if f.number == 1 and f.wire == LEN:
            p.ks = f.s
            p.ke = f.e
        elif f.number == 2 and f.wire == LEN:
            _open(&v, buf, f.s, f.e)
            while _next(&v, &g):
                if g.wire == VARINT and (g.number == 1 or g.number == 2 or g.number == 5):
                    v.pos = g.s
                    p.raw = _varint(&v)
                    p.kind = P_BOOL if g.number == 1 else (P_INT if g.number == 2 else P_UINT)
                elif g.wire == LEN and g.number == 3:
                    p.kind = P_STR
                    p.s = g.s
                    p.e = g.e
                elif g.wire == I64 and g.number == 4:
                    p.kind = P_NONE  # a double never steers routing
                # Anything else is an unknown field to protobuf: the value stands.
            if v.err:
                return v.err
    return c.err


cdef inline bint _key_is(const unsigned char* buf, Param* p, const char* key,
                         Py_ssize_t n) noexcept nogil:
    return p.ke - p.ks == n and memcmp(buf + p.ks, key, n) == 0


cdef str _string(bytes data, Py_ssize_t s, Py_ssize_t e):
    try:
        return data[s:e].decode()
    except UnicodeDecodeError:
        raise WireError("string field is not valid UTF-8") from None


cdef _fail(int err):
    raise WireError(ERRORS[err])


def peek_request(bytes buf):
    """Read routing fields from a serialized ``ModelInferRequest`` (see _wire_py)."""
    cdef Cursor c
    cdef Field f
    cdef Param p
    cdef int err
    cdef const unsigned char* data = <const unsigned char*>PyBytes_AS_STRING(buf)
    cdef object sequence_id = None
    cdef bint start_flag = False, end_flag = False, empty_final = False
    cdef uint64_t priority = 0
    cdef Py_ssize_t ms = 0, me = 0, vs = 0, ve = 0, rs = 0, re = 0
    _open(&c, data, 0, PyBytes_GET_SIZE(buf))
    while _next(&c, &f):
        if f.wire != LEN:
            if f.number <= 7:
                raise WireError(
                    f"field {f.number} has wire type {f.wire}, expected length-delimited"
                )
            continue
        if f.number == 1:
            ms, me = f.s, f.e
        elif f.number == 2:
            vs, ve = f.s, f.e
        elif f.number == 3:
            rs, re = f.s, f.e
        elif f.number == 4:
            err = _param(data, f.s, f.e, &p)
            if err:
                _fail(err)
            if _key_is(data, &p, b"sequence_id", 11):
                if p.kind == P_INT:
                    sequence_id = <int64_t>p.raw if p.raw else None
                elif p.kind == P_UINT:
                    sequence_id = p.raw if p.raw else None
                elif p.kind == P_STR and p.e > p.s:
                    sequence_id = _string(buf, p.s, p.e)
                else:
                    sequence_id = None
            elif _key_is(data, &p, b"sequence_start", 14):
                start_flag = p.kind == P_BOOL and p.raw != 0
            elif _key_is(data, &p, b"sequence_end", 12):
                end_flag = p.kind == P_BOOL and p.raw != 0
            elif _key_is(data, &p, b"triton_enable_empty_final_response", 34):
                empty_final = p.kind == P_BOOL and p.raw != 0
            elif _key_is(data, &p, b"priority", 8):
                priority = p.raw if (p.kind == P_INT or p.kind == P_UINT) \
                    and 0 < p.raw < (<uint64_t>1 << 63) else 0
    if c.err:
        _fail(c.err)
    # tuple.__new__, not the NamedTuple's own __new__ (a Python function): once per request.
    return tuple.__new__(RequestInfo, (_string(buf, ms, me), _string(buf, vs, ve),
                                       _string(buf, rs, re), sequence_id, start_flag, end_flag,
                                       empty_final, priority))


def peek_stream_response(bytes buf):
    """Read accounting fields from a serialized ``ModelStreamInferResponse`` (see _wire_py)."""
    cdef Cursor c, r
    cdef Field f, g
    cdef Param p
    cdef int err
    cdef const unsigned char* data = <const unsigned char*>PyBytes_AS_STRING(buf)
    cdef Py_ssize_t es = 0, ee = 0, rs = 0, re = 0
    cdef object final = None
    cdef bint has_outputs = False
    _open(&c, data, 0, PyBytes_GET_SIZE(buf))
    while _next(&c, &f):
        if f.wire != LEN:
            continue
        if f.number == 1:
            es, ee = f.s, f.e
        elif f.number == 2:
            _open(&r, data, f.s, f.e)
            while _next(&r, &g):
                if g.wire != LEN:
                    continue
                if g.number == 3:
                    rs, re = g.s, g.e
                elif g.number == 4:
                    err = _param(data, g.s, g.e, &p)
                    if err:
                        _fail(err)
                    if _key_is(data, &p, b"triton_final_response", 21):
                        final = p.kind == P_BOOL and p.raw != 0
                elif g.number == 5 or g.number == 6:
                    has_outputs = True
            if r.err:
                _fail(r.err)
    if c.err:
        _fail(c.err)
    return ResponseInfo(_string(buf, es, ee), _string(buf, rs, re), final, has_outputs)


cdef inline double _raw_sum(const unsigned char* p, Py_ssize_t n, int kind,
                            Py_ssize_t size) noexcept nogil:
    """Sum of n little-endian elements of one Triton datatype (see _RAW_KINDS)."""
    cdef double total = 0.0
    cdef Py_ssize_t i
    cdef uint64_t u
    cdef int j
    cdef float f32
    cdef double f64
    for i in range(n):
        u = 0
        for j in range(size):
            u |= (<uint64_t>p[i * size + j]) << (8 * j)
        if kind == 0:  # signed integers: sign-extend from size bytes
            if size < 8 and (u >> (8 * size - 1)) & 1:
                u |= ~((<uint64_t>1 << (8 * size)) - 1)
            total += <double><int64_t>u
        elif kind == 1:
            total += <double>u
        elif kind == 2:
            memcpy(&f32, &u, 4)
            total += <double>f32
        else:
            memcpy(&f64, &u, 8)
            total += f64
    return total


# datatype -> (kind: 0 signed, 1 unsigned, 2 FP32, 3 FP64; element size)
_RAW_KINDS = {
    b"INT8": (0, 1), b"INT16": (0, 2), b"INT32": (0, 4), b"INT64": (0, 8),
    b"UINT8": (1, 1), b"UINT16": (1, 2), b"UINT32": (1, 4), b"UINT64": (1, 8),
    b"FP32": (2, 4), b"FP64": (3, 8),
}


def peek_work(bytes buf, bytes input_name, bytes parameter):
    """A request's cost hint for LEAST_OUTSTANDING_WORK, or None (see _wire_py)."""
    cdef Cursor c, t, v
    cdef Field f, g, h
    cdef const unsigned char* data = <const unsigned char*>PyBytes_AS_STRING(buf)
    cdef Py_ssize_t plen = PyBytes_GET_SIZE(parameter)
    cdef Py_ssize_t ilen = PyBytes_GET_SIZE(input_name)
    cdef const char* pkey = PyBytes_AS_STRING(parameter)
    cdef const char* ikey = PyBytes_AS_STRING(input_name)
    cdef Py_ssize_t index = -1, inputs = 0, raws = 0, raw_s = 0, raw_e = -1, raw_index = -1
    cdef Py_ssize_t ks, ke, ns, ne, ds = 0, de = 0, ts, te, size
    cdef bint numeric
    cdef double value = 0.0, found = 0.0
    cdef bint have = False
    cdef uint64_t raw
    cdef int kind
    _open(&c, data, 0, PyBytes_GET_SIZE(buf))
    while _next(&c, &f):
        if f.wire != LEN:
            continue
        if f.number == 4 and plen:
            _open(&t, data, f.s, f.e)
            ks = ke = 0
            numeric = False
            while _next(&t, &g):
                if g.number == 1 and g.wire == LEN:
                    ks, ke = g.s, g.e
                elif g.number == 2 and g.wire == LEN:
                    numeric = False
                    _open(&v, data, g.s, g.e)
                    while _next(&v, &h):
                        if h.wire == VARINT and (h.number == 2 or h.number == 5):
                            v.pos = h.s
                            raw = _varint(&v)
                            value = <double><int64_t>raw if h.number == 2 else <double>raw
                            numeric = True
                        elif h.wire == I64 and h.number == 4:
                            memcpy(&value, data + h.s, 8)
                            numeric = True
                        elif (h.wire == VARINT and h.number == 1) or (
                                h.wire == LEN and h.number == 3):
                            numeric = False  # a bool or a string: not a cost
                        # Anything else is an unknown field to protobuf: the value stands.
                    if v.err:
                        _fail(v.err)
            if t.err:
                _fail(t.err)
            if ke - ks == plen and memcmp(data + ks, pkey, plen) == 0:
                have = numeric
                found = value
        elif f.number == 5 and not plen:
            _open(&t, data, f.s, f.e)
            ns = ne = ts = te = 0
            while _next(&t, &g):
                if g.wire == LEN and g.number == 1:
                    ns, ne = g.s, g.e
                elif g.wire == LEN and g.number == 2:
                    ts, te = g.s, g.e
            if t.err:
                _fail(t.err)
            if ne - ns == ilen and memcmp(data + ns, ikey, ilen) == 0:
                index = inputs
                ds, de = ts, te
            inputs += 1
        elif f.number == 7 and not plen:
            if raws == index:
                raw_s, raw_e, raw_index = f.s, f.e, index
            raws += 1
    if c.err:
        _fail(c.err)
    if plen:
        return found if have else None
    if index < 0:
        return None
    if raw_index != index:
        # The input came after its contents (a merge of two messages): look them up again.
        raw_e = -1
        raws = 0
        _open(&c, data, 0, PyBytes_GET_SIZE(buf))
        while _next(&c, &f):
            if f.number == 7 and f.wire == LEN:
                if raws == index:
                    raw_s, raw_e = f.s, f.e
                    break
                raws += 1
    if raw_e < 0:
        return None
    spec = _RAW_KINDS.get(buf[ds:de])
    if spec is None:
        return None
    kind, size = spec
    if (raw_e - raw_s) % size:
        return None
    return _raw_sum(data + raw_s, (raw_e - raw_s) // size, kind, size)
