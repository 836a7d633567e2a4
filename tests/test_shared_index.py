"""The shared table's pick index (``_core/_shared_index.pxi``): least-outstanding picks read
the lowest non-empty count level instead of scanning every slot. The index is the compiled
table's; the twin scans, so the differential tests here pit the index against the scan.

``check()`` verifies the index against the counts at quiescence (each ACTIVE slot under its
limit has its bit at its count's level and nowhere else), and every test here ends with it.
"""

from __future__ import annotations

import os
import uuid
from array import array
from collections import Counter
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import pytest
import test_shared_table as shared
import tritonmesh._core as core
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonmesh._core import _segment

# The same fixtures as tests/test_shared_table.py: both builds, tables unlinked afterwards.
impl = shared.impl
make_table = shared.make_table
NOT_USABLE = 0xFFFFFFFF


def _index_word(t: Any, level: int, slot: int) -> int:
    """Byte offset of the index word holding ``slot``'s bit at ``level``."""
    return int(_segment.index_offset(t.capacity, t.max_processes)
            + level * _segment.index_row(t.capacity) + slot // 64 * 8)


def _least(t: Any, view: Any = None, ejected: Any = None) -> set[int]:
    """The slots a least-outstanding pick may return now: the pickable ones with the lowest
    (count + 1) / weight."""
    keys = {}
    for slot, count, weight, state, limit in t.snapshot():
        if state != "ACTIVE" or (limit and count >= limit):
            continue
        if view is not None and (view[slot] != t.generation(slot) or ejected[slot]):
            continue
        keys[slot] = Fraction(count + 1) / Fraction(weight)
    low = min(keys.values(), default=None)
    return {s for s, k in keys.items() if k == low}


def _chi_square(counts: Counter[int], slots: list[int]) -> float:
    n = sum(counts.values())
    expected = n / len(slots)
    return sum((counts[s] - expected) ** 2 / expected for s in slots)


# -- the index against the scan ------------------------------------------------------------

Op = tuple[str, int, int]
OPS = st.lists(st.tuples(
    st.sampled_from(["pick", "pick", "pick", "pick_random", "release", "release", "acquire",
                     "add", "remove", "set_available", "set_limit", "eject", "exclude"]),
    st.integers(0, 129),
    st.integers(0, 20),
), min_size=1, max_size=120)


# Weights whose products with small counts are exact in binary floating point, so that the
# tests' exact least (Fractions) and the tables' cross-multiplied doubles agree on ties.
ODD_WEIGHTS = (1.0, 0.5, 1.5, 2.0, 3.0, 1.0)


def _differential(cls: Any, seed: int, ops: list[Op], with_view: bool,
                  odd: dict[int, float] | None = None,
                  layout: tuple[int, int] = (70, -1)) -> list[Any]:
    """Run ``ops`` on a fresh table of ``added`` + 60 slots, ``layout`` = (added, dense),
    every weight 1 but those in ``odd`` (slot: weight; "set_weight" ops change them): each
    pick checked to be least, the index checked after every operation; returns every result
    in order. Each added slot holds some requests, every other one none from ``dense`` on
    for 66 slots: (70, -1) three index words, whose rows the pick snapshots; (200, 64) five,
    the lowest level's first word sparse (four idle slots: the pick snapshots the row);
    (200, 0) five, that word dense (the pick draws by rejection first)."""
    added, dense = layout
    tag = f"test-{uuid.uuid4().hex[:12]}"
    shared.TAGS.append(tag)
    capacity = added + 60
    t = cls.create(capacity, 2, tag=tag, seed=seed, unlink_stale=False)
    view = array("I", [NOT_USABLE]) * capacity
    ejected = array("Q", [0]) * capacity
    if with_view:
        t.set_view(view, ejected)
    out: list[Any] = []
    held: list[int] = []
    try:
        for i in range(added):  # some slots at every level below 16 and some above
            slot = t.add((odd or {}).get(i, 1.0))
            view[slot] = t.generation(slot)
        for slot in range(added):
            for _ in range(slot % 2 if dense <= slot < dense + 66 else slot % 19):
                t.acquire(slot)
                held.append(slot)
        for name, slot, n in ops:
            least = _least(t, view if with_view else None, ejected)
            try:
                if name == "add":
                    result = t.add(1.0, n % 4)
                    view[result] = t.generation(result)
                elif name in ("pick", "pick_random"):
                    result = getattr(t, name)()
                    if result >= 0:
                        held.append(result)
                    if name == "pick":
                        assert (result in least) if least else result == -1, (result, least)
                elif name == "release":
                    result = held.pop(slot % len(held)) if held else -1
                    if result >= 0:
                        t.release(result)
                elif name == "acquire":
                    for _ in range(n):
                        t.acquire(slot)
                        held.append(slot)
                    result = n
                elif name == "set_available":
                    result = t.set_available(slot, n % 2 == 0)
                elif name == "set_limit":
                    result = t.set_limit(slot, n % 5)
                elif name == "set_weight":
                    result = t.set_weight(slot, ODD_WEIGHTS[n % len(ODD_WEIGHTS)])
                elif name == "eject":
                    ejected[slot] = 0 if ejected[slot] else 1
                    result = ejected[slot]
                elif name == "exclude":
                    view[slot] = t.generation(slot) if view[slot] == NOT_USABLE else NOT_USABLE
                    result = view[slot]
                else:
                    result = getattr(t, name)(slot)
            except (ValueError, IndexError) as exc:
                result = type(exc).__name__
            t.check()
            out += [result, t.snapshot()]
        for slot in held:
            t.release(slot)
        t.check()
        return out
    finally:
        t.close()
        t.unlink()


LAYOUTS = st.sampled_from([(70, -1), (200, 64), (200, 0)])


@shared.needs_c
@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), ops=OPS, layout=LAYOUTS)
def test_index_pick_is_the_scans_pick(seed: int, ops: list[Op], layout: tuple[int, int]) -> None:
    """Equal weights, no view: the compiled table's pick reads the index, the twin's scans;
    with one seed they make the same picks (on a row of four words or more whose first
    non-empty word has eight slots or more, both first draw slot ids by rejection, keeping
    the first tied one; then both draw one number for the tie-break and take the tied slots
    in slot order), after any sequence of updates and membership changes."""
    assert _differential(core.CSharedTable, seed, ops, False, layout=layout) == \
        _differential(core.PySharedTable, seed, ops, False, layout=layout)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), ops=OPS, layout=LAYOUTS)
def test_pick_is_least_through_a_view(seed: int, ops: list[Op], layout: tuple[int, int]) -> None:
    """With a view (slots unknown, excluded, ejected, and back again): every pick is one of
    the least-loaded slots the view allows, and the index agrees with the counts."""
    _differential(core.SharedTable, seed, ops, True, layout=layout)


# -- what the view rules out, and back ------------------------------------------------------

def test_an_ejected_slot_at_the_lowest_level_is_passed_over_then_back(make_table: Any) -> None:
    """The ejected slot has no requests, so it sits alone at the lowest level: picks go to
    the next level, uniformly, until the ejection ends; the very next pick takes it."""
    t = make_table(capacity=200)
    slots = [t.add() for _ in range(130)]
    _passed_over_then_back(t, slots, slots[70], [s for s in slots if s != slots[70]])


def _passed_over_then_back(t: Any, slots: list[int], quiet: int, others: list[int]) -> None:
    """Every slot of ``slots`` (a 200-slot table's first) holds a request but ``quiet``,
    which is ejected: picks, each released, are uniform over ``others`` (chi-square, six
    standard deviations above its mean); once the ejection ends, the next pick is ``quiet``."""
    view = array("I", [t.generation(s) for s in slots]) + \
        array("I", [NOT_USABLE]) * (200 - len(slots))
    ejected = array("Q", [0]) * 200
    t.set_view(view, ejected)
    for s in slots:
        t.acquire(s)
    t.release(quiet)
    ejected[quiet] = 1
    picks: Counter[int] = Counter()
    for _ in range(len(others) * 40):
        s = t.pick()
        picks[s] += 1
        t.release(s)
    assert set(picks) == set(others)
    df = len(others) - 1
    assert _chi_square(picks, others) < df + 6 * (2 * df) ** 0.5
    ejected[quiet] = 0
    assert t.pick() == quiet
    t.release(quiet)
    for s in slots:
        if s != quiet:
            t.release(s)
    shared._quiet(t)


# -- uniform at 1,024 instances ---------------------------------------------------------------

def _uniform_at_1024(t: Any, strategy: str, rounds_per_slot: int,
                     idle: range | list[int] = range(0, 1024, 2)) -> None:
    """Of 1,024 slots, all but those ``idle`` (by default every other one, over all
    sixteen index words) hold a request. A least-outstanding pick is uniform over
    the idle ones, pick_random over all 1,024: a chi-square test against uniform, six
    standard deviations above its mean."""
    slots = [t.add() for _ in range(1024)]
    quiet = {slots[i] for i in idle}
    for s in slots:
        if s not in quiet:
            t.acquire(s)
    allowed = sorted(quiet) if strategy == "pick" else slots
    rounds = rounds_per_slot * len(allowed)
    pick = getattr(t, strategy)
    picks: Counter[int] = Counter()
    for _ in range(rounds):
        s = pick()
        picks[s] += 1
        t.release(s)
    df = len(allowed) - 1
    assert set(picks) <= set(allowed)
    assert _chi_square(picks, allowed) < df + 6 * (2 * df) ** 0.5
    for s in slots:
        if s not in quiet:
            t.release(s)
    shared._quiet(t)


@shared.needs_c
@pytest.mark.parametrize("idle", [
    range(0, 1024, 2), range(0, 1024, 128), [*range(0, 64, 8), *range(64, 1024, 13)],
], ids=["half", "sparse", "mixed"])
def test_least_outstanding_is_uniform_at_1024_instances(idle: range | list[int]) -> None:
    """The index's tie-break, by each of its ways: "half" (every other slot idle) nearly
    always draws an idle slot by rejection within eight tries; "sparse" (8 idle, one in the
    first word) snapshots the row at once; "mixed" (82 idle, eight in the first word) draws
    first, and about half of its picks miss eight times and snapshot. The pick is uniform
    every way. The twin's scan has test_shared_table's test_ties_are_uniform (at
    1,024 slots it reads them all in Python, minutes per run) and makes the same draws."""
    tag = f"test-{uuid.uuid4().hex[:12]}"
    shared.TAGS.append(tag)
    assert core.CSharedTable is not None
    t = core.CSharedTable.create(1024, 2, tag=tag, seed=7, unlink_stale=False)
    try:
        _uniform_at_1024(t, "pick", 60 if len(idle) > 8 else 500, idle)
    finally:
        t.close()
        t.unlink()


def test_pick_random_is_uniform_at_1024_instances(make_table: Any, impl: str) -> None:
    _uniform_at_1024(make_table(capacity=1024, seed=7), "pick_random",
                     60 if impl == "c" else 10)


# -- a process that died mid-update -------------------------------------------------------------

def test_reclaim_repairs_the_index_a_dead_process_left(make_table: Any, impl: str) -> None:
    """A process killed between publishing a slot's availability and syncing the index
    (replayed: the status word written, the index not), and one killed between a count
    update and its sync (a bit left at another level): after reclaim, the survivors' picks
    find the slot at its level, and check() agrees."""
    t = make_table(capacity=8)
    a, b, c = t.add(), t.add(), t.add()
    other = shared._cls(impl).attach(t.name, 1)
    t.set_available(a, False)
    for s in (b, c):
        t.acquire(s)
    other.acquire(c)
    slots = _segment.offsets(t.capacity, t.max_processes)[1]
    status = slots + a * _segment.SLOT_SIZE + _segment.S_STATUS
    shared._poke(t.name, status, t.generation(a) << 32 | _segment.ACTIVE)
    # c's bit back at level 1, as before the other process's acquire took it to 2.
    word = _index_word(t, 2, c)
    bits = shared._peek(t.name, word)
    shared._poke(t.name, word, bits & ~(1 << (c % 64)))
    low = _index_word(t, 1, c)
    shared._poke(t.name, low, shared._peek(t.name, low) | 1 << (c % 64))
    if impl == "c":
        with pytest.raises(AssertionError, match="pick index"):
            t.check()
    shared._poke(t.name, _segment.HEADER + 64, shared._dead_pid())
    if impl == "py":
        other._unmap()  # the twin's fd
    assert t.reclaim(1) == 1
    t.check()
    assert t.pick() == a  # alone at level 0
    for s in (a, b, c):
        t.release(s)
    shared._quiet(t)


def test_stress_several_processes_on_the_index(make_table: Any, impl: str) -> None:
    """tests/test_shared_table.py's stress test with every weight 1, so that the three
    processes' least-outstanding picks read the index while they move it; at the end the
    index agrees with the counts (check)."""
    t = make_table(capacity=16, max_processes=4)
    for _ in range(4):
        t.add()
    _stress(t, impl, "hammer-even", 50_000 if impl == "c" else 3_000)


def _stress(t: Any, impl: str, mode: str, iterations: int) -> None:
    """Three worker processes in ``mode`` on ``t`` while this one checks, over and over,
    that every count is the sum of the ledgers; then every count is 0 and the index agrees."""
    procs = [shared._worker(impl, mode, t.name, i, iterations, seed=i) for i in (1, 2, 3)]
    verified = 0
    with shared._reaped(*procs):
        shared._go(procs)
        while any(p.poll() is None for p in procs):
            verified += t.check_live()
        assert [r["ops"] for r in shared._results(procs)] == [iterations] * 3
    assert verified > 0
    shared._quiet(t)


@pytest.fixture(autouse=True, scope="module")
def _nothing_left() -> Iterator[None]:
    yield
    left = [n for n in os.listdir(_segment.SHM_DIR)
            if any(n.endswith(f"-{tag}") for tag in shared.TAGS)]
    assert left == []
