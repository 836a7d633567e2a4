cdef object _begin_wait(SharedTable table):
    if table._base == NULL:
        raise ValueError("the table is closed")
    if not table._waiting:
        # Count first, flag second: a death between leaves one waiter too many (releases
        # then make a needless wake call), never one too few.
        tm_add32(table._waiters, 1)
        tm_store32(<uint32_t*>(table._procs + table._pi * 64 + P_WAITING), 1)
        table._waiting = True
    return tm_load32(table._wake_seq)


cdef object _wait_for_release(SharedTable table, uint32_t seen, double timeout):
    if not table._waiting:
        raise ValueError("begin_wait() first")
    cdef uint32_t* word = table._wake_seq
    with nogil:
        tm_futex_wait(word, seen, timeout)
    return tm_load32(table._wake_seq)


cdef void _end_wait(SharedTable table) noexcept:
    if table._waiting and table._base != NULL:
        tm_store32(<uint32_t*>(table._procs + table._pi * 64 + P_WAITING), 0)
        tm_add32(table._waiters, -1)
    table._waiting = False
