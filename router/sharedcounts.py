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
* a router process (``owner=False``) may send only to the instances it knows: it gives
  the table a view (``SharedTable.set_view``), one u32 per slot, the generation it knows
  the slot's instance by, or ``NOT_USABLE`` for a slot it does not know yet (its
  membership event is in flight: the follower's next poll brings it), a slot it excludes
  (a retry's "not that one again", an exclusion never written to the shared state, where
  the health checker's flag lives), and the fleet's ejection words
  (:mod:`tritonmesh.fleetoutliers`). The table's own scan skips what the view rules out,
  so a router process's picks are the table's methods, with nothing of this adapter on
  the path.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from tritonmesh._core import SharedTable

if TYPE_CHECKING:
    from tritonmesh.fleetoutliers import SharedEjections

__all__ = ["NOT_USABLE", "SharedCounts"]

# A slot's entry in a router process's view when it may not send there.
NOT_USABLE: Final = 0xFFFFFFFF


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
        self.ejected = memoryview(bytearray(8 * shared.capacity)).cast("Q") if ejections is None \
            else ejections.words(variant_index)
        # Router processes: the generation of each slot whose instance this process knows
        # (-1: none), kept by the membership follower (learn, forget); the supervisor knows
        # every slot. The view is what picks read: known and not excluded.
        self.generations: list[int] = []
        self.excluded: set[int] = set()
        self.view = array("I", [NOT_USABLE]) * shared.capacity
        if not owner:
            shared.set_view(self.view, self.ejected)
        # Each pick is the table's own (the supervisor's never runs: it serves no requests).
        self.pick: Callable[[], int] = shared.pick
        self.pick_random: Callable[[], int] = shared.pick_random
        self.pick_two: Callable[[], int] = shared.pick_two
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
            self._see(slot)
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

    # -- picks and what this process knows ---------------------------------------------

    def pick_under(self, limit: int) -> int:
        # Each slot carries the variant's limit; every shared pick honours it.
        return self.pick()

    def pick_round_robin(self) -> int:
        raise NotImplementedError("ROUND_ROBIN needs processes: 1")

    def learn(self, slot: int, generation: int) -> None:
        """This process knows ``slot`` now, as the instance of ``generation``."""
        generations = self.generations
        if len(generations) <= slot:
            generations.extend([-1] * (slot + 1 - len(generations)))
        generations[slot] = generation
        self.excluded.discard(slot)
        self._see(slot)

    def forget(self, slot: int) -> None:
        """``slot``'s instance left this process (removed, or its slot reused)."""
        self.generations[slot] = -1
        self.excluded.discard(slot)
        self._see(slot)

    def _see(self, slot: int) -> None:
        generations = self.generations
        known = generations[slot] if slot < len(generations) else -1
        self.view[slot] = NOT_USABLE if known < 0 or slot in self.excluded else known

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
        """Slots a pick may return here: ACTIVE, not ejected, and (a router process) known
        and not excluded."""
        view, ejected, owner = self.view, self.ejected, self.owner
        return sum(1 for slot, _, _, state, _ in self.shared.snapshot()
                   if state == "ACTIVE" and not ejected[slot]
                   and (owner or view[slot] != NOT_USABLE))


def _nothing() -> None:
    pass
