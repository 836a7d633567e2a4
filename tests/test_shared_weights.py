"""The shared table's pick index with unequal weights (``_core/_shared_weights.pxi``): the
slots of the fleet's few common weights (its weight classes) are read from the index, class
by class, the few others (an instance in slow start, a weighted few) one by one beside it,
and the pick is the scan's.

``scans`` counts the least-outstanding picks that read every slot; the twin keeps no index,
so its picks are the scan and the differential tests pit the index against it.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import test_shared_index as index
import test_shared_table as shared
import tritonmesh._core as core
from hypothesis import given, settings
from hypothesis import strategies as st

# Both builds, tables unlinked afterwards (tests/test_shared_table.py's fixtures).
impl = shared.impl
make_table = shared.make_table

OPS = st.lists(st.tuples(
    st.sampled_from(["pick", "pick", "pick", "pick", "release", "release", "acquire", "add",
                     "remove", "set_available", "set_limit", "set_weight", "set_weight",
                     "eject", "exclude"]),
    st.integers(0, 129),
    st.integers(0, 20),
), min_size=1, max_size=120)
# Up to 40 odd slots among 70: on both sides of the 32 that a pick reads one by one.
ODD = st.dictionaries(st.integers(0, 69), st.sampled_from(index.ODD_WEIGHTS[1:5]), max_size=40)
# Every one of the 70 slots weighted, from one to five distinct weights: up to four classes
# beside the odd slots, and past them (more than 32 odd slots) the scan.
SPREAD = st.lists(st.sampled_from(index.ODD_WEIGHTS[:5]), min_size=70, max_size=70).map(
    lambda weights: dict(enumerate(weights)))
# Every one of 200 slots weighted, two to four distinct weights: classes and no odd slot
# (but where one weight has fewer than four slots), where the pick may draw by rejection.
CLASSES = st.lists(st.sampled_from(index.ODD_WEIGHTS[:5]), min_size=2, max_size=4,
                   unique=True).flatmap(
    lambda weights: st.lists(st.sampled_from(weights), min_size=200, max_size=200)).map(
    lambda weights: dict(enumerate(weights)))


@shared.needs_c
@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), ops=OPS, weights=st.one_of(ODD, SPREAD, CLASSES),
       layout=index.LAYOUTS)
def test_pick_with_unequal_weights_is_the_scans_pick(seed: int, ops: list[index.Op],
                                                     weights: dict[int, float],
                                                     layout: tuple[int, int]) -> None:
    """A fleet of weight 1 with some slots of other weights, or of weights spread over it
    (several classes, odd slots beside them), whose weights then change: with one seed the
    compiled table's picks (the index by class, drawing by rejection where it does, and the
    odd slots) are the twin's (the scan, with the same draws), and each is least by
    (count + 1) / weight."""
    assert index._differential(core.CSharedTable, seed, ops, False, weights, layout) == \
        index._differential(core.PySharedTable, seed, ops, False, weights, layout)


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), ops=OPS, weights=st.one_of(ODD, SPREAD, CLASSES),
       layout=index.LAYOUTS)
def test_pick_with_unequal_weights_through_a_view(seed: int, ops: list[index.Op],
                                                  weights: dict[int, float],
                                                  layout: tuple[int, int]) -> None:
    """The same with a view (slots excluded, ejected, and back): every pick is least among
    the slots the view allows."""
    index._differential(core.SharedTable, seed, ops, True, weights, layout)


@pytest.fixture
def table_1024() -> Iterator[Any]:
    tag = f"test-{uuid.uuid4().hex[:12]}"
    shared.TAGS.append(tag)
    assert core.CSharedTable is not None
    t = core.CSharedTable.create(1024, 2, tag=tag, seed=11, unlink_stale=False)
    try:
        yield t
    finally:
        t.close()
        t.unlink()


@shared.needs_c
def test_one_instance_in_slow_start_picks_from_the_index(table_1024: Any) -> None:
    """1,024 slots of weight 1, half of them holding a request; one joins in slow start and
    ramps its weight up in steps. Every pick reads the index (no scan) and is one of the
    least by (count + 1) / weight: the ramping slot while its weight makes it so, the idle
    ones of weight 1 otherwise."""
    t = table_1024
    slots = [t.add() for _ in range(1023)]
    for s in slots[::2]:
        t.acquire(s)
    ramping = t.add(0.125)
    for step in range(1, 9):  # eighths, exact in binary: the test's Fractions see the ties
        t.set_weight(ramping, step / 8)
        held = []
        for _ in range(200):
            least = index._least(t)
            s = t.pick()
            assert s in least, (step, s, sorted(least)[:5])
            held.append(s)
            if len(held) == 8:  # the counts move, so the ramping slot wins some picks
                for h in held:
                    t.release(h)
                held = []
        for h in held:
            t.release(h)
    assert t.scans == 0
    for s in slots[::2]:
        t.release(s)
    shared._quiet(t)


def _uniform_from_the_index(t: Any, allowed: list[int], rounds_per_slot: int) -> None:
    """Least-outstanding picks (each released at once) are uniform over ``allowed``
    (chi-square, six standard deviations above its mean) and none reads every slot."""
    picks: Counter[int] = Counter()
    for _ in range(rounds_per_slot * len(allowed)):
        s = t.pick()
        picks[s] += 1
        t.release(s)
    df = len(allowed) - 1
    assert set(picks) == set(allowed)
    assert index._chi_square(picks, allowed) < df + 6 * (2 * df) ** 0.5
    assert t.scans == 0


@shared.needs_c
def test_ties_across_the_index_and_the_odd_slots_are_uniform(table_1024: Any) -> None:
    """Half of 1,024 slots of weight 1 hold a request; 24 of the busy ones weigh 2 to 9,
    three of each (too few for a class of their own: odd), and hold w - 1 requests, so
    (w - 1 + 1) / w ties them with the idle ones, (0 + 1) / 1: a pick is uniform over the 512
    idle slots in the index and the 24 odd ones (chi-square, six standard deviations above
    its mean), and reads no slot by the scan. The idle slots' first word is dense, so the
    pick draws slot ids first, keeping an odd one that ties (``_draw_with_odd``): a draw
    that left the odd ties to the snapshot fails it."""
    t = table_1024
    slots = [t.add() for _ in range(1024)]
    busy = slots[::2]
    for s in busy:
        t.acquire(s)
    heavy = busy[::21][:24]
    for i, s in enumerate(heavy):
        t.set_weight(s, float(i % 8 + 2))
        for _ in range(i % 8):
            t.acquire(s)
            busy.append(s)
    _uniform_from_the_index(t, slots[1::2] + heavy, 60)
    for s in busy:
        t.release(s)
    shared._quiet(t)


@shared.needs_c
def test_two_weight_classes_tie_uniformly_from_the_index(table_1024: Any) -> None:
    """Weights 1 and 2 alternating over 1,024 slots (two classes, no odd slot), each slot of
    weight 2 holding a request: (1 + 1) / 2 ties it with the idle ones of weight 1, so a
    pick is uniform over all 1,024 slots, found at level 0 of one class and level 1 of the
    other (chi-square, six standard deviations above its mean), and reads no slot by the
    scan."""
    t = table_1024
    slots = [t.add(2.0 if i % 2 else 1.0) for i in range(1024)]
    heavy = slots[1::2]
    for s in heavy:
        t.acquire(s)
    _uniform_from_the_index(t, slots, 40)
    for s in heavy:
        t.release(s)
    shared._quiet(t)


@shared.needs_c
@pytest.mark.parametrize("light_idle", [range(0, 16, 2), range(0, 1024, 128)],
                         ids=["mixed", "sparse"])
def test_two_weight_classes_tie_uniformly_drawn_or_not(table_1024: Any,
                                                       light_idle: range) -> None:
    """Weights 1 and 2 alternating over 1,024 slots: those of weight 1 hold a request but
    ``light_idle``, those of weight 2 two but one in 14 from slot 65, which hold one: the
    ties, (0 + 1) / 1 = (1 + 1) / 2, are in both classes at two levels. "mixed": eight in
    the first word, so the pick draws by rejection first (76 ties: about half its picks
    miss eight times and snapshot); "sparse": one there, so it snapshots at once. Uniform
    either way."""
    t = table_1024
    slots = [t.add(2.0 if i % 2 else 1.0) for i in range(1024)]
    light = set(light_idle)
    heavy_tied = set(range(65, 1024, 14))
    held = [s for s in slots if s % 2 == 0 and s not in light]
    held += [s for s in slots if s % 2 for _ in range(1 if s in heavy_tied else 2)]
    for s in held:
        t.acquire(s)
    _uniform_from_the_index(t, sorted(light | heavy_tied), 60)
    for s in held:
        t.release(s)
    shared._quiet(t)


@shared.needs_c
def test_weights_1_to_4_spread_pick_least_from_the_index(table_1024: Any) -> None:
    """Weights 1, 2, 3 and 4 in turn over 1,024 slots with requests piling up: every pick is
    one of the least by (count + 1) / weight, and none reads every slot."""
    t = table_1024
    for i in range(1024):
        t.add(float(i % 4 + 1))
    held = []
    for _ in range(3000):
        least = index._least(t) if len(held) % 50 == 0 else None
        s = t.pick()
        assert least is None or s in least, (s, sorted(least or ())[:5])
        held.append(s)
    assert t.scans == 0
    for s in held:
        t.release(s)
    shared._quiet(t)


@shared.needs_c
def test_more_weights_than_classes_spread_evenly_scan(table_1024: Any) -> None:
    """Weights 1 to 5 in turn: four classes leave about 200 slots odd, more than the 32 a
    pick reads beside the index, so the pick scans (and is still least)."""
    t = table_1024
    slots = [t.add(float(i % 5 + 1)) for i in range(1024)]
    s = t.pick()
    assert s in slots[4::5]
    assert t.scans == 1
    t.release(s)
    shared._quiet(t)


def test_an_ejected_slot_alone_at_its_class_lowest_level_is_passed_over_then_back(
        make_table: Any) -> None:
    """Weights 1 and 2 alternating over 130 slots (two classes), each holding a request but
    one of weight 2, which alone is at its class's level 0, the best, and is ejected: picks
    go to the other slots of weight 2 at level 1, uniformly (the class pick leaves the slot
    out of its class's bitmap once it meets it; a bitmap that kept it would find it there
    again on every read); once the ejection ends the very next pick takes it."""
    t = make_table(capacity=200)
    slots = [t.add(2.0 if i % 2 else 1.0) for i in range(130)]
    index._passed_over_then_back(t, slots, slots[71], [s for s in slots[1::2] if s != slots[71]])


def _best_class_in_the_last_level(cls: Any) -> tuple[list[int], int]:
    """256 slots, weights 1 and 3 alternating (two classes): those of weight 1 hold 5
    requests, those of weight 3 16, so the best, (16 + 1) / 3, is in the index's last level.
    40 picks, each released; returns them and the table's ``scans``."""
    tag = f"test-{uuid.uuid4().hex[:12]}"
    shared.TAGS.append(tag)
    t = cls.create(256, 2, tag=tag, seed=5, unlink_stale=False)
    try:
        slots = [t.add(3.0 if i % 2 else 1.0) for i in range(256)]
        for s in slots:
            for _ in range(16 if s % 2 else 5):
                t.acquire(s)
        picks = []
        for _ in range(40):
            picks.append(t.pick())
            t.release(picks[-1])
        for s in slots:
            for _ in range(16 if s % 2 else 5):
                t.release(s)
        t.check()
        return picks, t.scans
    finally:
        t.close()
        t.unlink()


@shared.needs_c
def test_a_class_best_in_the_last_level_makes_the_scans_draws() -> None:
    """The class pick cannot order the last level's counts, so it leaves the pick to the
    scan, which draws no slot ids by rejection: the twin, with the same seed, makes the same
    picks (it follows the class pick's walk up the levels), all of weight 3."""
    picks, scans = _best_class_in_the_last_level(core.CSharedTable)
    assert scans == 40
    assert all(s % 2 for s in picks)
    assert (picks, 40) == _best_class_in_the_last_level(core.PySharedTable)


def test_stress_several_processes_on_weight_classes(make_table: Any, impl: str) -> None:
    """tests/test_shared_table.py's stress test on 96 slots of weights 1 and 2 alternating
    (two classes: the processes' least-outstanding picks read the index class by class while
    they move it, and add and remove slots of both weights); at the end the index agrees
    with the counts (check)."""
    t = make_table(capacity=128, max_processes=4)
    for i in range(96):
        t.add(2.0 if i % 2 else 1.0)
    index._stress(t, impl, "hammer", 30_000 if impl == "c" else 2_000)


def test_stress_several_processes_beside_odd_slots(make_table: Any, impl: str) -> None:
    """The stress test on 260 slots of weight 1 and two of weight 2 (odd: too few for a class
    of their own), rows of five words: the processes' least-outstanding picks draw slot ids
    beside the odd slots (tied with the idle ones while they hold one request each, below
    them while idle) as they move the index; at the end the index agrees with the counts."""
    t = make_table(capacity=320, max_processes=4)
    for _ in range(260):
        t.add()
    for _ in range(2):
        t.add(2.0)
    index._stress(t, impl, "hammer-even", 30_000 if impl == "c" else 2_000)


def test_stress_several_processes_on_weight_classes_at_full_rows(make_table: Any,
                                                                  impl: str) -> None:
    """The stress test on a full table of 256 slots of weights 1 and 2 alternating (rows of
    four words, every one in use: the class pick draws, and its snapshot reads the rows
    live while the other processes move the slots the walk found tied)."""
    t = make_table(capacity=256, max_processes=4)
    for i in range(256):
        t.add(2.0 if i % 2 else 1.0)
    index._stress(t, impl, "hammer", 30_000 if impl == "c" else 2_000)
