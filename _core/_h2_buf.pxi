# Included by _h2.pyx: the byte buffers of streams and connections, and the clock.

from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.string cimport memcmp, memcpy, memmove
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec


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
