"""The fleet's sequence pins (tritonmesh.sharedpins) on their own: a differential test
against a dict, expiry, the limit, a torn cell, and processes sharing one table."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonmesh import sharedpins
from tritonmesh._core import _segment
from tritonmesh.sharedpins import CELL, HEADER, PinsFullError, SharedPins


@pytest.fixture
def pins() -> Iterator[SharedPins]:
    table = SharedPins.create(8, tag=f"pins-test-{os.getpid()}")
    yield table
    table.unlink()
    table.close()


def _cells(table: SharedPins) -> int:
    return sum(1 for i in range(table.capacity) if table._pin_at(i) is not None)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["find", "claim", "put", "drop"]),
                          st.integers(0, 11), st.integers(0, 3)), max_size=80))
def test_pins_behave_like_a_dict(ops: list[tuple[str, int, int]]) -> None:
    # 16 cells for 8 sequences and 12 keys: long probe runs, wrap-around and backward shifts.
    table = SharedPins.create(8, tag=f"pins-diff-{os.getpid()}")
    try:
        model: dict[int, tuple[int, int, int]] = {}
        for op, sequence, slot in ops:
            key = table.key(None, "m", sequence)
            pin = (0, slot, 7)
            if op == "find":
                assert table.find(key) == model.get(sequence)
            elif op == "drop":
                table.drop(key)
                model.pop(sequence, None)
            else:
                try:
                    got = table.claim(key, pin) if op == "claim" else (table.put(key, pin), pin)[1]
                except PinsFullError:
                    assert sequence not in model and len(model) == 8
                    continue
                if op == "claim" and sequence in model:
                    assert got == model[sequence]
                else:
                    model[sequence] = got = pin
            assert len(table) == len(model) == _cells(table)
        for sequence, pin in model.items():
            assert table.find(table.key(None, "m", sequence)) == pin
    finally:
        table.unlink()
        table.close()


def test_keys_tell_apart_variant_model_and_id_kind(pins: SharedPins) -> None:
    keys = {pins.key(None, "m", 1), pins.key("a", "m", 1), pins.key(None, "n", 1),
            pins.key(None, "m", "1"), pins.key(None, "m", 2)}
    assert len(keys) == 5


def test_a_claim_keeps_the_first_pin_unless_told_it_is_stale(pins: SharedPins) -> None:
    key = pins.key(None, "m", 5)
    assert pins.claim(key, (0, 1, 1)) == (0, 1, 1)
    assert pins.claim(key, (0, 2, 1)) == (0, 1, 1)
    assert pins.claim(key, (0, 2, 1), stale=(0, 1, 1)) == (0, 2, 1)
    pins.put(key, (0, 3, 1))
    assert pins.find(key) == (0, 3, 1)


def test_idle_pins_are_forgotten(pins: SharedPins) -> None:
    key = pins.key(None, "m", 1)
    pins.put(key, (0, 1, 1))
    pins.put(pins.key(None, "m", 2), (0, 1, 1))
    assert pins.expire(3600) == 0 and len(pins) == 2
    assert pins.expire(0) == 2 and len(pins) == 0
    pins.put(key, (0, 1, 1))
    pins.idle_ns = -1  # a lookup after the idle time: no pin, and it is gone
    assert pins.find(key) is None and len(pins) == 0


def test_a_sweep_forgets_exactly_the_idle_and_torn_pins() -> None:
    """A full table with long probe runs (one sweep chunk smaller than the table, so runs
    cross chunks and wrap): the sweep forgets the pins idle since before its cutoff and the
    torn cell, keeps every other pin findable, and counts what it forgot."""
    table = SharedPins.create(64, tag=f"pins-sweep-{os.getpid()}")
    try:
        keys = [table.key(None, "m", sequence) for sequence in range(64)]
        for sequence, key in enumerate(keys):
            table.put(key, (0, sequence, 1))
        cell = {table._map[HEADER + CELL.size * i:HEADER + CELL.size * i + 16]: i
                for i in range(table.capacity) if table._pin_at(i) is not None}
        idle, torn = keys[::3], keys[1]
        with open(_segment.path(table.name), "r+b") as f:
            for key in idle:  # last used at time 0: long before any cutoff
                f.seek(HEADER + CELL.size * cell[key] + 32)
                f.write((0).to_bytes(8, "little"))
            f.seek(HEADER + CELL.size * cell[torn] + 20)  # a kill mid-copy
            f.write((999).to_bytes(4, "little"))
        chunk, sharedpins.SWEEP_CHUNK = sharedpins.SWEEP_CHUNK, 48
        try:
            assert table.expire(3600) == len(idle) + 1
        finally:
            sharedpins.SWEEP_CHUNK = chunk
        kept = [k for k in keys if k not in idle and k != torn]
        assert len(table) == _cells(table) == len(kept)
        for key in kept:
            assert table.find(key) == (0, keys.index(key), 1)
        for key in [*idle, torn]:
            assert table.find(key) is None
    finally:
        table.unlink()
        table.close()


def test_the_limit_counts_open_sequences(pins: SharedPins) -> None:
    for sequence in range(8):
        pins.put(pins.key(None, "m", sequence), (0, 0, 0))
    with pytest.raises(PinsFullError):
        pins.put(pins.key(None, "m", 8), (0, 0, 0))
    pins.put(pins.key(None, "m", 3), (0, 1, 0))  # an open one may move
    pins.drop(pins.key(None, "m", 3))
    pins.put(pins.key(None, "m", 8), (0, 0, 0))


def test_a_torn_cell_reads_as_no_pin(pins: SharedPins) -> None:
    key = pins.key(None, "m", 1)
    pins.put(key, (0, 1, 1))
    (index,) = [i for i in range(pins.capacity) if pins._pin_at(i) is not None]
    with open(_segment.path(pins.name), "r+b") as f:
        f.seek(HEADER + CELL.size * index + 20)  # the slot, as a kill mid-copy leaves it
        f.write((2).to_bytes(4, "little"))
    assert pins.find(key) is None and len(pins) == 0


def _pin_many(name: str, start: int) -> None:
    table = SharedPins.attach(name, 400)
    for sequence in range(start, start + 100):
        table.claim(table.key(None, "m", sequence % 150), (0, start, 0))
    table.close()


def test_processes_agree_on_every_pin() -> None:
    """Four processes claim overlapping sequences at once: the table holds each sequence
    once, and its count is exact."""
    table = SharedPins.create(400, tag=f"pins-mp-{os.getpid()}")
    try:
        context = multiprocessing.get_context("spawn")
        workers = [context.Process(target=_pin_many, args=(table.name, start))
                   for start in (0, 25, 50, 75)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
            assert w.exitcode == 0
        assert len(table) == _cells(table) == 150
        for sequence in range(150):
            assert table.find(table.key(None, "m", sequence)) is not None
    finally:
        table.unlink()
        table.close()
