# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: binding=False
"""The outstanding table in shared memory, for several router processes: lock-free.

Layout: ``_segment``'s docstring. Every shared word is read and written with GCC's
``__atomic`` builtins (``atomics.h``); no process ever waits on another, so a process
killed at any instruction cannot wedge the rest.

Why the counts are exact after a process dies. Each process P keeps a ledger: per slot,
a cell holding the count P holds and the number ``seq`` of P's updates to that slot that
are applied. An update (acquire +1, release -1) is two single-word atomic steps, and
no order of two such steps is safe alone: a death between them leaves either a global
count the ledger does not explain or a ledger entry the count never saw. So the global
step carries the evidence: P writes the slot's count word with one compare-and-swap whose
high half is a stamp ``(P, sign, seq + 1)``. Then:

1. before P's CAS succeeds, nothing is changed: a death there loses nothing;
2. the CAS is the update (the linearisation point); from then on the stamp on the count
   word says "P's update seq+1 happened", until the next update of that slot overwrites
   it;
3. P then applies the update to its ledger cell with a CAS from ``(held, seq)`` to
   ``(held +/- 1, seq + 1)``.

Anyone who is about to overwrite a stamp first *helps*: if the stamped process's cell for
that slot still reads ``seq``, it applies the update there, with the same CAS (which only
one of the owner and the helpers can win: the cell moves off ``seq`` only by applying
update seq+1). So a stamp is never lost unapplied, and every ledger cell plus at most the
one pending stamp on its count word explains that count exactly. ``reclaim(P)`` helps the
stamps of P still on count words, then subtracts each cell's count from its slot's global
count and zeroes the cell (keeping ``seq``, so an old stamp can never look pending to a
process that later takes P's index). Sequence numbers are compared modulo 2**24 (the
stamp's width); a stale stamp of P on a slot's word is always P's latest update of that
slot (every update of the slot rewrites the stamp), so the cell reads seq or seq+1 and
the comparison is exact.

Membership is a second CAS protocol on each slot's status word (state and slot
generation): add claims a FREE slot (FREE -> CLAIMED by this process index, generation
+ 1), fills it in, and
publishes it ACTIVE; remove marks it REMOVED, and whoever then sees it REMOVED with a zero
count frees it by CAS on the same (generation, REMOVED), so a slot reused meanwhile is
never freed twice. A pick scans the counts, updates the chosen slot's count, then checks
that the slot is still ACTIVE in the generation it scanned; if not, it undoes and scans
again.
"""

cimport cython
from libc.stdint cimport int64_t, uint32_t, uint64_t

import mmap
import os

from tritonmesh._core import _segment

cdef extern from "debug.h":
    const int TRITONMESH_DEBUG

cdef extern from "atomics.h" nogil:
    uint64_t tm_load64(uint64_t* p)
    uint32_t tm_load32(uint32_t* p)
    void tm_store64(uint64_t* p, uint64_t v)
    void tm_store32(uint32_t* p, uint32_t v)
    bint tm_cas64(uint64_t* p, uint64_t* expected, uint64_t desired)
    bint tm_cas32(uint32_t* p, uint32_t* expected, uint32_t desired)
    uint32_t tm_add32(uint32_t* p, int v)
    uint64_t tm_add64(uint64_t* p, uint64_t v)
    double tm_load_f64(uint64_t* p)
    void tm_store_f64(uint64_t* p, double d)
    int tm_futex_wait(uint32_t* word, uint32_t seen, double timeout)
    void tm_futex_wake_all(uint32_t* word)

include "_common.pxi"

cdef enum:
    CLAIMED = 4         # the low byte; the next byte is the claiming process index + 1
    STATE_MASK = 0xFF
    P_WAITING = 8       # a process row's u32: it is registered as a waiter
    P_START = 16        # a process row's u64: its start time (_segment.start_time)
    SLOT_SIZE = 32
    S_WEIGHT = 8
    S_STATUS = 16
    S_LIMIT = 24
    H_HIGH = 20
    H_GENERATION = 24
    H_WAKE_SEQ = 64
    H_WAITERS = 68
    SEQ_MASK = 0xFFFFFF
    STAMP_NEG = 1 << 24
    # A pick whose chosen slot changed under it scans again; this many failed attempts in a
    # row (each one another process's membership change or limit win) and it answers -1.
    PICK_ATTEMPTS = 64

LAYOUT = (SLOT_SIZE, S_WEIGHT, S_STATUS, S_LIMIT, H_HIGH, H_GENERATION, H_WAKE_SEQ, H_WAITERS)


cdef inline uint64_t _status(uint32_t state, uint32_t gen) noexcept nogil:
    return ((<uint64_t>gen) << 32) | state


@cython.final
cdef class SharedTable:
    """Outstanding-request counts per upstream slot, shared by every attached process.

    Full API docs: _shared_c.pyi. One table object per process (and thread): its process
    index owns one ledger row.
    """

    cdef object _mm
    cdef unsigned char[::1] _view
    cdef char* _base
    cdef char* _slots
    cdef char* _ledgers
    cdef char* _procs
    cdef uint64_t* _mine
    cdef uint32_t* _high
    cdef uint64_t* _generation
    cdef uint32_t* _wake_seq
    cdef uint32_t* _waiters
    cdef Py_ssize_t _capacity
    cdef Py_ssize_t _max_processes
    cdef Py_ssize_t _pi
    cdef Py_ssize_t _row
    cdef uint64_t _rng
    cdef uint64_t _scanned
    cdef readonly str name
    cdef bint _waiting

    def __init__(self, str name, Py_ssize_t process_index, seed=None):
        """Attach to the segment ``name`` as ``process_index``; use ``attach``/``create``."""
        fd = _segment.open_file(name)
        try:
            mm = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        try:
            capacity, max_processes = _segment.read_sizes(name, memoryview(mm))
        except BaseException:
            mm.close()
            raise
        if not 0 <= process_index < max_processes:
            mm.close()
            raise ValueError(f"process_index must be in [0, {max_processes}), got {process_index}")
        self._mm = mm
        self._view = mm
        self._base = <char*>&self._view[0]
        procs, slots, ledgers, _ = _segment.offsets(capacity, max_processes)
        self._procs = self._base + <Py_ssize_t>procs
        self._slots = self._base + <Py_ssize_t>slots
        self._ledgers = self._base + <Py_ssize_t>ledgers
        self._row = _segment.ledger_row(capacity)
        self._capacity = capacity
        self._max_processes = max_processes
        self._pi = process_index
        self._mine = <uint64_t*>(self._ledgers + process_index * self._row)
        self._high = <uint32_t*>(self._base + H_HIGH)
        self._generation = <uint64_t*>(self._base + H_GENERATION)
        self._wake_seq = <uint32_t*>(self._base + H_WAKE_SEQ)
        self._waiters = <uint32_t*>(self._base + H_WAITERS)
        self.name = name
        self._waiting = False
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self._rng = splitmix64(<uint64_t>(seed & 0xFFFFFFFFFFFFFFFF)) or 1
        cdef uint64_t expected = 0
        cdef uint64_t* pid = <uint64_t*>(self._procs + process_index * 64)
        if not tm_cas64(pid, &expected, <uint64_t>os.getpid()):
            self._unmap()
            raise ValueError(f"process index {process_index} of {name!r} is held by pid "
                             f"{expected} (reclaim it first if that process has exited)")
        tm_store64(<uint64_t*>(self._procs + process_index * 64 + P_START),
                   <uint64_t>_segment.start_time(os.getpid()))

    @classmethod
    def create(cls, Py_ssize_t capacity, Py_ssize_t max_processes, *, str tag="table",
               seed=None, bint unlink_stale=True):
        """Create a segment owned by this process and attach to it as process index 0."""
        _segment.check_sizes(capacity, max_processes)
        if unlink_stale:
            _segment.unlink_stale()
        name = _segment.segment_name(tag)
        fd = _segment.create_file(name, _segment.offsets(capacity, max_processes)[3])
        try:
            with mmap.mmap(fd, 0) as mm:
                _segment.initialise(memoryview(mm), capacity, max_processes)
        except BaseException:
            _segment.unlink(name)
            raise
        finally:
            os.close(fd)
        return cls(name, 0, seed)

    @classmethod
    def attach(cls, str name, Py_ssize_t process_index, *, seed=None):
        """Attach to an existing segment as ``process_index``."""
        return cls(name, process_index, seed)

    cdef void _unmap(self):
        self._base = NULL
        self._view = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    def close(self):
        """Release what this process still holds, give up its index, and unmap."""
        if self._base == NULL:
            return
        self._reclaim(self._pi)
        self._waiting = False
        self._unmap()

    def unlink(self):
        """Remove the segment's name (the owner does, when it is done)."""
        _segment.unlink(self.name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    @property
    def process_index(self):
        return self._pi

    @property
    def capacity(self):
        return self._capacity

    @property
    def max_processes(self):
        return self._max_processes

    # -- words -------------------------------------------------------------------------

    cdef inline uint64_t* _word(self, Py_ssize_t s) noexcept nogil:
        return <uint64_t*>(self._slots + s * SLOT_SIZE)

    cdef inline uint64_t* _statusp(self, Py_ssize_t s) noexcept nogil:
        return <uint64_t*>(self._slots + s * SLOT_SIZE + S_STATUS)

    cdef inline uint32_t* _limitp(self, Py_ssize_t s) noexcept nogil:
        return <uint32_t*>(self._slots + s * SLOT_SIZE + S_LIMIT)

    cdef inline uint64_t* _weightp(self, Py_ssize_t s) noexcept nogil:
        return <uint64_t*>(self._slots + s * SLOT_SIZE + S_WEIGHT)

    cdef inline uint64_t* _cell(self, Py_ssize_t pi, Py_ssize_t s) noexcept nogil:
        return <uint64_t*>(self._ledgers + pi * self._row) + s

    cdef inline uint64_t _below(self, uint64_t k) noexcept nogil:
        return xorshift64star(&self._rng) % k

    # -- the update protocol (module docstring) ----------------------------------------

    cdef inline void _help(self, Py_ssize_t s, uint64_t g) noexcept nogil:
        """Apply the stamped update on count word ``g`` to its process's ledger, if it is not."""
        cdef uint32_t stamp = <uint32_t>(g >> 32)
        cdef uint64_t* cell
        cdef uint64_t cur
        cdef uint32_t seq, held
        if stamp == 0:
            return
        cell = self._cell((stamp >> 25) - 1, s)
        cur = tm_load64(cell)
        seq = <uint32_t>(cur >> 32) + 1
        if (seq & SEQ_MASK) != (stamp & SEQ_MASK):
            return
        held = <uint32_t>cur
        held = held - 1 if stamp & STAMP_NEG else held + 1
        tm_cas64(cell, &cur, ((<uint64_t>seq) << 32) | held)

    cdef int _update(self, Py_ssize_t s, bint up, uint32_t limit) noexcept nogil:
        """+1 (``up``, refused at ``limit`` when it is not 0) or -1 on slot ``s``, in the
        global count and this process's ledger. Returns 1, or 0 when refused."""
        cdef uint64_t* cell = self._mine + s
        cdef uint64_t* word = self._word(s)
        cdef uint64_t cur = tm_load64(cell)
        cdef uint32_t seq = <uint32_t>(cur >> 32) + 1
        cdef uint32_t held = <uint32_t>cur
        cdef uint64_t stamp = ((<uint64_t>(self._pi + 1)) << 25) | (seq & SEQ_MASK)
        cdef uint64_t g = tm_load64(word)
        cdef uint32_t count
        if not up:
            stamp |= STAMP_NEG
        while True:
            self._help(s, g)
            count = <uint32_t>g
            if up and limit != 0 and count >= limit:
                return 0
            count = count + 1 if up else count - 1
            if tm_cas64(word, &g, (stamp << 32) | count):
                break
        held = held + 1 if up else held - 1
        # Fails only when a helper applied it already.
        tm_cas64(cell, &cur, ((<uint64_t>seq) << 32) | held)
        return 1

    cdef void _drop(self, Py_ssize_t s) noexcept nogil:
        """-1 on ``s``; frees the slot when it is REMOVED and this was its last request."""
        cdef uint64_t st
        self._update(s, False, 0)
        if <uint32_t>tm_load64(self._word(s)) == 0:
            st = tm_load64(self._statusp(s))
            if <uint32_t>st == REMOVED:
                if tm_cas64(self._statusp(s), &st, _status(FREE, <uint32_t>(st >> 32))):
                    tm_add64(self._generation, 1)

    cdef int _check_slot_live(self, Py_ssize_t s, int tries) except -2:
        """Global count == sum of the ledgers (+ the one pending stamped update) for slot
        ``s``, while other processes update it: read the count word, every ledger cell, the
        word again; if the word did not change, the only cell that can have moved is the
        stamped process's (its update being applied), which is accounted either way.
        Returns 1 when verified, 0 when the word never stood still for ``tries`` reads."""
        cdef uint64_t g, cur
        cdef uint32_t stamp, total, held
        cdef Py_ssize_t p, owner
        cdef int _t
        for _t in range(tries):
            g = tm_load64(self._word(s))
            stamp = <uint32_t>(g >> 32)
            owner = <Py_ssize_t>(stamp >> 25) - 1 if stamp else -1
            total = 0
            for p in range(self._max_processes):
                cur = tm_load64(self._cell(p, s))
                held = <uint32_t>cur
                if p == owner and ((<uint32_t>(cur >> 32) + 1) & SEQ_MASK) == (stamp & SEQ_MASK):
                    held = held - 1 if stamp & STAMP_NEG else held + 1
                total += held
            if tm_load64(self._word(s)) != g:
                continue
            if total != <uint32_t>g:
                raise AssertionError(f"slot {s}: global count {<uint32_t>g} != sum of ledgers "
                                     f"{total} (with the pending update)")
            return 1
        return 0

    cdef int _debug_after(self, Py_ssize_t s) except -1:
        self._check_slot_live(s, 8)
        return 0

    # -- argument checks ---------------------------------------------------------------

    cdef inline uint32_t _live(self, Py_ssize_t slot) except 0xFFFFFFFF:
        """The slot's state, which must be ACTIVE, UNAVAILABLE or REMOVED."""
        if self._base == NULL:
            raise ValueError("the table is closed")
        if slot < 0 or slot >= self._capacity:
            raise IndexError(f"slot {slot} is not in the table")
        cdef uint32_t state = <uint32_t>tm_load64(self._statusp(slot))
        if state == FREE or (state & STATE_MASK) == CLAIMED:
            raise IndexError(f"slot {slot} is not in the table")
        return state

    cdef double _check_weight(self, weight) except -1.0:
        cdef double w = float(weight)
        if not w > 0 or w == float("inf"):
            raise ValueError(f"weight must be a positive finite number, got {w!r}")
        return w

    cdef uint32_t _check_limit(self, limit) except 0xFFFFFFFF:
        if not isinstance(limit, int) or not 0 <= limit <= _segment.MAX_COUNT:
            raise ValueError(f"limit must be an integer in [0, {_segment.MAX_COUNT}] "
                             f"(0: none), got {limit!r}")
        return <uint32_t>limit

    # -- membership ------------------------------------------------------------------

    cpdef Py_ssize_t add(self, weight=1.0, limit=0) except -1:
        """Add a pickable slot; returns its id (the lowest free one)."""
        cdef double w = self._check_weight(weight)
        cdef uint32_t lim = self._check_limit(limit)
        cdef Py_ssize_t s
        cdef uint64_t st
        cdef uint32_t gen, high
        if self._base == NULL:
            raise ValueError("the table is closed")
        for s in range(self._capacity):
            st = tm_load64(self._statusp(s))
            if <uint32_t>st != FREE:
                continue
            gen = <uint32_t>(st >> 32) + 1
            if tm_cas64(self._statusp(s), &st,
                        _status(CLAIMED | <uint32_t>((self._pi + 1) << 8), gen)):
                break
        else:
            raise ValueError(f"the shared table is full (capacity {self._capacity})")
        tm_store_f64(self._weightp(s), w)
        tm_store32(self._limitp(s), lim)
        high = tm_load32(self._high)
        while high < s + 1:
            if tm_cas32(self._high, &high, <uint32_t>(s + 1)):
                break
        tm_store64(self._statusp(s), _status(ACTIVE, gen))
        tm_add64(self._generation, 1)
        return s

    cpdef void remove(self, Py_ssize_t slot) except *:
        """Never pick ``slot`` again; it is freed after its last release, in any process."""
        self._live(slot)
        cdef uint64_t st = tm_load64(self._statusp(slot))
        while True:
            if <uint32_t>st == REMOVED:
                return
            if <uint32_t>st == FREE or (<uint32_t>st & STATE_MASK) == CLAIMED:
                raise IndexError(f"slot {slot} is not in the table")
            if tm_cas64(self._statusp(slot), &st, _status(REMOVED, <uint32_t>(st >> 32))):
                break
        st = _status(REMOVED, <uint32_t>(st >> 32))
        if <uint32_t>tm_load64(self._word(slot)) == 0:
            tm_cas64(self._statusp(slot), &st, _status(FREE, <uint32_t>(st >> 32)))
        tm_add64(self._generation, 1)

    cpdef void set_available(self, Py_ssize_t slot, bint available) except *:
        """Put ``slot`` back in the pick set, or take it out (draining, unhealthy)."""
        self._live(slot)
        cdef uint64_t st = tm_load64(self._statusp(slot))
        cdef uint32_t want = ACTIVE if available else UNAVAILABLE
        while <uint32_t>st != want:
            if <uint32_t>st == REMOVED:
                raise ValueError(f"slot {slot} was removed")
            if <uint32_t>st != ACTIVE and <uint32_t>st != UNAVAILABLE:
                raise IndexError(f"slot {slot} is not in the table")
            if tm_cas64(self._statusp(slot), &st, _status(want, <uint32_t>(st >> 32))):
                tm_add64(self._generation, 1)
                break

    cpdef bint is_available(self, Py_ssize_t slot) except -1:
        """Whether ``slot`` can be picked."""
        return self._live(slot) == ACTIVE

    cpdef void set_weight(self, Py_ssize_t slot, weight) except *:
        """Change ``slot``'s weight; its count is kept."""
        self._live(slot)
        tm_store_f64(self._weightp(slot), self._check_weight(weight))
        tm_add64(self._generation, 1)

    cpdef double weight(self, Py_ssize_t slot) except -1.0:
        """``slot``'s weight."""
        self._live(slot)
        return tm_load_f64(self._weightp(slot))

    cpdef void set_limit(self, Py_ssize_t slot, limit) except *:
        """``slot``'s concurrency limit (0: none), which picks and try_acquire honour."""
        self._live(slot)
        tm_store32(self._limitp(slot), self._check_limit(limit))

    cpdef uint32_t limit(self, Py_ssize_t slot) except 0xFFFFFFFF:
        """``slot``'s concurrency limit (0: none)."""
        self._live(slot)
        return tm_load32(self._limitp(slot))

    cpdef uint32_t generation(self, Py_ssize_t slot) except 0xFFFFFFFF:
        """``slot``'s generation: it changes when the id is reused for another instance."""
        self._live(slot)
        return <uint32_t>(tm_load64(self._statusp(slot)) >> 32)

    cpdef uint64_t membership_generation(self) except? 0:
        """Bumped by every add, remove, weight or availability change, in any process."""
        if self._base == NULL:
            raise ValueError("the table is closed")
        return tm_load64(self._generation)

    # -- picks -------------------------------------------------------------------------

    cdef inline bint _pickable(self, Py_ssize_t s, uint64_t* status, uint32_t* count) \
            noexcept nogil:
        status[0] = tm_load64(self._statusp(s))
        if <uint32_t>status[0] != ACTIVE:
            return False
        count[0] = <uint32_t>tm_load64(self._word(s))
        cdef uint32_t lim = tm_load32(self._limitp(s))
        return lim == 0 or count[0] < lim

    cdef inline bint _take(self, Py_ssize_t s, uint64_t status) noexcept nogil:
        """+1 on the scanned slot ``s``, kept only if it is still ACTIVE in that generation."""
        if not self._update(s, True, tm_load32(self._limitp(s))):
            return False
        if tm_load64(self._statusp(s)) == status:
            return True
        self._drop(s)
        return False

    cdef Py_ssize_t _scan_least(self) noexcept nogil:
        """The pickable slot with the lowest (count + 1) / weight, uniform among ties.

        Two passes rather than one with a reservoir: a random number (a division) per tied
        slot costs more than reading the tied slots again. Pass 2 starts at the first
        minimum; if the counts moved meanwhile and it finds fewer ties, the first stands.
        Ties are counted without a branch: with counts near the minimum mixed at random,
        a branch on "tied or above" is mispredicted half the time.
        """
        cdef Py_ssize_t high = tm_load32(self._high)
        cdef Py_ssize_t s, best = -1
        cdef uint64_t ties = 0, status, best_status = 0
        cdef int64_t r
        cdef uint32_t count, best_count = 0
        cdef double w, best_w = 0.0, lhs, rhs
        for s in range(high):
            if not self._pickable(s, &status, &count):
                continue
            w = tm_load_f64(self._weightp(s))
            lhs = (<double>count + 1.0) * best_w
            rhs = (<double>best_count + 1.0) * w
            if lhs < rhs or best < 0:
                best, best_count, best_w, best_status, ties = s, count, w, status, 1
            else:
                ties += lhs == rhs
        self._scanned = best_status
        if ties <= 1:
            return best
        r = <int64_t>self._below(ties)
        for s in range(best, high):
            if not self._pickable(s, &status, &count):
                continue
            r -= (<double>count + 1.0) * best_w == \
                (<double>best_count + 1.0) * tm_load_f64(self._weightp(s))
            if r < 0:
                self._scanned = status
                return s
        return best

    cpdef Py_ssize_t pick(self) except -2:
        """LEAST_OUTSTANDING_REQUESTS on the fleet-wide counts; -1 when nothing is pickable."""
        cdef Py_ssize_t s, _attempt
        if self._base == NULL:
            raise ValueError("the table is closed")
        for _attempt in range(PICK_ATTEMPTS):
            s = self._scan_least()
            if s < 0:
                return -1
            if self._take(s, self._scanned):
                if TRITONMESH_DEBUG:
                    self._debug_after(s)
                return s
        return -1

    cdef Py_ssize_t _scan_random(self) noexcept nogil:
        cdef Py_ssize_t high = tm_load32(self._high)
        cdef Py_ssize_t s, chosen = -1
        cdef double total = 0.0, w
        cdef uint64_t status
        cdef uint32_t count
        # One pass, weighted reservoir: keep slot s with probability w_s / (sum so far).
        for s in range(high):
            if not self._pickable(s, &status, &count):
                continue
            w = tm_load_f64(self._weightp(s))
            total += w
            if <double>(xorshift64star(&self._rng) >> 11) * (1.0 / 9007199254740992.0) * total < w:
                chosen, self._scanned = s, status
        return chosen

    cpdef Py_ssize_t pick_random(self) except -2:
        """RANDOM: a pickable slot with probability proportional to its weight."""
        cdef Py_ssize_t s, _attempt
        if self._base == NULL:
            raise ValueError("the table is closed")
        for _attempt in range(PICK_ATTEMPTS):
            s = self._scan_random()
            if s < 0:
                return -1
            if self._take(s, self._scanned):
                return s
        return -1

    cdef Py_ssize_t _sample(self, Py_ssize_t high, Py_ssize_t skip, uint64_t* status,
                            uint32_t* count) noexcept nogil:
        """A uniformly random pickable slot other than ``skip``, by rejection; -1 when
        ``high`` tries in a row found none (then the caller falls back to a scan)."""
        cdef Py_ssize_t s, _i
        for _i in range(high + 8):
            s = <Py_ssize_t>self._below(<uint64_t>high)
            if s != skip and self._pickable(s, status, count):
                return s
        return -1

    cpdef Py_ssize_t pick_two(self) except -2:
        """POWER_OF_TWO_CHOICES on the fleet-wide counts; -1 when nothing is pickable."""
        cdef Py_ssize_t high, a, b, s, _attempt
        cdef uint64_t sa, sb
        cdef uint32_t ca, cb
        cdef double lhs, rhs
        if self._base == NULL:
            raise ValueError("the table is closed")
        for _attempt in range(PICK_ATTEMPTS):
            high = tm_load32(self._high)
            if high == 0:
                return -1
            a = self._sample(high, -1, &sa, &ca)
            if a < 0:
                a = self._scan_random()
                if a < 0:
                    return -1
                sa = self._scanned
                ca = <uint32_t>tm_load64(self._word(a))
            b = self._sample(high, a, &sb, &cb)
            s, self._scanned = a, sa
            if b >= 0:
                lhs = (<double>ca + 1.0) * tm_load_f64(self._weightp(b))
                rhs = (<double>cb + 1.0) * tm_load_f64(self._weightp(a))
                if rhs < lhs or (rhs == lhs and xorshift64star(&self._rng) & 1):
                    s, self._scanned = b, sb
            if self._take(s, self._scanned):
                return s
        return -1

    # -- accounting --------------------------------------------------------------------

    cpdef void acquire(self, Py_ssize_t slot, long long generation=-1) except *:
        """Count one more request on ``slot`` (a pinned sequence); ignores the limit."""
        cdef uint32_t state = self._live(slot)
        cdef uint64_t st = tm_load64(self._statusp(slot))
        if state == REMOVED:
            raise ValueError(f"slot {slot} was removed")
        if generation >= 0 and <uint32_t>(st >> 32) != generation:
            raise ValueError(f"slot {slot} was reused (generation {st >> 32}, not {generation})")
        self._update(slot, True, 0)
        self._confirm(slot, st)

    cdef int _confirm(self, Py_ssize_t slot, uint64_t st) except -1:
        """After +1 on ``slot`` read in status ``st``: undo and raise if it was removed or
        reused meanwhile (a flip between ACTIVE and UNAVAILABLE is fine)."""
        cdef uint64_t now = tm_load64(self._statusp(slot))
        if (now >> 32) == (st >> 32) and (<uint32_t>now == ACTIVE or <uint32_t>now == UNAVAILABLE):
            if TRITONMESH_DEBUG:
                self._debug_after(slot)
            return 0
        self._drop(slot)
        raise ValueError(f"slot {slot} was removed")

    cpdef bint try_acquire(self, Py_ssize_t slot, limit=0) except -1:
        """One more request on ``slot`` if its count is below ``limit`` (0: the slot's own
        limit, if any); a compare-and-swap, so the count never exceeds the limit."""
        cdef uint32_t lim = self._check_limit(limit)
        cdef uint32_t state = self._live(slot)
        cdef uint64_t st = tm_load64(self._statusp(slot))
        if state == REMOVED:
            raise ValueError(f"slot {slot} was removed")
        if lim == 0:
            lim = tm_load32(self._limitp(slot))
        if not self._update(slot, True, lim):
            return False
        self._confirm(slot, st)
        return True

    cpdef void release(self, Py_ssize_t slot) except *:
        """One request of this process on ``slot`` ended: count one fewer."""
        if self._base == NULL or slot < 0 or slot >= self._capacity:
            raise IndexError(f"slot {slot} is not in the table")
        if <uint32_t>tm_load64(self._mine + slot) == 0:
            raise ValueError(f"release of slot {slot}, on which this process holds no requests")
        self._drop(slot)
        if tm_load32(self._waiters) != 0:
            tm_add32(self._wake_seq, 1)
            tm_futex_wake_all(self._wake_seq)
        if TRITONMESH_DEBUG:
            self._debug_after(slot)

    cpdef uint32_t outstanding(self, Py_ssize_t slot) except 0xFFFFFFFF:
        """``slot``'s fleet-wide outstanding count."""
        self._live(slot)
        return <uint32_t>tm_load64(self._word(slot))

    cpdef uint32_t held(self, Py_ssize_t slot, Py_ssize_t process_index=-1) except 0xFFFFFFFF:
        """What process ``process_index`` (default: this one) holds on ``slot``."""
        if self._base == NULL or slot < 0 or slot >= self._capacity:
            raise IndexError(f"slot {slot} is not in the table")
        if process_index == -1:
            process_index = self._pi
        if not 0 <= process_index < self._max_processes:
            raise ValueError(f"process_index must be in [0, {self._max_processes}), "
                             f"got {process_index}")
        self._help(slot, tm_load64(self._word(slot)))
        return <uint32_t>tm_load64(self._cell(process_index, slot))

    cpdef Py_ssize_t pid(self, Py_ssize_t process_index) except -1:
        """The pid attached at ``process_index`` (0: none)."""
        if not 0 <= process_index < self._max_processes:
            raise ValueError(f"process_index must be in [0, {self._max_processes}), "
                             f"got {process_index}")
        return <Py_ssize_t>tm_load64(<uint64_t*>(self._procs + process_index * 64))

    def reclaim(self, Py_ssize_t process_index):
        """Subtract everything process ``process_index`` held from the global counts, zero
        its ledger, and free its index. Call it after that process exited (and was reaped);
        returns the number of requests reclaimed."""
        if self._base == NULL:
            raise ValueError("the table is closed")
        if not 0 <= process_index < self._max_processes:
            raise ValueError(f"process_index must be in [0, {self._max_processes}), "
                             f"got {process_index}")
        if process_index == self._pi:
            raise ValueError("a process cannot reclaim its own index; close() the table")
        pid = tm_load64(<uint64_t*>(self._procs + process_index * 64))
        if pid != 0 and _segment.still_attached(
                pid, tm_load64(<uint64_t*>(self._procs + process_index * 64 + P_START))):
            raise ValueError(f"process index {process_index} is held by pid {pid}, "
                             "which is still running")
        return self._reclaim(process_index)

    cdef Py_ssize_t _reclaim(self, Py_ssize_t process_index) except -1:
        cdef uint64_t* pidp = <uint64_t*>(self._procs + process_index * 64)
        cdef uint32_t* waiting = <uint32_t*>(self._procs + process_index * 64 + P_WAITING)
        cdef uint32_t claimed = CLAIMED | <uint32_t>((process_index + 1) << 8)
        cdef Py_ssize_t s
        cdef uint64_t* cell
        cdef uint64_t cur, g
        cdef uint32_t held
        cdef Py_ssize_t total = 0
        # The whole capacity, not the high-water mark: a process may die between claiming a
        # slot in add() and raising the mark.
        for s in range(self._capacity):
            g = tm_load64(self._statusp(s))
            if <uint32_t>g == claimed:  # it died inside add()
                tm_cas64(self._statusp(s), &g, _status(FREE, <uint32_t>(g >> 32)))
            self._help(s, tm_load64(self._word(s)))
            cell = self._cell(process_index, s)
            cur = tm_load64(cell)
            held = <uint32_t>cur
            if held:
                g = tm_load64(self._word(s))
                # Keep the stamp: it may be another process's update, not yet in its ledger.
                while not tm_cas64(self._word(s), &g, (g & 0xFFFFFFFF00000000) |
                                   <uint32_t>(<uint32_t>g - held)):
                    pass
                tm_store64(cell, cur & 0xFFFFFFFF00000000)
                total += held
            # Also when it held nothing here: it may have died between its last release's
            # count update and freeing the removed slot, or inside remove().
            if <uint32_t>tm_load64(self._word(s)) == 0:
                g = tm_load64(self._statusp(s))
                if <uint32_t>g == REMOVED:
                    tm_cas64(self._statusp(s), &g, _status(FREE, <uint32_t>(g >> 32)))
        if tm_load32(waiting):
            tm_store32(waiting, 0)
            tm_add32(self._waiters, -1)
        tm_store64(pidp, 0)
        if total and tm_load32(self._waiters) != 0:
            tm_add32(self._wake_seq, 1)
            tm_futex_wake_all(self._wake_seq)
        return total

    # -- waiting for a release in any process -------------------------------------------

    def begin_wait(self):
        """Register as a waiter; returns the wake-up sequence to pass to wait_for_release.
        Read it *before* checking the condition (try_acquire), then wait if that failed."""
        if self._base == NULL:
            raise ValueError("the table is closed")
        if not self._waiting:
            # Count first, flag second: a death between leaves one waiter too many (releases
            # then make a needless wake call), never one too few.
            tm_add32(self._waiters, 1)
            tm_store32(<uint32_t*>(self._procs + self._pi * 64 + P_WAITING), 1)
            self._waiting = True
        return tm_load32(self._wake_seq)

    def wait_for_release(self, uint32_t seen, double timeout):
        """Block (GIL released) until a release in any process moves the wake-up sequence
        off ``seen``, or ``timeout`` seconds; returns the sequence now (``seen``: timed out)."""
        if not self._waiting:
            raise ValueError("begin_wait() first")
        cdef uint32_t* word = self._wake_seq
        with nogil:
            tm_futex_wait(word, seen, timeout)
        return tm_load32(self._wake_seq)

    def end_wait(self):
        """Stop being a waiter (releases stop paying for the wake-up)."""
        if self._waiting and self._base != NULL:
            tm_store32(<uint32_t*>(self._procs + self._pi * 64 + P_WAITING), 0)
            tm_add32(self._waiters, -1)
        self._waiting = False

    # -- inspection ----------------------------------------------------------------------

    def snapshot(self):
        """``(slot, outstanding, weight, state, limit)`` for every slot in use, by id."""
        out = []
        cdef Py_ssize_t s
        cdef uint64_t st
        for s in range(tm_load32(self._high)):
            st = tm_load64(self._statusp(s))
            if <uint32_t>st != FREE:
                out.append((s, <uint32_t>tm_load64(self._word(s)), tm_load_f64(self._weightp(s)),
                            _segment.STATE_NAMES[<uint32_t>st & STATE_MASK],
                            tm_load32(self._limitp(s))))
        return out

    def check_live(self, int tries=100):
        """Under load, for every slot: global count == sum of the ledgers, counting the one
        update whose count step is done and ledger step not yet (module docstring). Not
        during a reclaim. Returns the number of slots verified (a slot whose count changed
        on every one of ``tries`` attempts is skipped); raises AssertionError on a mismatch."""
        if self._base == NULL:
            raise ValueError("the table is closed")
        cdef Py_ssize_t s, verified = 0
        for s in range(tm_load32(self._high)):
            verified += self._check_slot_live(s, tries)
        return verified

    def check(self):
        """At quiescence: every global count is the sum of the ledgers, every free slot and
        every unattached process's ledger is zero. Raises AssertionError naming the first
        broken invariant."""
        cdef Py_ssize_t s, p
        cdef uint64_t total
        cdef uint32_t count, held, state
        for s in range(self._capacity):
            self._help(s, tm_load64(self._word(s)))
            count = <uint32_t>tm_load64(self._word(s))
            state = <uint32_t>tm_load64(self._statusp(s))
            total = 0
            for p in range(self._max_processes):
                held = <uint32_t>tm_load64(self._cell(p, s))
                if held and tm_load64(<uint64_t*>(self._procs + p * 64)) == 0:
                    raise AssertionError(f"slot {s}: unattached process {p} holds {held}")
                total += held
            if total != count:
                raise AssertionError(f"slot {s}: global count {count} != sum of ledgers {total}")
            if state == FREE and count != 0:
                raise AssertionError(f"free slot {s} has count {count}")
            if state == REMOVED and count == 0:
                raise AssertionError(f"removed slot {s} with no requests should be free")


def _bench_pick_release(SharedTable table, Py_ssize_t rounds, int strategy=0):
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
