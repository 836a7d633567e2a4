# Shared by the compiled tables (textual include): slot states, seeding, the random
# number generator and array growth. The pure-Python twins hold the same in
# _outstanding_py.py; both must give the same numbers.
from cpython.mem cimport PyMem_Realloc
from libc.stdint cimport uint64_t

cdef enum:
    FREE = 0
    ACTIVE = 1
    UNAVAILABLE = 2
    REMOVED = 3

STATE_NAMES = ("FREE", "ACTIVE", "UNAVAILABLE", "REMOVED")

cdef enum:
    _MAX_EXTERNAL = 65536  # the largest external load a slot takes (the twin's MAX_EXTERNAL)

MAX_EXTERNAL = _MAX_EXTERNAL


cdef inline uint64_t splitmix64(uint64_t x) noexcept nogil:
    x += <uint64_t>0x9E3779B97F4A7C15
    x = (x ^ (x >> 30)) * <uint64_t>0xBF58476D1CE4E5B9
    x = (x ^ (x >> 27)) * <uint64_t>0x94D049BB133111EB
    return x ^ (x >> 31)


cdef inline uint64_t xorshift64star(uint64_t* state) noexcept nogil:
    cdef uint64_t x = state[0]
    x ^= x >> 12
    x ^= x << 25
    x ^= x >> 27
    state[0] = x
    return x * <uint64_t>0x2545F4914F6CDD1D


cdef void* _grow(void* ptr, Py_ssize_t* cap, Py_ssize_t need, size_t item) except NULL:
    cdef Py_ssize_t new_cap = cap[0] if cap[0] > 0 else 4
    cdef void* out
    while new_cap < need:
        new_cap *= 2
    out = PyMem_Realloc(ptr, new_cap * item)
    if out == NULL:
        raise MemoryError()
    cap[0] = new_cap
    return out
