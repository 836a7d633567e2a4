"""A variant's table in shared memory, as :class:`~tritonmesh.variant.Variant` uses it.

:class:`SharedCounts` presents one :class:`tritonmesh._core.SharedTable` (one segment per
variant, created by the supervisor) under the interface of the private
``OutstandingTable``, for the strategies with a shared pick: LEAST_OUTSTANDING_REQUESTS
(``pick``), RANDOM (``pick_random``) and POWER_OF_TWO_CHOICES (``pick_two``). Every pick
reads and counts on the fleet-wide counts.

Two kinds of owner:

* the supervisor (``owner=True``) is the only one to add and remove slots, and its
  availability (membership state and health checks) is the shared state every process
  picks by. A new slot stays unavailable until the supervisor has published its address
  (:mod:`tritonmesh.members`), so no router process picks an instance it cannot reach.
* a router process (``owner=False``) keeps a retry's "not that one again" to itself, an
  exclusion never written to the shared state (the health checker's flag lives there).
  The outlier detector's ejections are the fleet's (:mod:`tritonmesh.fleetoutliers`): a
  word per slot, which every pick reads. A pick that lands on an excluded or ejected
  slot, or on one whose address this process does not know yet (its membership event is
  in flight), is released, and the least loaded slot this process may use is taken
  instead (whatever the strategy: this is the rare path).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from tritonmesh._core import SharedTable

if TYPE_CHECKING:
    from tritonmesh.fleetoutliers import SharedEjections

__all__ = ["MAX_REPICKS", "SharedCounts"]

# A pick that lands on a slot this process may not use is released, and the least loaded
# slot it may use is counted instead by compare-and-swap; this many tries when other
# processes keep winning the race for it, then the pick answers "none".
MAX_REPICKS: Final = 8


class SharedCounts:
    """One variant's shared table behind the private table's interface."""

    def __init__(self, shared: SharedTable, *, owner: bool, limit: int = 0,
                 ejections: SharedEjections | None = None, variant_index: int = 0):
        self.shared = shared
        self.owner = owner
        # The table's own method: a release needs nothing of this adapter.
        self.release: Callable[[int], None] = shared.release
        self.limit = limit
        # The fleet's ejection word per slot (0: not ejected), read by every pick.
        self.ejections = ejections
        self.variant_index = variant_index
        self.ejected = memoryview(bytes(8 * shared.capacity)).cast("Q") if ejections is None \
            else ejections.words(variant_index)
        # Router processes: the generation of each slot whose instance this process knows
        # (-1: none), kept by the membership follower; the supervisor knows every slot.
        self.generations: list[int] = []
        self.excluded: set[int] = set()
        # Membership follower (router processes): re-read the published membership.
        self.resync: Callable[[], None] = _nothing
        # Supervisor: a slot was added or removed; publish the membership.
        self.on_change: Callable[[], None] = _nothing
        # Supervisor: slots added but not yet published, and the availability they wait for.
        self.unpublished: dict[int, bool] = {}

    # -- membership (the supervisor) ---------------------------------------------------

    def add(self, weight: float = 1.0) -> int:
        self._owner_only("add")
        slot = self.shared.add(weight, self.limit)
        self.shared.set_available(slot, False)
        if self.ejections is not None:  # a reused slot: its last instance's ejection ends
            self.ejections.forget(self.variant_index, slot)
        self.unpublished[slot] = True
        self.on_change()
        return slot

    def remove(self, slot: int) -> None:
        self._owner_only("remove")
        self.unpublished.pop(slot, None)
        self.shared.remove(slot)
        self.on_change()

    def published(self) -> None:
        """The membership naming every slot added so far is out: they may be picked."""
        pending, self.unpublished = self.unpublished, {}
        for slot, available in pending.items():
            self.shared.set_available(slot, available)

    def set_limit(self, limit: int) -> None:
        """Every slot's concurrency limit (0: none), this one for slots added later."""
        self._owner_only("set_limit")
        self.limit = limit
        for slot, *_ in self.shared.snapshot():
            self.shared.set_limit(slot, limit)

    def set_weight(self, slot: int, weight: float) -> None:
        self._owner_only("set_weight")
        self.shared.set_weight(slot, weight)

    def set_available(self, slot: int, available: bool) -> None:
        if not self.owner:
            if available:
                self.excluded.discard(slot)
            else:
                self.excluded.add(slot)
        elif slot in self.unpublished:
            self.unpublished[slot] = available
        else:
            self.shared.set_available(slot, available)

    def set_external(self, slot: int, load: float) -> None:
        raise NotImplementedError("load reports need processes: 1 (the shared table has no "
                                  "external load)")

    def _owner_only(self, what: str) -> None:
        if not self.owner:
            raise RuntimeError(f"only the supervisor changes membership ({what})")

    # -- picks -------------------------------------------------------------------------

    def pick(self) -> int:
        return self._usable(self.shared.pick())

    def pick_random(self) -> int:
        return self._usable(self.shared.pick_random())

    def pick_two(self) -> int:
        return self._usable(self.shared.pick_two())

    def pick_under(self, limit: int) -> int:
        # Each slot carries the variant's limit; every shared pick honours it.
        return self.pick()

    def pick_round_robin(self) -> int:
        raise NotImplementedError("ROUND_ROBIN needs processes: 1")

    def _usable(self, slot: int) -> int:
        """``slot`` if this process may send there, else another (``slot`` released)."""
        # Every pick of a router process comes through here: one frame, the checks inline.
        if slot < 0 or self.owner:
            return slot
        generations = self.generations
        if slot < len(generations) and generations[slot] == self.shared.generation(slot) \
                and not self.ejected[slot] and slot not in self.excluded:
            return slot
        return self._elsewhere(slot)

    def _elsewhere(self, slot: int) -> int:
        """The pick landed on ``slot``, which this process does not know (its membership
        event is in flight) or may not use: ``slot`` once known, else another."""
        if slot not in self.excluded and not self.ejected[slot]:
            self.resync()
            if self._knows(slot):
                return slot
        self.shared.release(slot)
        return self._least_loaded_usable()

    def _least_loaded_usable(self) -> int:
        """The least loaded slot (ties at random) that this process may use and that is
        below its limit, counted by compare-and-swap; -1 when there is none."""
        shared, excluded, ejected = self.shared, self.excluded, self.ejected
        resynced = False
        for _ in range(MAX_REPICKS):
            best, best_load, ties = -1, math.inf, 0
            snapshot = shared.snapshot()
            if not resynced and any(state == "ACTIVE" and not self._knows(slot)
                                    for slot, _, _, state, _ in snapshot):
                self.resync()  # a member this process has not heard of yet
                resynced = True
            for slot, count, weight, state, limit in snapshot:
                if state != "ACTIVE" or slot in excluded or ejected[slot] \
                        or (limit and count >= limit) or not self._knows(slot):
                    continue
                load = (count + 1) / weight
                if load < best_load:
                    best, best_load, ties = slot, load, 1
                elif load == best_load:
                    ties += 1
                    if random.randrange(ties) == 0:
                        best = slot
            if best < 0:
                return -1
            try:
                if shared.try_acquire(best):
                    return best
            except ValueError:  # removed meanwhile
                pass
        return -1

    def _knows(self, slot: int) -> bool:
        generations = self.generations
        return slot < len(generations) and generations[slot] == self.shared.generation(slot)

    def knows(self, slot: int, generation: int) -> bool:
        """Whether this process knows ``slot`` as the instance of ``generation`` (a pin's)."""
        generations = self.generations
        return slot < len(generations) and generations[slot] == generation

    # -- counting ----------------------------------------------------------------------

    def acquire(self, slot: int) -> None:
        if self.owner:
            self.shared.acquire(slot)
        else:  # a slot reused since this process learned it raises, never counts elsewhere
            self.shared.acquire(slot, self.generations[slot])

    def outstanding(self, slot: int) -> int:
        return self.shared.outstanding(slot)

    def snapshot(self) -> list[tuple[int, int, float, str]]:
        return [(slot, count, weight, state)
                for slot, count, weight, state, _ in self.shared.snapshot()]

    def total_outstanding(self) -> int:
        return sum(count for _, count, _, _, _ in self.shared.snapshot())

    def pickable(self) -> int:
        excluded, ejected = self.excluded, self.ejected
        return sum(1 for slot, _, _, state, _ in self.shared.snapshot()
                   if state == "ACTIVE" and slot not in excluded and not ejected[slot])


def _nothing() -> None:
    pass
