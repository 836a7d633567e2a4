"""The outstanding table: every behavioural test runs against the C class and the twin.

Tables are wrapped by ``checked``, which runs the full invariant check after every
operation (as CPython's test_heapq does), so each test also exercises ``check()``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import pytest
import tritonmesh._core as core
from hypothesis import given, settings
from hypothesis import strategies as st

# The switch as tritonmesh._core reads it. Only the switch may skip the compiled class: a
# build that silently failed must fail these tests, not skip them.
NO_EXTENSIONS_ENV = os.environ.get("TRITONMESH_NO_EXTENSIONS", "") not in ("", "0")
needs_c = pytest.mark.skipif(NO_EXTENSIONS_ENV, reason="TRITONMESH_NO_EXTENSIONS=1: twin only")


@pytest.fixture(params=[pytest.param("c", marks=needs_c), "py"])
def table_cls(request: pytest.FixtureRequest) -> Any:
    """The compiled class, then the pure-Python twin."""
    if request.param == "py":
        return core.PyOutstandingTable
    if core.COutstandingTable is None:
        pytest.fail("the compiled core did not load and TRITONMESH_NO_EXTENSIONS is not set")
    return core.COutstandingTable


class _Checked:
    """A table whose every method call is followed by ``check()``."""

    def __init__(self, table: Any) -> None:
        self._table = table

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._table, name)

        def call(*args: Any) -> Any:
            try:
                return method(*args)
            finally:
                self._table.check()

        return call

    def __len__(self) -> int:
        return len(self._table)


def checked(table: Any) -> Any:
    return _Checked(table)


def _chi_square(counts: list[int], expected: list[float]) -> float:
    return sum((c - e) ** 2 / e for c, e in zip(counts, expected, strict=True))


# Upper critical values of the chi-square distribution at p = 0.001, by degrees of freedom
# (standard tables; scipy.stats.chi2.ppf(0.999, dof)). The seeds are fixed, so a pass is
# a pass every run; a correct implementation would fail a random seed once in 1000.
CHI2_P001 = {1: 10.83, 3: 16.27, 7: 24.32, 11: 31.26, 15: 37.70}


def _spread(pick: Callable[[], int], release: Callable[[int], None], n: int) -> Counter[int]:
    """Slots chosen by ``n`` pick + release pairs (the low-load pattern)."""
    seen: Counter[int] = Counter()
    for _ in range(n):
        slot = pick()
        seen[slot] += 1
        release(slot)
    return seen


# -- the build ---------------------------------------------------------------------------


def test_compiled_core_loaded() -> None:
    """Fails if the extension silently did not build or load."""
    if NO_EXTENSIONS_ENV:
        assert core.NO_EXTENSIONS
        assert core.OutstandingTable is core.PyOutstandingTable
        return
    assert core.COutstandingTable is not None, "tritonmesh._core._outstanding_c did not import"
    assert core.OutstandingTable is core.COutstandingTable
    module = __import__(core.COutstandingTable.__module__, fromlist=["_"])
    assert module.__file__ is not None and module.__file__.endswith(".so")


@needs_c
def test_same_api_as_twin_and_stub() -> None:
    import ast
    from pathlib import Path

    assert core.COutstandingTable is not None
    stub = Path(core.__file__).with_name("_outstanding_c.pyi")
    tree = ast.parse(stub.read_text())
    stub_cls = next(n for n in tree.body if isinstance(n, ast.ClassDef))
    stubbed = {f.name for f in stub_cls.body if isinstance(f, ast.FunctionDef)}

    def public(cls: type) -> set[str]:
        return {n for n in vars(cls) if not n.startswith("_")} | {"__init__", "__len__"}

    assert public(core.COutstandingTable) == public(core.PyOutstandingTable) == stubbed


# -- behaviour ---------------------------------------------------------------------------


def test_pick_is_least_loaded(table_cls: Any) -> None:
    t = checked(table_cls(seed=1))
    slots = [t.add() for _ in range(4)]
    for _ in range(4):
        t.pick()
    assert sorted(t.outstanding(s) for s in slots) == [1, 1, 1, 1]
    t.release(slots[2])
    assert t.pick() == slots[2]


def test_pick_relative_to_weight(table_cls: Any) -> None:
    t = checked(table_cls(seed=2))
    small, big = t.add(1.0), t.add(3.0)
    for _ in range(40):
        t.pick()
    # (count + 1) / weight stays balanced: 3x the requests on the 3x-capacity slot.
    assert (t.outstanding(small), t.outstanding(big)) == (10, 30)


def test_never_picks_a_more_loaded_slot(table_cls: Any) -> None:
    t = checked(table_cls(seed=3))
    slots = [t.add(w) for w in (1.0, 2.0, 0.5, 1.0, 2.0, 3.0)]
    t.set_available(slots[5], False)  # the lightest, but not pickable
    for i in range(300):
        before = {s: t.outstanding(s) for s in slots[:5]}
        chosen = t.pick()
        best = min(Fraction(before[s] + 1) / Fraction(t.weight(s)) for s in before)
        assert Fraction(before[chosen] + 1) / Fraction(t.weight(chosen)) == best
        if i % 3 == 0:
            t.release(chosen)


def test_release_at_zero_is_an_error(table_cls: Any) -> None:
    t = checked(table_cls(seed=4))
    s = t.add()
    with pytest.raises(ValueError, match="no outstanding requests"):
        t.release(s)
    assert t.outstanding(s) == 0 and t.total_outstanding() == 0
    t.acquire(s)
    t.release(s)
    with pytest.raises(ValueError, match="no outstanding requests"):
        t.release(s)
    for bad in (99, -1):
        with pytest.raises(IndexError, match="not in the table"):
            t.release(bad)


def test_empty_table_picks_nothing(table_cls: Any) -> None:
    t = checked(table_cls(seed=5))
    for pick in (t.pick, t.pick_random, t.pick_round_robin, t.pick_two):
        assert pick() == -1
    s = t.add()
    t.set_available(s, False)
    for pick in (t.pick, t.pick_random, t.pick_round_robin, t.pick_two):
        assert pick() == -1
    assert t.total_outstanding() == 0


def test_unavailable_is_excluded_but_releasable(table_cls: Any) -> None:
    t = checked(table_cls(seed=6))
    a, b = t.add(), t.add()
    t.acquire(a)
    t.set_available(a, False)
    t.set_available(a, False)  # idempotent
    assert not t.is_available(a) and t.pickable() == 1 and len(t) == 2
    t.acquire(a)  # a pinned sequence may still go to a draining instance
    for pick in (t.pick, t.pick_random, t.pick_round_robin, t.pick_two):
        assert pick() == b
    t.release(a)
    t.release(a)
    assert t.outstanding(a) == 0
    t.set_available(a, True)
    assert t.is_available(a)
    assert t.pick() == a  # back, and the least loaded


def test_removed_id_not_reused_while_outstanding(table_cls: Any) -> None:
    t = checked(table_cls(seed=7))
    a, b = t.add(), t.add()
    t.acquire(a)
    t.remove(a)
    t.remove(a)  # idempotent
    assert all(t.pick() == b for _ in range(3))
    c = t.add()
    assert c not in (a, b)  # a is still outstanding
    t.release(a)
    assert len(t) == 2  # a is free again
    assert t.add() == a
    t.acquire(b)
    t.remove(b)
    with pytest.raises(ValueError, match="was removed"):
        t.set_available(b, True)
    with pytest.raises(ValueError, match="was removed"):
        t.acquire(b)
    t.release(b)
    t.release(b)
    t.release(b)
    t.release(b)
    with pytest.raises(IndexError, match="not in the table"):
        t.release(b)
    for call in (t.outstanding, t.weight, t.is_available, t.remove):
        with pytest.raises(IndexError, match="not in the table"):
            call(b)


def test_ids_reused_lowest_first(table_cls: Any) -> None:
    t = checked(table_cls(seed=15))
    slots = [t.add() for _ in range(5)]
    for s in (3, 1, 4):
        t.remove(slots[s])
    assert [t.add(), t.add(), t.add(), t.add()] == [1, 3, 4, 5]


def test_set_weight_moves_classes(table_cls: Any) -> None:
    t = checked(table_cls(seed=8))
    slots = [t.add() for _ in range(3)]
    t.acquire(slots[0])
    t.set_weight(slots[0], 4.0)  # moves with its count
    assert t.weight(slots[0]) == 4.0 and t.outstanding(slots[0]) == 1
    for _ in range(11):
        t.pick()
    assert [t.outstanding(s) for s in slots] == [8, 2, 2]
    t.set_available(slots[1], False)
    t.set_weight(slots[1], 0.5)  # an unavailable slot keeps its new weight for later
    t.set_available(slots[1], True)
    assert t.weight(slots[1]) == 0.5
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive finite"):
            t.set_weight(slots[1], bad)
        with pytest.raises(ValueError, match="positive finite"):
            t.add(bad)


def test_large_counts(table_cls: Any) -> None:
    t = checked(table_cls(seed=16))
    a, b = t.add(), t.add()
    for _ in range(300):
        t.acquire(a)
    t.set_weight(a, 2.0)
    t.set_available(a, False)
    t.set_available(a, True)
    assert t.pick() == b
    for _ in range(300):
        t.release(a)
    assert t.total_outstanding() == 1


def test_snapshot_and_totals(table_cls: Any) -> None:
    t = checked(table_cls(seed=9))
    a, b, c = t.add(), t.add(2.0), t.add()
    t.acquire(b)
    t.acquire(c)
    t.set_available(a, False)
    t.remove(c)
    assert t.snapshot() == [(a, 0, 1.0, "UNAVAILABLE"), (b, 1, 2.0, "ACTIVE"),
                            (c, 1, 1.0, "REMOVED")]
    assert t.total_outstanding() == 2 and len(t) == 3 and t.pickable() == 1


def test_pick_two_prefers_the_less_loaded(table_cls: Any) -> None:
    t = checked(table_cls(seed=14))
    a, b = t.add(), t.add()
    for _ in range(5):
        t.acquire(a)
    assert all(t.pick_two() == b for _ in range(5))  # b reaches 5, still not above a
    t.remove(b)
    assert t.pick_two() == a  # the only one left


def test_round_robin_visits_every_slot(table_cls: Any) -> None:
    t = checked(table_cls(seed=17))
    slots = [t.add(w) for w in (1.0, 5.0, 1.0)]
    assert sorted(t.pick_round_robin() for _ in range(3)) == slots  # weights not applied


# -- fairness (statistics, fixed seeds) ---------------------------------------------------


def test_low_load_spreads_over_every_idle_slot(table_cls: Any) -> None:
    """pick + release one at a time must not stick to one instance."""
    t = checked(table_cls(seed=10))
    slots = [t.add() for _ in range(8)]
    seen = _spread(t.pick, t.release, 8000)
    counts = [seen[s] for s in slots]
    assert min(counts) > 0 and _chi_square(counts, [1000.0] * 8) < CHI2_P001[7], counts


@pytest.mark.parametrize("strategy", ["pick", "pick_two", "pick_random", "pick_round_robin"])
def test_ties_spread_uniformly(table_cls: Any, strategy: str) -> None:
    t = checked(table_cls(seed=11))
    slots = [t.add() for _ in range(16)]
    seen = _spread(getattr(t, strategy), t.release, 16000)
    counts = [seen[s] for s in slots]
    assert _chi_square(counts, [1000.0] * 16) < CHI2_P001[15], counts


def test_ties_only_among_the_least_loaded(table_cls: Any) -> None:
    """With some slots busy, pick spreads uniformly over exactly the idle ones."""
    t = checked(table_cls(seed=18))
    slots = [t.add() for _ in range(16)]
    busy = slots[::4]
    for s in busy:
        t.acquire(s)
    seen = _spread(t.pick, t.release, 12000)
    assert not set(seen) & set(busy)
    idle = [seen[s] for s in slots if s not in busy]
    assert _chi_square(idle, [1000.0] * 12) < CHI2_P001[11], idle


def test_ties_across_weight_classes_are_uniform(table_cls: Any) -> None:
    """Slots of different weights whose (count + 1) / weight tie are equally likely."""
    t = checked(table_cls(seed=12))
    a, b, c = t.add(1.0), t.add(2.0), t.add(2.0)
    t.acquire(b)
    t.acquire(c)  # (0 + 1) / 1 == (1 + 1) / 2 for all three
    seen = _spread(t.pick, t.release, 6000)
    counts = [seen[a], seen[b], seen[c]]
    assert _chi_square(counts, [2000.0] * 3) < 13.82, counts  # dof 2, p = 0.001


def test_random_follows_weights(table_cls: Any) -> None:
    t = checked(table_cls(seed=13))
    weights = [1.0, 2.0, 3.0, 4.0]
    slots = [t.add(w) for w in weights]
    n = 20000
    seen = _spread(t.pick_random, t.release, n)
    expected = [n * w / sum(weights) for w in weights]
    counts = [seen[s] for s in slots]
    assert _chi_square(counts, expected) < CHI2_P001[3], counts


# -- external load (another replica's requests, from Triton's load report) -----------------


def test_external_load_is_compared_with_the_local_count(table_cls: Any) -> None:
    t = checked(table_cls(seed=20))
    a, b = t.add(), t.add()
    t.set_external(a, 3)
    assert [t.pick() for _ in range(3)] == [b, b, b]  # b's load climbs to a's 3
    assert (t.outstanding(a), t.outstanding(b), t.external(a)) == (0, 3, 3)
    assert {t.pick(), t.pick()} == {a, b}  # tied at 3: either, then the other
    t.set_external(a, 0)
    assert t.pick() == a  # a: 1 + 0 against b's 4 + 0, local counts alone again
    assert t.total_outstanding() == 6  # external load is never outstanding here


def test_external_load_rounds_and_is_bounded(table_cls: Any) -> None:
    t = checked(table_cls(seed=21))
    a = t.add()
    for value, stored in ((2.5, 3), (2.49, 2), (0.4, 0), (core.MAX_EXTERNAL, core.MAX_EXTERNAL),
                          (1, 1)):
        t.set_external(a, value)
        assert t.external(a) == stored
    for bad in (-0.1, core.MAX_EXTERNAL + 1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="external load"):
            t.set_external(a, bad)
    assert t.external(a) == 1
    with pytest.raises(IndexError, match="not in the table"):
        t.set_external(5, 1)


def test_external_load_follows_a_slot_out_of_and_back_into_the_pick_set(table_cls: Any) -> None:
    t = checked(table_cls(seed=22))
    a, b = t.add(), t.add()
    t.set_available(a, False)
    t.set_external(a, 4)  # while unpickable: kept, and counted once a is back
    t.set_available(a, True)
    t.set_weight(a, 1.0)
    assert [t.pick() for _ in range(4)] == [b] * 4
    t.remove(b)  # with 4 outstanding: removed, still in the table
    t.remove(a)
    assert t.add() == a and t.external(a) == 0  # a fresh slot starts with none


def test_pick_two_compares_external_load(table_cls: Any) -> None:
    t = checked(table_cls(seed=23))
    a, b = t.add(), t.add()
    t.set_external(b, 1)
    assert t.pick_two() == a
    assert t.pick_two() in (a, b)  # 1 + 0 against 0 + 1: a coin
    t.set_external(b, 50)
    assert all(t.pick_two() == a for _ in range(20))


def test_pick_under_a_limit_reads_local_counts_and_compares_load(table_cls: Any) -> None:
    t = checked(table_cls(seed=25))
    a, b, c = t.add(), t.add(), t.add(2.0)
    t.acquire(a)
    t.set_external(b, 5)
    t.set_external(c, 9)
    assert t.pick() == a  # the least loaded overall (1 + 0 against 5 and 9 / 2)...
    t.release(a)
    assert t.pick_under(1) == c  # ...is full at 1: c's (0 + 9 + 1) / 2 beats b's 0 + 5 + 1
    assert t.pick_under(1) == b
    assert t.pick_under(1) == -1  # every slot holds one request of this router's
    assert t.pick_under(2) == a
    with pytest.raises(ValueError, match="limit"):
        t.pick_under(0)


def test_random_and_round_robin_ignore_external_load(table_cls: Any) -> None:
    t = checked(table_cls(seed=24))
    a, b = t.add(), t.add()
    t.set_external(a, 1000)
    assert {t.pick_round_robin(), t.pick_round_robin()} == {a, b}
    seen = _spread(t.pick_random, t.release, 400)
    assert seen[a] > 100 and seen[b] > 100


# -- differential: C vs twin, and properties over any operation sequence -------------------

Op = tuple[str, int, float, bool]
WEIGHTS = st.sampled_from([0.5, 1.0, 2.0, 3.0])
# Picks and releases are repeated so that counts grow, ties form and break, and the
# control-plane operations land on a table that has slots in every state.
OPS = st.lists(st.tuples(
    st.sampled_from(["pick", "pick", "pick_random", "pick_round_robin", "pick_two",
                     "release", "release", "release", "acquire", "add", "remove",
                     "set_weight", "set_available", "weight", "outstanding", "is_available",
                     "set_external", "set_external", "external", "pick_under"]),
    st.integers(-1, 11),
    st.one_of(WEIGHTS, st.just(0.0)),
    st.booleans(),
), min_size=1, max_size=200)
SETUP = st.lists(WEIGHTS, min_size=1, max_size=10).map(
    lambda weights: [("add", 0, w, True) for w in weights])
PICKS = ("pick", "pick_random", "pick_round_robin", "pick_two")


def _apply(t: Any, ops: list[Op]) -> list[Any]:
    """Run ``ops``; every result, error and snapshot along the way, in order."""
    out: list[Any] = []
    for name, slot, weight, flag in ops:
        before = t.snapshot()
        external = {s: t.external(s) for s, *_ in before}
        try:
            if name == "add":
                result = t.add(weight)
            elif name == "set_weight":
                result = t.set_weight(slot, weight)
            elif name == "set_available":
                result = t.set_available(slot, flag)
            elif name == "pick_under":  # the slot field as the limit: -1 and 0 are refused
                result = t.pick_under(slot)
            elif name == "set_external":  # 0, 1.5 (rounds up), 3, 6, 9; -1.5 is refused
                result = t.set_external(slot, weight * 3 * (1 if flag else -1))
            elif name in PICKS:
                result = getattr(t, name)()
            else:
                result = getattr(t, name)(slot)
        except (ValueError, IndexError) as exc:
            result = (type(exc).__name__, str(exc))
        t.check()
        if name == "pick" and result != -1:
            _assert_least_loaded(before, external, result)
        out += [result, t.snapshot(), t.total_outstanding(), len(t), t.pickable(),
                [t.external(s) for s, *_ in t.snapshot()]]
    return out


def _assert_least_loaded(before: list[tuple[int, int, float, str]], external: dict[int, int],
                         chosen: int) -> None:
    keys = {s: Fraction(c + external[s] + 1) / Fraction(w)
            for s, c, w, state in before if state == "ACTIVE"}
    assert keys[chosen] == min(keys.values()), (chosen, before)


@needs_c
@settings(max_examples=1000, deadline=None)
@given(seed=st.integers(-(2**70), 2**70), setup=SETUP, ops=OPS)
def test_c_and_twin_agree(seed: int, setup: list[Op], ops: list[Op]) -> None:
    assert core.COutstandingTable is not None, "the compiled core did not load"
    ops = setup + ops
    assert _apply(core.COutstandingTable(seed), ops) == _apply(core.PyOutstandingTable(seed), ops)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), setup=SETUP, ops=OPS)
def test_invariants_hold_for_any_sequence(seed: int, setup: list[Op], ops: list[Op]) -> None:
    t = core.OutstandingTable(seed)
    _apply(t, setup + ops)
    assert sum(count for _, count, _, _ in t.snapshot()) == t.total_outstanding() >= 0


def test_check_detects_corruption() -> None:
    """check() is only worth running after every operation if it catches a broken table."""
    t = core.PyOutstandingTable(seed=19)
    a, _ = t.add(), t.add()
    t.acquire(a)
    t._count[a] = 0  # the order is no longer sorted, the total no longer matches
    with pytest.raises(AssertionError, match="total"):
        t.check()
