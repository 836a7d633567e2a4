cdef inline void _help(SharedTable table, Py_ssize_t s, uint64_t g) noexcept nogil:
    """Apply the stamped update on count word ``g`` to its process's ledger, if it is not."""
    cdef uint32_t stamp = <uint32_t>(g >> 32)
    cdef uint64_t* cell
    cdef uint64_t cur
    cdef uint32_t seq, held
    if stamp == 0:
        return
    cell = table._cell((stamp >> 25) - 1, s)
    cur = tm_load64(cell)
    seq = <uint32_t>(cur >> 32) + 1
    if (seq & SEQ_MASK) != (stamp & SEQ_MASK):
        return
    held = <uint32_t>cur
    held = held - 1 if stamp & STAMP_NEG else held + 1
    tm_cas64(cell, &cur, ((<uint64_t>seq) << 32) | held)


cdef int _update(SharedTable table, Py_ssize_t s, bint up, uint32_t limit) noexcept nogil:
    """+1 (``up``, refused at ``limit`` when it is not 0) or -1 on slot ``s``, in the
    global count and this process's ledger. Returns 1, or 0 when refused."""
    cdef uint64_t* cell = table._mine + s
    cdef uint64_t* word = table._word(s)
    cdef uint64_t cur = tm_load64(cell)
    cdef uint32_t seq = <uint32_t>(cur >> 32) + 1
    cdef uint32_t held = <uint32_t>cur
    cdef uint64_t stamp = ((<uint64_t>(table._pi + 1)) << 25) | (seq & SEQ_MASK)
    cdef uint64_t g = tm_load64(word)
    cdef uint32_t count
    if not up:
        stamp |= STAMP_NEG
    while True:
        _help(table, s, g)
        count = <uint32_t>g
        if up and limit != 0 and count >= limit:
            return 0
        count = count + 1 if up else count - 1
        if tm_cas64(word, &g, (stamp << 32) | count):
            break
    held = held + 1 if up else held - 1
    # A store, not a compare-and-swap: besides this process, only a helper applying this
    # very stamp (the same value, from the same cell) and reclaim (after this process is
    # dead) write this cell, and a helper that comes after the store fails its CAS from
    # ``cur``. Release orders it after the count step for the reclaim that follows a death.
    tm_store64_release(cell, ((<uint64_t>seq) << 32) | held)
    _sync_move(table, s, <uint32_t>g, count)
    return 1


cdef void _drop(SharedTable table, Py_ssize_t s) noexcept nogil:
    """-1 on ``s``; frees the slot when it is REMOVED and this was its last request."""
    cdef uint64_t st
    _update(table, s, False, 0)
    if <uint32_t>tm_load64(table._word(s)) == 0:
        st = tm_load64(table._statusp(s))
        if <uint32_t>st == REMOVED:
            if tm_cas64(table._statusp(s), &st, _status(FREE, <uint32_t>(st >> 32))):
                tm_add64(table._generation, 1)


cdef int _check_slot_live(SharedTable table, Py_ssize_t s, int tries) except -2:
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
        g = tm_load64(table._word(s))
        stamp = <uint32_t>(g >> 32)
        owner = <Py_ssize_t>(stamp >> 25) - 1 if stamp else -1
        total = 0
        for p in range(table._max_processes):
            cur = tm_load64(table._cell(p, s))
            held = <uint32_t>cur
            if p == owner and ((<uint32_t>(cur >> 32) + 1) & SEQ_MASK) == (stamp & SEQ_MASK):
                held = held - 1 if stamp & STAMP_NEG else held + 1
            total += held
        if tm_load64(table._word(s)) != g:
            continue
        if total != <uint32_t>g:
            raise AssertionError(f"slot {s}: global count {<uint32_t>g} != sum of ledgers "
                                 f"{total} (with the pending update)")
        return 1
    return 0


cdef int _debug_after(SharedTable table, Py_ssize_t s) except -1:
    _check_slot_live(table, s, 8)
    return 0


cdef Py_ssize_t _reclaim(SharedTable table, Py_ssize_t process_index) except -1:
    cdef uint64_t* pidp = <uint64_t*>(table._procs + process_index * 64)
    cdef uint32_t* waiting = <uint32_t*>(table._procs + process_index * 64 + P_WAITING)
    cdef uint32_t claimed = CLAIMED | <uint32_t>((process_index + 1) << 8)
    cdef Py_ssize_t s
    cdef uint64_t* cell
    cdef uint64_t cur, g
    cdef uint32_t held
    cdef Py_ssize_t total = 0
    # The whole capacity, not the high-water mark: a process may die between claiming a
    # slot in add() and raising the mark.
    for s in range(table._capacity):
        g = tm_load64(table._statusp(s))
        if <uint32_t>g == claimed:  # it died inside add()
            tm_cas64(table._statusp(s), &g, _status(FREE, <uint32_t>(g >> 32)))
        _help(table, s, tm_load64(table._word(s)))
        cell = table._cell(process_index, s)
        cur = tm_load64(cell)
        held = <uint32_t>cur
        if held:
            g = tm_load64(table._word(s))
            # Keep the stamp: it may be another process's update, not yet in its ledger.
            while not tm_cas64(table._word(s), &g, (g & 0xFFFFFFFF00000000) |
                               <uint32_t>(<uint32_t>g - held)):
                pass
            tm_store64(cell, cur & 0xFFFFFFFF00000000)
            total += held
        # Also when it held nothing here: it may have died between its last release's
        # count update and freeing the removed slot, or inside remove().
        if <uint32_t>tm_load64(table._word(s)) == 0:
            g = tm_load64(table._statusp(s))
            if <uint32_t>g == REMOVED:
                tm_cas64(table._statusp(s), &g, _status(FREE, <uint32_t>(g >> 32)))
    # Its syncs of the pick index, too, may be half done.
    _sync_all(table)
    if tm_load32(waiting):
        tm_store32(waiting, 0)
        tm_add32(table._waiters, -1)
    tm_store64(pidp, 0)
    if total and tm_load32(table._waiters) != 0:
        tm_add32(table._wake_seq, 1)
        tm_futex_wake_all(table._wake_seq)
    return total


cdef Py_ssize_t _reclaim_exited(SharedTable table, Py_ssize_t process_index) except -1:
    if table._base == NULL:
        raise ValueError("the table is closed")
    if not 0 <= process_index < table._max_processes:
        raise ValueError(f"process_index must be in [0, {table._max_processes}), "
                         f"got {process_index}")
    if process_index == table._pi:
        raise ValueError("a process cannot reclaim its own index; close() the table")
    pid = tm_load64(<uint64_t*>(table._procs + process_index * 64))
    if pid != 0 and _segment.still_attached(
            pid, tm_load64(<uint64_t*>(table._procs + process_index * 64 + P_START))):
        raise ValueError(f"process index {process_index} is held by pid {pid}, "
                         "which is still running")
    return _reclaim(table, process_index)


cdef Py_ssize_t _check_live(SharedTable table, int tries) except -1:
    if table._base == NULL:
        raise ValueError("the table is closed")
    cdef Py_ssize_t s, verified = 0
    for s in range(tm_load32(table._high)):
        verified += _check_slot_live(table, s, tries)
    return verified


cdef int _check_quiescent(SharedTable table) except -1:
    cdef Py_ssize_t s, p
    cdef uint64_t total
    cdef uint32_t count, held, state
    for s in range(table._capacity):
        _help(table, s, tm_load64(table._word(s)))
        count = <uint32_t>tm_load64(table._word(s))
        state = <uint32_t>tm_load64(table._statusp(s))
        total = 0
        for p in range(table._max_processes):
            held = <uint32_t>tm_load64(table._cell(p, s))
            if held and tm_load64(<uint64_t*>(table._procs + p * 64)) == 0:
                raise AssertionError(f"slot {s}: unattached process {p} holds {held}")
            total += held
        if total != count:
            raise AssertionError(f"slot {s}: global count {count} != sum of ledgers {total}")
        if state == FREE and count != 0:
            raise AssertionError(f"free slot {s} has count {count}")
        if state == REMOVED and count == 0:
            raise AssertionError(f"removed slot {s} with no requests should be free")
    return _check_index(table)


cdef list _snapshot(SharedTable table):
    out = []
    cdef Py_ssize_t s
    cdef uint64_t st
    for s in range(tm_load32(table._high)):
        st = tm_load64(table._statusp(s))
        if <uint32_t>st != FREE:
            out.append((s, <uint32_t>tm_load64(table._word(s)), tm_load_f64(table._weightp(s)),
                        _segment.STATE_NAMES[<uint32_t>st & STATE_MASK],
                        tm_load32(table._limitp(s))))
    return out


cdef int _acquire(SharedTable table, Py_ssize_t slot, long long generation) except -1:
    cdef uint32_t state = table._live(slot)
    cdef uint64_t st = tm_load64(table._statusp(slot))
    if state == REMOVED:
        raise ValueError(f"slot {slot} was removed")
    if generation >= 0 and <uint32_t>(st >> 32) != generation:
        raise ValueError(f"slot {slot} was reused (generation {st >> 32}, not {generation})")
    _update(table, slot, True, 0)
    table._confirm(slot, st)
    return 0


cdef bint _try_acquire(SharedTable table, Py_ssize_t slot, limit) except -1:
    cdef uint32_t lim = table._check_limit(limit)
    cdef uint32_t state = table._live(slot)
    cdef uint64_t st = tm_load64(table._statusp(slot))
    if state == REMOVED:
        raise ValueError(f"slot {slot} was removed")
    if lim == 0:
        lim = tm_load32(table._limitp(slot))
    if not _update(table, slot, True, lim):
        return False
    table._confirm(slot, st)
    return True
