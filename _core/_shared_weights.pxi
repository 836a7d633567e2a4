# Weights and the pick index. A level is a count, so it orders slots of one weight only.
# Each process keeps a picture of the weights, once per membership generation (every add,
# remove, weight and availability change bumps it): up to CLASSES weight *classes*, the
# weights most ACTIVE slots have (the fleet's common weight; weighted variants and mixed
# instance sizes: a few weights, many instances each), each with a bitmap of its slots, and
# the *odd* slots, the ACTIVE ones of any other weight (an instance in slow start), in slot
# order, with a bitmap. Its least-outstanding picks read the index per class (each class's
# lowest level with a slot: its least (count + 1) / weight), read the odd slots one by one,
# and take the least of all, uniform among ties across all; with more than ODD_MAX odd slots
# (more distinct weights than classes, spread evenly) the picture says "scan". The answer
# is the scan's: both take the r-th tied slot in slot order for one draw in [0, ties).


cdef extern from "atomics.h" nogil:
    uint64_t tm_snap_rank(const uint64_t* snap, const uint32_t* cum, Py_ssize_t s)
    uint32_t tm_row_classes(uint64_t* row, const uint64_t* cls, int nclass, Py_ssize_t words)
    uint64_t tm_classes_snapshot(uint64_t* index, Py_ssize_t stride, const uint64_t* cls,
                                 const uint32_t* at, uint32_t tied, int nclass,
                                 Py_ssize_t words, uint64_t* snap, uint32_t* cum)
    uint64_t tm_classes_word(uint64_t* index, Py_ssize_t stride, const uint64_t* cls,
                             const uint32_t* at, uint32_t tied, int nclass, Py_ssize_t words,
                             Py_ssize_t w)
    uint64_t tm_classes_first(uint64_t* index, Py_ssize_t stride, const uint64_t* cls,
                              const uint32_t* at, uint32_t tied, int nclass, Py_ssize_t words)

cdef enum:
    # The most odd slots a pick reads one by one, beside the index (a handful of instances in
    # slow start at once); past it, every slot (the scan), which costs what a pick cost
    # before the picture.
    ODD_MAX = 32
    # A weight of this many slots or more is a class of its own (while there are classes to
    # spare); fewer stay odd: a slot or two in slow start cost a read each, less than one
    # more bitmap to AND into every index row a pick reads.
    CLASS_MIN = 4


cdef inline void _odd_bit(SharedTable table, Py_ssize_t s, bint on) noexcept nogil:
    if on:
        table._odd_bits[s >> 6] |= (<uint64_t>1) << (s & 63)
    else:
        table._odd_bits[s >> 6] &= ~((<uint64_t>1) << (s & 63))
    _remask(table, s >> 6)


cdef Py_ssize_t _weight_candidates(SharedTable table, Py_ssize_t high, double* weight,
                                   Py_ssize_t* slots) noexcept nogil:
    """The weights of up to CLASSES classes, most slots first, with their ACTIVE slots'
    numbers; returns how many. Misra and Gries' heavy hitters find every weight more than
    1 / (CLASSES + 1) of the slots have (and the majority's, where one has it), then a
    second pass counts them exactly. Any choice is exact (the odd slots are what differs);
    the most common are the fastest."""
    cdef Py_ssize_t s, c, n = 0
    cdef double w
    for s in range(high):
        if <uint32_t>tm_load64(table._statusp(s)) != ACTIVE:
            continue
        w = tm_load_f64(table._weightp(s))
        for c in range(n):
            if weight[c] == w:
                slots[c] += 1
                break
        else:
            if n < CLASSES:
                weight[n], slots[n] = w, 1
                n += 1
            else:
                c = 0
                while c < n:
                    slots[c] -= 1
                    if slots[c] == 0:
                        n -= 1
                        weight[c], slots[c] = weight[n], slots[n]
                    else:
                        c += 1
    for c in range(n):
        slots[c] = 0
    for s in range(high):
        if <uint32_t>tm_load64(table._statusp(s)) != ACTIVE:
            continue
        w = tm_load_f64(table._weightp(s))
        for c in range(n):
            if weight[c] == w:
                slots[c] += 1
                break
    for s in range(1, n):  # most slots first (insertion sort of at most CLASSES)
        c = s
        while c > 0 and slots[c] > slots[c - 1]:
            weight[c], weight[c - 1] = weight[c - 1], weight[c]
            slots[c], slots[c - 1] = slots[c - 1], slots[c]
            c -= 1
    return n


cdef inline void _read_weights(SharedTable table) noexcept nogil:
    """This process's picture of the weights, and the largest (pick_random), once per
    membership generation (read before the weights: a change after it bumps it again).
    Inline: every pick asks, and the answer is nearly always "as before"."""
    cdef uint64_t gen = tm_load64(table._generation)
    if gen != table._weights_gen:
        _picture_weights(table, gen)


cdef void _picture_weights(SharedTable table, uint64_t gen) noexcept nogil:
    cdef Py_ssize_t s, i, c, high, n, nclass, odd = 0
    cdef Py_ssize_t slots[CLASSES]
    cdef double weight[CLASSES]
    cdef double w, top = 0.0
    high = tm_load32(table._high)
    n = _weight_candidates(table, high, weight, slots)
    for c in range(n):
        odd += slots[c]
    # The classes: the common weight, and the next most common ones of CLASS_MIN slots or
    # more, or while the rest are more than a pick reads one by one.
    nclass = 1
    odd -= slots[0] if n else 0
    while nclass < n and (slots[nclass] >= CLASS_MIN or odd > ODD_MAX):
        odd -= slots[nclass]
        nclass += 1
    if table._nodd <= ODD_MAX:  # past it (the scan) the bits are already clear
        for i in range(table._nodd):
            _odd_bit(table, table._odd[i], False)
    table._nodd = 0
    for i in range(table._nclass * table._class_words):
        table._class_bits[i] = 0
    table._class_words = (high + 63) >> 6
    table._class_weight[0] = weight[0] if n else 0.0
    for c in range(1, nclass):
        table._class_weight[c] = weight[c]
    for s in range(high):
        if <uint32_t>tm_load64(table._statusp(s)) != ACTIVE:
            continue
        w = tm_load_f64(table._weightp(s))
        if w > top:
            top = w
        if table._nodd > ODD_MAX:
            continue
        for c in range(nclass):
            if w == table._class_weight[c]:
                table._class_bits[c * table._class_words + (s >> 6)] |= \
                    (<uint64_t>1) << (s & 63)
                table._class_of[s] = <unsigned char>c
                break
        else:
            if table._nodd == ODD_MAX:
                for i in range(table._nodd):
                    _odd_bit(table, table._odd[i], False)
                table._nodd = ODD_MAX + 1
                continue
            table._odd[table._nodd] = <int32_t>s
            table._nodd += 1
            _odd_bit(table, s, True)
    table._nclass = nclass
    for i in range(CLASSES * table._class_words):
        table._class_usable[i] = table._class_bits[i] & ~table._skip[i % table._class_words]
    table._indexed = table._nodd <= ODD_MAX
    table._top_weight = top
    table._weights_gen = gen


cdef inline uint32_t _drawn_level(SharedTable table, Py_ssize_t s, uint32_t level) noexcept nogil:
    """The level a slot drawn from the pick's snapshot was read at: its class's."""
    return level if table._nclass == 1 else table._class_level[table._class_of[s]]


cdef Py_ssize_t _least_by_class(SharedTable table) noexcept nogil:
    """The least-outstanding pick with several weight classes: each class's lowest level
    with a slot this process may use, read level by level until no class left can tie the
    best so far ((level + 1) / its weight above the best's); the tied classes' slots at
    their levels, and the odd ones, are the ties. Without odd ones, one of them drawn by
    rejection where _index_least would draw (the rows long, the ties' first word dense);
    else the r-th of them in slot order for one random r (the scan's tie-break, as
    _index_least). -1: nothing there, a class whose best is in the last level (its counts
    differ: the scan decides), or something stale."""
    cdef Py_ssize_t words = (tm_load32(table._high) + 63) >> 6
    cdef int nclass = <int>table._nclass, c, best
    cdef uint32_t level, found, have, pending, tied
    cdef uint64_t* index = <uint64_t*>table._index
    cdef Py_ssize_t stride = table._index_row >> 3
    cdef double* cw = table._class_weight
    cdef uint32_t* lv = table._class_level
    cdef uint64_t ties
    cdef Py_ssize_t s
    cdef int drawn
    if words > table._class_words:
        words = table._class_words  # slots added since the picture: the next one has them
    if table._nskip:
        _unskip_visible(table)
    while True:
        best, have = -1, 0
        pending = ((<uint32_t>1) << nclass) - 1
        for level in range(<uint32_t>LEVELS):
            for c in range(nclass):
                if best >= 0 and (pending >> c) & 1 and \
                        (<double>level + 1.0) * cw[best] > (<double>lv[best] + 1.0) * cw[c]:
                    pending &= ~((<uint32_t>1) << c)
            if not pending:
                break
            found = tm_row_classes(_bits(table, level), table._class_usable, nclass,
                                   words) & pending
            if not found:
                continue
            if level == LEVELS - 1:
                return -1
            for c in range(nclass):
                if (found >> c) & 1:
                    lv[c] = level
                    if best < 0 or (<double>level + 1.0) * cw[best] < \
                            (<double>lv[best] + 1.0) * cw[c]:
                        best = c
            have |= found
            pending &= ~found
        if best < 0:
            return -1
        tied = 0
        for c in range(nclass):
            if (have >> c) & 1 and \
                    (<double>lv[c] + 1.0) * cw[best] == (<double>lv[best] + 1.0) * cw[c]:
                tied |= (<uint32_t>1) << c
        s = -1
        if not table._nodd and words >= DRAW_MIN_WORDS and tm_classes_first(
                index, stride, table._class_usable, lv, tied, nclass,
                words) >= DRAW_MIN_BITS:
            s = _draw_in_classes(table, tied, words)
        if s < 0:
            ties = tm_classes_snapshot(index, stride, table._class_usable, lv, tied,
                                       nclass, words, table._snap, table._cum)
            if table._nodd:
                return _least_with_odd(table, lv[best], cw[best], ties, words)
            if ties == 0:
                # The walk and the snapshot read the live rows at two moments: other
                # processes moved every tied slot off its level in between. Selecting
                # from an empty snapshot would read past it and draw a slot id past the
                # rows; the scan decides instead.
                return -1
            s = tm_snap_select(table._snap, table._cum, words,
                               table._below(ties) if ties > 1 else 0)
        drawn = _check_drawn(table, s, lv[table._class_of[s]])
        if drawn != 0:
            return s if drawn > 0 else -1
        # this process's view rules the slot out (now skipped): read the index again


cdef Py_ssize_t _draw_in_classes(SharedTable table, uint32_t tied,
                                 Py_ssize_t words) noexcept nogil:
    """_draw_in_row over the tied classes' slots at their levels' rows: up to DRAW_TRIES
    uniform slot ids, the first among them kept."""
    cdef Py_ssize_t high = tm_load32(table._high), s, _i
    for _i in range(DRAW_TRIES):
        s = <Py_ssize_t>table._below(<uint64_t>high)
        if (s >> 6) < words and (tm_classes_word(
                <uint64_t*>table._index, table._index_row >> 3, table._class_usable,
                table._class_level, tied, <int>table._nclass,
                words, s >> 6) >> (s & 63)) & 1:
            return s
    return -1


cdef Py_ssize_t _draw_with_odd(SharedTable table, uint64_t* row, Py_ssize_t high,
                               uint32_t level) noexcept nogil:
    """_draw_in_row with odd slots, ``level`` the common weight's lowest (an instance in
    slow start: the common case of an odd slot). The odd slots are read one by one first:
    one below (level + 1) / the common weight, -1 (_least_with_odd decides). Else up to
    DRAW_TRIES uniform slot ids, the first kept that is in the row or an odd slot tied with
    it (its ``_scanned`` set): each try is uniform over the ties or nothing, as
    _draw_in_row's. -1: every try missed."""
    cdef double common = table._class_weight[0], lhs, rhs
    cdef uint64_t status[ODD_MAX]
    cdef uint64_t tied = 0
    cdef uint32_t count
    cdef Py_ssize_t i, s, _t
    for i in range(table._nodd):
        if not _pickable(table, table._odd[i], &status[i], &count):
            continue
        lhs = (<double>count + 1.0) * common
        rhs = (<double>level + 1.0) * tm_load_f64(table._weightp(table._odd[i]))
        if lhs < rhs:
            return -1
        if lhs == rhs:
            tied |= (<uint64_t>1) << i
    for _t in range(DRAW_TRIES):
        s = <Py_ssize_t>table._below(<uint64_t>high)
        if _in_row(table, row, s):
            return s
        if tied and (table._odd_bits[s >> 6] >> (s & 63)) & 1:
            for i in range(table._nodd):
                if table._odd[i] == s and (tied >> i) & 1:
                    table._scanned = status[i]
                    return s
    return -1


cdef Py_ssize_t _least_with_odd(SharedTable table, uint32_t level, double common,
                                uint64_t ties, Py_ssize_t words) noexcept nogil:
    """The least-outstanding pick when the index's least is ``level`` in a class of weight
    ``common``, with ``ties`` tied slots in the snapshot (_index_least, _least_by_class),
    and the odd slots are read one by one. -1: what the index had was stale, or is ruled
    out by this process's view (put in the skip set); the caller scans."""
    cdef double w, best_w = 0.0, lhs, rhs
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
    return s if _check_drawn(table, s, _drawn_level(table, s, level)) > 0 else -1
