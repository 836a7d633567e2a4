# The pick index: per count level, a bitmap of the slots at that level (_segment's layout),
# so that a least-outstanding pick reads the lowest non-empty level instead of every slot.
#
# A slot belongs at level min(count, LEVELS - 1) while it is ACTIVE and under its limit,
# nowhere otherwise (``_desired``). The counts stay the truth and the index follows them:
# whoever changes one of a slot's inputs (the count word, its status, its limit) then syncs
# the levels that change touched, old and new. A sync makes one level's bit agree with the
# slot's inputs as read *after* the bit operation, and goes round again if they moved
# meanwhile. So the last bit operation on any (slot, level) was made by a process that
# then read the final inputs and found its operation right, and at quiescence the index
# equals the counts exactly (``check``). In between it is a hint: a pick validates what it
# reads there against the counts and falls back to the scan when the hint is stale; a
# process killed between a count update and its sync leaves a stale bit until the
# supervisor's ``reclaim`` syncs every level of every slot.
#
# Weights: the level is the count, so the index orders only slots of one weight. Each
# process keeps, once per membership generation, its picture of the weights: the common
# weight and the few slots of another one, which its picks leave out of the index and read
# one by one (_shared_weights.pxi).


cdef extern from "atomics.h" nogil:
    void tm_or64(uint64_t* p, uint64_t v)
    void tm_and64(uint64_t* p, uint64_t v)
    uint64_t tm_row_snapshot(uint64_t* row, const uint64_t* mask, Py_ssize_t words,
                             uint64_t* snap, uint32_t* cum)
    uint64_t tm_row_first(uint64_t* row, const uint64_t* mask, Py_ssize_t words)
    Py_ssize_t tm_snap_select(const uint64_t* snap, const uint32_t* cum, Py_ssize_t words,
                              uint64_t r)
    int tm_lowest64(uint64_t v)

cdef enum:
    LEVELS = 16
    NO_LEVEL = 0xFF
    # A pick_random draws this many slots before it falls back to the weighted scan.
    RANDOM_TRIES = 32
    # A least-outstanding pick draws this many slot ids, kept if they are in the lowest
    # level's row, before it snapshots the row (with half the fleet idle all miss 1 time in
    # 256), where the row has DRAW_MIN_WORDS words or more and its first non-empty word
    # DRAW_MIN_BITS slots or more. A shorter row's snapshot costs less than the draws'
    # mispredicted branches; a sparse one's, less than eight draws that nearly all miss.
    DRAW_TRIES = 8
    DRAW_MIN_WORDS = 4
    DRAW_MIN_BITS = 8


cdef inline uint32_t _level_of(uint32_t count) noexcept nogil:
    return count if count < LEVELS - 1 else LEVELS - 1


cdef inline uint64_t* _bits(SharedTable table, uint32_t level) noexcept nogil:
    return <uint64_t*>(table._index + level * table._index_row)


cdef inline uint32_t _desired(SharedTable table, Py_ssize_t s) noexcept nogil:
    """The level ``s`` belongs at (NO_LEVEL: none), from its inputs as they are now."""
    cdef uint32_t count, lim
    if <uint32_t>tm_load64(table._statusp(s)) != ACTIVE:
        return NO_LEVEL
    count = <uint32_t>tm_load64(table._word(s))
    lim = tm_load32(table._limitp(s))
    if lim != 0 and count >= lim:
        return NO_LEVEL
    return _level_of(count)


cdef void _sync_level(SharedTable table, Py_ssize_t s, uint32_t level) noexcept nogil:
    """Make ``s``'s bit at ``level`` agree with its inputs, read after the bit operation."""
    cdef uint64_t* word = _bits(table, level) + (s >> 6)
    cdef uint64_t bit = (<uint64_t>1) << (s & 63)
    cdef bint want = _desired(table, s) == level
    cdef bint now
    while True:
        _flip(word, bit, want)
        now = _desired(table, s) == level
        if now == want:
            return
        want = now


cdef inline void _flip(uint64_t* word, uint64_t bit, bint want) noexcept nogil:
    if ((tm_load64(word) & bit) != 0) != want:
        if want:
            tm_or64(word, bit)
        else:
            tm_and64(word, ~bit)


cdef inline void _sync_move(SharedTable table, Py_ssize_t s, uint32_t before,
                            uint32_t after) noexcept nogil:
    """After ``s``'s count went from ``before`` to ``after``: both levels' bits, the new one
    first (a pick never finds the slot in neither), by one read of the inputs before and
    one after (_sync_level's argument, for two levels at once); if they moved, level by
    level."""
    cdef uint32_t a = _level_of(before), b = _level_of(after), d
    cdef Py_ssize_t w = s >> 6
    cdef uint64_t bit = (<uint64_t>1) << (s & 63)
    if a == b:
        _sync_level(table, s, b)
        return
    d = _desired(table, s)
    _flip(_bits(table, b) + w, bit, d == b)
    _flip(_bits(table, a) + w, bit, d == a)
    if _desired(table, s) != d:
        _sync_level(table, s, b)
        _sync_level(table, s, a)


cdef inline void _sync_slot(SharedTable table, Py_ssize_t s) noexcept nogil:
    """After a change of ``s``'s status or limit: the level of its count."""
    _sync_level(table, s, _level_of(<uint32_t>tm_load64(table._word(s))))


cdef void _sync_all(SharedTable table) noexcept nogil:
    """Every level of every slot (reclaim: a dead process may have left any of them)."""
    cdef Py_ssize_t s
    cdef uint32_t level
    for s in range(tm_load32(table._high)):
        for level in range(LEVELS):
            _sync_level(table, s, level)


# -- slots this process's view rules out ----------------------------------------------------

cdef inline bint _in_view(SharedTable table, Py_ssize_t s, uint64_t status) noexcept nogil:
    return table._view_gen == NULL or (table._view_gen[s] == <uint32_t>(status >> 32) and (
        table._view_ejected == NULL or tm_load64(table._view_ejected + s) == 0))


cdef void _unskip_visible(SharedTable table) noexcept nogil:
    """Take out of this process's skip set every slot its view allows again, or that left
    the index (it is skipped again if a pick meets it there and the view still rules it
    out): the skip set is exact at every pick."""
    cdef Py_ssize_t i = 0, s
    cdef uint64_t status
    while i < table._nskip:
        s = table._skipped[i]
        status = tm_load64(table._statusp(s))
        if <uint32_t>status != ACTIVE or _in_view(table, s, status):
            table._nskip -= 1
            table._skipped[i] = table._skipped[table._nskip]
            table._skip[s >> 6] &= ~((<uint64_t>1) << (s & 63))
            _remask(table, s >> 6)
        else:
            i += 1


cdef inline void _skip_slot(SharedTable table, Py_ssize_t s) noexcept nogil:
    table._skip[s >> 6] |= (<uint64_t>1) << (s & 63)
    _remask(table, s >> 6)
    table._skipped[table._nskip] = <int32_t>s
    table._nskip += 1


cdef inline void _remask(SharedTable table, Py_ssize_t w) noexcept nogil:
    """After a change of word ``w`` of the skip set or of the odd slots' bitmap."""
    cdef Py_ssize_t c
    table._mask[w] = table._skip[w] | table._odd_bits[w]
    if w < table._class_words:
        for c in range(table._nclass):
            table._class_usable[c * table._class_words + w] = \
                table._class_bits[c * table._class_words + w] & ~table._skip[w]


cdef void _clear_skips(SharedTable table) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(table._nskip):
        table._skip[table._skipped[i] >> 6] = 0
        _remask(table, table._skipped[i] >> 6)
    table._nskip = 0


# -- the picks on the index -------------------------------------------------------------------

cdef Py_ssize_t _least_in_overflow(SharedTable table, Py_ssize_t words) noexcept nogil:
    """The last level holds every count from LEVELS - 1 up: the scan's two passes, over its
    bits only."""
    cdef uint64_t* row = _bits(table, LEVELS - 1)
    cdef Py_ssize_t w, s, best = -1
    cdef uint64_t x, status, ties = 0, best_status = 0
    cdef uint32_t count, best_count = 0
    cdef int64_t r
    for w in range(words):
        x = tm_load64(row + w) & ~table._skip[w]
        while x:
            s = (w << 6) + tm_lowest64(x)
            x &= x - 1
            if not _pickable(table, s, &status, &count):
                continue
            if best < 0 or count < best_count:
                best, best_count, best_status, ties = s, count, status, 1
            else:
                ties += count == best_count
    table._scanned = best_status
    if ties <= 1:
        return best
    r = <int64_t>table._below(ties)
    for w in range(best >> 6, words):
        x = tm_load64(row + w) & ~table._skip[w]
        if w == best >> 6:
            x &= ~(((<uint64_t>1) << (best & 63)) - 1)
        while x:
            s = (w << 6) + tm_lowest64(x)
            x &= x - 1
            if _pickable(table, s, &status, &count) and count == best_count:
                r -= 1
                if r < 0:
                    table._scanned = status
                    return s
    return best


cdef int _check_drawn(SharedTable table, Py_ssize_t s, uint32_t level) noexcept nogil:
    """Slot ``s``, drawn from ``level``'s row (or a snapshot of it): 1 it is the pick
    (``_scanned`` set), 0 this process's view rules it out (it is now in the skip set), -1
    the index was stale (the slot left the level or stopped being pickable since)."""
    cdef uint64_t status = tm_load64(table._statusp(s))
    cdef uint32_t count
    if <uint32_t>status == ACTIVE and not _in_view(table, s, status):
        _skip_slot(table, s)
        return 0
    if not _pickable(table, s, &status, &count) or count > level:
        return -1
    table._scanned = status
    return 1


cdef inline bint _in_row(SharedTable table, uint64_t* row, Py_ssize_t s) noexcept nogil:
    """Whether slot ``s``'s bit is in ``row``, less this process's mask."""
    return (tm_load64(row + (s >> 6)) & ~table._mask[s >> 6]) >> (s & 63) & 1


cdef inline Py_ssize_t _draw_in_row(SharedTable table, uint64_t* row,
                                    Py_ssize_t high) noexcept nogil:
    """A uniform slot id below ``high``, kept if its bit is in the row (masked), up to
    DRAW_TRIES times; -1 when every try missed."""
    cdef Py_ssize_t s, _i
    for _i in range(DRAW_TRIES):
        s = <Py_ssize_t>table._below(<uint64_t>high)
        if _in_row(table, row, s):
            return s
    return -1


cdef Py_ssize_t _index_least(SharedTable table) noexcept nogil:
    """The least-outstanding pickable slot, uniform among ties, from the index: the lowest
    level with a slot this process may use, then a slot of it drawn by rejection (a uniform
    slot id, kept if it is in the row) up to DRAW_TRIES times where the row is long and not
    sparse, else its r-th such slot in slot order for one random r (the scan's tie-break).
    Each try is a uniform draw from the level's slots or nothing, and the fallback is
    uniform among them too, so the pick is uniform among the ties whichever way it ends;
    the twin makes the same draws. With odd slots the draws also keep one tied with the
    level (_draw_with_odd); one below it, or no draw, and _least_with_odd decides. -1: the
    index had nothing, or what it had was stale; the caller scans."""
    cdef Py_ssize_t high = tm_load32(table._high)
    cdef Py_ssize_t words = (high + 63) >> 6
    cdef Py_ssize_t s
    cdef uint32_t level
    cdef uint64_t* row
    cdef uint64_t ties, first
    cdef int drawn
    if table._nskip:
        _unskip_visible(table)
    for level in range(LEVELS - 1):
        row = _bits(table, level)
        while True:
            s = -1
            if words >= DRAW_MIN_WORDS:
                first = tm_row_first(row, table._mask, words)
                if first == 0:
                    break
                if first >= DRAW_MIN_BITS and not table._nodd:
                    s = _draw_in_row(table, row, high)
                elif first >= DRAW_MIN_BITS:
                    s = _draw_with_odd(table, row, high, level)
                    if s >= 0 and (table._odd_bits[s >> 6] >> (s & 63)) & 1:
                        return s  # an odd slot, checked as it was read
            if s < 0:
                # One pass keeps a snapshot of the row; the draw selects from it. A slot
                # that left the level since is caught by the check against its count below.
                ties = tm_row_snapshot(row, table._mask, words, table._snap, table._cum)
                if ties == 0:
                    break
                if table._nodd:
                    return _least_with_odd(table, level, table._class_weight[0], ties, words)
                s = tm_snap_select(table._snap, table._cum, words,
                                   table._below(ties) if ties > 1 else 0)
            drawn = _check_drawn(table, s, level)
            if drawn == 0:
                continue  # draw again among the rest of this level
            return s if drawn > 0 else -1
    if table._nodd:
        return -1  # the common weight's slots all count LEVELS - 1 or more: the scan decides
    return _least_in_overflow(table, words)


cdef Py_ssize_t _sample_random(SharedTable table) noexcept nogil:
    """RANDOM by rejection: a uniform slot id below the high-water mark, kept if pickable
    and then with probability weight / the largest weight. Each try is a draw from the
    weighted distribution or nothing, so the answer is exact; after RANDOM_TRIES misses
    (few pickable slots) the weighted scan decides."""
    cdef Py_ssize_t high = tm_load32(table._high), s, _i
    cdef uint64_t status
    cdef uint32_t count
    if high == 0:
        return -1
    _read_weights(table)
    for _i in range(RANDOM_TRIES):
        s = <Py_ssize_t>table._below(<uint64_t>high)
        if not _pickable(table, s, &status, &count):
            continue
        if (table._nodd or table._nclass > 1) and (
                <double>(xorshift64star(&table._rng) >> 11) * (1.0 / 9007199254740992.0) *
                table._top_weight >= tm_load_f64(table._weightp(s))):
            continue
        table._scanned = status
        return s
    return _scan_random(table)


cdef int _check_index(SharedTable table) except -1:
    """At quiescence: each slot's bit is set at its level and nowhere else."""
    cdef Py_ssize_t s
    cdef uint32_t level, want
    cdef bint on
    for s in range(table._capacity):
        want = _desired(table, s)
        for level in range(LEVELS):
            on = (tm_load64(_bits(table, level) + (s >> 6)) >> (s & 63)) & 1
            if on != (want == level):
                raise AssertionError(
                    f"slot {s}: the pick index has it {'at' if on else 'not at'} level "
                    f"{level}, its count {<uint32_t>tm_load64(table._word(s))} and state say "
                    f"{'none' if want == NO_LEVEL else want}")
    return 0
