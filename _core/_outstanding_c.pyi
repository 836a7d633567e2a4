"""Stub for the compiled outstanding table; behaviour is documented in _outstanding_py."""

class OutstandingTable:
    """Outstanding-request counts per upstream slot, and the picks that read them.

    Lock-free by design: every method runs on the event-loop thread. State lives in
    flat C arrays so that a shared-memory variant can reuse the layout.
    """

    def __init__(self, seed: int | None = None) -> None: ...
    def add(self, weight: float = 1.0) -> int:
        """Add a pickable slot with no outstanding requests; returns its id."""
    def remove(self, slot: int) -> None:
        """Never pick this slot again; its id is reused only after its last release."""
    def set_weight(self, slot: int, weight: float) -> None: ...
    def weight(self, slot: int) -> float: ...
    def set_available(self, slot: int, available: bool) -> None:
        """Take a slot out of the pick set (draining, unhealthy) or put it back."""
    def is_available(self, slot: int) -> bool: ...
    def pick(self) -> int:
        """LEAST_OUTSTANDING_REQUESTS: lowest (count + 1) / weight, ties uniformly random.

        Counts the pick as outstanding; returns -1 when no slot can be picked.
        """
    def pick_random(self) -> int:
        """RANDOM: a slot with probability proportional to its weight; -1 if none."""
    def pick_round_robin(self) -> int:
        """ROUND_ROBIN over the pickable slots (weights not applied); -1 if none."""
    def pick_two(self) -> int:
        """POWER_OF_TWO_CHOICES: the less loaded of two distinct samples; -1 if none."""
    def acquire(self, slot: int) -> None:
        """Count one more request on a slot chosen by the caller (a pinned sequence)."""
    def release(self, slot: int) -> None:
        """One request on the slot ended; ValueError if it had none outstanding."""
    def outstanding(self, slot: int) -> int: ...
    def total_outstanding(self) -> int: ...
    def pickable(self) -> int: ...
    def __len__(self) -> int: ...
    def snapshot(self) -> list[tuple[int, int, float, str]]:
        """(slot, outstanding, weight, state) for every slot in use, by slot id."""
    def check(self) -> None:
        """Verify every invariant; raises AssertionError naming the first one broken."""

def _bench_pick_release(table: OutstandingTable, rounds: int, strategy: int = 0) -> None: ...
