"""Sequence pins shared by the router processes of one endpoint (``processes`` >= 2).

A Triton sequence keeps its state in one server, so every request of it must reach the
instance its start went to. With K router processes a client's connections (or
tritonclient's reconnect) land in different processes, so the pins cannot be a dict in
each: they live in one shared-memory segment, ``tritonmesh-<supervisor pid>-pins``,
created by the supervisor beside the tables and removed with them (a crashed run's is
removed by ``unlink_stale``).

Layout: a 64-byte header (magic, version, capacity, live pins, the owner's pid and start
time at the offsets of ``_segment``'s header, so stale-segment cleanup judges it the same
way, and a random 16-byte key for the digests), then ``capacity`` cells of 40 bytes: the
key's digest (16 bytes), the pin (variant index, slot, slot generation: u32 each), a
check word (CRC-32 of the cell's first 28 bytes, with the low bit set; 0 = empty) and
the last use (u64 nanoseconds of CLOCK_MONOTONIC, one clock for every process).
Open addressing by linear probing, deletion by backward shift (no tombstones), at most
half full (``capacity`` is a power of two >= 2 * ``limits.max_sequences``).

A key is (target variant, model, sequence id), digested with BLAKE2b keyed by the
segment's random key, 128 bits: a client cannot make two sequences collide, and by
chance two of 100,000 open sequences collide once in about 10**28 tries.

Every operation takes an exclusive ``flock`` on the segment for a few microseconds of
Python (no syscall, allocation of note or callback inside). This is a lock, unlike the
outstanding table's compare-and-swap, and a deliberate one: only requests that carry a
``sequence_id`` pay it (one lock per request, never on the pick path of the others), the
kernel drops the lock of a process that dies holding it, so a SIGKILLed router process
wedges nobody, and the check word makes a cell it was writing read as empty rather than
as a wrong pin. A pin belongs to no process: it stays valid when the process that made
it dies, so there is nothing to reclaim.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import struct
import time
import zlib
from typing import Final

import numpy as np
from tritonmesh._core import _segment

__all__ = ["Pin", "PinsFullError", "SharedPins"]

Pin = tuple[int, int, int]  # (variant index, slot, slot generation)

MAGIC: Final = _segment.PINS_MAGIC
VERSION: Final = 1
HEADER: Final = 64
H_CAPACITY, H_LIVE, H_SECRET = 12, 16, 48
CELL: Final = struct.Struct("<16sIIIIQ")  # digest, variant, slot, generation, check, last use
_VALUE = struct.Struct("<16sIII")  # the part the check word covers
_CELLS = np.dtype([("digest", "V16"), ("variant", "<u4"), ("slot", "<u4"),
                   ("generation", "<u4"), ("check", "<u4"), ("last", "<u8")])
assert _CELLS.itemsize == CELL.size
# The sweep holds the lock for this many cells at a time, so that requests of open
# sequences wait for at most one chunk.
SWEEP_CHUNK: Final = 4096


class PinsFullError(Exception):
    """``limits.max_sequences`` sequences are pinned fleet-wide."""


def _capacity(max_sequences: int) -> int:
    return max(16, 1 << (2 * max_sequences - 1).bit_length())


class SharedPins:
    """The fleet's sequence pins: one segment, every router process attached."""

    def __init__(self, name: str, fd: int, *, owner: bool):
        self.name = name
        self._fd = fd
        self.owner = owner  # the supervisor: it sweeps idle pins and unlinks the segment
        self._map = mmap.mmap(fd, 0)
        header = self._map[:HEADER]
        if len(header) < HEADER or int.from_bytes(header[:8], "little") != MAGIC \
                or int.from_bytes(header[8:12], "little") != VERSION:
            self._map.close()
            os.close(fd)
            raise ValueError(f"shared-memory segment {name!r} is not a tritonmesh pin table")
        self.capacity = int.from_bytes(header[H_CAPACITY:H_CAPACITY + 4], "little")
        self._mask = self.capacity - 1
        self._secret = header[H_SECRET:H_SECRET + 16]
        self.max_sequences = self.capacity // 2
        self.idle_ns = 10 * 10**9  # limits.sequence_idle_timeout_s, set by the balancer
        self._sweep_at = 0

    @classmethod
    def create(cls, max_sequences: int, tag: str = "pins") -> SharedPins:
        """A segment owned by this process for ``max_sequences`` open sequences."""
        capacity = _capacity(max_sequences)
        name = _segment.segment_name(tag)
        fd = _segment.create_owned(name, HEADER + CELL.size * capacity, MAGIC, {
            8: VERSION.to_bytes(4, "little"), H_CAPACITY: capacity.to_bytes(4, "little"),
            H_SECRET: os.urandom(16)})
        pins = cls(name, fd, owner=True)
        pins.max_sequences = max_sequences
        return pins

    @classmethod
    def attach(cls, name: str, max_sequences: int) -> SharedPins:
        pins = cls(name, _segment.open_file(name), owner=False)
        pins.max_sequences = max_sequences
        return pins

    def close(self) -> None:
        if not self._map.closed:
            self._map.close()
            os.close(self._fd)

    def unlink(self) -> None:
        _segment.unlink(self.name)

    # -- keys --------------------------------------------------------------------------

    def key(self, target_variant: str | None, model: str, sequence_id: int | str) -> bytes:
        """The digest that stands for one sequence in the table."""
        kind = b"i" if isinstance(sequence_id, int) else b"s"
        text = f"{target_variant or ''}\0{model}\0{sequence_id}".encode()
        return hashlib.blake2b(kind + text, digest_size=16, key=self._secret).digest()

    # -- operations (each one lock) ------------------------------------------------------

    def find(self, key: bytes) -> Pin | None:
        """The sequence's pin, its last use now; None when it has none (or it was idle
        for longer than ``idle_ns``: then it is forgotten)."""
        with self._locked():
            return self._find(key, time.monotonic_ns(), touch=True)

    def claim(self, key: bytes, pin: Pin, stale: Pin | None = None) -> Pin:
        """Pin the sequence to ``pin`` unless another process pinned it meanwhile; returns
        the pin it has now. ``stale``: a pin the caller found unusable (its instance left),
        replaced rather than kept.

        Raises:
            PinsFullError: it had no pin and ``max_sequences`` are pinned.
        """
        with self._locked():
            now = time.monotonic_ns()
            current = self._find(key, now, touch=True)
            if current is not None and current != stale:
                return current
            self._store(key, pin, now)
            return pin

    def put(self, key: bytes, pin: Pin) -> None:
        """Pin the sequence to ``pin`` whatever it had (a sequence start).

        Raises:
            PinsFullError: it had no pin and ``max_sequences`` are pinned.
        """
        with self._locked():
            self._store(key, pin, time.monotonic_ns())

    def drop(self, key: bytes) -> None:
        """Forget the sequence's pin (its end)."""
        with self._locked():
            index = self._index(key)
            if index >= 0:
                self._delete(index)

    def __len__(self) -> int:
        return int.from_bytes(self._map[H_LIVE:H_LIVE + 4], "little")

    def expire(self, idle_s: float) -> int:
        """Forget the pins idle for longer than ``idle_s`` (the supervisor sweeps; a router
        process's call only sets the idle time its lookups honour); returns how many."""
        self.idle_ns = int(idle_s * 1e9)
        if not self.owner:
            return 0
        forgotten = 0
        for start in range(0, self.capacity, SWEEP_CHUNK):
            stop = min(start + SWEEP_CHUNK, self.capacity)
            with self._locked():
                cutoff = time.monotonic_ns() - self.idle_ns
                index = self._next_expired(start, stop, cutoff)
                while index >= 0:
                    self._delete(index)  # the next cell may have moved here: look again
                    forgotten += 1
                    index = self._next_expired(index, stop, cutoff)
        return forgotten

    def _next_expired(self, start: int, stop: int, cutoff: int) -> int:
        """The first cell in [start, stop) that is idle since before ``cutoff`` or torn; -1.
        The table is sized for the fleet's limit and mostly empty: numpy finds the occupied
        cells, and only those are looked at one by one (a Python loop over every cell cost
        the supervisor about 8% of a core at the default 100,000 sequences)."""
        cells = np.frombuffer(self._map, _CELLS, stop - start, self._offset(start))
        try:
            occupied = np.flatnonzero(cells["check"])
            idle = cells["last"][occupied] < cutoff
            for i, old in zip(occupied.tolist(), idle.tolist(), strict=True):
                index = start + int(i)
                if old or self._pin_at(index) is None:
                    return index
            return -1
        finally:
            del cells  # a view of the map: the map cannot close while one lives

    # -- under the lock ------------------------------------------------------------------

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return _segment.flocked(self._fd)

    def _offset(self, index: int) -> int:
        return HEADER + CELL.size * index

    def _home(self, digest: bytes) -> int:
        return int.from_bytes(digest[:8], "little") & self._mask

    def _pin_at(self, index: int) -> Pin | None:
        """The cell's pin; None when it is empty or torn (its check word disagrees)."""
        offset = self._offset(index)
        _, variant, slot, generation, check, _ = CELL.unpack_from(self._map, offset)
        if not check or check != zlib.crc32(self._map[offset:offset + _VALUE.size]) | 1:
            return None
        return variant, slot, generation

    def _index(self, key: bytes) -> int:
        """The cell holding ``key``, or -1."""
        index = self._home(key)
        for _ in range(self.capacity):
            digest, _, _, _, check, _ = CELL.unpack_from(self._map, self._offset(index))
            if not check:
                return -1
            if digest == key:
                return index
            index = (index + 1) & self._mask
        return -1

    def _find(self, key: bytes, now: int, *, touch: bool) -> Pin | None:
        index = self._index(key)
        if index < 0:
            return None
        offset = self._offset(index)
        last = int.from_bytes(self._map[offset + 32:offset + 40], "little")
        pin = self._pin_at(index)
        if pin is None or now - last > self.idle_ns:
            self._delete(index)
            return None
        if touch:
            self._map[offset + 32:offset + 40] = now.to_bytes(8, "little")
        return pin

    def _store(self, key: bytes, pin: Pin, now: int) -> None:
        index = self._index(key)
        if index < 0:
            live = len(self)
            if live >= self.max_sequences:
                raise PinsFullError(f"{live} sequences are pinned")
            index = self._home(key)
            while CELL.unpack_from(self._map, self._offset(index))[4]:
                index = (index + 1) & self._mask
            self._map[H_LIVE:H_LIVE + 4] = (live + 1).to_bytes(4, "little")
        value = _VALUE.pack(key, *pin)
        # One copy of the whole cell: a process killed inside it leaves a torn cell, whose
        # check word then disagrees, never a half-written pin that reads as valid.
        self._map[self._offset(index):self._offset(index) + CELL.size] = CELL.pack(
            key, *pin, zlib.crc32(value) | 1, now)

    def _delete(self, index: int) -> None:
        """Empty cell ``index``, moving later cells of its probe run back (no tombstones)."""
        mask, cell = self._mask, CELL.size
        hole = index
        probe = index
        while True:
            probe = (probe + 1) & mask
            offset = self._offset(probe)
            digest, _, _, _, check, _ = CELL.unpack_from(self._map, offset)
            if not check:
                break
            home = self._home(digest)
            # The entry may move to the hole unless its home lies cyclically in (hole, probe].
            if (probe - home) & mask >= (probe - hole) & mask:
                self._map[self._offset(hole):self._offset(hole) + cell] = \
                    self._map[offset:offset + cell]
                hole = probe
        self._map[self._offset(hole):self._offset(hole) + cell] = bytes(cell)
        live = len(self)
        self._map[H_LIVE:H_LIVE + 4] = max(live - 1, 0).to_bytes(4, "little")
