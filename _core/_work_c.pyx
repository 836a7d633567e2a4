# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: binding=False
"""The outstanding-work table in C: same algorithm, same arithmetic in the same order, same
random numbers and so the same picks as ``_work_py`` (read its module docstring for the
model). Full API docs: _work_c.pyi.
"""

cimport cython
from cpython.mem cimport PyMem_Free
from libc.math cimport exp, isfinite, log, sqrt
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t

import os

cdef extern from "debug.h":
    const int TRITONMESH_DEBUG

include "_common.pxi"

cdef enum:
    _SERVICE_MIN = 8  # samples before a slot's service-time line is trusted (as the twin)

SERVICE_MIN_SAMPLES = _SERVICE_MIN


@cython.final
cdef class WorkTable:
    """Outstanding requests and work per upstream slot, a learned speed per slot, and the
    LEAST_OUTSTANDING_WORK pick that reads them.

    Lock-free by design: every method runs on the event-loop thread, so no operation can
    interleave with another. State lives in flat C arrays so that a shared-memory variant
    can reuse the layout.
    """

    cdef uint64_t _rng
    cdef double _decay
    cdef double _keep        # 1 - service_alpha
    # per slot
    cdef int64_t* _count
    cdef double* _work
    cdef double* _ext        # external requests, as set
    cdef double* _xwork      # external requests x mean cost
    cdef double* _mcost      # mean cost of the requests in flight, last seen
    cdef double* _estimate   # seconds per unit of work; 0.0 = no sample yet
    cdef double* _last       # time of the last sample
    cdef double* _weight
    # the service-time line's sums: weight, cost, seconds, cost², cost * seconds; samples
    cdef double* _ln
    cdef double* _lx
    cdef double* _ly
    cdef double* _lxx
    cdef double* _lxy
    cdef int64_t* _lsamples
    cdef uint8_t* _state
    cdef Py_ssize_t* _apos
    cdef Py_ssize_t _nslots
    cdef Py_ssize_t _slot_cap
    # dense array of pickable slots
    cdef int32_t* _avail
    cdef Py_ssize_t _navail
    cdef Py_ssize_t _avail_cap
    cdef int64_t _total
    cdef Py_ssize_t _used
    # hint quality, over the whole table (as the twin): weighted sums of log residuals and
    # log seconds (weight, r, r², s, s²), samples, the quality; the costs picked (weight, sum)
    cdef double _qn, _qr, _qrr, _qs, _qss
    cdef int64_t _qsamples
    cdef double _quality
    cdef double _cn, _csum

    def __cinit__(self, seed=None, decay_s=10.0, service_alpha=0.02):
        self._count = NULL
        self._work = NULL
        self._ext = self._xwork = self._mcost = NULL
        self._estimate = NULL
        self._last = NULL
        self._weight = NULL
        self._ln = self._lx = self._ly = self._lxx = self._lxy = NULL
        self._lsamples = NULL
        self._state = NULL
        self._apos = NULL
        self._avail = NULL
        self._nslots = self._slot_cap = self._navail = self._avail_cap = 0
        self._qn = self._qr = self._qrr = self._qs = self._qss = 0.0
        self._qsamples = 0
        self._quality = 1.0
        self._cn = self._csum = 0.0

    def __init__(self, seed=None, decay_s=10.0, service_alpha=0.02):
        """Create an empty table; ``seed`` fixes the tie-breaking, ``decay_s`` how fast
        the estimate forgets a slow sample, ``service_alpha`` the weight of a new sample
        in the service-time line."""
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self._decay = _positive(decay_s, "decay_s")
        cdef double alpha = float(service_alpha)
        if not (0.0 < alpha <= 1.0):
            raise ValueError(f"service_alpha must be in (0, 1], got {service_alpha!r}")
        self._keep = 1.0 - alpha
        self._rng = splitmix64(<uint64_t>(seed & 0xFFFFFFFFFFFFFFFF))
        if self._rng == 0:
            self._rng = 1
        self._total = 0
        self._used = 0

    def __dealloc__(self):
        PyMem_Free(self._count)
        PyMem_Free(self._work)
        PyMem_Free(self._ext)
        PyMem_Free(self._xwork)
        PyMem_Free(self._mcost)
        PyMem_Free(self._estimate)
        PyMem_Free(self._last)
        PyMem_Free(self._weight)
        PyMem_Free(self._ln)
        PyMem_Free(self._lx)
        PyMem_Free(self._ly)
        PyMem_Free(self._lxx)
        PyMem_Free(self._lxy)
        PyMem_Free(self._lsamples)
        PyMem_Free(self._state)
        PyMem_Free(self._apos)
        PyMem_Free(self._avail)

    cdef inline Py_ssize_t _below(self, Py_ssize_t k) noexcept nogil:
        return <Py_ssize_t>(xorshift64star(&self._rng) % <uint64_t>k)

    cdef inline int _slot(self, Py_ssize_t slot) except -1:
        if slot < 0 or slot >= self._nslots or self._state[slot] == FREE:
            raise IndexError(f"slot {slot} is not in the table")
        return 0

    cdef inline void _debug_check(self):
        if TRITONMESH_DEBUG:
            self.check()

    # -- the dense array of pickable slots ---------------------------------------------

    cdef int _avail_add(self, Py_ssize_t slot) except -1:
        if self._navail == self._avail_cap:
            self._avail = <int32_t*>_grow(self._avail, &self._avail_cap, self._navail + 1,
                                          sizeof(int32_t))
        self._apos[slot] = self._navail
        self._avail[self._navail] = <int32_t>slot
        self._navail += 1
        return 0

    cdef void _avail_remove(self, Py_ssize_t slot) noexcept nogil:
        cdef Py_ssize_t i = self._apos[slot]
        cdef int32_t last
        self._navail -= 1
        last = self._avail[self._navail]
        if last != slot:
            self._avail[i] = last
            self._apos[last] = i
        self._apos[slot] = -1

    # -- membership ------------------------------------------------------------------

    cpdef Py_ssize_t add(self, weight=1.0) except -1:
        """Add a pickable slot with nothing outstanding and no estimate; return its id."""
        cdef double w = _positive(weight, "weight")
        cdef Py_ssize_t slot = -1, i, cap
        for i in range(self._nslots):
            if self._state[i] == FREE:
                slot = i
                break
        if slot < 0:
            slot = self._nslots
            if slot >= self._slot_cap:
                cap = self._slot_cap
                self._count = <int64_t*>_grow(self._count, &cap, slot + 1, sizeof(int64_t))
                cap = self._slot_cap
                self._work = <double*>_grow(self._work, &cap, slot + 1, sizeof(double))
                cap = self._slot_cap
                self._ext = <double*>_grow(self._ext, &cap, slot + 1, sizeof(double))
                cap = self._slot_cap
                self._xwork = <double*>_grow(self._xwork, &cap, slot + 1, sizeof(double))
                cap = self._slot_cap
                self._mcost = <double*>_grow(self._mcost, &cap, slot + 1, sizeof(double))
                cap = self._slot_cap
                self._estimate = <double*>_grow(self._estimate, &cap, slot + 1, sizeof(double))
                cap = self._slot_cap
                self._last = <double*>_grow(self._last, &cap, slot + 1, sizeof(double))
                cap = self._slot_cap
                self._weight = <double*>_grow(self._weight, &cap, slot + 1, sizeof(double))
                cap = self._slot_cap
                self._ln = <double*>_grow(self._ln, &cap, slot + 1, sizeof(double))
                cap = self._slot_cap
                self._lx = <double*>_grow(self._lx, &cap, slot + 1, sizeof(double))
                cap = self._slot_cap
                self._ly = <double*>_grow(self._ly, &cap, slot + 1, sizeof(double))
                cap = self._slot_cap
                self._lxx = <double*>_grow(self._lxx, &cap, slot + 1, sizeof(double))
                cap = self._slot_cap
                self._lxy = <double*>_grow(self._lxy, &cap, slot + 1, sizeof(double))
                cap = self._slot_cap
                self._lsamples = <int64_t*>_grow(self._lsamples, &cap, slot + 1,
                                                 sizeof(int64_t))
                cap = self._slot_cap
                self._state = <uint8_t*>_grow(self._state, &cap, slot + 1, sizeof(uint8_t))
                cap = self._slot_cap
                self._apos = <Py_ssize_t*>_grow(self._apos, &cap, slot + 1, sizeof(Py_ssize_t))
                self._slot_cap = cap
            self._state[slot] = FREE
            self._apos[slot] = -1
            self._nslots += 1
        self._count[slot] = 0
        self._work[slot] = 0.0
        self._ext[slot] = 0.0
        self._xwork[slot] = 0.0
        self._mcost[slot] = 1.0
        self._estimate[slot] = 0.0
        self._last[slot] = 0.0
        self._ln[slot] = 0.0
        self._lx[slot] = 0.0
        self._ly[slot] = 0.0
        self._lxx[slot] = 0.0
        self._lxy[slot] = 0.0
        self._lsamples[slot] = 0
        self._weight[slot] = w
        self._state[slot] = ACTIVE
        self._used += 1
        self._avail_add(slot)
        self._debug_check()
        return slot

    cpdef void remove(self, Py_ssize_t slot) except *:
        """Never pick this slot again; its id is reused only after its last release."""
        self._slot(slot)
        if self._state[slot] == REMOVED:
            return
        if self._state[slot] == ACTIVE:
            self._avail_remove(slot)
        self._state[slot] = REMOVED
        if self._count[slot] == 0:
            self._state[slot] = FREE
            self._used -= 1
        self._debug_check()

    cpdef void set_weight(self, Py_ssize_t slot, weight) except *:
        """Change the slot's weight (relative capacity)."""
        self._slot(slot)
        self._weight[slot] = _positive(weight, "weight")

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
        """Set the slot's external load in requests; the pick counts them as load x the
        mean cost of this table's requests there."""
        self._slot(slot)
        if not (0.0 <= load <= _MAX_EXTERNAL):
            raise ValueError(f"external load must be a number in [0, {_MAX_EXTERNAL}], "
                             f"got {load!r}")
        if self._count[slot] > 0:
            self._mcost[slot] = self._work[slot] / self._count[slot]
        self._ext[slot] = load
        self._xwork[slot] = load * self._mcost[slot]
        self._debug_check()

    cpdef double external(self, Py_ssize_t slot) except -1.0:
        """The slot's external load in requests, as last set (0.0 unless set)."""
        self._slot(slot)
        return self._ext[slot]

    cpdef double external_work(self, Py_ssize_t slot) except -1.0:
        """The slot's external load in units of work, as the pick counts it."""
        self._slot(slot)
        return self._xwork[slot]

    # -- the pick ----------------------------------------------------------------------

    cpdef Py_ssize_t pick(self, double cost=1.0, Py_ssize_t limit=0) except -2:
        """The pickable slot with the lowest (work + external work + cost) * estimate /
        weight (limit: on the local count); -1 if none."""
        _check_cost(cost)
        cdef Py_ssize_t i, slot, best = -1, ties = 0, n = self._navail, n_known = 0
        cdef double known = 0.0, default, e, score, best_score = float("inf"), work
        cdef double q = self._quality, cmean = 0.0, csum
        for i in range(n):
            e = self._estimate[self._avail[i]]
            if e > 0.0:
                known += e
                n_known += 1
        default = known / n_known if n_known else 1.0
        if q < 1.0 and self._cn > 0.0:
            cmean = self._csum / self._cn
        for i in range(n):
            slot = self._avail[i]
            if limit > 0 and self._count[slot] >= limit:
                continue
            e = self._estimate[slot]
            work = self._work[slot] + cost
            if q < 1.0:  # the hint says less than it seems: toward outstanding x mean cost
                work = q * work + (1.0 - q) * <double>(self._count[slot] + 1) * cmean
            score = (work + self._xwork[slot]) * (e if e > 0.0 else default) \
                / self._weight[slot]
            if score < best_score:
                best = slot
                best_score = score
                ties = 1
            elif score == best_score:
                ties += 1
                if self._below(ties) == 0:
                    best = slot
        if best >= 0:
            self._count[best] += 1
            self._work[best] += cost
            self._total += 1
            csum = self._csum * self._keep + cost
            if isfinite(csum):  # an absurd cost must not make the mean infinite for good
                self._cn = self._cn * self._keep + 1.0
                self._csum = csum
            self._debug_check()
        return best

    # -- accounting --------------------------------------------------------------------

    cpdef void acquire(self, Py_ssize_t slot, double cost=1.0) except *:
        """Count a request on a slot the caller chose (a pinned sequence)."""
        self._slot(slot)
        _check_cost(cost)
        if self._state[slot] == REMOVED:
            raise ValueError(f"slot {slot} was removed")
        self._count[slot] += 1
        self._work[slot] += cost
        self._total += 1
        self._debug_check()

    cpdef void release(self, Py_ssize_t slot, double cost=1.0) except *:
        """A request of ``cost`` on the slot ended; ValueError if it had none outstanding."""
        cdef double left
        self._slot(slot)
        _check_cost(cost)
        if self._count[slot] == 0:
            raise ValueError(f"release of slot {slot} with no outstanding requests")
        self._count[slot] -= 1
        self._total -= 1
        if self._count[slot] == 0:
            self._work[slot] = 0.0
            if self._state[slot] == REMOVED:
                self._state[slot] = FREE
                self._used -= 1
        else:
            left = self._work[slot] - cost
            self._work[slot] = left if left > 0.0 else 0.0
        self._debug_check()

    cpdef void observe(self, Py_ssize_t slot, double seconds_per_unit, double now) except *:
        """Fold one finished request's seconds / ahead into the slot's estimate (peak EWMA)."""
        cdef double current, elapsed, w
        self._slot(slot)
        if not (seconds_per_unit > 0.0 and isfinite(seconds_per_unit)):
            raise ValueError(
                f"seconds_per_unit must be a positive finite number, got {seconds_per_unit!r}")
        current = self._estimate[slot]
        if current == 0.0 or seconds_per_unit > current:
            self._estimate[slot] = seconds_per_unit
        else:
            elapsed = now - self._last[slot]
            w = exp(-elapsed / self._decay) if elapsed > 0.0 else 1.0
            self._estimate[slot] = current * w + seconds_per_unit * (1.0 - w)
        self._last[slot] = now

    cpdef void observe_service(self, Py_ssize_t slot, double cost, double seconds) except *:
        """Fold one finished request (cost, seconds taken) into the slot's service line."""
        cdef double xx, xy, keep
        self._slot(slot)
        _check_cost(cost)
        if not (seconds >= 0.0 and isfinite(seconds)):
            raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")
        xx = cost * cost
        xy = cost * seconds
        if not (isfinite(xx) and isfinite(xy)):
            return
        self._observe_residual(slot, cost, seconds)
        keep = self._keep
        self._ln[slot] = self._ln[slot] * keep + 1.0
        self._lx[slot] = self._lx[slot] * keep + cost
        self._ly[slot] = self._ly[slot] * keep + seconds
        self._lxx[slot] = self._lxx[slot] * keep + xx
        self._lxy[slot] = self._lxy[slot] * keep + xy
        self._lsamples[slot] += 1

    cdef void _observe_residual(self, Py_ssize_t slot, double cost,
                                double seconds) noexcept nogil:
        cdef double predicted, s, r, keep, n, mean_r, mean_s, var_r, var_s, q
        if seconds <= 0.0 or self._lsamples[slot] < _SERVICE_MIN:
            return
        predicted = self._service_time(slot, cost)
        if predicted <= 0.0:
            return
        s = log(seconds)
        r = s - log(predicted)
        keep = self._keep
        self._qn = self._qn * keep + 1.0
        self._qr = self._qr * keep + r
        self._qrr = self._qrr * keep + r * r
        self._qs = self._qs * keep + s
        self._qss = self._qss * keep + s * s
        self._qsamples += 1
        if self._qsamples < _SERVICE_MIN:
            return
        n = self._qn
        mean_r = self._qr / n
        mean_s = self._qs / n
        var_r = self._qrr / n - mean_r * mean_r
        var_s = self._qss / n - mean_s * mean_s
        if var_s <= 1e-12:  # every request took the same time: nothing to predict
            self._quality = 1.0
        else:
            q = 1.0 - var_r / var_s
            self._quality = 0.0 if q < 0.0 else (1.0 if q > 1.0 else q)

    cpdef double residual_sd(self):
        """Spread of log(seconds / predicted) over recent requests; -1.0 until learned."""
        cdef double mean_r, var_r
        if self._qsamples < _SERVICE_MIN:
            return -1.0
        mean_r = self._qr / self._qn
        var_r = self._qrr / self._qn - mean_r * mean_r
        return sqrt(var_r) if var_r > 0.0 else 0.0

    cpdef double hint_quality(self):
        """The share of the spread of log service time the costs explain, in [0, 1]."""
        return self._quality

    cpdef double service_time(self, Py_ssize_t slot, double cost) except -2.0:
        """Expected seconds for a request of ``cost`` on the slot; -1.0 until learned."""
        self._slot(slot)
        _check_cost(cost)
        return self._service_time(slot, cost)

    cdef double _service_time(self, Py_ssize_t slot, double cost) noexcept nogil:
        cdef double n, x, y, xx, spread, slope, value
        if self._lsamples[slot] < _SERVICE_MIN:
            return -1.0
        n = self._ln[slot]
        x = self._lx[slot]
        y = self._ly[slot]
        xx = self._lxx[slot]
        spread = n * xx - x * x
        if spread <= 1e-9 * n * xx:
            return y / x * cost if x > 0.0 else y / n
        slope = (n * self._lxy[slot] - x * y) / spread
        if slope < 0.0:
            return y / n
        value = (y - slope * x) / n + slope * cost
        return value if value > 0.0 else 0.0

    # -- reading -----------------------------------------------------------------------

    cpdef int64_t outstanding(self, Py_ssize_t slot) except -1:
        """The slot's outstanding count."""
        self._slot(slot)
        return self._count[slot]

    cpdef double work(self, Py_ssize_t slot) except -1.0:
        """The slot's outstanding work: the sum of the costs in flight there."""
        self._slot(slot)
        return self._work[slot]

    cpdef double estimate(self, Py_ssize_t slot) except -1.0:
        """The slot's seconds per unit of work; 0.0 until its first sample."""
        self._slot(slot)
        return self._estimate[slot]

    cpdef double mean_estimate(self):
        """Mean seconds per unit over the pickable slots with a sample; 0.0 if none."""
        cdef Py_ssize_t i, n_known = 0
        cdef double known = 0.0, e
        for i in range(self._navail):
            e = self._estimate[self._avail[i]]
            if e > 0.0:
                known += e
                n_known += 1
        return known / n_known if n_known else 0.0

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
        """(slot, outstanding, weight, state) for every slot in the table, by id."""
        cdef Py_ssize_t slot
        return [
            (slot, self._count[slot], self._weight[slot], STATE_NAMES[self._state[slot]])
            for slot in range(self._nslots) if self._state[slot] != FREE
        ]

    def check(self):
        """Verify every invariant of the layout; AssertionError names the first one broken."""
        cdef Py_ssize_t slot, i, active = 0, used = 0
        cdef int64_t total = 0, count
        cdef uint8_t state
        for slot in range(self._nslots):
            state = self._state[slot]
            count = self._count[slot]
            assert state <= REMOVED, f"slot {slot}: bad state"
            if state == FREE:
                assert self._apos[slot] == -1, f"free slot {slot} is pickable"
                continue
            used += 1
            total += count
            assert count >= 0, f"slot {slot}: negative count {count}"
            assert self._work[slot] >= 0.0, f"slot {slot}: negative work"
            assert self._xwork[slot] >= 0.0, f"slot {slot}: negative external work"
            assert count or self._work[slot] == 0.0, f"slot {slot}: work with no requests"
            assert self._estimate[slot] >= 0.0, f"slot {slot}: negative estimate"
            assert state != REMOVED or count > 0, f"removed slot {slot} has no requests"
            if state == ACTIVE:
                active += 1
                i = self._apos[slot]
                assert 0 <= i < self._navail and self._avail[i] == slot, \
                    f"slot {slot}: position map broken"
            else:
                assert self._apos[slot] == -1, f"slot {slot} is pickable in state {state}"
        assert active == self._navail, "pickable count"
        assert total == self._total, f"total {self._total} != sum of counts {total}"
        assert used == self._used, f"used {self._used} != slots in the table {used}"


cdef double _positive(value, str what) except -1.0:
    cdef double v = float(value)
    if not (v > 0.0 and isfinite(v)):
        raise ValueError(f"{what} must be a positive finite number, got {v!r}")
    return v


cdef inline int _check_cost(double cost) except -1:
    if not (cost >= 0.0 and isfinite(cost)):
        raise ValueError(f"cost must be a finite number >= 0, got {cost!r}")
    return 0


def _bench_pick_release(WorkTable table, Py_ssize_t rounds, double cost=1.0):
    """Run ``rounds`` pick + release pairs in a C loop, for ``bench/core_bench.py``."""
    cdef Py_ssize_t _, slot
    for _ in range(rounds):
        slot = table.pick(cost, 0)
        table.release(slot, cost)
