/* GCC/Clang __atomic builtins on words of the shared table's segment, as Cython can call
   them. Sequentially consistent but for one release store (a ledger cell's owner step):
   the table's correctness arguments (the remove/release handshake, the wait/release
   handshake) are store-then-load pairs between processes, which need a total order; on
   x86-64 a seq_cst load is a plain load anyway. */
#ifndef TRITONMESH_ATOMICS_H
#define TRITONMESH_ATOMICS_H
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <time.h>
#include <limits.h>
#include <unistd.h>
#include <sys/types.h>
#include <sys/syscall.h>
#include <linux/futex.h>

static inline uint64_t tm_load64(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline uint32_t tm_load32(uint32_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline void tm_store64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
/* A ledger cell's owner step (_shared_ledger.pxi: no read-modify-write needed there); on
   x86-64 a plain store where a seq_cst one is an xchg. */
static inline void tm_store64_release(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
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
static inline void tm_or64(uint64_t *p, uint64_t v) { __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
static inline void tm_and64(uint64_t *p, uint64_t v) { __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }

/* The pick index's rows. One pass over a row keeps a snapshot of it, snap[w] = row[w] &
   ~mask[w], and cum[w] = the set bits of snap[0..w]; returns the total. The build targets
   baseline x86-64, where __builtin_popcountll is a library call; target_clones adds a
   POPCNT copy, chosen once at load time (an ifunc). Elsewhere the compiler's own popcount
   stands. */
#if defined(__x86_64__) && defined(__GNUC__)
#define TM_POPCNT_CLONES __attribute__((target_clones("popcnt", "default")))
#else
#define TM_POPCNT_CLONES
#endif
TM_POPCNT_CLONES
static uint64_t tm_row_snapshot(uint64_t *row, const uint64_t *mask, ssize_t words,
                                uint64_t *snap, uint32_t *cum) {
    uint64_t total = 0;
    for (ssize_t w = 0; w < words; w++) {
        uint64_t x = __atomic_load_n(row + w, __ATOMIC_SEQ_CST) & ~mask[w];
        snap[w] = x;
        total += (uint64_t)__builtin_popcountll(x);
        cum[w] = (uint32_t)total;
    }
    return total;
}
/* The position of the r-th (from 0) set bit of a snapshot of `words` words, r below its
   total. No branch on r: where it falls is random, and each mispredicted branch costs more
   than the arithmetic. The word: cum is nondecreasing, so the words whose cum is <= r are
   the ones before it (a count the compiler vectorises); then halvings inside the word. */
TM_POPCNT_CLONES
static ssize_t tm_snap_select(const uint64_t *snap, const uint32_t *cum, ssize_t words,
                              uint64_t r) {
    ssize_t w = 0, base;
    uint64_t x, h, m;
    uint32_t r32 = (uint32_t)r;  /* r < 2**20 slots: 32-bit lanes, four to a vector */
    for (ssize_t i = 0; i < words; i++) w += cum[i] <= r32;
    if (w) r -= cum[w - 1];
    x = snap[w];
    base = w << 6;
    for (int half = 32; half; half >>= 1) {
        h = (uint64_t)__builtin_popcountll(x & ((1ULL << half) - 1));
        m = -(uint64_t)(r >= h);
        r -= h & m;
        x >>= half & m;
        base += (ssize_t)(half & m);
    }
    return base;
}
/* The set bits of a row's first word that has any (masked); 0: the row has none. */
TM_POPCNT_CLONES
static uint64_t tm_row_first(uint64_t *row, const uint64_t *mask, ssize_t words) {
    for (ssize_t w = 0; w < words; w++) {
        uint64_t x = __atomic_load_n(row + w, __ATOMIC_SEQ_CST) & ~mask[w];
        if (x) return (uint64_t)__builtin_popcountll(x);
    }
    return 0;
}
/* How many set bits of a snapshot come before position s. */
TM_POPCNT_CLONES
static uint64_t tm_snap_rank(const uint64_t *snap, const uint32_t *cum, ssize_t s) {
    ssize_t w = s >> 6;
    return (w ? cum[w - 1] : 0) +
        (uint64_t)__builtin_popcountll(snap[w] & ((1ULL << (s & 63)) - 1));
}
/* Weight classes (_shared_weights.pxi): class c's slots less the skip set are the bitmap
   cls + c * words, at most TM_CLASSES classes (no odd slot is in one, so the row needs no
   other mask). One pass over a row returns which classes have a slot in it (bit c: class
   c). */
#define TM_CLASSES 4
static inline uint32_t tm_row_classes(uint64_t *row, const uint64_t *restrict cls, int nclass,
                                      ssize_t words) {
    /* Two classes (weighted variants: the common case) read two bitmaps; more read all
       TM_CLASSES, unrolled (the unused ones are allocated and clear): a loop over the
       classes inside the loop over the words would keep the compiler from hoisting them. */
    uint64_t any0 = 0, any1 = 0, any2 = 0, any3 = 0;
    const uint64_t *k1 = cls + words, *k2 = cls + 2 * words, *k3 = cls + 3 * words;
    if (nclass == 2) {
        for (ssize_t w = 0; w < words; w++) {
            uint64_t x = __atomic_load_n(row + w, __ATOMIC_SEQ_CST);
            any0 |= x & cls[w];
            any1 |= x & k1[w];
        }
        return (uint32_t)(any0 != 0) | (uint32_t)(any1 != 0) << 1;
    }
    for (ssize_t w = 0; w < words; w++) {
        uint64_t x = __atomic_load_n(row + w, __ATOMIC_SEQ_CST);
        any0 |= x & cls[w];
        any1 |= x & k1[w];
        any2 |= x & k2[w];
        any3 |= x & k3[w];
    }
    return ((uint32_t)(any0 != 0) | (uint32_t)(any1 != 0) << 1 |
            (uint32_t)(any2 != 0) << 2 | (uint32_t)(any3 != 0) << 3) & ((1u << nclass) - 1);
}
/* The snapshot of the tied classes' slots (bit c of `tied`: class c, whose level's row is
   index + at[c] * stride), with its running counts as tm_row_snapshot's; returns the total. */
TM_POPCNT_CLONES
static uint64_t tm_classes_snapshot(uint64_t *index, ssize_t stride,
                                    const uint64_t *restrict cls, const uint32_t *at,
                                    uint32_t tied, int nclass, ssize_t words,
                                    uint64_t *restrict snap, uint32_t *restrict cum) {
    /* Each tied class's row and bitmap first (one class tied alone is named twice: ORed
       with itself it is the same), then one loop over the words, unrolled for two. */
    uint64_t *r[TM_CLASSES];
    const uint64_t *k[TM_CLASSES];
    int m = 0;
    uint64_t total = 0;
    for (int c = 0; c < nclass; c++) {
        if (tied >> c & 1) {
            r[m] = index + (ssize_t)at[c] * stride;
            k[m] = cls + (ssize_t)c * words;
            m++;
        }
    }
    if (m == 1) {
        r[1] = r[0];
        k[1] = k[0];
    }
    for (ssize_t w = 0; w < words; w++) {
        uint64_t x = (__atomic_load_n(r[0] + w, __ATOMIC_SEQ_CST) & k[0][w]) |
            (__atomic_load_n(r[1] + w, __ATOMIC_SEQ_CST) & k[1][w]);
        for (int j = 2; j < m; j++) x |= __atomic_load_n(r[j] + w, __ATOMIC_SEQ_CST) & k[j][w];
        snap[w] = x;
        total += (uint64_t)__builtin_popcountll(x);
        cum[w] = (uint32_t)total;
    }
    return total;
}
/* The tied classes' slots (as tm_classes_snapshot) in word w of their rows. */
static inline uint64_t tm_classes_word(uint64_t *index, ssize_t stride, const uint64_t *cls,
                                       const uint32_t *at, uint32_t tied, int nclass,
                                       ssize_t words, ssize_t w) {
    uint64_t x = 0;
    for (int c = 0; c < nclass; c++)
        if (tied >> c & 1)
            x |= __atomic_load_n(index + (ssize_t)at[c] * stride + w, __ATOMIC_SEQ_CST) &
                cls[(ssize_t)c * words + w];
    return x;
}
/* The set bits of the first word of the tied classes' slots that has any; 0: none. */
TM_POPCNT_CLONES
static uint64_t tm_classes_first(uint64_t *index, ssize_t stride, const uint64_t *cls,
                                 const uint32_t *at, uint32_t tied, int nclass, ssize_t words) {
    for (ssize_t w = 0; w < words; w++) {
        uint64_t x = tm_classes_word(index, stride, cls, at, tied, nclass, words, w);
        if (x) return (uint64_t)__builtin_popcountll(x);
    }
    return 0;
}
/* The lowest set bit of v (not 0). */
static inline int tm_lowest64(uint64_t v) { return __builtin_ctzll(v); }

/* A draw in [0, k) from 64 random bits: the high word of x * k (one multiplication where
   x % k is a 64-bit division); the twin computes the same. */
static inline uint64_t tm_below(uint64_t x, uint64_t k) {
    return (uint64_t)(((unsigned __int128)x * k) >> 64);
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
