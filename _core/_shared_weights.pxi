# Weights and the pick index. A level is a count, so it orders slots of one weight only.
# Each process keeps a picture of the weights, once per membership generation (every add,
# remove, weight and availability change bumps it): the *common* weight (a majority vote
# over the ACTIVE slots) and the *odd* slots, the ACTIVE ones of any other weight (an
# instance in slow start, a weighted variant's few), in slot order, with a bitmap. Its
# least-outstanding picks read the index without the odd slots, read those one by one, and
# take the least (count + 1) / weight of both, uniform among ties across both; with more
# than ODD_MAX odd slots (weights spread evenly) the picture says "scan". The answer is the
# scan's: both take the r-th tied slot in slot order for one draw in [0, ties).


cdef extern from "atomics.h" nogil:
    uint64_t tm_snap_rank(const uint64_t* snap, const uint32_t* cum, Py_ssize_t s)

cdef enum:
    # The most odd slots a pick reads one by one, beside the index (a handful of instances in
    # slow start at once); past it, every slot (the scan), which costs what a pick cost
    # before the picture.
    ODD_MAX = 32


cdef inline void _odd_bit(SharedTable table, Py_ssize_t s, bint on) noexcept nogil:
    if on:
        table._odd_bits[s >> 6] |= (<uint64_t>1) << (s & 63)
    else:
        table._odd_bits[s >> 6] &= ~((<uint64_t>1) << (s & 63))
    _remask(table, s >> 6)


cdef void _read_weights(SharedTable table) noexcept nogil:
    """This process's picture of the weights, and the largest (pick_random), once per
    membership generation (read before the weights: a change after it bumps it again)."""
    cdef uint64_t gen = tm_load64(table._generation)
    cdef Py_ssize_t s, i, high, votes = 0
    cdef double w, common = 0.0, top = 0.0
    if gen == table._weights_gen:
        return
    high = tm_load32(table._high)
    # Boyer-Moore's vote finds the weight most slots have when one has a majority; any
    # choice is exact (the odd list is what differs from it), the majority is fastest.
    for s in range(high):
        if <uint32_t>tm_load64(table._statusp(s)) != ACTIVE:
            continue
        w = tm_load_f64(table._weightp(s))
        if votes == 0:
            common = w
        votes += 1 if w == common else -1
        if w > top:
            top = w
    for i in range(table._nodd):
        _odd_bit(table, table._odd[i], False)
    table._nodd = 0
    for s in range(high):
        if <uint32_t>tm_load64(table._statusp(s)) != ACTIVE or \
                tm_load_f64(table._weightp(s)) == common:
            continue
        if table._nodd == ODD_MAX:
            for i in range(table._nodd):
                _odd_bit(table, table._odd[i], False)
            table._nodd = ODD_MAX + 1
            break
        table._odd[table._nodd] = <int32_t>s
        table._nodd += 1
        _odd_bit(table, s, True)
    table._common_weight = common
    table._indexed = table._nodd <= ODD_MAX
    table._top_weight = top
    table._weights_gen = gen


cdef Py_ssize_t _least_with_odd(SharedTable table, uint32_t level, uint64_t ties,
                                Py_ssize_t words) noexcept nogil:
    """The least-outstanding pick when the index's lowest level with a slot of the common
    weight is ``level``, with ``ties`` of them in the snapshot (_index_least), and the odd
    slots are read one by one. -1: what the index had was stale, or is ruled out by this
    process's view (put in the skip set); the caller scans."""
    cdef double common = table._common_weight, w, best_w = 0.0, lhs, rhs
    cdef Py_ssize_t i, s, best = -1, first = 0, k = 0
    cdef uint64_t status, best_status = 0, odd_ties = 0, r, place
    cdef uint32_t count, best_count = 0
    # The least odd slot, the first in slot order among equals, and its ties: the scan's
    # first pass, over the odd slots only.
    for i in range(table._nodd):
        s = table._odd[i]
        if not _pickable(table, s, &status, &count):
            continue
        w = tm_load_f64(table._weightp(s))
        lhs = (<double>count + 1.0) * best_w
        rhs = (<double>best_count + 1.0) * w
        if best < 0 or lhs < rhs:
            best, best_count, best_w, best_status, odd_ties, first = s, count, w, status, 1, i
        else:
            odd_ties += lhs == rhs
    if best >= 0:
        lhs = (<double>level + 1.0) * best_w
        rhs = (<double>best_count + 1.0) * common
        if rhs < lhs:
            ties = 0
        elif lhs < rhs:
            odd_ties = 0
    r = table._below(ties + odd_ties) if ties + odd_ties > 1 else 0
    # The r-th of both tied sets in slot order: an odd tie's place is its rank among the
    # odd ties plus the index's ties before it.
    if odd_ties:
        for i in range(first, table._nodd):
            s = table._odd[i]
            if not _pickable(table, s, &status, &count) or (<double>count + 1.0) * best_w != \
                    (<double>best_count + 1.0) * tm_load_f64(table._weightp(s)):
                continue
            place = k + (tm_snap_rank(table._snap, table._cum, s) if ties else 0)
            if r < place:
                break
            if r == place:
                table._scanned = status
                return s
            k += 1
        if not ties:
            table._scanned = best_status  # the counts moved: fewer ties than drawn for
            return best
    if r - k >= ties:
        return -1  # the counts moved
    s = tm_snap_select(table._snap, table._cum, words, r - k)
    return s if _check_drawn(table, s, level) > 0 else -1
