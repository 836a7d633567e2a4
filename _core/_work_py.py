"""The outstanding-work table, in pure Python: the reference twin of ``_work_c``.

LEAST_OUTSTANDING_WORK weighs each instance's outstanding requests by what they cost.
A request's cost is a number the router knows before sending it: a per-model hint read
from the request (an input such as ``MAX_TOKENS``, or a request parameter), or 1 when
the model has none. Per slot the table keeps

* the outstanding count and the outstanding work (the sum of the costs in flight);
* an estimate of the seconds one unit of work takes there, learned from finished
  requests: a request that found ``ahead`` units of work on its instance (its own
  included) and took ``seconds`` is a sample of ``seconds / ahead``. The estimate is a
  peak EWMA (Finagle's ``PeakEwma``): a sample above it replaces it at once, a sample
  below pulls it down with weight ``1 - exp(-elapsed / decay_s)``, so an instance that
  turned slow is avoided at once and one that recovered wins its traffic back over a
  few ``decay_s``.

Per slot it also keeps a line, ``service seconds = a + b * cost``, fitted by exponentially
weighted least squares to the requests it was shown (``observe_service``): dispatch ahead
needs *when* a running request will end, and the peak-EWMA speed is the wrong tool for
that (pessimistic on purpose, and a ratio with no fixed part). Five running sums per slot;
``service_time(slot, cost)`` reads the line.

``pick(cost)`` sends the request where it is expected to finish first: the pickable slot
with the lowest ``(work + cost) * estimate / weight``. With no hint (cost 1 everywhere)
that is peak-EWMA's ``estimate * (outstanding + 1)``. A slot with no sample yet is
scored with the mean estimate of the pickable slots that have one (1.0 when none has),
so a new instance takes a fair share at once instead of all traffic or none.

How well do costs predict service time? Over the whole table, each request that finished on
a slot whose line is trusted adds its log residual ``r = log(seconds / predicted)`` and its
``log(seconds)`` to exponentially weighted sums (the line's weight per sample). From them:
``residual_sd()``, the spread of ``r`` (about 0 for an exact hint, about the noise's sigma
for a hint that is the length times lognormal noise), and ``hint_quality()``, the share of
the spread of log service time that the costs explain, ``1 - var(r) / var(log seconds)``
in [0, 1] (1 until there are ``SERVICE_MIN_SAMPLES`` residuals: a hint is trusted until
shown otherwise; about 0 without a hint, where every cost is the same). Below 1 the pick
blends each slot's work toward its outstanding count times the mean cost picked:
``q * (work + cost) + (1 - q) * (outstanding + 1) * mean_cost``, peak-EWMA x outstanding
when the hint says nothing.

The pick is a linear scan over a dense array of pickable slots: the score of every slot
depends on the new request's cost, so no ordering kept between picks can answer it.
Ties (all idle, say) are broken uniformly at random by reservoir sampling. Both
implementations run the same arithmetic in the same order with the same random
numbers, so for the same seed and operations they return the same slots.

External load (``set_external``): requests the slot's instance holds that this table did
not send (another router replica's, from Triton's load report). Triton reports requests,
not their costs, so they count as that many requests of the mean cost of this table's own
requests in flight there (last seen when it had any; 1 before): the replicas' traffic is
one client mix split between them. The pick adds that work to the slot's own; 0 unless set.
"""

from __future__ import annotations

import math
import os
from typing import Final

from tritonmesh._core._outstanding_py import (
    _MASK,
    ACTIVE,
    FREE,
    MAX_EXTERNAL,
    REMOVED,
    STATE_NAMES,
    UNAVAILABLE,
    splitmix64,
)

__all__ = ["SERVICE_MIN_SAMPLES", "WorkTable"]

_INF: Final = float("inf")
# Samples before a slot's service-time line is trusted.
SERVICE_MIN_SAMPLES: Final = 8


class WorkTable:
    """Outstanding requests and work per upstream slot, a learned speed per slot, and the
    LEAST_OUTSTANDING_WORK pick that reads them.

    Slots, weights and states behave as in ``OutstandingTable``: pickable, unavailable
    (never picked, still acquirable and releasable) or removed (never picked again; the
    id is reused only after its last release). Lock-free by design: every method runs on
    the event-loop thread, so no operation can interleave with another. State lives in
    flat arrays so that a shared-memory variant can reuse the layout.
    """

    def __init__(self, seed: int | None = None, decay_s: float = 10.0,
                 service_alpha: float = 0.02):
        """Create an empty table.

        Args:
            seed: seeds the random tie-breaking (any int, reduced modulo 2**64); None
                seeds from ``os.urandom``. The same seed and operations give the same
                picks, here and in the compiled table.
            decay_s: how fast the estimate forgets a slow sample, in seconds.
            service_alpha: the weight of each new sample in the service-time line, in
                (0, 1]; its memory is about ``1 / service_alpha`` requests.

        Raises:
            ValueError: ``decay_s`` is not a positive finite number, or
                ``service_alpha`` is not in (0, 1].
        """
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self._rng = splitmix64(seed & _MASK) or 1
        self._decay = self._positive(decay_s, "decay_s")
        alpha = float(service_alpha)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"service_alpha must be in (0, 1], got {service_alpha!r}")
        self._keep = 1.0 - alpha
        # The service-time line's sums: weight, cost, seconds, cost², cost * seconds.
        self._ln: list[float] = []
        self._lx: list[float] = []
        self._ly: list[float] = []
        self._lxx: list[float] = []
        self._lxy: list[float] = []
        self._lsamples: list[int] = []
        self._count: list[int] = []
        self._work: list[float] = []
        self._ext: list[float] = []  # external requests, as set
        self._xwork: list[float] = []  # external requests x mean cost
        self._mcost: list[float] = []  # mean cost of the requests in flight, last seen
        self._estimate: list[float] = []  # seconds per unit of work; 0.0 = no sample yet
        self._last: list[float] = []  # time of the last sample
        self._weight: list[float] = []
        self._state: list[int] = []
        self._apos: list[int] = []
        self._avail: list[int] = []
        self._total = 0
        self._used = 0
        # Hint quality, over the whole table: weighted sums of the log residuals against
        # the slots' lines and of log seconds (weight, r, r², s, s²), samples, the
        # quality they give; and the weighted sums of the costs picked (weight, cost).
        self._qn = self._qr = self._qrr = self._qs = self._qss = 0.0
        self._qsamples = 0
        self._quality = 1.0
        self._cn = 0.0
        self._csum = 0.0

    # -- random numbers (xorshift64*), identical in the compiled table -----------------

    def _below(self, k: int) -> int:
        x = self._rng
        x ^= x >> 12
        x ^= (x << 25) & _MASK
        x ^= x >> 27
        self._rng = x
        return ((x * 0x2545F4914F6CDD1D) & _MASK) % k

    # -- argument checks ---------------------------------------------------------------

    def _slot(self, slot: int) -> int:
        if not 0 <= slot < len(self._state) or self._state[slot] == FREE:
            raise IndexError(f"slot {slot} is not in the table")
        return slot

    @staticmethod
    def _positive(value: float, what: str) -> float:
        value = float(value)
        if not 0 < value < _INF:
            raise ValueError(f"{what} must be a positive finite number, got {value!r}")
        return value

    @staticmethod
    def _cost(cost: float) -> float:
        cost = float(cost)
        if not 0 <= cost < _INF:
            raise ValueError(f"cost must be a finite number >= 0, got {cost!r}")
        return cost

    # -- the dense array of pickable slots ---------------------------------------------

    def _avail_add(self, slot: int) -> None:
        self._apos[slot] = len(self._avail)
        self._avail.append(slot)

    def _avail_remove(self, slot: int) -> None:
        i = self._apos[slot]
        last = self._avail.pop()
        if last != slot:
            self._avail[i] = last
            self._apos[last] = i
        self._apos[slot] = -1

    # -- membership ------------------------------------------------------------------

    def add(self, weight: float = 1.0) -> int:
        """Add a pickable slot with nothing outstanding and no estimate; return its id.

        The lowest free id is reused first.

        Raises:
            ValueError: ``weight`` is not a positive finite number.
        """
        weight = self._positive(weight, "weight")
        slot = next((i for i, state in enumerate(self._state) if state == FREE), -1)
        if slot < 0:
            slot = len(self._state)
            for ints in (self._count, self._state, self._apos, self._lsamples):
                ints.append(0)
            for floats in (self._work, self._ext, self._xwork, self._mcost, self._estimate,
                           self._last, self._weight, self._ln, self._lx, self._ly, self._lxx,
                           self._lxy):
                floats.append(0.0)
            self._apos[slot] = -1
        self._count[slot] = 0
        self._work[slot] = 0.0
        self._ext[slot] = self._xwork[slot] = 0.0
        self._mcost[slot] = 1.0
        self._estimate[slot] = 0.0
        self._last[slot] = 0.0
        self._ln[slot] = self._lx[slot] = self._ly[slot] = 0.0
        self._lxx[slot] = self._lxy[slot] = 0.0
        self._lsamples[slot] = 0
        self._weight[slot] = weight
        self._state[slot] = ACTIVE
        self._used += 1
        self._avail_add(slot)
        return slot

    def remove(self, slot: int) -> None:
        """Never pick ``slot`` again; its id is reused only after its last release.

        Raises:
            IndexError: ``slot`` is not in the table.
        """
        state = self._state[self._slot(slot)]
        if state == REMOVED:
            return
        if state == ACTIVE:
            self._avail_remove(slot)
        self._state[slot] = REMOVED
        if self._count[slot] == 0:
            self._state[slot] = FREE
            self._used -= 1

    def set_weight(self, slot: int, weight: float) -> None:
        """Change ``slot``'s weight (relative capacity).

        Raises:
            IndexError: ``slot`` is not in the table.
            ValueError: ``weight`` is not a positive finite number.
        """
        self._slot(slot)
        self._weight[slot] = self._positive(weight, "weight")

    def weight(self, slot: int) -> float:
        """``slot``'s weight.

        Raises:
            IndexError: ``slot`` is not in the table.
        """
        return self._weight[self._slot(slot)]

    def set_available(self, slot: int, available: bool) -> None:
        """Put ``slot`` back in the pick set, or take it out (draining, unhealthy).

        Raises:
            IndexError: ``slot`` is not in the table.
            ValueError: ``slot`` was removed.
        """
        state = self._state[self._slot(slot)]
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
        """Set the requests ``slot``'s instance holds that this table did not send; the
        pick counts them as ``load`` x the mean cost of this table's requests there.

        Raises:
            IndexError: ``slot`` is not in the table.
            ValueError: ``load`` is not a finite number in [0, MAX_EXTERNAL].
        """
        self._slot(slot)
        load = float(load)
        if not 0.0 <= load <= MAX_EXTERNAL:
            raise ValueError(f"external load must be a number in [0, {MAX_EXTERNAL}], "
                             f"got {load!r}")
        if self._count[slot] > 0:
            self._mcost[slot] = self._work[slot] / self._count[slot]
        self._ext[slot] = load
        self._xwork[slot] = load * self._mcost[slot]

    def external(self, slot: int) -> float:
        """``slot``'s external load in requests, as last set (0.0 unless set).

        Raises:
            IndexError: ``slot`` is not in the table.
        """
        return self._ext[self._slot(slot)]

    def external_work(self, slot: int) -> float:
        """``slot``'s external load in units of work, as the pick counts it.

        Raises:
            IndexError: ``slot`` is not in the table.
        """
        return self._xwork[self._slot(slot)]

    # -- the pick ----------------------------------------------------------------------

    def pick(self, cost: float = 1.0, limit: int = 0) -> int:
        """LEAST_OUTSTANDING_WORK: the pickable slot with the lowest
        ``(work + cost + external work) * estimate / weight``, ties broken uniformly at
        random; with ``hint_quality()`` q below 1 the work read is ``q * (work + cost) +
        (1 - q) * (outstanding + 1) * mean cost picked``, the external work added after.
        ``limit`` reads the local count only.

        Counts the request (one more outstanding, ``cost`` more work) on the slot chosen.

        Args:
            cost: the request's cost, >= 0.
            limit: when > 0, only slots with fewer than ``limit`` requests outstanding.

        Returns:
            The slot, or -1 when no slot is pickable (under ``limit``).

        Raises:
            ValueError: ``cost`` is negative or not finite.
        """
        cost = self._cost(cost)
        avail = self._avail
        estimate = self._estimate
        known = 0.0
        n_known = 0
        for slot in avail:
            if estimate[slot] > 0.0:
                known += estimate[slot]
                n_known += 1
        default = known / n_known if n_known else 1.0
        q = self._quality
        cmean = self._csum / self._cn if q < 1.0 and self._cn > 0.0 else 0.0
        best = -1
        best_score = _INF
        ties = 0
        for slot in avail:
            if limit > 0 and self._count[slot] >= limit:
                continue
            e = estimate[slot]
            work = self._work[slot] + cost
            if q < 1.0:  # the hint says less than it seems: toward outstanding x mean cost
                work = q * work + (1.0 - q) * (self._count[slot] + 1) * cmean
            score = (work + self._xwork[slot]) * (e if e > 0.0 else default) \
                / self._weight[slot]
            if score < best_score:
                best = slot
                best_score = score
                ties = 1
            elif score == best_score:
                ties += 1
                if self._below(ties) == 0:
                    best = slot
        if best >= 0:
            self._count[best] += 1
            self._work[best] += cost
            self._total += 1
            csum = self._csum * self._keep + cost
            if csum < _INF:  # an absurd cost must not make the mean infinite for good
                self._cn = self._cn * self._keep + 1.0
                self._csum = csum
        return best

    # -- accounting --------------------------------------------------------------------

    def acquire(self, slot: int, cost: float = 1.0) -> None:
        """Count a request on a slot the caller chose (a pinned sequence).

        Raises:
            IndexError: ``slot`` is not in the table.
            ValueError: ``slot`` was removed, or ``cost`` is negative or not finite.
        """
        self._slot(slot)
        cost = self._cost(cost)
        if self._state[slot] == REMOVED:
            raise ValueError(f"slot {slot} was removed")
        self._count[slot] += 1
        self._work[slot] += cost
        self._total += 1

    def release(self, slot: int, cost: float = 1.0) -> None:
        """A request of ``cost`` on ``slot`` ended: one fewer outstanding, less work.

        When the count reaches zero the work is reset to exactly 0 (no float drift
        survives an idle moment), and a removed slot leaves the table.

        Raises:
            IndexError: ``slot`` is not in the table.
            ValueError: ``slot`` has no outstanding requests (counts never go negative),
                or ``cost`` is negative or not finite.
        """
        self._slot(slot)
        cost = self._cost(cost)
        if self._count[slot] == 0:
            raise ValueError(f"release of slot {slot} with no outstanding requests")
        self._count[slot] -= 1
        self._total -= 1
        if self._count[slot] == 0:
            self._work[slot] = 0.0
            if self._state[slot] == REMOVED:
                self._state[slot] = FREE
                self._used -= 1
        else:
            left = self._work[slot] - cost
            self._work[slot] = left if left > 0.0 else 0.0

    def observe(self, slot: int, seconds_per_unit: float, now: float) -> None:
        """Fold one finished request's ``seconds / ahead`` into ``slot``'s estimate.

        Args:
            seconds_per_unit: the sample, > 0.
            now: the current time in seconds, from one monotonic clock.

        Raises:
            IndexError: ``slot`` is not in the table.
            ValueError: the sample is not a positive finite number.
        """
        self._slot(slot)
        sample = self._positive(seconds_per_unit, "seconds_per_unit")
        current = self._estimate[slot]
        if current == 0.0 or sample > current:
            self._estimate[slot] = sample
        else:
            elapsed = now - self._last[slot]
            w = math.exp(-elapsed / self._decay) if elapsed > 0.0 else 1.0
            self._estimate[slot] = current * w + sample * (1.0 - w)
        self._last[slot] = now

    def observe_service(self, slot: int, cost: float, seconds: float) -> None:
        """Fold one finished request (its cost, and the seconds it took) into ``slot``'s
        service-time line.

        A sample whose square is not finite is ignored: costs come from clients, and one
        absurd value must not turn the sums into infinities for good.

        Raises:
            IndexError: ``slot`` is not in the table.
            ValueError: ``cost`` or ``seconds`` is negative or not finite.
        """
        self._slot(slot)
        cost = self._cost(cost)
        seconds = float(seconds)
        if not 0.0 <= seconds < _INF:
            raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")
        xx = cost * cost
        xy = cost * seconds
        if not (xx < _INF and xy < _INF):
            return
        self._observe_residual(slot, cost, seconds)
        keep = self._keep
        self._ln[slot] = self._ln[slot] * keep + 1.0
        self._lx[slot] = self._lx[slot] * keep + cost
        self._ly[slot] = self._ly[slot] * keep + seconds
        self._lxx[slot] = self._lxx[slot] * keep + xx
        self._lxy[slot] = self._lxy[slot] * keep + xy
        self._lsamples[slot] += 1

    def _observe_residual(self, slot: int, cost: float, seconds: float) -> None:
        """Fold how far ``slot``'s line (before this sample) missed ``seconds`` into the
        table's hint-quality sums, and refresh the quality."""
        if seconds <= 0.0 or self._lsamples[slot] < SERVICE_MIN_SAMPLES:
            return
        predicted = self.service_time(slot, cost)
        if predicted <= 0.0:
            return
        s = math.log(seconds)
        r = s - math.log(predicted)
        keep = self._keep
        self._qn = self._qn * keep + 1.0
        self._qr = self._qr * keep + r
        self._qrr = self._qrr * keep + r * r
        self._qs = self._qs * keep + s
        self._qss = self._qss * keep + s * s
        self._qsamples += 1
        if self._qsamples < SERVICE_MIN_SAMPLES:
            return
        n = self._qn
        mean_r = self._qr / n
        mean_s = self._qs / n
        var_r = self._qrr / n - mean_r * mean_r
        var_s = self._qss / n - mean_s * mean_s
        if var_s <= 1e-12:  # every request took the same time: nothing to predict
            self._quality = 1.0
        else:
            q = 1.0 - var_r / var_s
            self._quality = 0.0 if q < 0.0 else (1.0 if q > 1.0 else q)

    def residual_sd(self) -> float:
        """The spread (standard deviation) of ``log(seconds / predicted)`` over the recent
        requests, the prediction being each slot's service-time line; -1.0 before
        ``SERVICE_MIN_SAMPLES`` such requests."""
        if self._qsamples < SERVICE_MIN_SAMPLES:
            return -1.0
        mean_r = self._qr / self._qn
        var_r = self._qrr / self._qn - mean_r * mean_r
        return math.sqrt(var_r) if var_r > 0.0 else 0.0

    def hint_quality(self) -> float:
        """The share of the spread of log service time the costs explain, in [0, 1]: 1
        for an exact hint (and until learned), about 0 without one."""
        return self._quality

    def service_time(self, slot: int, cost: float) -> float:
        """Expected seconds for a request of ``cost`` on ``slot``, from its line; -1.0
        before ``SERVICE_MIN_SAMPLES`` samples.

        With every recent cost equal there is no slope to fit: the mean seconds per
        unit, times ``cost``. A falling line is noise on a flat one: the mean.

        Raises:
            IndexError: ``slot`` is not in the table.
            ValueError: ``cost`` is negative or not finite.
        """
        self._slot(slot)
        cost = self._cost(cost)
        if self._lsamples[slot] < SERVICE_MIN_SAMPLES:
            return -1.0
        n = self._ln[slot]
        x = self._lx[slot]
        y = self._ly[slot]
        xx = self._lxx[slot]
        spread = n * xx - x * x
        if spread <= 1e-9 * n * xx:
            return y / x * cost if x > 0.0 else y / n
        slope = (n * self._lxy[slot] - x * y) / spread
        if slope < 0.0:
            return y / n
        value = (y - slope * x) / n + slope * cost
        return value if value > 0.0 else 0.0

    # -- reading -----------------------------------------------------------------------

    def outstanding(self, slot: int) -> int:
        """``slot``'s outstanding count.

        Raises:
            IndexError: ``slot`` is not in the table.
        """
        return self._count[self._slot(slot)]

    def work(self, slot: int) -> float:
        """``slot``'s outstanding work: the sum of the costs in flight there.

        Raises:
            IndexError: ``slot`` is not in the table.
        """
        return self._work[self._slot(slot)]

    def estimate(self, slot: int) -> float:
        """``slot``'s seconds per unit of work; 0.0 until its first sample.

        Raises:
            IndexError: ``slot`` is not in the table.
        """
        return self._estimate[self._slot(slot)]

    def mean_estimate(self) -> float:
        """The mean seconds per unit of work over the pickable slots that have a sample;
        0.0 when none has."""
        known = 0.0
        n_known = 0
        for slot in self._avail:
            if self._estimate[slot] > 0.0:
                known += self._estimate[slot]
                n_known += 1
        return known / n_known if n_known else 0.0

    def total_outstanding(self) -> int:
        """The sum of every slot's outstanding count."""
        return self._total

    def pickable(self) -> int:
        """The number of slots that can be picked."""
        return len(self._avail)

    def __len__(self) -> int:
        """Slots in the table: pickable, unavailable, or removed but still outstanding."""
        return self._used

    def snapshot(self) -> list[tuple[int, int, float, str]]:
        """``(slot, outstanding, weight, state)`` for every slot in the table, by id, as
        ``OutstandingTable.snapshot``."""
        return [
            (slot, self._count[slot], self._weight[slot], STATE_NAMES[state])
            for slot, state in enumerate(self._state) if state != FREE
        ]

    def check(self) -> None:
        """Verify every invariant of the layout.

        Raises:
            AssertionError: naming the first invariant broken.
        """
        total = used = 0
        for slot, state in enumerate(self._state):
            count = self._count[slot]
            assert state in (FREE, ACTIVE, UNAVAILABLE, REMOVED), f"slot {slot}: bad state"
            if state == FREE:
                assert self._apos[slot] == -1, f"free slot {slot} is pickable"
                continue
            used += 1
            total += count
            assert count >= 0, f"slot {slot}: negative count {count}"
            assert self._work[slot] >= 0.0, f"slot {slot}: negative work"
            assert self._xwork[slot] >= 0.0, f"slot {slot}: negative external work"
            assert count or self._work[slot] == 0.0, f"slot {slot}: work with no requests"
            assert self._estimate[slot] >= 0.0, f"slot {slot}: negative estimate"
            assert state != REMOVED or count > 0, f"removed slot {slot} has no requests"
            if state == ACTIVE:
                i = self._apos[slot]
                assert 0 <= i < len(self._avail) and self._avail[i] == slot, \
                    f"slot {slot}: position map broken"
            else:
                assert self._apos[slot] == -1, f"slot {slot} is pickable in state {state}"
        assert len(self._avail) == sum(s == ACTIVE for s in self._state), "pickable count"
        assert total == self._total, f"total {self._total} != sum of counts {total}"
        assert used == self._used, f"used {self._used} != slots in the table {used}"
