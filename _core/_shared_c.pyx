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
3. P then writes ``(held +/- 1, seq + 1)`` to its ledger cell, which read ``(held, seq)``.

Anyone who is about to overwrite a stamp first *helps*: if the stamped process's cell for
that slot still reads ``seq``, it applies the update there, with a CAS from ``(held, seq)``
(which at most one helper wins: the cell moves off ``seq`` only by applying update seq+1).
The owner needs no CAS: every writer of its cell while it lives writes that same value
(a helper applies only the stamp still pending, and reclaim waits for the owner's death),
and a helper that comes after the owner's store fails its CAS. So a stamp is never lost
unapplied, and every ledger cell plus at most the
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
never freed twice. A pick finds a slot (the pick index, or a scan of the counts),
updates the chosen slot's count, then checks that the slot is still ACTIVE in the
generation it read; if not, it undoes and looks again.

The pick index (``_shared_index.pxi``) is a hint the writers keep beside the counts, per
count level a bitmap of slots; its own argument (why it equals the counts at quiescence,
and what a pick does when it does not) is at the top of that file.
"""

cimport cython
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t

import mmap
import os

from tritonmesh._core import _segment

cdef extern from "debug.h":
    const int TRITONMESH_DEBUG

cdef extern from "atomics.h" nogil:
    uint64_t tm_load64(uint64_t* p)
    uint32_t tm_load32(uint32_t* p)
    void tm_store64(uint64_t* p, uint64_t v)
    void tm_store64_release(uint64_t* p, uint64_t v)
    void tm_store32(uint32_t* p, uint32_t v)
    bint tm_cas64(uint64_t* p, uint64_t* expected, uint64_t desired)
    bint tm_cas32(uint32_t* p, uint32_t* expected, uint32_t desired)
    uint32_t tm_add32(uint32_t* p, int v)
    uint64_t tm_add64(uint64_t* p, uint64_t v)
    uint64_t tm_below(uint64_t x, uint64_t k)
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
    # The most weight classes the index serves at once (_shared_weights.pxi; atomics.h's
    # TM_CLASSES).
    CLASSES = 4

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
    cdef readonly uint64_t scans
    cdef bint _waiting
    # This process's view (set_view): the generation it may send each slot by, and the
    # fleet's ejection words; NULL: every pickable slot.
    cdef uint32_t* _view_gen
    cdef uint64_t* _view_ejected
    cdef object _view_buffers
    # The pick index (_shared_index.pxi): its rows in the segment; this process's skip set
    # (slots its view rules out that the index holds) and its picture of the weights.
    cdef char* _index
    cdef Py_ssize_t _index_row
    cdef uint64_t* _skip
    cdef int32_t* _skipped
    cdef uint64_t* _mask    # _skip | _odd_bits: what a pick leaves out of the index's rows
    cdef uint64_t* _snap    # one index row as the last pick read it, and its running counts
    cdef uint32_t* _cum
    cdef Py_ssize_t _nskip
    cdef uint64_t _weights_gen
    cdef double _top_weight
    # The picture of the weights (_shared_weights.pxi): the weight classes (their weights,
    # each one's slots as a bitmap, each slot's class), the odd slots (a list and a
    # bitmap), and whether the index serves least-outstanding picks; a pick's scratch: per
    # class, the lowest level with a slot.
    cdef Py_ssize_t _nclass
    cdef double _class_weight[CLASSES]
    cdef uint64_t* _class_bits
    cdef uint64_t* _class_usable  # _class_bits less the skip set: what a class pick ANDs
    cdef Py_ssize_t _class_words
    cdef unsigned char* _class_of
    cdef uint32_t _class_level[CLASSES]
    cdef int32_t* _odd
    cdef Py_ssize_t _nodd
    cdef uint64_t* _odd_bits
    cdef bint _indexed

    def __cinit__(self, *args, **kwargs):
        self._skip = NULL
        self._skipped = NULL
        self._snap = NULL
        self._cum = NULL
        self._odd = NULL
        self._odd_bits = NULL
        self._mask = NULL
        self._class_bits = NULL
        self._class_usable = NULL
        self._class_of = NULL

    def __dealloc__(self):
        PyMem_Free(self._skip)
        PyMem_Free(self._skipped)
        PyMem_Free(self._snap)
        PyMem_Free(self._cum)
        PyMem_Free(self._odd)
        PyMem_Free(self._odd_bits)
        PyMem_Free(self._mask)
        PyMem_Free(self._class_bits)
        PyMem_Free(self._class_usable)
        PyMem_Free(self._class_of)

    def __init__(self, str name, Py_ssize_t process_index, seed=None):
        """Attach to the segment ``name`` as ``process_index``; use ``attach``/``create``."""
        _map(self, name, process_index, seed)

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
        self._view_gen = NULL
        self._view_ejected = NULL
        self._view_buffers = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    def close(self):
        """Release what this process still holds, give up its index, and unmap."""
        if self._base == NULL:
            return
        _reclaim(self, self._pi)
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
        return tm_below(xorshift64star(&self._rng), k)

    # -- the update protocol (module docstring) ----------------------------------------

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

    def set_view(self, generations, ejected=None):
        """Picks in this process skip a slot unless ``generations[slot]`` is its generation
        and ``ejected[slot]`` is 0 (module docstring of tritonmesh.sharedcounts)."""
        cdef uint32_t[::1] gens = generations
        cdef uint64_t[::1] words
        if gens.shape[0] < self._capacity:
            raise ValueError(f"generations has {gens.shape[0]} slots, the table {self._capacity}")
        if ejected is not None:
            words = ejected
            if words.shape[0] < self._capacity:
                raise ValueError(f"ejected has {words.shape[0]} slots, the table {self._capacity}")
            self._view_ejected = &words[0]
        self._view_gen = &gens[0]
        _clear_skips(self)
        self._view_buffers = (gens, None if ejected is None else words)

    # -- membership ------------------------------------------------------------------

    cpdef Py_ssize_t add(self, weight=1.0, limit=0) except -1:
        """Add a pickable slot; returns its id (the lowest free one)."""
        return _add(self, weight, limit)

    cpdef void remove(self, Py_ssize_t slot) except *:
        """Never pick ``slot`` again; it is freed after its last release, in any process."""
        _remove(self, slot)

    cpdef void set_available(self, Py_ssize_t slot, bint available) except *:
        """Put ``slot`` back in the pick set, or take it out (draining, unhealthy)."""
        _set_available(self, slot, available)

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
        _sync_slot(self, slot)

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

    cpdef Py_ssize_t pick(self) except -2:
        """LEAST_OUTSTANDING_REQUESTS on the fleet-wide counts; -1 when nothing is pickable."""
        cdef Py_ssize_t s, _attempt
        if self._base == NULL:
            raise ValueError("the table is closed")
        _read_weights(self)
        for _attempt in range(PICK_ATTEMPTS):
            # The index orders slots of one weight by count (a few weight classes, each
            # read apart, and the few slots of other weights read beside it); when it has
            # nothing (or something stale), the scan decides.
            if not self._indexed:
                s = -1
            elif self._nclass > 1:
                s = _least_by_class(self)
            else:
                s = _index_least(self)
            if s < 0:
                self.scans += 1
                s = _scan_least(self)
                if s < 0:
                    return -1
            if _take(self, s, self._scanned):
                if TRITONMESH_DEBUG:
                    _debug_after(self, s)
                return s
        return -1

    cpdef Py_ssize_t pick_random(self) except -2:
        """RANDOM: a pickable slot with probability proportional to its weight."""
        cdef Py_ssize_t s, _attempt
        if self._base == NULL:
            raise ValueError("the table is closed")
        for _attempt in range(PICK_ATTEMPTS):
            s = _sample_random(self)
            if s < 0:
                return -1
            if _take(self, s, self._scanned):
                return s
        return -1

    cpdef Py_ssize_t pick_two(self) except -2:
        """POWER_OF_TWO_CHOICES on the fleet-wide counts; -1 when nothing is pickable."""
        return _pick_two(self)

    # -- accounting --------------------------------------------------------------------

    cpdef void acquire(self, Py_ssize_t slot, long long generation=-1) except *:
        """Count one more request on ``slot`` (a pinned sequence); ignores the limit."""
        _acquire(self, slot, generation)

    cdef int _confirm(self, Py_ssize_t slot, uint64_t st) except -1:
        """After +1 on ``slot`` read in status ``st``: undo and raise if it was removed or
        reused meanwhile (a flip between ACTIVE and UNAVAILABLE is fine)."""
        cdef uint64_t now = tm_load64(self._statusp(slot))
        if (now >> 32) == (st >> 32) and (<uint32_t>now == ACTIVE or <uint32_t>now == UNAVAILABLE):
            if TRITONMESH_DEBUG:
                _debug_after(self, slot)
            return 0
        _drop(self, slot)
        raise ValueError(f"slot {slot} was removed")

    cpdef bint try_acquire(self, Py_ssize_t slot, limit=0) except -1:
        """One more request on ``slot`` if its count is below ``limit`` (0: the slot's own
        limit, if any); a compare-and-swap, so the count never exceeds the limit."""
        return _try_acquire(self, slot, limit)

    cpdef void release(self, Py_ssize_t slot) except *:
        """One request of this process on ``slot`` ended: count one fewer."""
        if self._base == NULL or slot < 0 or slot >= self._capacity:
            raise IndexError(f"slot {slot} is not in the table")
        if <uint32_t>tm_load64(self._mine + slot) == 0:
            raise ValueError(f"release of slot {slot}, on which this process holds no requests")
        _drop(self, slot)
        if tm_load32(self._waiters) != 0:
            tm_add32(self._wake_seq, 1)
            tm_futex_wake_all(self._wake_seq)
        if TRITONMESH_DEBUG:
            _debug_after(self, slot)

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
        _help(self, slot, tm_load64(self._word(slot)))
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
        return _reclaim_exited(self, process_index)

    # -- waiting for a release in any process -------------------------------------------

    def begin_wait(self):
        """Register as a waiter; returns the wake-up sequence to pass to wait_for_release.
        Read it *before* checking the condition (try_acquire), then wait if that failed."""
        return _begin_wait(self)

    def wait_for_release(self, uint32_t seen, double timeout):
        """Block (GIL released) until a release in any process moves the wake-up sequence
        off ``seen``, or ``timeout`` seconds; returns the sequence now (``seen``: timed out)."""
        return _wait_for_release(self, seen, timeout)

    def end_wait(self):
        """Stop being a waiter (releases stop paying for the wake-up)."""
        _end_wait(self)

    # -- inspection ----------------------------------------------------------------------

    def snapshot(self):
        """``(slot, outstanding, weight, state, limit)`` for every slot in use, by id."""
        return _snapshot(self)

    def check_live(self, int tries=100):
        """Under load, for every slot: global count == sum of the ledgers, counting the one
        update whose count step is done and ledger step not yet (module docstring). Not
        during a reclaim. Returns the number of slots verified (a slot whose count changed
        on every one of ``tries`` attempts is skipped); raises AssertionError on a mismatch."""
        return _check_live(self, tries)

    def check(self):
        """At quiescence: every global count is the sum of the ledgers, every free slot and
        every unattached process's ledger is zero. Raises AssertionError naming the first
        broken invariant."""
        _check_quiescent(self)


# The table's parts by concern, as functions of the table (cdef, and the class is final:
# calls stay direct, the small ones inline): mapping the segment; the update protocol,
# ledgers and checks; membership; the picks' scans; waiting for a release in another
# process.
include "_shared_segment.pxi"
include "_shared_ledger.pxi"
include "_shared_members.pxi"
include "_shared_pick.pxi"
include "_shared_index.pxi"
include "_shared_weights.pxi"
include "_shared_wake.pxi"


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
