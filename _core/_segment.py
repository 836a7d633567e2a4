"""The shared table's segment: its layout, its name, creating, attaching and cleaning up.

Used by both implementations (``_shared_c`` and ``_shared_py``), so that they agree on
every offset. A segment is a POSIX shared-memory object: on Linux, what ``shm_open``
makes, a file in ``/dev/shm``, mapped with ``mmap``. Its name is
``tritonmesh-<owner pid>-<tag>``: a segment whose owner (the supervisor that created it)
is no longer running is stale, and ``unlink_stale`` removes it.

Layout (little-endian, every word naturally aligned; ``P`` = max_processes,
``C`` = capacity):

- header, 128 bytes: magic (u64), version (u32), capacity (u32), max_processes (u32),
  high-water slot count (u32: slots ``[0, high)`` have ever been used; picks scan only
  those), membership generation (u64, bumped by every add/remove/weight/availability
  change), owner pid (u64), owner start time (u64, clock ticks after boot, from
  ``/proc/<pid>/stat``: a reused pid is not mistaken for the owner), wake-up sequence
  (u32) and waiter count (u32) for ``wait_for_release``, on the header's second line.
- process table, ``P`` x 64 bytes: the pid attached at each process index (u64, 0 = none),
  whether that process is registered as a waiter (u32 at +8), and its start time (u64 at
  +16; a reused pid is not mistaken for it).
- slots, ``C`` x 32 bytes: the count word (u64: fleet-wide outstanding count in the low
  32 bits, the stamp of the last update in the high 32), weight (f64), status (u64: state in
  the low 32 bits, slot generation in the high 32, bumped when the slot is reused),
  concurrency limit (u32, 0 = none).
- ledgers, ``P`` rows of ``C`` x u64, each row starting on a 64-byte line: a process's
  cell for a slot is the count it holds (low 32 bits) and the number of its updates to
  that slot that are applied (high 32).
- the pick index (compiled table only; the twin scans), ``INDEX_LEVELS`` rows of one bit
  per slot (``ceil(C / 64)`` u64), each row starting on a 64-byte line: row ``l`` has the
  bit of every ACTIVE slot under its limit whose count is ``l`` (the last row: at least
  ``l``). ``_shared_index.pxi`` keeps it.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import re
from collections.abc import Iterator

MAGIC = 0x31_4C_42_54_48_53_4D_54  # b"TMSHTBL1" read as a little-endian u64
# The segments of the sequence pins, ejections and retry counts (tritonmesh.sharedpins,
# .fleetoutliers, .fleetbudget) keep the owner at the same offsets.
PINS_MAGIC = 0x31_53_4E_49_50_53_4D_54  # b"TMSPINS1"
EJECTIONS_MAGIC = 0x31_4A_43_45_4A_45_4D_54  # b"TMEJECJ1"
RETRIES_MAGIC = 0x31_59_52_54_45_52_4D_54  # b"TMRETRY1"
VERSION = 2  # 2: the pick index after the ledgers
PREFIX = "tritonmesh-"
SHM_DIR = "/dev/shm"
MAX_PROCESSES = 127  # a stamp names its process in 7 bits (index + 1)
MAX_CAPACITY = 1 << 20
MAX_COUNT = (1 << 31) - 1

HEADER = 128
H_MAGIC, H_VERSION, H_CAPACITY, H_MAX_PROCESSES, H_HIGH = 0, 8, 12, 16, 20
# The wake-up words sit on the header's second line: waiters write them, pickers read the first.
H_GENERATION, H_OWNER_PID, H_OWNER_START, H_WAKE_SEQ, H_WAITERS = 24, 32, 40, 64, 68
PROC_SIZE = 64
P_WAITING, P_START = 8, 16
SLOT_SIZE = 32
# S_STATUS: one u64, state in the low 32 bits and the slot generation in the high 32, so
# that freeing a slot is one compare-and-swap that fails if the slot was reused meanwhile.
S_WORD, S_WEIGHT, S_STATUS, S_LIMIT = 0, 8, 16, 24
# Counts 0 .. INDEX_LEVELS - 2 have a row of the pick index each; the last row holds every
# higher count (a pick reads the counts of the slots there).
INDEX_LEVELS = 16

# Slot states. CLAIMED: an add() is filling the slot in; nobody may pick or acquire it. Its
# status carries the claiming process index + 1 in bits 8-15, so reclaim can free it.
FREE, ACTIVE, UNAVAILABLE, REMOVED, CLAIMED = 0, 1, 2, 3, 4
STATE_NAMES = ("FREE", "ACTIVE", "UNAVAILABLE", "REMOVED", "CLAIMED")

_NAME = re.compile(r"^tritonmesh-(\d+)-[A-Za-z0-9_.-]+$")


def offsets(capacity: int, max_processes: int) -> tuple[int, int, int, int]:
    """``(process table, slots, ledgers, total size)`` byte offsets for these sizes."""
    procs = HEADER
    slots = procs + PROC_SIZE * max_processes
    ledgers = slots + SLOT_SIZE * capacity
    ledgers = (ledgers + 63) & ~63
    index = ledgers + ledger_row(capacity) * max_processes
    return procs, slots, ledgers, index + INDEX_LEVELS * index_row(capacity)


def ledger_row(capacity: int) -> int:
    """Bytes per process's ledger row (a whole number of 64-byte lines)."""
    return (capacity * 8 + 63) & ~63


def index_offset(capacity: int, max_processes: int) -> int:
    """Byte offset of the pick index's first row (after the ledgers)."""
    return offsets(capacity, max_processes)[3] - INDEX_LEVELS * index_row(capacity)


def index_row(capacity: int) -> int:
    """Bytes per row of the pick index: one bit per slot, in whole 64-byte lines."""
    return ((capacity + 63) // 64 * 8 + 63) & ~63


def check_sizes(capacity: int, max_processes: int) -> None:
    """Raise ValueError naming the argument when a size is out of range."""
    if not isinstance(capacity, int) or not 1 <= capacity <= MAX_CAPACITY:
        raise ValueError(f"capacity must be an integer in [1, {MAX_CAPACITY}], got {capacity!r}")
    if not isinstance(max_processes, int) or not 1 <= max_processes <= MAX_PROCESSES:
        raise ValueError(
            f"max_processes must be an integer in [1, {MAX_PROCESSES}], got {max_processes!r}")


def start_time(pid: int) -> int:
    """The process's start time in clock ticks after boot, or 0 when it is not running."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def segment_name(tag: str, pid: int | None = None) -> str:
    """The segment name for a table that this process (or ``pid``) owns."""
    name = f"{PREFIX}{os.getpid() if pid is None else pid}-{tag}"
    if not _NAME.match(name):
        raise ValueError(f"tag must be letters, digits, '_', '.' or '-', got {tag!r}")
    return name


def path(name: str) -> str:
    """The segment's file under /dev/shm; ValueError for a name that is not one of ours."""
    if not _NAME.match(name):
        raise ValueError(f"{name!r} is not a tritonmesh shared-memory segment name")
    return os.path.join(SHM_DIR, name)


def create_file(name: str, size: int) -> int:
    """Create the segment (it must not exist) and size it; returns an O_RDWR fd."""
    fd = os.open(path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        os.unlink(path(name))
        raise
    return fd


def create_owned(name: str, size: int, magic: int, fields: dict[int, bytes]) -> int:
    """Create a segment of another kind (the router's pins, ejections, retry counts) with
    ``fields`` written at their header offsets, this process as its owner at the table's
    offsets (so ``unlink_stale`` judges it the same way) and ``magic`` written last;
    returns an O_RDWR fd."""
    fd = create_file(name, size)
    with mmap.mmap(fd, 64) as header:
        for offset, value in fields.items():
            header[offset:offset + len(value)] = value
        header[H_OWNER_PID:H_OWNER_PID + 8] = os.getpid().to_bytes(8, "little")
        header[H_OWNER_START:H_OWNER_START + 8] = start_time(os.getpid()).to_bytes(8, "little")
        header[H_MAGIC:H_MAGIC + 8] = magic.to_bytes(8, "little")
    return fd


@contextlib.contextmanager
def flocked(fd: int) -> Iterator[None]:
    """An exclusive ``flock`` on the segment's fd (the kernel drops a dead holder's)."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def open_file(name: str) -> int:
    """Open an existing segment O_RDWR."""
    return os.open(path(name), os.O_RDWR | os.O_CLOEXEC)


def unlink(name: str) -> None:
    """Remove the segment's name (mappings stay valid until unmapped); missing is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path(name))


def _owner_alive(seg: str, pid: int) -> bool:
    """Whether the segment's recorded owner is the running process ``pid``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(os.path.join(SHM_DIR, seg), "rb") as f:
            header = f.read(HEADER)
    except OSError:
        return True
    if len(header) < HEADER or int.from_bytes(header[H_MAGIC:H_MAGIC + 8], "little") not in (
            MAGIC, PINS_MAGIC, EJECTIONS_MAGIC, RETRIES_MAGIC):
        return True  # not initialised yet, or not ours to judge: leave it
    recorded = int.from_bytes(header[H_OWNER_START:H_OWNER_START + 8], "little")
    return recorded == 0 or recorded == start_time(pid)


def unlink_stale() -> list[str]:
    """Unlink every tritonmesh segment whose owner is no longer running; returns their names.

    A segment's owner is the pid in its name; when that pid is running but started at a
    different time than the segment records, the pid was reused and the segment is stale.
    """
    removed: list[str] = []
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return removed
    for seg in sorted(names):
        m = _NAME.match(seg)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        if not _owner_alive(seg, int(m.group(1))):
            unlink(seg)
            removed.append(seg)
    return removed


def initialise(buf: memoryview, capacity: int, max_processes: int) -> None:
    """Write a fresh segment's header (the mapping is zero-filled); the magic goes last,
    so that an attach racing the create sees an uninitialised segment, not a torn one."""
    buf[H_VERSION:H_VERSION + 4] = VERSION.to_bytes(4, "little")
    buf[H_CAPACITY:H_CAPACITY + 4] = capacity.to_bytes(4, "little")
    buf[H_MAX_PROCESSES:H_MAX_PROCESSES + 4] = max_processes.to_bytes(4, "little")
    buf[H_OWNER_PID:H_OWNER_PID + 8] = os.getpid().to_bytes(8, "little")
    buf[H_OWNER_START:H_OWNER_START + 8] = start_time(os.getpid()).to_bytes(8, "little")
    buf[H_MAGIC:H_MAGIC + 8] = MAGIC.to_bytes(8, "little")


def read_sizes(name: str, buf: memoryview) -> tuple[int, int]:
    """``(capacity, max_processes)`` from a mapped segment's header, checked against its size.

    Raises:
        ValueError: not a tritonmesh table, another layout version, or the wrong size.
    """
    if len(buf) < HEADER or int.from_bytes(buf[H_MAGIC:H_MAGIC + 8], "little") != MAGIC:
        raise ValueError(f"shared-memory segment {name!r} is not an initialised tritonmesh table")
    version = int.from_bytes(buf[H_VERSION:H_VERSION + 4], "little")
    if version != VERSION:
        raise ValueError(f"segment {name!r} has layout version {version}, expected {VERSION}")
    capacity = int.from_bytes(buf[H_CAPACITY:H_CAPACITY + 4], "little")
    max_processes = int.from_bytes(buf[H_MAX_PROCESSES:H_MAX_PROCESSES + 4], "little")
    check_sizes(capacity, max_processes)
    if len(buf) != offsets(capacity, max_processes)[3]:
        raise ValueError(f"segment {name!r} is {len(buf)} bytes, its header says "
                         f"{offsets(capacity, max_processes)[3]}")
    return capacity, max_processes


def running(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie, exited but not reaped, is not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:][:1] not in (b"Z", b"X")


def still_attached(pid: int, recorded_start: int) -> bool:
    """Whether the process recorded at an index (``pid``, started at ``recorded_start``
    ticks, 0 if unknown) is still running: a zombie is not, nor another process that
    reused the pid."""
    if not running(pid):
        return False
    return recorded_start == 0 or start_time(pid) == recorded_start
