cdef int _map(SharedTable table, str name, Py_ssize_t process_index, seed) except -1:
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
    # This process's skip set (_shared_index.pxi): a bit and a list entry per slot.
    cdef Py_ssize_t words = (capacity + 63) // 64
    table._skip = <uint64_t*>PyMem_Calloc(words, sizeof(uint64_t))
    table._skipped = <int32_t*>PyMem_Malloc(capacity * sizeof(int32_t))
    table._snap = <uint64_t*>PyMem_Malloc(words * sizeof(uint64_t))
    table._cum = <uint32_t*>PyMem_Malloc(words * sizeof(uint32_t))
    table._odd = <int32_t*>PyMem_Malloc(ODD_MAX * sizeof(int32_t))
    table._odd_bits = <uint64_t*>PyMem_Calloc(words, sizeof(uint64_t))
    table._mask = <uint64_t*>PyMem_Calloc(words, sizeof(uint64_t))
    # The weight classes' bitmaps (as pictured, and less the skip set), each slot's class.
    table._class_bits = <uint64_t*>PyMem_Calloc(CLASSES * words, sizeof(uint64_t))
    table._class_usable = <uint64_t*>PyMem_Calloc(CLASSES * words, sizeof(uint64_t))
    table._class_of = <unsigned char*>PyMem_Malloc(capacity)
    if table._skip == NULL or table._skipped == NULL or table._snap == NULL or \
            table._cum == NULL or table._odd == NULL or table._odd_bits == NULL or \
            table._mask == NULL or table._class_bits == NULL or table._class_of == NULL or \
            table._class_usable == NULL:
        mm.close()
        raise MemoryError()
    table._mm = mm
    table._view = mm
    table._base = <char*>&table._view[0]
    procs, slots, ledgers, _ = _segment.offsets(capacity, max_processes)
    table._procs = table._base + <Py_ssize_t>procs
    table._slots = table._base + <Py_ssize_t>slots
    table._ledgers = table._base + <Py_ssize_t>ledgers
    table._row = _segment.ledger_row(capacity)
    table._index = table._base + <Py_ssize_t>_segment.index_offset(capacity, max_processes)
    table._index_row = _segment.index_row(capacity)
    table._nskip = 0
    table._nodd = 0
    table._nclass = 1
    table._class_words = 0
    table._weights_gen = 0xFFFFFFFFFFFFFFFF
    table._capacity = capacity
    table._max_processes = max_processes
    table._pi = process_index
    table._mine = <uint64_t*>(table._ledgers + process_index * table._row)
    table._high = <uint32_t*>(table._base + H_HIGH)
    table._generation = <uint64_t*>(table._base + H_GENERATION)
    table._wake_seq = <uint32_t*>(table._base + H_WAKE_SEQ)
    table._waiters = <uint32_t*>(table._base + H_WAITERS)
    table.name = name
    table._waiting = False
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little")
    table._rng = splitmix64(<uint64_t>(seed & 0xFFFFFFFFFFFFFFFF)) or 1
    cdef uint64_t expected = 0
    cdef uint64_t* pid = <uint64_t*>(table._procs + process_index * 64)
    if not tm_cas64(pid, &expected, <uint64_t>os.getpid()):
        table._unmap()
        raise ValueError(f"process index {process_index} of {name!r} is held by pid "
                         f"{expected} (reclaim it first if that process has exited)")
    tm_store64(<uint64_t*>(table._procs + process_index * 64 + P_START),
               <uint64_t>_segment.start_time(os.getpid()))
    return 0
