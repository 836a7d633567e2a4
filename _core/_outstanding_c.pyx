# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: binding=False, always_allow_keywords=False
# Plain method descriptors with METH_NOARGS / METH_O, rather than cyfunctions, are what
# CPython's call specialization fast-paths: 10-25 ns less per pick + release from Python.
"""The outstanding-request table in C: same algorithm, same random numbers, same results
as ``_outstanding_py`` (read its module docstring for the layout), with no Python objects
touched on pick and release.
"""

cimport cython
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.string cimport memset

import os

cdef extern from "debug.h":
    const int TRITONMESH_DEBUG

include "_common.pxi"

cdef struct WeightClass:
    double weight
    int32_t* order      # pickable slots sorted by load (count + external)
    Py_ssize_t n
    Py_ssize_t cap
    int64_t* bstart     # bstart[c]: index of the first slot with load >= c
    Py_ssize_t blen     # logical length, as the twin's list
    Py_ssize_t bcap
    Py_ssize_t refs


@cython.final
cdef class OutstandingTable:
    """Outstanding-request counts per upstream slot, and the picks that read them.

    Lock-free by design: every method runs on the event-loop thread, so no
    operation can interleave with another. State lives in flat C arrays so that a
    shared-memory variant can reuse the layout. Full API docs: _outstanding_c.pyi.
    """

    cdef uint64_t _rng
    # per slot
    cdef int64_t* _count
    cdef int64_t* _ext       # external load (another replica's requests); 0 unless set
    cdef double* _weight
    cdef int32_t* _cls
    cdef uint8_t* _state
    cdef Py_ssize_t* _opos
    cdef Py_ssize_t* _apos
    cdef Py_ssize_t _nslots
    cdef Py_ssize_t _slot_cap
    # dense array of pickable slots
    cdef int32_t* _avail
    cdef Py_ssize_t _navail
    cdef Py_ssize_t _avail_cap
    # weight classes
    cdef WeightClass* _classes
    cdef Py_ssize_t _nclasses
    cdef Py_ssize_t _class_cap
    cdef dict _class_of
    cdef Py_ssize_t _rr
    cdef int64_t _total
    cdef Py_ssize_t _used

    def __cinit__(self, seed=None):
        self._count = NULL
        self._ext = NULL
        self._weight = NULL
        self._cls = NULL
        self._state = NULL
        self._opos = NULL
        self._apos = NULL
        self._avail = NULL
        self._classes = NULL
        self._nslots = self._slot_cap = self._navail = self._avail_cap = 0
        self._nclasses = self._class_cap = 0
        self._class_of = {}

    def __init__(self, seed=None):
        """Create an empty table; ``seed`` (any int) fixes the random tie-breaking."""
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self._rng = splitmix64(<uint64_t>(seed & 0xFFFFFFFFFFFFFFFF))
        if self._rng == 0:
            self._rng = 1
        self._rr = 0
        self._total = 0
        self._used = 0

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self._nclasses):
            PyMem_Free(self._classes[i].order)
            PyMem_Free(self._classes[i].bstart)
        PyMem_Free(self._classes)
        PyMem_Free(self._count)
        PyMem_Free(self._ext)
        PyMem_Free(self._weight)
        PyMem_Free(self._cls)
        PyMem_Free(self._state)
        PyMem_Free(self._opos)
        PyMem_Free(self._apos)
        PyMem_Free(self._avail)

    # -- random numbers (xorshift64*), identical in the Python twin -------------------

    cdef inline uint64_t _next(self) noexcept nogil:
        return xorshift64star(&self._rng)

    cdef inline Py_ssize_t _below(self, Py_ssize_t k) noexcept nogil:
        return <Py_ssize_t>(self._next() % <uint64_t>k)

    cdef inline double _uniform(self) noexcept nogil:
        return <double>(self._next() >> 11) * (1.0 / 9007199254740992.0)

    # -- argument checks ---------------------------------------------------------------

    cdef inline int _slot(self, Py_ssize_t slot) except -1:
        if slot < 0 or slot >= self._nslots or self._state[slot] == FREE:
            raise IndexError(f"slot {slot} is not in the table")
        return 0

    cdef double _check_weight(self, weight) except -1.0:
        cdef double w = float(weight)
        if not w > 0 or w == float("inf"):
            raise ValueError(f"weight must be a positive finite number, got {w!r}")
        return w

    # -- class bucket moves --------------------------------------------------------------

    cdef inline void _swap(self, WeightClass* k, Py_ssize_t i, Py_ssize_t j) noexcept nogil:
        cdef int32_t a = k.order[i]
        cdef int32_t b = k.order[j]
        k.order[i] = b
        k.order[j] = a
        self._opos[a] = j
        self._opos[b] = i

    cdef int _grow_buckets(self, WeightClass* k, int64_t count) except -1:
        cdef Py_ssize_t need = count + 2
        cdef Py_ssize_t i
        if k.blen >= need:
            return 0
        if need > k.bcap:
            k.bstart = <int64_t*>_grow(k.bstart, &k.bcap, need, sizeof(int64_t))
        for i in range(k.blen, need):
            k.bstart[i] = k.n
        k.blen = need
        return 0

    cdef int _class_insert(self, Py_ssize_t slot) except -1:
        cdef WeightClass* k = &self._classes[self._cls[slot]]
        cdef int64_t c = self._count[slot] + self._ext[slot]
        cdef Py_ssize_t p, j, b
        self._grow_buckets(k, c)
        if k.n + 1 > k.cap:
            k.order = <int32_t*>_grow(k.order, &k.cap, k.n + 1, sizeof(int32_t))
        p = k.n
        k.order[p] = <int32_t>slot
        k.n += 1
        self._opos[slot] = p
        b = k.blen - 1
        while b > c:
            j = k.bstart[b]
            if j < p:
                self._swap(k, p, j)
                p = j
            k.bstart[b] += 1
            b -= 1
        return 0

    cdef void _class_remove(self, Py_ssize_t slot) noexcept:
        cdef WeightClass* k = &self._classes[self._cls[slot]]
        cdef int64_t c = self._count[slot] + self._ext[slot]
        cdef Py_ssize_t n = k.n
        cdef Py_ssize_t b, end
        self._swap(k, self._opos[slot], k.bstart[c + 1] - 1)
        for b in range(c + 1, k.blen):
            end = k.bstart[b + 1] if b + 1 < k.blen else n
            self._swap(k, self._opos[slot], end - 1)
            k.bstart[b] -= 1
        k.n -= 1
        self._opos[slot] = -1

    cdef inline int _up(self, Py_ssize_t slot) except -1:
        # One bucket up: the slot's load (count + external) is about to grow by one.
        cdef int64_t c
        cdef WeightClass* k
        if self._opos[slot] >= 0:
            c = self._count[slot] + self._ext[slot]
            k = &self._classes[self._cls[slot]]
            if k.blen < c + 3:
                self._grow_buckets(k, c + 1)
            self._swap(k, self._opos[slot], k.bstart[c + 1] - 1)
            k.bstart[c + 1] -= 1
        return 0

    cdef inline void _down(self, Py_ssize_t slot) noexcept nogil:
        cdef int64_t c
        cdef WeightClass* k
        if self._opos[slot] >= 0:
            c = self._count[slot] + self._ext[slot]
            k = &self._classes[self._cls[slot]]
            self._swap(k, self._opos[slot], k.bstart[c])
            k.bstart[c] += 1

    cdef inline int _bump(self, Py_ssize_t slot) except -1:
        self._up(slot)
        self._count[slot] += 1
        self._total += 1
        return 0

    cdef inline void _drop(self, Py_ssize_t slot) noexcept nogil:
        self._down(slot)
        self._count[slot] -= 1
        self._total -= 1

    cdef int _avail_add(self, Py_ssize_t slot) except -1:
        if self._navail + 1 > self._avail_cap:
            self._avail = <int32_t*>_grow(self._avail, &self._avail_cap, self._navail + 1,
                                          sizeof(int32_t))
        self._apos[slot] = self._navail
        self._avail[self._navail] = <int32_t>slot
        self._navail += 1
        self._class_insert(slot)
        return 0

    cdef void _avail_remove(self, Py_ssize_t slot) noexcept:
        cdef Py_ssize_t i = self._apos[slot]
        cdef int32_t last
        self._navail -= 1
        last = self._avail[self._navail]
        if last != slot:
            self._avail[i] = last
            self._apos[last] = i
        self._apos[slot] = -1
        self._class_remove(slot)

    cdef Py_ssize_t _class_for(self, double weight) except -1:
        cdef object index = self._class_of.get(weight)
        cdef Py_ssize_t i
        cdef WeightClass* k
        if index is None:
            index = -1
            for i in range(self._nclasses):
                if self._classes[i].refs == 0:
                    del self._class_of[self._classes[i].weight]
                    index = i
                    break
            if index == -1:
                if self._nclasses + 1 > self._class_cap:
                    self._classes = <WeightClass*>_grow(
                        self._classes, &self._class_cap, self._nclasses + 1, sizeof(WeightClass))
                index = self._nclasses
                memset(&self._classes[index], 0, sizeof(WeightClass))
                self._nclasses += 1
            k = &self._classes[<Py_ssize_t>index]
            # A reused class is empty: keep its buffers, reset its layout.
            k.weight = weight
            k.n = 0
            k.refs = 0
            k.blen = 0
            self._grow_buckets(k, 0)
            self._class_of[weight] = index
        self._classes[<Py_ssize_t>index].refs += 1
        return <Py_ssize_t>index

    cdef int _debug_check(self) except -1:
        if TRITONMESH_DEBUG:
            self.check()
        return 0

    # -- membership ------------------------------------------------------------------

    cpdef Py_ssize_t add(self, weight=1.0) except -1:
        """Add a pickable slot with no outstanding requests; returns its id.

        Ids of removed slots are reused (lowest first) once their count is zero.
        """
        cdef double w = self._check_weight(weight)
        cdef Py_ssize_t slot
        cdef Py_ssize_t cap
        for slot in range(self._nslots):
            if self._state[slot] == FREE:
                break
        else:
            slot = self._nslots
            if slot + 1 > self._slot_cap:
                cap = self._slot_cap
                self._count = <int64_t*>_grow(self._count, &cap, slot + 1, sizeof(int64_t))
                cap = self._slot_cap
                self._ext = <int64_t*>_grow(self._ext, &cap, slot + 1, sizeof(int64_t))
                cap = self._slot_cap
                self._weight = <double*>_grow(self._weight, &cap, slot + 1, sizeof(double))
                cap = self._slot_cap
                self._cls = <int32_t*>_grow(self._cls, &cap, slot + 1, sizeof(int32_t))
                cap = self._slot_cap
                self._state = <uint8_t*>_grow(self._state, &cap, slot + 1, sizeof(uint8_t))
                cap = self._slot_cap
                self._opos = <Py_ssize_t*>_grow(self._opos, &cap, slot + 1, sizeof(Py_ssize_t))
                cap = self._slot_cap
                self._apos = <Py_ssize_t*>_grow(self._apos, &cap, slot + 1, sizeof(Py_ssize_t))
                self._slot_cap = cap
            self._state[slot] = FREE
            self._opos[slot] = -1
            self._apos[slot] = -1
            self._nslots += 1
        self._count[slot] = 0
        self._ext[slot] = 0
        self._weight[slot] = w
        self._cls[slot] = <int32_t>self._class_for(w)
        self._state[slot] = ACTIVE
        self._used += 1
        self._avail_add(slot)
        self._debug_check()
        return slot

    cdef void _free(self, Py_ssize_t slot) noexcept:
        self._classes[self._cls[slot]].refs -= 1
        self._cls[slot] = -1
        self._state[slot] = FREE
        self._used -= 1

    # Mutators are `void ... except *` so that Python callers get None, as from the twin.

    cpdef void remove(self, Py_ssize_t slot) except *:
        """Never pick this slot again; its id is reused only after its last release."""
        self._slot(slot)
        if self._state[slot] == REMOVED:
            return
        if self._state[slot] == ACTIVE:
            self._avail_remove(slot)
        self._state[slot] = REMOVED
        if self._count[slot] == 0:
            self._free(slot)
        self._debug_check()

    cpdef void set_weight(self, Py_ssize_t slot, weight) except *:
        """Change a slot's weight (relative capacity); its count is kept."""
        self._slot(slot)
        cdef double w = self._check_weight(weight)
        cdef bint active = self._state[slot] == ACTIVE
        if active:
            self._avail_remove(slot)
        self._classes[self._cls[slot]].refs -= 1
        self._weight[slot] = w
        self._cls[slot] = <int32_t>self._class_for(w)
        if active:
            self._avail_add(slot)
        self._debug_check()

    cpdef double weight(self, Py_ssize_t slot) except -1.0:
        """The slot's weight."""
        self._slot(slot)
        return self._weight[slot]

    cpdef void set_available(self, Py_ssize_t slot, bint available) except *:
        """Take a slot out of the pick set (draining, unhealthy) or put it back."""
        self._slot(slot)
        cdef uint8_t state = self._state[slot]
        if state == REMOVED:
            raise ValueError(f"slot {slot} was removed")
        if available and state == UNAVAILABLE:
            self._state[slot] = ACTIVE
            self._avail_add(slot)
        elif not available and state == ACTIVE:
            self._state[slot] = UNAVAILABLE
            self._avail_remove(slot)
        self._debug_check()

    cpdef bint is_available(self, Py_ssize_t slot) except -1:
        """Whether the slot can be picked."""
        self._slot(slot)
        return self._state[slot] == ACTIVE

    cpdef void set_external(self, Py_ssize_t slot, double load) except *:
        """Set the slot's external load (rounded to the nearest integer); picks compare
        outstanding + external."""
        self._slot(slot)
        if not (0.0 <= load <= _MAX_EXTERNAL):
            raise ValueError(f"external load must be a number in [0, {_MAX_EXTERNAL}], "
                             f"got {load!r}")
        cdef int64_t target = <int64_t>(load + 0.5)
        self._grow_buckets(&self._classes[self._cls[slot]], self._count[slot] + target)
        while self._ext[slot] < target:
            self._up(slot)
            self._ext[slot] += 1
        while self._ext[slot] > target:
            self._down(slot)
            self._ext[slot] -= 1
        self._debug_check()

    cpdef int64_t external(self, Py_ssize_t slot) except -1:
        """The slot's external load, as last set (0 unless set)."""
        self._slot(slot)
        return self._ext[slot]

    # -- picks -------------------------------------------------------------------------

    cpdef Py_ssize_t pick(self) except -2:
        """LEAST_OUTSTANDING_REQUESTS: the slot with the lowest (load + 1) / weight, the
        load being count + external.

        Ties are broken uniformly at random over every tied slot. Counts the pick as
        outstanding. Returns -1 when no slot can be picked.
        """
        cdef WeightClass* best = NULL
        cdef WeightClass* k
        cdef int64_t best_min = 0, m
        cdef Py_ssize_t tied = 0, ties, i, slot, first
        cdef double lhs, rhs
        for i in range(self._nclasses):
            k = &self._classes[i]
            if k.n == 0:
                continue
            first = k.order[0]
            m = self._count[first] + self._ext[first]
            if best == NULL:
                best = k
                best_min = m
                tied = k.bstart[m + 1]
                continue
            lhs = (m + 1) * best.weight
            rhs = (best_min + 1) * k.weight
            if lhs < rhs:
                best = k
                best_min = m
                tied = k.bstart[m + 1]
            elif lhs == rhs:
                ties = k.bstart[m + 1]
                tied += ties
                if self._below(tied) < ties:
                    best = k
                    best_min = m
        if best == NULL:
            return -1
        slot = best.order[self._below(best.bstart[best_min + 1])]
        self._bump(slot)
        if TRITONMESH_DEBUG:
            self.check()
        return slot

    cpdef Py_ssize_t pick_under(self, int64_t limit) except -2:
        """LOR among the pickable slots under ``limit`` (local counts); -1 if none."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        cdef Py_ssize_t i, slot, best = -1, ties = 0
        cdef int64_t count
        cdef double load, weight, best_load = 0.0, best_weight = 1.0
        for i in range(self._navail):
            slot = self._avail[i]
            count = self._count[slot]
            if count >= limit:
                continue
            load = <double>(count + self._ext[slot] + 1)
            weight = self._weight[slot]
            if best < 0 or load * best_weight < best_load * weight:
                best = slot
                best_load = load
                best_weight = weight
                ties = 1
            elif load * best_weight == best_load * weight:
                ties += 1
                if self._below(ties) == 0:
                    best = slot
        if best >= 0:
            self._bump(best)
            if TRITONMESH_DEBUG:
                self.check()
        return best

    cpdef Py_ssize_t pick_random(self) except -2:
        """RANDOM (SageMaker's default): probability proportional to weight; -1 if none."""
        cdef double total = 0.0, r
        cdef Py_ssize_t i, slot
        cdef WeightClass* k
        cdef WeightClass* chosen = NULL
        for i in range(self._nclasses):
            total += self._classes[i].weight * self._classes[i].n
        if total == 0.0:
            return -1
        r = self._uniform() * total
        for i in range(self._nclasses):
            k = &self._classes[i]
            if k.n == 0:
                continue
            chosen = k
            r -= k.weight * k.n
            if r < 0.0:
                break
        slot = chosen.order[self._below(chosen.n)]
        self._bump(slot)
        if TRITONMESH_DEBUG:
            self.check()
        return slot

    cpdef Py_ssize_t pick_round_robin(self) except -2:
        """ROUND_ROBIN over the pickable slots (weights are not applied); -1 if none."""
        cdef Py_ssize_t slot
        if self._navail == 0:
            return -1
        self._rr = (self._rr + 1) % self._navail
        slot = self._avail[self._rr]
        self._bump(slot)
        if TRITONMESH_DEBUG:
            self.check()
        return slot

    cpdef Py_ssize_t pick_two(self) except -2:
        """POWER_OF_TWO_CHOICES: the less loaded of two distinct uniform samples; -1 if none."""
        cdef Py_ssize_t n = self._navail, i, j, a, b, slot
        cdef double lhs, rhs
        if n == 0:
            return -1
        if n == 1:
            slot = self._avail[0]
        else:
            i = self._below(n)
            j = self._below(n - 1)
            if j >= i:
                j += 1
            a = self._avail[i]
            b = self._avail[j]
            lhs = (self._count[a] + self._ext[a] + 1) * self._weight[b]
            rhs = (self._count[b] + self._ext[b] + 1) * self._weight[a]
            if lhs < rhs:
                slot = a
            elif rhs < lhs:
                slot = b
            else:
                slot = a if self._next() & 1 else b
        self._bump(slot)
        if TRITONMESH_DEBUG:
            self.check()
        return slot

    # -- accounting --------------------------------------------------------------------

    cpdef void acquire(self, Py_ssize_t slot) except *:
        """Count one more request on a slot chosen by the caller (a pinned sequence)."""
        self._slot(slot)
        if self._state[slot] == REMOVED:
            raise ValueError(f"slot {slot} was removed")
        self._bump(slot)
        self._debug_check()

    cpdef void release(self, Py_ssize_t slot) except *:
        """One request on the slot ended; ValueError if it had none outstanding."""
        if slot < 0 or slot >= self._nslots or self._state[slot] == FREE:
            raise IndexError(f"slot {slot} is not in the table")
        if self._count[slot] == 0:
            raise ValueError(f"release of slot {slot} with no outstanding requests")
        self._drop(slot)
        if self._state[slot] == REMOVED and self._count[slot] == 0:
            self._free(slot)
        if TRITONMESH_DEBUG:
            self.check()

    cpdef int64_t outstanding(self, Py_ssize_t slot) except -1:
        """The slot's outstanding count."""
        self._slot(slot)
        return self._count[slot]

    cpdef int64_t total_outstanding(self):
        """The sum of every slot's outstanding count."""
        return self._total

    cpdef Py_ssize_t pickable(self):
        """The number of slots that can be picked."""
        return self._navail

    def __len__(self):
        """Slots in the table: pickable, unavailable, or removed but still outstanding."""
        return self._used

    def snapshot(self):
        """(slot, outstanding, weight, state) for every slot in use, by slot id."""
        return [
            (slot, self._count[slot], self._weight[slot], STATE_NAMES[self._state[slot]])
            for slot in range(self._nslots) if self._state[slot] != FREE
        ]

    def check(self):
        """Verify every invariant; raises AssertionError naming the first one broken."""
        cdef Py_ssize_t slot, i, c, n
        cdef int64_t total = 0
        cdef Py_ssize_t active = 0
        cdef WeightClass* k
        for slot in range(self._nslots):
            state = self._state[slot]
            if state == FREE:
                continue
            cnt = self._count[slot]
            assert cnt >= 0, f"slot {slot} count {cnt} < 0"
            assert 0 <= self._ext[slot] <= _MAX_EXTERNAL, f"slot {slot} external out of range"
            total += cnt
            assert (self._opos[slot] >= 0) == (state == ACTIVE), \
                f"slot {slot} order membership vs state"
            assert (self._apos[slot] >= 0) == (state == ACTIVE), f"slot {slot} avail vs state"
            if state == ACTIVE:
                active += 1
                assert self._avail[self._apos[slot]] == slot, f"slot {slot} apos broken"
                k = &self._classes[self._cls[slot]]
                assert k.order[self._opos[slot]] == slot, f"slot {slot} opos broken"
                assert k.weight == self._weight[slot], f"slot {slot} in the wrong class"
            if state == REMOVED:
                assert cnt > 0, f"removed slot {slot} with no requests should be free"
        assert total == self._total, f"sum of counts {total} != total {self._total}"
        assert active == self._navail, "avail size"
        refs = [0] * self._nclasses
        for slot in range(self._nslots):
            if self._state[slot] != FREE:
                refs[self._cls[slot]] += 1
        for i in range(self._nclasses):
            k = &self._classes[i]
            assert k.refs == refs[i], f"class {i} refs {k.refs} != {refs[i]}"
            n = k.n
            counts = [self._count[k.order[j]] + self._ext[k.order[j]] for j in range(n)]
            assert counts == sorted(counts), f"class {i} order not sorted by load: {counts}"
            assert k.blen >= (max(counts) + 2 if counts else 2), f"class {i} bstart short"
            for c in range(k.blen):
                want = sum(1 for x in counts if x < c)
                assert k.bstart[c] == want, \
                    f"class {i} bstart[{c}] = {k.bstart[c]}, expected {want} (n={n})"


def _bench_pick_release(OutstandingTable table, Py_ssize_t rounds, int strategy=0):
    """Time-free loop for benchmarks: ``rounds`` pick+release pairs, entirely in C."""
    cdef Py_ssize_t _, slot
    for _ in range(rounds):
        if strategy == 0:
            slot = table.pick()
        elif strategy == 1:
            slot = table.pick_random()
        else:
            slot = table.pick_two()
        table.release(slot)
