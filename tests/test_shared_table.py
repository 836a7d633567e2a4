"""The shared-memory outstanding table: the compiled class and the twin, in one process and
across real OS processes (tests/shared_table_worker.py, started by PID and stopped by
themselves or by SIGKILL).

Every test's tables are closed and unlinked, and the last test checks that nothing of this
module is left in /dev/shm.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import tritonmesh._core as core
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonmesh._core import _segment

NO_EXTENSIONS_ENV = os.environ.get("TRITONMESH_NO_EXTENSIONS", "") not in ("", "0")
needs_c = pytest.mark.skipif(NO_EXTENSIONS_ENV, reason="TRITONMESH_NO_EXTENSIONS=1: twin only")
WORKER = str(Path(__file__).with_name("shared_table_worker.py"))
TAGS: list[str] = []  # every segment this module created, for the final /dev/shm check


@pytest.fixture(params=[pytest.param("c", marks=needs_c), "py"])
def impl(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _cls(impl: str) -> Any:
    return core.CSharedTable if impl == "c" else core.PySharedTable


@pytest.fixture
def make_table(impl: str) -> Iterator[Any]:
    """``make_table(capacity=8, max_processes=4)``: a fresh segment, closed and unlinked
    after the test."""
    made: list[Any] = []

    def make(capacity: int = 8, max_processes: int = 4, seed: int = 1) -> Any:
        tag = f"test-{uuid.uuid4().hex[:12]}"
        TAGS.append(tag)
        t = _cls(impl).create(capacity, max_processes, tag=tag, seed=seed)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()
        t.unlink()
        assert not os.path.exists(_segment.path(t.name))


def _worker(impl: str, mode: str, name: str, index: int, iterations: int, seed: int,
            limit: int = 0) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, WORKER, impl, mode, name, str(index), str(iterations), str(seed),
         str(limit)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _go(procs: list[subprocess.Popen[str]]) -> None:
    """Start the workers together, once every one is attached (each prints ``ready``)."""
    for p in procs:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready", f"worker {p.pid} did not attach"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.close()
        p.stdin = None  # communicate() must not touch it again


@contextlib.contextmanager
def _reaped(*procs: subprocess.Popen[str]) -> Iterator[None]:
    """Whatever happens in the block, kill (by PID) and reap every one still running."""
    try:
        yield
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


def _results(procs: list[subprocess.Popen[str]], timeout: float = 120) -> list[dict[str, Any]]:
    """Each worker's JSON line, once it exited 0; kills (by PID) any left on failure."""
    out = []
    try:
        for p in procs:
            stdout, _ = p.communicate(timeout=timeout)
            assert p.returncode == 0, f"worker {p.pid} exited {p.returncode}"
            out.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


def _quiet(t: Any) -> None:
    """Every count and every ledger is zero, and the invariants hold."""
    t.check()
    for slot, outstanding, *_ in t.snapshot():
        assert outstanding == 0, f"slot {slot} still counts {outstanding}"
        for p in range(t.max_processes):
            assert t.held(slot, p) == 0


def test_compiled_table_loaded() -> None:
    """A build that silently failed must fail here, not fall back to the twin."""
    if NO_EXTENSIONS_ENV:
        assert core.SharedTable is core.PySharedTable
    else:
        assert core.CSharedTable is not None
        assert core.SharedTable is core.CSharedTable


@needs_c
def test_layout_agrees_with_segment() -> None:
    from tritonmesh._core import _shared_c

    assert _shared_c.LAYOUT == (
        _segment.SLOT_SIZE, _segment.S_WEIGHT, _segment.S_STATUS, _segment.S_LIMIT,
        _segment.H_HIGH, _segment.H_GENERATION, _segment.H_WAKE_SEQ, _segment.H_WAITERS)


# -- one process ------------------------------------------------------------------------


def test_pick_is_least_outstanding_fleet_wide(make_table: Any, impl: str) -> None:
    t = make_table()
    other = _cls(impl).attach(t.name, 1)
    try:
        a, b, c = t.add(), t.add(), t.add()
        assert (a, b, c) == (0, 1, 2)
        t.acquire(a)
        t.acquire(a)
        other.acquire(b)
        # The other process's pick sees this one's requests: c is the only empty slot.
        assert other.pick() == c
        assert (t.outstanding(a), t.outstanding(b), t.outstanding(c)) == (2, 1, 1)
        assert (t.held(a), t.held(b, 1), t.held(c, 1)) == (2, 1, 1)
        assert t.held(b) == 0
        with pytest.raises(ValueError, match="holds no requests"):
            t.release(b)
        other.release(b)
        other.release(c)
        t.release(a)
        t.release(a)
        _quiet(t)
    finally:
        other.close()


def test_weights(make_table: Any) -> None:
    t = make_table()
    light, heavy = t.add(1.0), t.add(3.0)
    picks = Counter(t.pick() for _ in range(8))
    # (count + 1) / weight is levelled: 2 on the light slot, 6 on the heavy one.
    assert picks == {light: 2, heavy: 6}
    t.set_weight(light, 5.0)
    assert t.weight(light) == 5.0
    assert t.pick() == light
    for slot, n in (picks + Counter({light: 1})).items():
        for _ in range(n):
            t.release(slot)
    _quiet(t)
    with pytest.raises(ValueError, match="positive finite"):
        t.add(0)
    with pytest.raises(ValueError, match="positive finite"):
        t.set_weight(light, float("inf"))


def test_ties_are_uniform(make_table: Any) -> None:
    t = make_table()
    for _ in range(4):
        t.add()
    counts: Counter[int] = Counter()
    for _ in range(4000):
        slot = t.pick()
        counts[slot] += 1
        t.release(slot)
    assert set(counts) == {0, 1, 2, 3}
    assert all(850 <= n <= 1150 for n in counts.values()), counts


def test_pick_random_and_pick_two(make_table: Any) -> None:
    t = make_table()
    light, heavy = t.add(1.0), t.add(3.0)
    counts: Counter[int] = Counter()
    for _ in range(4000):
        slot = t.pick_random()
        counts[slot] += 1
        t.release(slot)
    assert 2700 <= counts[heavy] <= 3300, counts  # proportional to weight: 3 of 4
    t.acquire(light)
    # Two slots: pick_two compares both, and the loaded light one loses.
    assert all(t.pick_two() == heavy for _ in range(3))
    for _ in range(3):
        t.release(heavy)
    t.release(light)
    _quiet(t)
    empty = make_table()
    assert (empty.pick(), empty.pick_random(), empty.pick_two()) == (-1, -1, -1)


def test_unavailable_and_removed(make_table: Any) -> None:
    t = make_table()
    a, b = t.add(), t.add()
    t.set_available(a, False)
    assert not t.is_available(a)
    assert [t.pick() for _ in range(3)] == [b, b, b]
    t.acquire(a)  # a pinned sequence may still use a draining instance
    t.set_available(a, True)
    assert t.pick() == a
    gen = t.generation(a)
    t.remove(a)
    t.remove(a)  # idempotent
    assert [s for s, *_ in t.snapshot()] == [a, b]  # a is removed, not free: it counts 2
    with pytest.raises(ValueError, match="removed"):
        t.set_available(a, True)
    with pytest.raises(ValueError, match="removed"):
        t.acquire(a)
    assert t.pick() == b
    t.release(a)
    t.release(a)  # the last release frees it
    with pytest.raises(IndexError):
        t.outstanding(a)
    assert t.add() == a  # the lowest free id is reused, in a new generation
    assert t.generation(a) != gen
    with pytest.raises(ValueError, match="reused"):
        t.acquire(a, gen)
    t.acquire(a, t.generation(a))
    t.release(a)
    for _ in range(4):
        t.release(b)
    _quiet(t)


def test_limits(make_table: Any) -> None:
    t = make_table()
    a = t.add(limit=2)
    b = t.add()
    assert t.limit(a) == 2
    assert t.try_acquire(a) and t.try_acquire(a)
    assert not t.try_acquire(a)
    assert t.outstanding(a) == 2
    assert t.try_acquire(b, 1)
    assert not t.try_acquire(b, 1)
    assert t.pick() == b  # a is at its limit; b has none of its own
    t.set_limit(b, 2)
    assert t.pick() == -1  # every slot at its limit
    assert t.pick_two() == -1 and t.pick_random() == -1
    t.set_limit(a, 0)
    assert t.pick() == a
    for slot, n in ((a, 3), (b, 2)):
        for _ in range(n):
            t.release(slot)
    _quiet(t)
    with pytest.raises(ValueError, match="limit must be"):
        t.set_limit(a, -1)
    with pytest.raises(ValueError, match="limit must be"):
        t.try_acquire(a, 1 << 31)


def test_bad_arguments(make_table: Any, impl: str) -> None:
    t = make_table(capacity=2, max_processes=2)
    t.add()
    t.add()
    with pytest.raises(ValueError, match="full"):
        t.add()
    for bad in (-1, 2, 5):
        with pytest.raises(IndexError):
            t.outstanding(bad)
        with pytest.raises(IndexError):
            t.release(bad)
    with pytest.raises(ValueError, match="process_index"):
        _cls(impl).attach(t.name, 2)
    with pytest.raises(ValueError, match="is held by pid"):
        _cls(impl).attach(t.name, 0)
    with pytest.raises(ValueError, match="own index"):
        t.reclaim(0)
    other = _cls(impl).attach(t.name, 1)
    with pytest.raises(ValueError, match="still running"):
        t.reclaim(1)
    # The same pid with another start time: the pid was reused, the attached process is gone.
    _poke(t.name, _segment.HEADER + 64 + _segment.P_START, 12345)
    assert t.reclaim(1) == 0 and t.pid(1) == 0
    if impl == "py":
        other._unmap()  # the twin's fd
    with pytest.raises(ValueError, match="capacity"):
        _cls(impl).create(0, 1, tag="never")
    with pytest.raises(ValueError, match="max_processes"):
        _cls(impl).create(1, 128, tag="never")
    with pytest.raises(ValueError, match="tag"):
        _cls(impl).create(1, 1, tag="a/b")
    with pytest.raises(FileNotFoundError):
        _cls(impl).attach("tritonmesh-1-does-not-exist", 1)


def test_close_releases_and_frees_the_index(make_table: Any, impl: str) -> None:
    t = make_table()
    a = t.add()
    other = _cls(impl).attach(t.name, 1)
    other.acquire(a)
    other.pick()
    assert t.outstanding(a) == 2
    other.close()
    assert t.outstanding(a) == 0 and t.pid(1) == 0
    _quiet(t)
    with pytest.raises(ValueError, match="closed"):
        other.pick()
    again = _cls(impl).attach(t.name, 1)  # the index is free again
    again.close()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize(
    "died", ["after_global", "after_global_then_overwritten", "after_ledger", "before_global"])
@pytest.mark.parametrize("op", ["acquire", "release"])
def test_reclaim_is_exact_whichever_step_the_process_died_at(
        make_table: Any, impl: str, died: str, op: str) -> None:
    """Replays a process killed between the two steps of an update by rewinding its
    ledger cell: the stamp on the count word (or, once another update replaced it, the
    help that update gave) is what lets reclaim count it exactly."""
    t = make_table()
    a = t.add()
    other = _cls(impl).attach(t.name, 1)
    other.acquire(a)
    other.acquire(a)
    t.acquire(a)
    _, _, ledgers, _ = _segment.offsets(t.capacity, t.max_processes)
    cell = ledgers + _segment.ledger_row(t.capacity) + a * 8
    word = _segment.offsets(t.capacity, t.max_processes)[1] + a * _segment.SLOT_SIZE
    fd = _segment.open_file(t.name)
    try:
        with mmap.mmap(fd, 0) as mm:
            before = bytes(mm[cell:cell + 8]), bytes(mm[word:word + 8])
            getattr(other, op)(a)
            if died.startswith("after_global"):
                mm[cell:cell + 8] = before[0]
            elif died == "before_global":
                mm[cell:cell + 8], mm[word:word + 8] = before
            procs = _segment.HEADER + 64
            mm[procs:procs + 8] = _dead_pid().to_bytes(8, "little")
    finally:
        os.close(fd)
    if impl == "py":
        other._unmap()  # the twin's fd (nothing is released: the row names a dead pid now)
    if died == "after_global_then_overwritten":
        # Another process's updates replace the stamp: the first one must apply it first.
        t.acquire(a)
        t.release(a)
    reclaimed = t.reclaim(1)
    delta = 0 if died == "before_global" else 1 if op == "acquire" else -1
    assert reclaimed == 2 + delta
    assert t.outstanding(a) == 1 and t.held(a) == 1 and t.held(a, 1) == 0
    t.release(a)
    _quiet(t)


def _poke(name: str, offset: int, value: int) -> None:
    """Write a u64 into the segment, as a process that then died would have left it."""
    fd = _segment.open_file(name)
    try:
        with mmap.mmap(fd, 0) as mm:
            mm[offset:offset + 8] = value.to_bytes(8, "little")
    finally:
        os.close(fd)


def _peek(name: str, offset: int, size: int = 8) -> int:
    fd = _segment.open_file(name)
    try:
        with mmap.mmap(fd, 0) as mm:
            return int.from_bytes(mm[offset:offset + size], "little")
    finally:
        os.close(fd)


def test_reclaim_finishes_what_a_dead_process_left_half_done(make_table: Any, impl: str) -> None:
    """A process killed inside add() (slot CLAIMED), after its last release's count update
    but before freeing the removed slot, and while registered as a waiter: reclaim frees the
    slots and drops the waiter, although the process held no request."""
    t = make_table()
    a, b = t.add(), t.add()
    other = _cls(impl).attach(t.name, 1)
    other.acquire(b)
    t.remove(b)
    other.release(b)  # the last request: b is freed...
    slots = _segment.offsets(t.capacity, t.max_processes)[1]
    status = slots + b * _segment.SLOT_SIZE + _segment.S_STATUS
    gen = _peek(t.name, status) >> 32
    _poke(t.name, status, gen << 32 | _segment.REMOVED)  # ...or not, had it died first
    free = slots + 5 * _segment.SLOT_SIZE + _segment.S_STATUS
    _poke(t.name, free, 1 << 32 | _segment.CLAIMED | 2 << 8)  # died inside add()
    other.begin_wait()
    assert _peek(t.name, _segment.H_WAITERS, 4) == 1
    _poke(t.name, _segment.HEADER + 64, _dead_pid())
    if impl == "py":
        other._unmap()  # the twin's fd
    assert t.reclaim(1) == 0
    assert _peek(t.name, _segment.H_WAITERS, 4) == 0
    assert [s for s, *_ in t.snapshot()] == [a]
    t.check()
    assert t.add() == b and t.add() == 2


# -- differential: C vs twin over any single-process sequence -----------------------------

Op = tuple[str, int, float, int]
OPS = st.lists(st.tuples(
    st.sampled_from(["pick", "pick", "pick_random", "pick_two", "release", "release",
                     "release", "acquire", "try_acquire", "add", "remove", "set_weight",
                     "set_available", "set_limit", "outstanding", "weight", "is_available"]),
    st.integers(-1, 9),
    st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0]),
    st.integers(-1, 3),
), min_size=1, max_size=150)


def _apply(t: Any, ops: list[Op]) -> list[Any]:
    """Run ``ops``; every result, error and snapshot along the way, in order."""
    out: list[Any] = []
    for name, slot, weight, n in ops:
        before = t.snapshot()
        try:
            if name == "add":
                result = t.add(weight or 1.0, max(n, 0))
            elif name == "set_weight":
                result = t.set_weight(slot, weight)
            elif name == "set_available":
                result = t.set_available(slot, n > 0)
            elif name in ("set_limit", "try_acquire"):
                result = getattr(t, name)(slot, n)
            elif name.startswith("pick"):
                result = getattr(t, name)()
            else:
                result = getattr(t, name)(slot)
        except (ValueError, IndexError) as exc:
            result = (type(exc).__name__, str(exc))
        t.check()
        if name == "pick" and result != -1:
            keys = {s: Fraction(c + 1) / Fraction(w) for s, c, w, state, limit in before
                    if state == "ACTIVE" and (limit == 0 or c < limit)}
            assert keys[result] == min(keys.values()), (result, before)
        out += [result, t.snapshot()]
    return out


def _run(cls: Any, seed: int, ops: list[Op]) -> list[Any]:
    tag = f"test-{uuid.uuid4().hex[:12]}"
    TAGS.append(tag)
    t = cls.create(10, 2, tag=tag, seed=seed, unlink_stale=False)
    try:
        return _apply(t, [("add", 0, 1.0, 0), ("add", 0, 2.0, 0), *ops])
    finally:
        t.close()
        t.unlink()


@needs_c
@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), ops=OPS)
def test_c_and_twin_agree(seed: int, ops: list[Op]) -> None:
    """Same seed, same operations: the same picks, errors and snapshots, and every
    invariant after every operation (check(), and a least-outstanding pick is least)."""
    assert _run(core.CSharedTable, seed, ops) == _run(core.PySharedTable, seed, ops)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), ops=OPS)
def test_invariants_hold_for_any_sequence(seed: int, ops: list[Op]) -> None:
    _run(core.SharedTable, seed, ops)


# -- several processes ------------------------------------------------------------------


def test_stress_several_processes(make_table: Any, impl: str) -> None:
    """Three processes hammer every operation at once while this one checks, over and over,
    that every count is the sum of the ledgers; at the end every count and ledger is 0 (each
    worker released all it held) and the invariants hold."""
    t = make_table(capacity=16, max_processes=4)
    for _ in range(4):
        t.add()
    iterations = 50_000 if impl == "c" else 3_000
    procs = [_worker(impl, "hammer", t.name, i, iterations, seed=i) for i in (1, 2, 3)]
    verified = 0
    with _reaped(*procs):
        _go(procs)
        # Meanwhile: global count == sum of the ledgers (+ the pending update), under load.
        while any(p.poll() is None for p in procs):
            verified += t.check_live()
        assert [r["ops"] for r in _results(procs)] == [iterations] * 3
    assert verified > 0
    _quiet(t)
    assert all(t.pid(i) == 0 for i in (1, 2, 3))


def test_try_acquire_never_exceeds_the_limit(make_table: Any, impl: str) -> None:
    """Three processes contend for a slot of limit 1; each reads the fleet-wide count right
    after each success: no read ever sees 2. Refusals prove they did contend."""
    t = make_table()
    t.add()
    iterations = 100_000 if impl == "c" else 3_000
    procs = [_worker(impl, "limited", t.name, i, iterations, seed=i, limit=1)
             for i in (1, 2, 3)]
    _go(procs)
    results = _results(procs)
    assert max(r["highest"] for r in results) == 1, results
    assert sum(r["refused"] for r in results) > 0, results
    _quiet(t)


def test_sigkill_mid_loop_then_reclaim(make_table: Any, impl: str) -> None:
    """A process killed at an arbitrary instruction of its pick/release loop (six times, to
    land at different ones): the others never wedge and, after reclaim, every count is
    exact."""
    t = make_table(capacity=8, max_processes=4)
    for _ in range(3):
        t.add()
    warmup = 5_000 if impl == "c" else 500
    for round_ in range(6):
        victim = _worker(impl, "forever", t.name, 1, warmup, seed=100 + round_)
        others = [_worker(impl, "hammer", t.name, i, warmup * 4, seed=10 * round_ + i)
                  for i in (2, 3)]
        with _reaped(victim, *others):
            _go([victim, *others])
            assert victim.stdout is not None
            assert victim.stdout.readline().strip() == "running"
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
            assert victim.returncode == -signal.SIGKILL
            # Reclaimed while the other two are still at it, as a supervisor would. held()
            # applies the victim's last stamp first, so its ledger is final from here on.
            held = sum(t.held(s, 1) for s in range(t.capacity))
            assert t.reclaim(1) == held
            _results(others)
        _quiet(t)


def test_wake_up_across_processes_is_never_lost(make_table: Any, impl: str) -> None:
    """Two processes take turns on a slot of limit 1, waiting for each other's release:
    a lost wake-up would show as a wait that timed out (20 s)."""
    t = make_table()
    t.add(limit=1)
    iterations = 300 if impl == "c" else 100
    procs = [_worker(impl, "waiter", t.name, i, iterations, seed=i) for i in (1, 2)]
    _go(procs)
    assert [r["timeouts"] for r in _results(procs)] == [0, 0]
    _quiet(t)


def test_wait_returns_at_once_after_a_release(make_table: Any, impl: str) -> None:
    t = make_table()
    a = t.add(limit=1)
    other = _cls(impl).attach(t.name, 1)
    try:
        assert other.try_acquire(a)
        seq = t.begin_wait()
        assert not t.try_acquire(a)
        other.release(a)  # between the check and the wait: the sequence moved
        assert t.wait_for_release(seq, 30.0) != seq
        assert t.try_acquire(a)
        t.end_wait()
        seq = t.begin_wait()
        assert t.wait_for_release(seq, 0.01) == seq  # nothing released: times out
        t.end_wait()
        t.release(a)
    finally:
        other.close()
    _quiet(t)


def test_stale_segment_is_unlinked(impl: str) -> None:
    """A table whose owner was SIGKILLed is left in /dev/shm; the next create finds and
    unlinks it, and leaves a live owner's table alone."""
    tag = f"test-stale-{uuid.uuid4().hex[:8]}"
    TAGS.append(tag)
    code = ("import sys, tritonmesh._core as core\n"
            f"cls = core.CSharedTable if {impl!r} == 'c' else core.PySharedTable\n"
            f"t = cls.create(4, 2, tag={tag!r})\n"
            "print(t.name, flush=True)\n"
            "sys.stdin.read()\n")
    owner = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    with _reaped(owner):
        name = owner.stdout.readline().strip()
        assert os.path.exists(_segment.path(name))
        assert name not in _segment.unlink_stale()  # its owner is running
        assert os.path.exists(_segment.path(name))
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
    try:
        assert os.path.exists(_segment.path(name))
        fresh = _cls(impl).create(4, 2, tag=tag)
        fresh.close()
        fresh.unlink()
        assert not os.path.exists(_segment.path(name))
    finally:
        _segment.unlink(name)


def test_nothing_left_in_dev_shm() -> None:
    left = [n for n in os.listdir(_segment.SHM_DIR) if any(n.endswith(f"-{t}") for t in TAGS)]
    assert left == []
