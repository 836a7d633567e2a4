cdef Py_ssize_t _add(SharedTable table, weight, limit) except -1:
    cdef double w = table._check_weight(weight)
    cdef uint32_t lim = table._check_limit(limit)
    cdef Py_ssize_t s
    cdef uint64_t st
    cdef uint32_t gen, high
    if table._base == NULL:
        raise ValueError("the table is closed")
    for s in range(table._capacity):
        st = tm_load64(table._statusp(s))
        if <uint32_t>st != FREE:
            continue
        gen = <uint32_t>(st >> 32) + 1
        if tm_cas64(table._statusp(s), &st,
                    _status(CLAIMED | <uint32_t>((table._pi + 1) << 8), gen)):
            break
    else:
        raise ValueError(f"the shared table is full (capacity {table._capacity})")
    tm_store_f64(table._weightp(s), w)
    tm_store32(table._limitp(s), lim)
    high = tm_load32(table._high)
    while high < s + 1:
        if tm_cas32(table._high, &high, <uint32_t>(s + 1)):
            break
    tm_store64(table._statusp(s), _status(ACTIVE, gen))
    _sync_slot(table, s)
    tm_add64(table._generation, 1)
    return s


cdef int _remove(SharedTable table, Py_ssize_t slot) except -1:
    table._live(slot)
    cdef uint64_t st = tm_load64(table._statusp(slot))
    while True:
        if <uint32_t>st == REMOVED:
            return 0
        if <uint32_t>st == FREE or (<uint32_t>st & STATE_MASK) == CLAIMED:
            raise IndexError(f"slot {slot} is not in the table")
        if tm_cas64(table._statusp(slot), &st, _status(REMOVED, <uint32_t>(st >> 32))):
            break
    st = _status(REMOVED, <uint32_t>(st >> 32))
    _sync_slot(table, slot)
    if <uint32_t>tm_load64(table._word(slot)) == 0:
        tm_cas64(table._statusp(slot), &st, _status(FREE, <uint32_t>(st >> 32)))
    tm_add64(table._generation, 1)
    return 0


cdef int _set_available(SharedTable table, Py_ssize_t slot, bint available) except -1:
    table._live(slot)
    cdef uint64_t st = tm_load64(table._statusp(slot))
    cdef uint32_t want = ACTIVE if available else UNAVAILABLE
    while <uint32_t>st != want:
        if <uint32_t>st == REMOVED:
            raise ValueError(f"slot {slot} was removed")
        if <uint32_t>st != ACTIVE and <uint32_t>st != UNAVAILABLE:
            raise IndexError(f"slot {slot} is not in the table")
        if tm_cas64(table._statusp(slot), &st, _status(want, <uint32_t>(st >> 32))):
            _sync_slot(table, slot)
            tm_add64(table._generation, 1)
            break
    return 0
