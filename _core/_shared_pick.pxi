cdef inline bint _pickable(SharedTable table, Py_ssize_t s, uint64_t* status, uint32_t* count) \
        noexcept nogil:
    status[0] = tm_load64(table._statusp(s))
    if <uint32_t>status[0] != ACTIVE:
        return False
    if table._view_gen != NULL and (table._view_gen[s] != <uint32_t>(status[0] >> 32) or (
            table._view_ejected != NULL and tm_load64(table._view_ejected + s) != 0)):
        return False
    count[0] = <uint32_t>tm_load64(table._word(s))
    cdef uint32_t lim = tm_load32(table._limitp(s))
    return lim == 0 or count[0] < lim


cdef inline bint _take(SharedTable table, Py_ssize_t s, uint64_t status) noexcept nogil:
    """+1 on the scanned slot ``s``, kept only if it is still ACTIVE in that generation."""
    if not _update(table, s, True, tm_load32(table._limitp(s))):
        return False
    if tm_load64(table._statusp(s)) == status:
        return True
    _drop(table, s)
    return False


cdef Py_ssize_t _scan_least(SharedTable table) noexcept nogil:
    """The pickable slot with the lowest (count + 1) / weight, uniform among ties.

    Two passes rather than one with a reservoir: a random number (a division) per tied
    slot costs more than reading the tied slots again. Pass 2 starts at the first
    minimum; if the counts moved meanwhile and it finds fewer ties, the first stands.
    Ties are counted without a branch: with counts near the minimum mixed at random,
    a branch on "tied or above" is mispredicted half the time.
    """
    cdef Py_ssize_t high = tm_load32(table._high)
    cdef Py_ssize_t s, best = -1
    cdef uint64_t ties = 0, status, best_status = 0
    cdef int64_t r
    cdef uint32_t count, best_count = 0
    cdef double w, best_w = 0.0, lhs, rhs
    for s in range(high):
        if not _pickable(table, s, &status, &count):
            continue
        w = tm_load_f64(table._weightp(s))
        lhs = (<double>count + 1.0) * best_w
        rhs = (<double>best_count + 1.0) * w
        if lhs < rhs or best < 0:
            best, best_count, best_w, best_status, ties = s, count, w, status, 1
        else:
            ties += lhs == rhs
    table._scanned = best_status
    if ties <= 1:
        return best
    r = <int64_t>table._below(ties)
    for s in range(best, high):
        if not _pickable(table, s, &status, &count):
            continue
        r -= (<double>count + 1.0) * best_w == \
            (<double>best_count + 1.0) * tm_load_f64(table._weightp(s))
        if r < 0:
            table._scanned = status
            return s
    return best


cdef Py_ssize_t _scan_random(SharedTable table) noexcept nogil:
    cdef Py_ssize_t high = tm_load32(table._high)
    cdef Py_ssize_t s, chosen = -1
    cdef double total = 0.0, w
    cdef uint64_t status
    cdef uint32_t count
    # One pass, weighted reservoir: keep slot s with probability w_s / (sum so far).
    for s in range(high):
        if not _pickable(table, s, &status, &count):
            continue
        w = tm_load_f64(table._weightp(s))
        total += w
        if <double>(xorshift64star(&table._rng) >> 11) * (1.0 / 9007199254740992.0) * total < w:
            chosen, table._scanned = s, status
    return chosen


cdef Py_ssize_t _sample(SharedTable table, Py_ssize_t high, Py_ssize_t skip, uint64_t* status,
                        uint32_t* count) noexcept nogil:
    """A uniformly random pickable slot other than ``skip``, by rejection; -1 when
    ``high`` tries in a row found none (then the caller falls back to a scan)."""
    cdef Py_ssize_t s, _i
    for _i in range(high + 8):
        s = <Py_ssize_t>table._below(<uint64_t>high)
        if s != skip and _pickable(table, s, status, count):
            return s
    return -1


cdef Py_ssize_t _pick_two(SharedTable table) except -2:
    cdef Py_ssize_t high, a, b, s, _attempt
    cdef uint64_t sa, sb
    cdef uint32_t ca, cb
    cdef double lhs, rhs
    if table._base == NULL:
        raise ValueError("the table is closed")
    for _attempt in range(PICK_ATTEMPTS):
        high = tm_load32(table._high)
        if high == 0:
            return -1
        a = _sample(table, high, -1, &sa, &ca)
        if a < 0:
            a = _scan_random(table)
            if a < 0:
                return -1
            sa = table._scanned
            ca = <uint32_t>tm_load64(table._word(a))
        b = _sample(table, high, a, &sb, &cb)
        s, table._scanned = a, sa
        if b >= 0:
            lhs = (<double>ca + 1.0) * tm_load_f64(table._weightp(b))
            rhs = (<double>cb + 1.0) * tm_load_f64(table._weightp(a))
            if rhs < lhs or (rhs == lhs and xorshift64star(&table._rng) & 1):
                s, table._scanned = b, sb
        if _take(table, s, table._scanned):
            return s
    return -1
