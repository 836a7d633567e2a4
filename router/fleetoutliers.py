"""Outlier ejection for the whole fleet of router processes (``processes`` >= 2).

An instance ejected in one router process is out of every process's picks at once, for
the same back-off, and returns as on one process: on the first passing active health
probe after the back-off (the supervisor's, which runs the probes).

Where the detection counts live: in each router process. A process counts the failures
of the requests it sent (``consecutive_failures`` in a row, or one refused connection)
and, when they say eject, ejects for the fleet. Shared counts would be one more atomic
update per request on every process's path for a rule that needs no fleet-wide sum: a
broken instance fails every request, so the first process to see five in a row is as good
a witness as the fleet (Envoy aggregates in its main thread because its workers cannot
eject on their own; here each process can, into shared memory). The cost is that
detection needs five failures *in one process*: at most K * 5 - (K - 1) failed requests
fleet-wide before the ejection, against 5 with one process.

Shared, in one segment (``tritonmesh-<supervisor pid>-ejections``): per variant and slot,
the ejection's end (u64 nanoseconds of CLOCK_MONOTONIC, one clock for every process; 0:
not ejected), which every pick reads (:class:`~tritonmesh.sharedcounts.SharedCounts`
skips a slot whose word is not 0), and a record: the slot generation it was ejected at and
the ejections in a row that set the back-off (doubling per ejection, capped, forgotten
after ``max_ejection_s`` of success, as on one process). Writes (an ejection, a return, a
reset) take a ``flock`` on the segment; they are rare, and the kernel drops the lock of a
process that dies holding it. Reads take nothing. The detector's flag stays its own: the
health checker's verdict is the shared table's availability, and neither overwrites the
other.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final, cast

from tritonmesh._core import _segment
from tritonmesh.instance import InstanceState
from tritonmesh.outlier import OutlierDetector

if TYPE_CHECKING:
    from tritonmesh.instance import Instance
    from tritonmesh.sharedcounts import SharedCounts

__all__ = ["FleetOutliers", "SharedEjections"]

log = logging.getLogger("tritonmesh.outlier")

MAGIC: Final = _segment.EJECTIONS_MAGIC
VERSION: Final = 1
HEADER: Final = 64
H_VARIANTS, H_CAPACITY = 12, 16


class SharedEjections:
    """The fleet's ejections: ``variants`` x ``capacity`` slots in one segment."""

    def __init__(self, name: str, fd: int):
        self.name = name
        self._fd = fd
        self._map = mmap.mmap(fd, 0)
        header = self._map[:HEADER]
        if int.from_bytes(header[:8], "little") != MAGIC \
                or int.from_bytes(header[8:12], "little") != VERSION:
            self._map.close()
            os.close(fd)
            raise ValueError(f"shared-memory segment {name!r} is not a tritonmesh ejection table")
        self.variants = int.from_bytes(header[H_VARIANTS:H_VARIANTS + 4], "little")
        self.capacity = int.from_bytes(header[H_CAPACITY:H_CAPACITY + 4], "little")
        cells = self.variants * self.capacity
        self._words = memoryview(self._map)[HEADER:HEADER + 8 * cells].cast("Q")
        # Per slot: the generation it was ejected at, and its ejections in a row.
        self._records = memoryview(self._map)[HEADER + 8 * cells:HEADER + 16 * cells].cast("I")
        self._views: list[memoryview] = []  # handed out by words(); released by close()

    @classmethod
    def create(cls, variants: int, capacity: int, tag: str = "ejections") -> SharedEjections:
        name = _segment.segment_name(tag)
        fd = _segment.create_owned(name, HEADER + 16 * variants * capacity, MAGIC, {
            8: VERSION.to_bytes(4, "little"), H_VARIANTS: variants.to_bytes(4, "little"),
            H_CAPACITY: capacity.to_bytes(4, "little")})
        return cls(name, fd)

    @classmethod
    def attach(cls, name: str) -> SharedEjections:
        return cls(name, _segment.open_file(name))

    def close(self) -> None:
        if not self._map.closed:
            for view in (*self._views, self._words, self._records):
                view.release()
            self._map.close()
            os.close(self._fd)

    def unlink(self) -> None:
        _segment.unlink(self.name)

    def words(self, variant: int) -> memoryview:
        """Variant ``variant``'s ejection words, by slot: what a pick reads (0: not ejected).
        Valid until :meth:`close`."""
        view = self._words[variant * self.capacity:(variant + 1) * self.capacity]
        self._views.append(view)
        return view

    def until(self, variant: int, slot: int) -> int:
        return int(self._words[variant * self.capacity + slot])

    def ejections(self, variant: int, slot: int) -> int:
        return int(self._records[2 * (variant * self.capacity + slot) + 1])

    def eject(self, variant: int, slot: int, generation: int, base_s: float,
              max_s: float) -> float:
        """Eject the slot for the back-off its record sets, unless it is ejected already;
        returns the seconds (0.0: it was)."""
        cell = variant * self.capacity + slot
        with self._locked():
            if self._words[cell]:
                return 0.0
            records = self._records
            row = int(records[2 * cell + 1]) if records[2 * cell] == generation else 0
            seconds = float(min(base_s * 2 ** row, max_s))
            records[2 * cell], records[2 * cell + 1] = generation, row + 1
            self._words[cell] = time.monotonic_ns() + max(int(seconds * 1e9), 1)
            return seconds

    def end(self, variant: int, slot: int) -> bool:
        """End the slot's ejection if its back-off is over; whether it did."""
        cell = variant * self.capacity + slot
        with self._locked():
            word = self._words[cell]
            if not word or time.monotonic_ns() < word:
                return False
            self._words[cell] = 0
            return True

    def forget(self, variant: int, slot: int, generation: int = -1) -> None:
        """Reset the slot's ejections in a row (``generation``: only if ejected at it);
        -1: the slot was reused, so its ejection ends too."""
        cell = variant * self.capacity + slot
        with self._locked():
            if generation == -1:
                self._words[cell] = 0
            elif self._records[2 * cell] != generation:
                return
            self._records[2 * cell + 1] = 0

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return _segment.flocked(self._fd)


class FleetOutliers(OutlierDetector):
    """:class:`OutlierDetector` with its ejections in :class:`SharedEjections`.

    In a router process it ejects for the fleet; in the supervisor (``supervisor=True``),
    whose health checker calls :meth:`probe_passed`, it ends ejections. ``Instance.ejected``
    says, in each process, whether the fleet ejected that instance (the supervisor's shows
    on ``tritonmesh status``); a pick reads the shared word itself.
    """

    def __init__(self, shared: SharedEjections, variant_index: dict[str, int], *,
                 supervisor: bool):
        super().__init__()
        self.shared = shared
        self.variant_index = variant_index
        self.supervisor = supervisor

    def _where(self, instance: Instance) -> tuple[int, int]:
        return self.variant_index[instance.variant.name], instance.slot

    def success(self, instance: Instance) -> None:
        instance.failures = 0
        if instance.ejections and \
                time.monotonic() > instance.ejected_until + self.max_ejection_s:
            instance.ejections = 0
            self.shared.forget(*self._where(instance), self._generation(instance))

    def _may_eject(self, instance: Instance) -> bool:
        variant = instance.variant
        words = cast("SharedCounts", variant.table).ejected
        members = [i for i in variant.live_instances() if i.state is InstanceState.ACTIVE]
        ejected = sum(1 for i in members if words[i.slot])
        return ejected + 1 <= self.max_ejected_fraction * len(members)

    def eject(self, instance: Instance, reason: str) -> None:
        if self.supervisor or instance.ejected:
            return
        variant, slot = self._where(instance)
        seconds = self.shared.eject(variant, slot, self._generation(instance),
                                    self.base_ejection_s, self.max_ejection_s)
        instance.failures = 0
        if not seconds:  # another process ejected it: this one learns so from the word
            return
        instance.ejections = self.shared.ejections(variant, slot)
        instance.ejected_until = time.monotonic() + seconds
        log.warning("ejecting %s for %.1fs, from every router process: %s",
                    instance.address, seconds, reason)
        instance.ejected = True

    def probe_passed(self, instance: Instance) -> None:
        """The supervisor's probe of ``instance`` passed: its ejection ends if its back-off
        is over."""
        if self.supervisor and self.shared.end(*self._where(instance)):
            log.info("instance %s returns after its ejection, to every router process",
                     instance.address)

    def follow(self, instances: Iterator[Instance]) -> None:
        """Each instance's ``ejected`` as the fleet's word says (a poll: for status and
        the max_ejected_fraction count, never for picks, which read the word)."""
        for instance in instances:
            ejected = self.shared.until(*self._where(instance)) != 0
            if ejected is not instance.ejected:
                instance.ejected = ejected
                if not ejected:
                    log.info("instance %s returns after its ejection", instance.address)

    def _generation(self, instance: Instance) -> int:
        counts = cast("SharedCounts", instance.variant.table)
        return int(counts.shared.generation(instance.slot))
