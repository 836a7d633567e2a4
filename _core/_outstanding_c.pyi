"""Stub for the compiled outstanding table (``_outstanding_c.pyx``).

The pure-Python twin, ``_outstanding_py.OutstandingTable``, has the same API and returns the
same slots for the same seed and operations; its module docstring describes the layout.
"""

MAX_EXTERNAL: int

class OutstandingTable:
    """Outstanding-request counts per upstream slot, and the picks that read them.

    A slot is one upstream instance, named by a small integer id. Each slot has an
    outstanding count, a weight (its relative capacity) and a state: pickable, unavailable
    (draining or unhealthy: never picked, still acquirable and releasable) or removed
    (never picked again; its id is reused only after its last release).

    Lock-free by design: every method runs on the event-loop thread, so no operation can
    interleave with another, and pick and release touch no Python objects. State lives in
    flat C arrays so that a shared-memory variant can reuse the layout.
    """

    def __init__(self, seed: int | None = None) -> None:
        """Create an empty table.

        Args:
            seed: seeds the random tie-breaking (any int, reduced modulo 2**64). The same
                seed and operations give the same picks, here and in the twin. None seeds
                from ``os.urandom``.
        """

    def add(self, weight: float = 1.0) -> int:
        """Add a pickable slot with no outstanding requests and return its id.

        The lowest free id is reused first; a removed slot's id is free only once its
        count is back to zero.

        Raises:
            ValueError: ``weight`` is not a positive finite number.
        """

    def remove(self, slot: int) -> None:
        """Never pick ``slot`` again; its id is reused only after its last release.

        Requests already outstanding on it stay releasable. Removing a removed slot
        does nothing.

        Raises:
            IndexError: ``slot`` is not in the table.
        """

    def set_weight(self, slot: int, weight: float) -> None:
        """Change ``slot``'s weight (relative capacity); its count is kept.

        Raises:
            IndexError: ``slot`` is not in the table.
            ValueError: ``weight`` is not a positive finite number.
        """

    def weight(self, slot: int) -> float:
        """``slot``'s weight.

        Raises:
            IndexError: ``slot`` is not in the table.
        """

    def set_available(self, slot: int, available: bool) -> None:
        """Put ``slot`` back in the pick set, or take it out (draining, unhealthy).

        An unavailable slot keeps its count and can still be acquired and released.

        Raises:
            IndexError: ``slot`` is not in the table.
            ValueError: ``slot`` was removed.
        """

    def is_available(self, slot: int) -> bool:
        """Whether ``slot`` can be picked.

        Raises:
            IndexError: ``slot`` is not in the table.
        """

    def set_external(self, slot: int, load: float) -> None:
        """Set the requests ``slot``'s instance holds that this table did not send.

        Picks compare ``outstanding + external``; ``outstanding`` stays the exact local
        count. Stored as the nearest integer (halves round up). O(change).

        Raises:
            IndexError: ``slot`` is not in the table.
            ValueError: ``load`` is not a finite number in [0, MAX_EXTERNAL].
        """

    def external(self, slot: int) -> int:
        """``slot``'s external load, as last set (0 unless set).

        Raises:
            IndexError: ``slot`` is not in the table.
        """

    def pick(self) -> int:
        """LEAST_OUTSTANDING_REQUESTS: the slot with the lowest (count + external + 1) /
        weight.

        Ties are broken uniformly at random over every tied slot, across weights too.
        Counts the pick as outstanding (release it when the request ends). O(number of
        distinct weights): O(1) when all weights are equal.

        Returns:
            The slot, or -1 when no slot is pickable.
        """

    def pick_under(self, limit: int) -> int:
        """LEAST_OUTSTANDING_REQUESTS among the pickable slots with fewer than ``limit``
        requests outstanding (the local count; external load does not fill a slot).

        For late binding's second try when the least loaded slot is full: with external
        load, a slot with room may carry more load than a full one. A linear scan; ties are
        broken uniformly at random. Counts the pick as outstanding.

        Returns:
            The slot, or -1 when every pickable slot is at ``limit``.

        Raises:
            ValueError: ``limit`` is below 1.
        """

    def pick_random(self) -> int:
        """RANDOM (SageMaker's default): a slot with probability proportional to its weight.

        Counts the pick as outstanding.

        Returns:
            The slot, or -1 when no slot is pickable.
        """

    def pick_round_robin(self) -> int:
        """ROUND_ROBIN over the pickable slots; weights are not applied.

        The rotation follows an internal array that changes order when slots become
        unpickable, so it is fair over time rather than in slot-id order. Counts the pick
        as outstanding.

        Returns:
            The slot, or -1 when no slot is pickable.
        """

    def pick_two(self) -> int:
        """POWER_OF_TWO_CHOICES: of two distinct uniformly sampled slots, the lower
        (count + external + 1) / weight; a fair coin decides ties.

        Counts the pick as outstanding.

        Returns:
            The slot, or -1 when no slot is pickable.
        """

    def acquire(self, slot: int) -> None:
        """Count one more request on a slot the caller chose (a pinned sequence).

        Allowed on pickable and unavailable slots.

        Raises:
            IndexError: ``slot`` is not in the table.
            ValueError: ``slot`` was removed.
        """

    def release(self, slot: int) -> None:
        """One request on ``slot`` ended: count one fewer.

        A removed slot whose count reaches zero leaves the table (its id becomes free).

        Raises:
            IndexError: ``slot`` is not in the table.
            ValueError: ``slot`` has no outstanding requests (counts never go negative).
        """

    def outstanding(self, slot: int) -> int:
        """``slot``'s outstanding count.

        Raises:
            IndexError: ``slot`` is not in the table.
        """

    def total_outstanding(self) -> int:
        """The sum of every slot's outstanding count (kept up to date, O(1))."""

    def pickable(self) -> int:
        """The number of slots that can be picked."""

    def __len__(self) -> int:
        """The number of slots in the table: pickable, unavailable, or removed with
        requests still outstanding."""

    def snapshot(self) -> list[tuple[int, int, float, str]]:
        """``(slot, outstanding, weight, state)`` for every slot in the table, by id.

        ``state`` is ``"ACTIVE"`` (pickable), ``"UNAVAILABLE"`` or ``"REMOVED"``.
        """

    def check(self) -> None:
        """Verify every invariant of the layout (O(slots x largest count)).

        Built with ``TRITONMESH_DEBUG=1``, the compiled table runs this after every
        mutation.

        Raises:
            AssertionError: naming the first invariant broken.
        """

def _bench_pick_release(table: OutstandingTable, rounds: int, strategy: int = 0) -> None:
    """Run ``rounds`` pick + release pairs in a C loop, for ``bench/core_bench.py``.

    ``strategy``: 0 ``pick``, 1 ``pick_random``, 2 ``pick_two``.
    """
