"""Stub for the compiled outstanding-work table (``_work_c.pyx``).

The pure-Python twin, ``_work_py.WorkTable``, has the same API and returns the same slots
for the same seed and operations; its module docstring describes the model.
"""

SERVICE_MIN_SAMPLES: int

class WorkTable:
    """Outstanding requests and work per upstream slot, a learned speed per slot, and the
    LEAST_OUTSTANDING_WORK pick that reads them. Lock-free: event-loop thread only."""

    def __init__(self, seed: int | None = None, decay_s: float = 10.0,
                 service_alpha: float = 0.02) -> None:
        """Create an empty table; ``seed`` fixes the tie-breaking (None: ``os.urandom``),
        ``decay_s`` is how fast the estimate forgets a slow sample, ``service_alpha`` the
        weight of a new sample in the service-time line.

        Raises:
            ValueError: ``decay_s`` is not a positive finite number, or ``service_alpha``
                is not in (0, 1].
        """

    def add(self, weight: float = 1.0) -> int:
        """Add a pickable slot with nothing outstanding and no estimate; return its id
        (the lowest free one).

        Raises:
            ValueError: ``weight`` is not a positive finite number.
        """

    def remove(self, slot: int) -> None:
        """Never pick ``slot`` again; its id is reused only after its last release."""

    def set_weight(self, slot: int, weight: float) -> None:
        """Change ``slot``'s weight (relative capacity)."""

    def weight(self, slot: int) -> float:
        """``slot``'s weight."""

    def set_available(self, slot: int, available: bool) -> None:
        """Put ``slot`` back in the pick set, or take it out (draining, unhealthy).

        Raises:
            ValueError: ``slot`` was removed.
        """

    def is_available(self, slot: int) -> bool:
        """Whether ``slot`` can be picked."""

    def pick(self, cost: float = 1.0, limit: int = 0) -> int:
        """LEAST_OUTSTANDING_WORK: the pickable slot with the lowest
        ``(work + cost) * estimate / weight``, ties broken uniformly at random; a slot
        with no estimate yet is scored with the mean of the others' (1.0 if none). With
        ``hint_quality()`` q below 1 the work read is ``q * (work + cost) + (1 - q) *
        (outstanding + 1) * mean cost picked``.

        Counts the request (one more outstanding, ``cost`` more work) on the slot chosen.
        ``limit`` > 0 considers only slots with fewer than ``limit`` outstanding. O(n)
        over the pickable slots, in C.

        Returns:
            The slot, or -1 when no slot is pickable (under ``limit``).

        Raises:
            ValueError: ``cost`` is negative or not finite.
        """

    def acquire(self, slot: int, cost: float = 1.0) -> None:
        """Count a request on a slot the caller chose (a pinned sequence).

        Raises:
            IndexError: ``slot`` is not in the table.
            ValueError: ``slot`` was removed, or ``cost`` is negative or not finite.
        """

    def release(self, slot: int, cost: float = 1.0) -> None:
        """A request of ``cost`` on ``slot`` ended. At a count of zero the work resets to
        exactly 0 and a removed slot leaves the table.

        Raises:
            IndexError: ``slot`` is not in the table.
            ValueError: ``slot`` has no outstanding requests, or a bad ``cost``.
        """

    def observe(self, slot: int, seconds_per_unit: float, now: float) -> None:
        """Fold a finished request's ``seconds / ahead`` into ``slot``'s peak-EWMA
        estimate: a larger sample replaces it, a smaller one pulls it down with weight
        ``1 - exp(-(now - last sample) / decay_s)``.

        Raises:
            ValueError: the sample is not a positive finite number.
        """

    def observe_service(self, slot: int, cost: float, seconds: float) -> None:
        """Fold a finished request (its cost, the seconds it took) into ``slot``'s
        service-time line (``seconds = a + b * cost``, exponentially weighted least
        squares). A sample whose square is not finite is ignored.

        Raises:
            ValueError: ``cost`` or ``seconds`` is negative or not finite.
        """

    def service_time(self, slot: int, cost: float) -> float:
        """Expected seconds for a request of ``cost`` on ``slot``; -1.0 before
        ``SERVICE_MIN_SAMPLES`` samples."""

    def residual_sd(self) -> float:
        """The spread (standard deviation) of ``log(seconds / predicted)`` over the recent
        requests, the prediction being each slot's service-time line: about 0 when costs
        predict service time exactly, about sigma for costs off by lognormal(0, sigma)
        noise; -1.0 before ``SERVICE_MIN_SAMPLES`` such requests."""

    def hint_quality(self) -> float:
        """The share of the spread of log service time that the costs explain,
        ``1 - var(residual) / var(log seconds)`` clamped to [0, 1]: 1 for an exact hint
        (and until learned), about 0 without one. ``pick`` blends work toward outstanding
        x mean cost by it."""

    def outstanding(self, slot: int) -> int:
        """``slot``'s outstanding count."""

    def set_external(self, slot: int, load: float) -> None:
        """Set the requests ``slot``'s instance holds that this table did not send; the
        pick counts them as ``load`` x the mean cost of this table's requests there (last
        seen when it had any; 1.0 before).

        Raises:
            IndexError: ``slot`` is not in the table.
            ValueError: ``load`` is not a finite number in [0, MAX_EXTERNAL].
        """

    def external(self, slot: int) -> float:
        """``slot``'s external load in requests, as last set (0.0 unless set)."""

    def external_work(self, slot: int) -> float:
        """``slot``'s external load in units of work, as the pick counts it."""

    def work(self, slot: int) -> float:
        """``slot``'s outstanding work: the sum of the costs in flight there."""

    def estimate(self, slot: int) -> float:
        """``slot``'s seconds per unit of work; 0.0 until its first sample."""

    def mean_estimate(self) -> float:
        """The mean seconds per unit of work over the pickable slots that have a sample;
        0.0 when none has."""

    def total_outstanding(self) -> int:
        """The sum of every slot's outstanding count."""

    def pickable(self) -> int:
        """The number of slots that can be picked."""

    def __len__(self) -> int:
        """Slots in the table: pickable, unavailable, or removed but still outstanding."""

    def snapshot(self) -> list[tuple[int, int, float, str]]:
        """``(slot, outstanding, weight, state)`` for every slot in the table, by id."""

    def check(self) -> None:
        """Verify every invariant of the layout.

        Raises:
            AssertionError: naming the first invariant broken.
        """

def _bench_pick_release(table: WorkTable, rounds: int, cost: float = 1.0) -> None:
    """Run ``rounds`` pick + release pairs in a C loop, for ``bench/core_bench.py``."""
