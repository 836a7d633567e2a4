"""Stub for the compiled shared-memory table (``_shared_c.pyx``).

The pure-Python twin, ``_shared_py.SharedTable``, has the same API and protocol (with a
flock around each compare-and-swap); ``_segment``'s docstring describes the layout and
``_shared_c``'s module docstring why counts stay exact when a process dies.
"""

from typing import Any

class SharedTable:
    """Outstanding-request counts per upstream slot, shared by several processes.

    One table (a shared-memory segment) holds up to ``capacity`` slots and up to
    ``max_processes`` attached processes. Each slot has a fleet-wide outstanding count, a
    weight, a state (pickable, unavailable, removed), a concurrency limit (0: none) and a
    generation that changes when its id is reused. Each attached process has a process
    index and a ledger: what it holds on each slot. Picks read the fleet-wide counts.

    Lock-free: every shared word is updated with one atomic compare-and-swap; no process
    waits for another, and a process killed at any instruction leaves the others running
    and its share reclaimable exactly (``reclaim``). One table object per process and
    thread: its process index owns one ledger row. A least-outstanding pick reads a pick
    index the writers keep (per count level, a bitmap of the slots there;
    ``_shared_index.pxi``), so its cost hardly grows with the slots; slots whose weight is
    not the fleet's common one (slow start, a few weighted) are read one by one beside it,
    and with more than 32 of them it scans every slot ever used. ``pick_random`` samples;
    ``pick_two`` samples two.
    """

    name: str
    scans: int
    """Least-outstanding picks (attempts) of this object that read every slot: the index
    had nothing or something stale, or the weights are spread over more than 32 odd slots.
    The twin keeps no index: it counts every one."""

    def __init__(self, name: str, process_index: int, seed: int | None = None) -> None:
        """Attach to the segment ``name`` as ``process_index``; prefer ``attach``."""

    @classmethod
    def create(cls, capacity: int, max_processes: int, *, tag: str = "table",
               seed: int | None = None, unlink_stale: bool = True) -> SharedTable:
        """Create a segment owned by this process, attached as process index 0.

        The segment is ``/dev/shm/tritonmesh-<this pid>-<tag>``.

        Args:
            capacity: slots, in [1, 2**20].
            max_processes: process indexes, in [1, 127].
            tag: tells apart several tables of one owner: letters, digits, ``_.-``.
            seed: seeds this object's random tie-breaking (None: ``os.urandom``).
            unlink_stale: first unlink every tritonmesh segment whose owner is no longer
                running (``unlink_stale()``).

        Raises:
            ValueError: a size out of range or a bad tag.
            FileExistsError: this process already owns a segment with that tag.
        """

    @classmethod
    def attach(cls, name: str, process_index: int, *, seed: int | None = None) -> SharedTable:
        """Attach to the existing segment ``name`` as ``process_index``.

        Raises:
            FileNotFoundError: no such segment.
            ValueError: not an initialised table, another layout version, an index out of
                range, or an index another process holds (reclaim it if that one exited).
        """

    def close(self) -> None:
        """Release everything this process still holds, give up its index, unmap.

        Idempotent; every other method raises ValueError afterwards.
        """

    def unlink(self) -> None:
        """Remove the segment's name; attached processes keep their mappings."""

    def __enter__(self) -> SharedTable: ...
    def __exit__(self, *exc_info: object) -> None:
        """``close()``."""

    @property
    def process_index(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def max_processes(self) -> int: ...

    def set_view(self, generations: Any, ejected: Any = None) -> None:
        """Make this process's picks skip the slots it may not send to.

        After this call, ``pick``, ``pick_random`` and ``pick_two`` in this process (this
        table object) return a slot only if ``generations[slot]`` equals the slot's
        generation (the instance this process knows by that slot, and has not excluded)
        and ``ejected[slot]`` is 0 (the fleet's ejection word). The buffers stay this
        process's: it changes them whenever it learns or forgets a slot, and each pick
        reads them as it scans. ``acquire`` and ``try_acquire`` ignore the view.

        Args:
            generations: a writable buffer of u32 (``array('I')``), one per slot at least;
                0xFFFFFFFF for a slot this process may not use.
            ejected: a buffer of u64 per slot (0: not ejected), or None.

        Raises:
            ValueError: a buffer shorter than the table's capacity.
        """

    def add(self, weight: float = 1.0, limit: int = 0) -> int:
        """Add a pickable slot with weight ``weight`` and concurrency limit ``limit``
        (0: none); returns its id, the lowest free one.

        Raises:
            ValueError: a weight that is not positive and finite, a limit out of range,
                or a full table.
        """

    def remove(self, slot: int) -> None:
        """Never pick ``slot`` again; its id is freed after its last release, whichever
        process makes it. Removing a removed slot does nothing.

        Raises:
            IndexError: ``slot`` is not in the table.
        """

    def set_available(self, slot: int, available: bool) -> None:
        """Put ``slot`` back in the pick set, or take it out (draining, unhealthy).

        A pick that starts after this returns, in any process, does not return ``slot``
        until it is available again. It keeps its count and can still be acquired and released.

        Raises:
            IndexError: ``slot`` is not in the table.
            ValueError: ``slot`` was removed.
        """

    def is_available(self, slot: int) -> bool:
        """Whether ``slot`` can be picked. Raises IndexError when it is not in the table."""

    def set_weight(self, slot: int, weight: float) -> None:
        """Change ``slot``'s weight; its count is kept.

        Raises:
            IndexError: ``slot`` is not in the table.
            ValueError: ``weight`` is not a positive finite number.
        """

    def weight(self, slot: int) -> float:
        """``slot``'s weight. Raises IndexError when it is not in the table."""

    def set_limit(self, slot: int, limit: int) -> None:
        """``slot``'s concurrency limit (0: none), honoured by picks and ``try_acquire``.

        Lowering it below the current count takes effect as requests end; nothing is
        cancelled.

        Raises:
            IndexError: ``slot`` is not in the table.
            ValueError: ``limit`` is not an integer in [0, 2**31 - 1].
        """

    def limit(self, slot: int) -> int:
        """``slot``'s concurrency limit (0: none)."""

    def generation(self, slot: int) -> int:
        """``slot``'s generation; a reused id has a new one (see ``acquire``)."""

    def membership_generation(self) -> int:
        """A counter bumped by every add, remove, weight or availability change in any
        process: a process that caches membership re-reads it when this moves."""

    def pick(self) -> int:
        """LEAST_OUTSTANDING_REQUESTS on the fleet-wide counts: the pickable slot below its
        limit with the lowest (count + 1) / weight, ties broken uniformly at random.

        Counts the pick (release it when the request ends). The count update is a
        compare-and-swap that honours the limit; if another process changed the slot
        meanwhile, the pick looks again (up to 64 times, then answers -1). The
        pick reads the pick index (the lowest count level with a slot of the common weight
        this process may use, beside the few slots of other weights read one by one; then
        one random draw among the ties of both, in slot order: the same answer as the scan
        on the same table and seed); when the index has nothing or something stale, or more
        than 32 slots have another weight, it scans.

        Returns:
            The slot, or -1 when no slot is pickable (or all are at their limit).
        """

    def pick_random(self) -> int:
        """RANDOM: a pickable slot below its limit, with probability proportional to its
        weight. Counts the pick. Returns -1 when none.

        By rejection: a uniform slot id, kept if pickable and (unequal weights) with
        probability weight / the largest weight; after 32 misses, a weighted scan. Each
        try is a draw from the same distribution, so the answer is exact."""

    def pick_two(self) -> int:
        """POWER_OF_TWO_CHOICES: of two distinct uniformly sampled pickable slots, the lower
        (count + 1) / weight, a fair coin on ties. Counts the pick. Returns -1 when none."""

    def acquire(self, slot: int, generation: int = -1) -> None:
        """Count one more request on ``slot`` (a pinned sequence), ignoring its limit.

        Args:
            generation: when not -1, the generation the caller knows ``slot`` by; a slot
                reused since raises ValueError instead of counting on another instance.

        Raises:
            IndexError: ``slot`` is not in the table.
            ValueError: ``slot`` was removed or reused (also when that happens during the
                call: the count is undone).
        """

    def try_acquire(self, slot: int, limit: int = 0) -> bool:
        """Count one more request on ``slot`` if its fleet-wide count is below ``limit``
        (0: the slot's own limit; none if it has none). A compare-and-swap: the count never
        exceeds the limit, not even for an instant.

        Returns:
            Whether the request was counted.

        Raises:
            IndexError: ``slot`` is not in the table.
            ValueError: ``slot`` was removed, or a bad ``limit``.
        """

    def release(self, slot: int) -> None:
        """One request *of this process* on ``slot`` ended: count one fewer, here and in
        this process's ledger; wakes the waiters of every process if there are any.

        A removed slot whose count reaches zero is freed.

        Raises:
            IndexError: ``slot`` is out of range.
            ValueError: this process holds no request on ``slot``.
        """

    def outstanding(self, slot: int) -> int:
        """``slot``'s fleet-wide outstanding count."""

    def held(self, slot: int, process_index: int = -1) -> int:
        """What process ``process_index`` (-1: this one) holds on ``slot``, per its ledger."""

    def pid(self, process_index: int) -> int:
        """The pid attached at ``process_index`` (0: none)."""

    def reclaim(self, process_index: int) -> int:
        """Subtract what process ``process_index`` held from the global counts, zero its
        ledger and free its index, after that process died.

        Exact whatever instruction the process died at (module docstring). Call it once
        the process has exited (after ``waitpid``); while it runs, this raises.

        Returns:
            The number of requests reclaimed.

        Raises:
            ValueError: the index is this table's own, out of range, or held by a running
                process.
        """

    def begin_wait(self) -> int:
        """Register this process as a waiter for releases; returns the wake-up sequence.

        The protocol, with no lost wake-up: ``seq = begin_wait()``; then loop: if
        ``try_acquire(slot)`` succeeds, stop; else ``seq = wait_for_release(seq, t)``.
        ``end_wait()`` at the end. A release in any process bumps the sequence and wakes
        every waiter whenever one is registered; with none registered it costs one load.
        """

    def wait_for_release(self, seen: int, timeout: float) -> int:
        """Block (the GIL released) until the wake-up sequence is no longer ``seen`` or
        ``timeout`` seconds pass; returns the sequence now (``seen`` when timed out).

        A futex on the sequence word, shared across processes: a release between reading
        ``seen`` and this call makes it return at once.
        """

    def end_wait(self) -> None:
        """Unregister as a waiter."""

    def snapshot(self) -> list[tuple[int, int, float, str, int]]:
        """``(slot, outstanding, weight, state, limit)`` for every slot in use, by id."""

    def check_live(self, tries: int = 100) -> int:
        """The invariant under load, slot by slot: the global count equals the sum of the
        ledgers plus the one update (at most) whose count step is done and ledger step not
        yet. Reads the count word, every ledger cell, then the word again; an unchanged word
        means only that update's cell can have moved meanwhile. Not meant to run during a
        ``reclaim`` (which subtracts and zeroes in two steps).

        Built with ``TRITONMESH_DEBUG=1``, every pick, acquire and release checks its slot so.

        Returns:
            The number of slots verified: a slot whose count word changed during each of
            ``tries`` attempts is skipped.

        Raises:
            AssertionError: a slot whose count and ledgers disagree.
        """

    def check(self) -> None:
        """The invariants at quiescence (no update in flight in any process): every global
        count equals the sum of the ledgers, free slots count zero, processes not attached
        hold nothing, removed slots with no requests were freed, and the pick index has
        each ACTIVE slot under its limit at its count's level and nowhere else (the twin
        keeps no index).

        Raises:
            AssertionError: naming the first broken invariant.
        """


def _bench_pick_release(table: SharedTable, rounds: int, strategy: int = 0) -> None:
    """``rounds`` pick+release pairs in a C loop (0: pick, 1: pick_random, 2: pick_two)."""
