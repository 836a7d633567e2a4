/* GCC/Clang __atomic builtins on words of the shared table's segment, as Cython can call
   them. Sequentially consistent throughout: the table's correctness arguments (the
   remove/release handshake, the wait/release handshake) are store-then-load pairs between
   processes, which need a total order; on x86-64 a seq_cst load is a plain load anyway. */
#ifndef TRITONMESH_ATOMICS_H
#define TRITONMESH_ATOMICS_H
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <time.h>
#include <limits.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <linux/futex.h>

static inline uint64_t tm_load64(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline uint32_t tm_load32(uint32_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline void tm_store64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
static inline void tm_store32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
/* On failure *expected is updated to the current value, as __atomic_compare_exchange_n does. */
static inline int tm_cas64(uint64_t *p, uint64_t *expected, uint64_t desired) {
    return __atomic_compare_exchange_n(p, expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
static inline int tm_cas32(uint32_t *p, uint32_t *expected, uint32_t desired) {
    return __atomic_compare_exchange_n(p, expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
static inline uint32_t tm_add32(uint32_t *p, int32_t v) {
    return __atomic_add_fetch(p, (uint32_t)v, __ATOMIC_SEQ_CST);
}
static inline uint64_t tm_add64(uint64_t *p, uint64_t v) {
    return __atomic_add_fetch(p, v, __ATOMIC_SEQ_CST);
}
static inline double tm_load_f64(uint64_t *p) {
    uint64_t bits = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    double d;
    memcpy(&d, &bits, sizeof d);
    return d;
}
static inline void tm_store_f64(uint64_t *p, double d) {
    uint64_t bits;
    memcpy(&bits, &d, sizeof bits);
    __atomic_store_n(p, bits, __ATOMIC_SEQ_CST);
}

/* A shared (not FUTEX_PRIVATE) futex: the word is in a MAP_SHARED mapping, so waiters
   and wakers in different processes meet on it. Returns 0, or an errno: EAGAIN (the word
   was not `seen` any more), ETIMEDOUT, EINTR. */
static inline int tm_futex_wait(uint32_t *word, uint32_t seen, double timeout) {
    struct timespec ts;
    if (timeout < 0) timeout = 0;
    ts.tv_sec = (time_t)timeout;
    ts.tv_nsec = (long)((timeout - (double)ts.tv_sec) * 1e9);
    if (syscall(SYS_futex, word, FUTEX_WAIT, seen, &ts, NULL, 0) == -1) return errno;
    return 0;
}
static inline void tm_futex_wake_all(uint32_t *word) {
    syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}
#endif
