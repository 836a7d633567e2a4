"""The outstanding-request table, in pure Python: the reference twin of ``_outstanding_c``.

Both implementations run the same algorithm with the same random number generator,
so for the same seed and the same operations they return the same slots; the test
suite checks that pick by pick.

Layout. Slots are small integers. Slots of equal weight share a *weight class*;
each class keeps its pickable slots in ``order``, sorted by outstanding count, and
``bstart[c]`` = index in ``order`` of the first slot whose count is >= c (the
bucket layout of an O(1) LFU cache). Incrementing or decrementing a count swaps
the slot with the edge of its bucket and moves one boundary: O(1). The least
loaded slots of a class are ``order[0:bstart[min + 1]]``, so a uniformly random
one among all tied slots is one index away. A binary heap cannot do that: with
random tie-break keys, slots that lose keep their (large) keys and the winner
draws a fresh one, so the same slot wins again and again at low load.

External load. A slot may also carry an *external* count (``set_external``): requests
its instance holds that this table did not send (another router replica's, from
Triton's load report). The buckets are keyed by the *load*, outstanding + external,
so LEAST_OUTSTANDING_REQUESTS and POWER_OF_TWO_CHOICES compare both; the outstanding
count itself stays exact and is what ``outstanding`` answers (and what a concurrency
limit reads). External is 0 unless set, so nothing changes without load reports.
Changing it moves the slot one bucket per unit: control-plane work, a few times a second.
"""

from __future__ import annotations

import os
from typing import Final

__all__ = ["MAX_EXTERNAL", "OutstandingTable"]

_MASK: Final = 0xFFFFFFFFFFFFFFFF
# The largest external load a slot takes: it sizes a weight class's bucket array, so it
# is bounded; a report above it is clamped by the caller (tritonmesh.loadreport).
MAX_EXTERNAL: Final = 65536
FREE, ACTIVE, UNAVAILABLE, REMOVED = 0, 1, 2, 3
STATE_NAMES: Final = ("FREE", "ACTIVE", "UNAVAILABLE", "REMOVED")


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


class _Class:
    __slots__ = ("bstart", "order", "refs", "weight")

    def __init__(self, weight: float):
        self.weight = weight
        self.order: list[int] = []
        self.bstart: list[int] = [0, 0]
        self.refs = 0


class OutstandingTable:
    """Outstanding-request counts per upstream slot, and the picks that read them.

    A slot is one upstream instance, named by a small integer id. Each slot has an
    outstanding count, a weight (its relative capacity) and a state: pickable, unavailable
    (draining or unhealthy: never picked, still acquirable and releasable) or removed
    (never picked again; its id is reused only after its last release).

    Lock-free by design: every method runs on the event-loop thread, so no operation can
    interleave with another. This is the reference twin of the compiled table: the same
    API, the same layout in flat arrays, the same picks for the same seed.
    """

    def __init__(self, seed: int | None = None):
        """Create an empty table.

        Args:
            seed: seeds the random tie-breaking (any int, reduced modulo 2**64). The same
                seed and operations give the same picks, here and in the compiled table. None seeds
                from ``os.urandom``.
        """
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self._rng = splitmix64(seed & _MASK) or 1
        self._count: list[int] = []
        self._ext: list[int] = []
        self._weight: list[float] = []
        self._cls: list[int] = []
        self._state: list[int] = []
        self._opos: list[int] = []
        self._apos: list[int] = []
        self._avail: list[int] = []
        self._classes: list[_Class] = []
        self._class_of: dict[float, int] = {}
        self._rr = 0
        self._total = 0
        self._used = 0

    # -- random numbers (xorshift64*), identical in the C twin ------------------------

    def _next(self) -> int:
        x = self._rng
        x ^= x >> 12
        x ^= (x << 25) & _MASK
        x ^= x >> 27
        self._rng = x
        return (x * 0x2545F4914F6CDD1D) & _MASK

    def _below(self, k: int) -> int:
        return self._next() % k

    def _uniform(self) -> float:
        return (self._next() >> 11) * (1.0 / 9007199254740992.0)

    # -- argument checks ---------------------------------------------------------------

    def _slot(self, slot: int) -> int:
        if not 0 <= slot < len(self._state) or self._state[slot] == FREE:
            raise IndexError(f"slot {slot} is not in the table")
        return slot

    @staticmethod
    def _check_weight(weight: float) -> float:
        weight = float(weight)
        if not weight > 0 or weight == float("inf"):
            raise ValueError(f"weight must be a positive finite number, got {weight!r}")
        return weight

    # -- class bucket moves --------------------------------------------------------------

    def _swap(self, k: _Class, i: int, j: int) -> None:
        order = k.order
        a, b = order[i], order[j]
        order[i], order[j] = b, a
        self._opos[a] = j
        self._opos[b] = i

    def _grow_buckets(self, k: _Class, count: int) -> None:
        # bstart must cover index count + 1; new entries point past the end.
        while len(k.bstart) < count + 2:
            k.bstart.append(len(k.order))

    def _class_insert(self, slot: int) -> None:
        k = self._classes[self._cls[slot]]
        c = self._count[slot] + self._ext[slot]
        self._grow_buckets(k, c)
        p = len(k.order)
        k.order.append(slot)
        self._opos[slot] = p
        bstart = k.bstart
        for b in range(len(bstart) - 1, c, -1):
            j = bstart[b]
            if j < p:
                self._swap(k, p, j)
                p = j
            bstart[b] += 1

    def _class_remove(self, slot: int) -> None:
        k = self._classes[self._cls[slot]]
        c = self._count[slot] + self._ext[slot]
        bstart = k.bstart
        n = len(k.order)
        # To the end of its own bucket, then across each higher bucket to the very end.
        self._swap(k, self._opos[slot], bstart[c + 1] - 1)
        for b in range(c + 1, len(bstart)):
            end = bstart[b + 1] if b + 1 < len(bstart) else n
            self._swap(k, self._opos[slot], end - 1)
            bstart[b] -= 1
        k.order.pop()
        self._opos[slot] = -1

    def _up(self, slot: int) -> None:
        # One bucket up: the slot's load (count + external) is about to grow by one.
        if self._opos[slot] >= 0:
            c = self._count[slot] + self._ext[slot]
            k = self._classes[self._cls[slot]]
            self._grow_buckets(k, c + 1)
            self._swap(k, self._opos[slot], k.bstart[c + 1] - 1)
            k.bstart[c + 1] -= 1

    def _down(self, slot: int) -> None:
        if self._opos[slot] >= 0:
            c = self._count[slot] + self._ext[slot]
            k = self._classes[self._cls[slot]]
            self._swap(k, self._opos[slot], k.bstart[c])
            k.bstart[c] += 1

    def _bump(self, slot: int) -> None:
        self._up(slot)
        self._count[slot] += 1
        self._total += 1

    def _drop(self, slot: int) -> None:
        self._down(slot)
        self._count[slot] -= 1
        self._total -= 1

    def _avail_add(self, slot: int) -> None:
        self._apos[slot] = len(self._avail)
        self._avail.append(slot)
        self._class_insert(slot)

    def _avail_remove(self, slot: int) -> None:
        i = self._apos[slot]
        last = self._avail.pop()
        if last != slot:
            self._avail[i] = last
            self._apos[last] = i
        self._apos[slot] = -1
        self._class_remove(slot)

    def _class_for(self, weight: float) -> int:
        index = self._class_of.get(weight)
        if index is None:
            for i, k in enumerate(self._classes):
                if k.refs == 0:
                    del self._class_of[k.weight]
                    self._classes[i] = _Class(weight)
                    index = i
                    break
            else:
                index = len(self._classes)
                self._classes.append(_Class(weight))
            self._class_of[weight] = index
        self._classes[index].refs += 1
        return index

    # -- membership ------------------------------------------------------------------

    def add(self, weight: float = 1.0) -> int:
        """Add a pickable slot with no outstanding requests and return its id.

        The lowest free id is reused first; a removed slot's id is free only once its
        count is back to zero.

        Raises:
            ValueError: ``weight`` is not a positive finite number.
        """
        weight = self._check_weight(weight)
        slot = next((i for i, state in enumerate(self._state) if state == FREE), -1)
        if slot < 0:
            slot = len(self._state)
            self._count.append(0)
            self._ext.append(0)
            self._weight.append(0.0)
            self._cls.append(-1)
            self._state.append(FREE)
            self._opos.append(-1)
            self._apos.append(-1)
        self._count[slot] = 0
        self._ext[slot] = 0
        self._weight[slot] = weight
        self._cls[slot] = self._class_for(weight)
        self._state[slot] = ACTIVE
        self._used += 1
        self._avail_add(slot)
        return slot

    def _free(self, slot: int) -> None:
        self._classes[self._cls[slot]].refs -= 1
        self._cls[slot] = -1
        self._state[slot] = FREE
        self._used -= 1

    def remove(self, slot: int) -> None:
        """Never pick ``slot`` again; its id is reused only after its last release.

        Requests already outstanding on it stay releasable. Removing a removed slot
        does nothing.

        Raises:
            IndexError: ``slot`` is not in the table.
        """
        self._slot(slot)
        if self._state[slot] == REMOVED:
            return
        if self._state[slot] == ACTIVE:
            self._avail_remove(slot)
        self._state[slot] = REMOVED
        if self._count[slot] == 0:
            self._free(slot)

    def set_weight(self, slot: int, weight: float) -> None:
        """Change ``slot``'s weight (relative capacity); its count is kept.

        Raises:
            IndexError: ``slot`` is not in the table.
            ValueError: ``weight`` is not a positive finite number.
        """
        self._slot(slot)
        weight = self._check_weight(weight)
        active = self._state[slot] == ACTIVE
        if active:
            self._avail_remove(slot)
        self._classes[self._cls[slot]].refs -= 1
        self._weight[slot] = weight
        self._cls[slot] = self._class_for(weight)
        if active:
            self._avail_add(slot)

    def weight(self, slot: int) -> float:
        """``slot``'s weight.

        Raises:
            IndexError: ``slot`` is not in the table.
        """
        return self._weight[self._slot(slot)]

    def set_available(self, slot: int, available: bool) -> None:
        """Put ``slot`` back in the pick set, or take it out (draining, unhealthy).

        An unavailable slot keeps its count and can still be acquired and released.

        Raises:
            IndexError: ``slot`` is not in the table.
            ValueError: ``slot`` was removed.
        """
        self._slot(slot)
        state = self._state[slot]
        if state == REMOVED:
            raise ValueError(f"slot {slot} was removed")
        if available and state == UNAVAILABLE:
            self._state[slot] = ACTIVE
            self._avail_add(slot)
        elif not available and state == ACTIVE:
            self._state[slot] = UNAVAILABLE
            self._avail_remove(slot)

    def is_available(self, slot: int) -> bool:
        """Whether ``slot`` can be picked.

        Raises:
            IndexError: ``slot`` is not in the table.
        """
        return self._state[self._slot(slot)] == ACTIVE

    def set_external(self, slot: int, load: float) -> None:
        """Set the requests ``slot``'s instance holds that this table did not send.

        Picks compare ``outstanding + external``; ``outstanding`` stays the exact local
        count. Stored as the nearest integer (halves round up). O(change).

        Raises:
            IndexError: ``slot`` is not in the table.
            ValueError: ``load`` is not a finite number in [0, MAX_EXTERNAL].
        """
        self._slot(slot)
        load = float(load)
        if not 0.0 <= load <= MAX_EXTERNAL:
            raise ValueError(f"external load must be a number in [0, {MAX_EXTERNAL}], "
                             f"got {load!r}")
        target = int(load + 0.5)
        k = self._classes[self._cls[slot]]
        self._grow_buckets(k, self._count[slot] + target)
        while self._ext[slot] < target:
            self._up(slot)
            self._ext[slot] += 1
        while self._ext[slot] > target:
            self._down(slot)
            self._ext[slot] -= 1

    def external(self, slot: int) -> int:
        """``slot``'s external load, as last set (0 unless set).

        Raises:
            IndexError: ``slot`` is not in the table.
        """
        return self._ext[self._slot(slot)]

    # -- picks -------------------------------------------------------------------------

    def pick(self) -> int:
        """LEAST_OUTSTANDING_REQUESTS: the slot with the lowest (count + external + 1) /
        weight.

        Ties are broken uniformly at random over every tied slot, across weights too.
        Counts the pick as outstanding (release it when the request ends). O(number of
        distinct weights): O(1) when all weights are equal.

        Returns:
            The slot, or -1 when no slot is pickable.
        """
        best: _Class | None = None
        best_min = 0
        tied = 0
        for k in self._classes:
            if not k.order:
                continue
            first = k.order[0]
            m = self._count[first] + self._ext[first]
            if best is None:
                best, best_min, tied = k, m, k.bstart[m + 1]
                continue
            lhs = (m + 1) * best.weight
            rhs = (best_min + 1) * k.weight
            if lhs < rhs:
                best, best_min, tied = k, m, k.bstart[m + 1]
            elif lhs == rhs:
                ties = k.bstart[m + 1]
                tied += ties
                if self._below(tied) < ties:
                    best, best_min = k, m
        if best is None:
            return -1
        slot = best.order[self._below(best.bstart[best_min + 1])]
        self._bump(slot)
        return slot

    def pick_under(self, limit: int) -> int:
        """LEAST_OUTSTANDING_REQUESTS among the pickable slots with fewer than ``limit``
        requests outstanding (the local count; external load does not fill a slot).

        For late binding's second try when the least loaded slot is full: with external
        load, a slot with room may carry more load than a full one. A linear scan; ties are
        broken uniformly at random (reservoir sampling). Counts the pick as outstanding.

        Returns:
            The slot, or -1 when every pickable slot is at ``limit``.

        Raises:
            ValueError: ``limit`` is below 1.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        best = -1
        best_load = 0
        best_weight = 1.0
        ties = 0
        for slot in self._avail:
            count = self._count[slot]
            if count >= limit:
                continue
            load = count + self._ext[slot] + 1
            weight = self._weight[slot]
            if best < 0 or load * best_weight < best_load * weight:
                best, best_load, best_weight, ties = slot, load, weight, 1
            elif load * best_weight == best_load * weight:
                ties += 1
                if self._below(ties) == 0:
                    best = slot
        if best >= 0:
            self._bump(best)
        return best

    def pick_random(self) -> int:
        """RANDOM (SageMaker's default): a slot with probability proportional to its weight.

        Counts the pick as outstanding.

        Returns:
            The slot, or -1 when no slot is pickable.
        """
        total = 0.0
        for k in self._classes:
            total += k.weight * len(k.order)
        if total == 0.0:
            return -1
        r = self._uniform() * total
        chosen: _Class | None = None
        for k in self._classes:
            if not k.order:
                continue
            chosen = k
            r -= k.weight * len(k.order)
            if r < 0.0:
                break
        assert chosen is not None
        slot = chosen.order[self._below(len(chosen.order))]
        self._bump(slot)
        return slot

    def pick_round_robin(self) -> int:
        """ROUND_ROBIN over the pickable slots; weights are not applied.

        The rotation follows an internal array that changes order when slots become
        unpickable, so it is fair over time rather than in slot-id order. Counts the pick
        as outstanding.

        Returns:
            The slot, or -1 when no slot is pickable.
        """
        n = len(self._avail)
        if n == 0:
            return -1
        self._rr = (self._rr + 1) % n
        slot = self._avail[self._rr]
        self._bump(slot)
        return slot

    def pick_two(self) -> int:
        """POWER_OF_TWO_CHOICES: of two distinct uniformly sampled slots, the lower
        (count + external + 1) / weight; a fair coin decides ties.

        Counts the pick as outstanding.

        Returns:
            The slot, or -1 when no slot is pickable.
        """
        avail = self._avail
        n = len(avail)
        if n == 0:
            return -1
        if n == 1:
            slot = avail[0]
        else:
            i = self._below(n)
            j = self._below(n - 1)
            if j >= i:
                j += 1
            a, b = avail[i], avail[j]
            lhs = (self._count[a] + self._ext[a] + 1) * self._weight[b]
            rhs = (self._count[b] + self._ext[b] + 1) * self._weight[a]
            if lhs < rhs:
                slot = a
            elif rhs < lhs:
                slot = b
            else:
                slot = a if self._next() & 1 else b
        self._bump(slot)
        return slot

    # -- accounting --------------------------------------------------------------------

    def acquire(self, slot: int) -> None:
        """Count one more request on a slot the caller chose (a pinned sequence).

        Allowed on pickable and unavailable slots.

        Raises:
            IndexError: ``slot`` is not in the table.
            ValueError: ``slot`` was removed.
        """
        self._slot(slot)
        if self._state[slot] == REMOVED:
            raise ValueError(f"slot {slot} was removed")
        self._bump(slot)

    def release(self, slot: int) -> None:
        """One request on ``slot`` ended: count one fewer.

        A removed slot whose count reaches zero leaves the table (its id becomes free).

        Raises:
            IndexError: ``slot`` is not in the table.
            ValueError: ``slot`` has no outstanding requests (counts never go negative).
        """
        self._slot(slot)
        if self._count[slot] == 0:
            raise ValueError(f"release of slot {slot} with no outstanding requests")
        self._drop(slot)
        if self._state[slot] == REMOVED and self._count[slot] == 0:
            self._free(slot)

    def outstanding(self, slot: int) -> int:
        """``slot``'s outstanding count.

        Raises:
            IndexError: ``slot`` is not in the table.
        """
        return self._count[self._slot(slot)]

    def total_outstanding(self) -> int:
        """The sum of every slot's outstanding count (kept up to date, O(1))."""
        return self._total

    def pickable(self) -> int:
        """The number of slots that can be picked."""
        return len(self._avail)

    def __len__(self) -> int:
        """The number of slots in the table: pickable, unavailable, or removed with
        requests still outstanding.
        """
        return self._used

    def snapshot(self) -> list[tuple[int, int, float, str]]:
        """``(slot, outstanding, weight, state)`` for every slot in the table, by id.

        ``state`` is ``"ACTIVE"`` (pickable), ``"UNAVAILABLE"`` or ``"REMOVED"``.
        """
        return [
            (slot, self._count[slot], self._weight[slot], STATE_NAMES[state])
            for slot, state in enumerate(self._state) if state != FREE
        ]

    def check(self) -> None:
        """Verify every invariant of the layout (O(slots x largest count)).

        Built with ``TRITONMESH_DEBUG=1``, the compiled table runs this after every
        mutation.

        Raises:
            AssertionError: naming the first invariant broken.
        """
        total = 0
        active = 0
        for slot, state in enumerate(self._state):
            if state == FREE:
                continue
            c = self._count[slot]
            assert c >= 0, f"slot {slot} count {c} < 0"
            assert 0 <= self._ext[slot] <= MAX_EXTERNAL, f"slot {slot} external out of range"
            total += c
            in_order = self._opos[slot] >= 0
            assert in_order == (state == ACTIVE), f"slot {slot} order membership vs state"
            assert (self._apos[slot] >= 0) == (state == ACTIVE), f"slot {slot} avail vs state"
            if state == ACTIVE:
                active += 1
                assert self._avail[self._apos[slot]] == slot, f"slot {slot} apos broken"
                k = self._classes[self._cls[slot]]
                assert k.order[self._opos[slot]] == slot, f"slot {slot} opos broken"
                assert k.weight == self._weight[slot], f"slot {slot} in the wrong class"
            if state == REMOVED:
                assert c > 0, f"removed slot {slot} with no requests should be free"
        assert total == self._total, f"sum of counts {total} != total {self._total}"
        assert active == len(self._avail), "avail size"
        refs = [0] * len(self._classes)
        for slot, state in enumerate(self._state):
            if state != FREE:
                refs[self._cls[slot]] += 1
        for i, k in enumerate(self._classes):
            assert k.refs == refs[i], f"class {i} refs {k.refs} != {refs[i]}"
            n = len(k.order)
            counts = [self._count[s] + self._ext[s] for s in k.order]
            assert counts == sorted(counts), f"class {i} order not sorted by load: {counts}"
            assert len(k.bstart) >= (max(counts) + 2 if counts else 2), f"class {i} bstart short"
            for c, start in enumerate(k.bstart):
                want = sum(1 for x in counts if x < c)
                assert start == want, f"class {i} bstart[{c}] = {start}, expected {want} (n={n})"
