"""The outstanding-work table (LEAST_OUTSTANDING_WORK): every behavioural test runs against
the C class and the twin, each operation followed by the full invariant check."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
import tritonmesh._core as core
from hypothesis import given, settings
from hypothesis import strategies as st
from test_core import CHI2_P001, NO_EXTENSIONS_ENV, _chi_square, checked, needs_c


@pytest.fixture(params=[pytest.param("c", marks=needs_c), "py"])
def table_cls(request: pytest.FixtureRequest) -> Any:
    """The compiled class, then the pure-Python twin."""
    if request.param == "py":
        return core.PyWorkTable
    if core.CWorkTable is None:
        pytest.fail("the compiled core did not load and TRITONMESH_NO_EXTENSIONS is not set")
    return core.CWorkTable


def test_compiled_work_table_loaded() -> None:
    if NO_EXTENSIONS_ENV:
        assert core.WorkTable is core.PyWorkTable
        return
    assert core.CWorkTable is not None, "tritonmesh._core._work_c did not import"
    assert core.WorkTable is core.CWorkTable
    module = __import__(core.CWorkTable.__module__, fromlist=["_"])
    assert module.__file__ is not None and module.__file__.endswith(".so")


@needs_c
def test_same_api_as_twin_and_stub() -> None:
    import ast
    from pathlib import Path

    assert core.CWorkTable is not None
    tree = ast.parse(Path(core.__file__).with_name("_work_c.pyi").read_text())
    stub_cls = next(n for n in tree.body if isinstance(n, ast.ClassDef))
    stubbed = {f.name for f in stub_cls.body if isinstance(f, ast.FunctionDef)}

    def public(cls: type) -> set[str]:
        return {n for n in vars(cls) if not n.startswith("_")} | {"__init__", "__len__"}

    assert public(core.CWorkTable) == public(core.PyWorkTable) == stubbed


# -- behaviour ---------------------------------------------------------------------------


def test_pick_goes_to_least_work_not_fewest_requests(table_cls: Any) -> None:
    t = checked(table_cls(seed=1))
    a, b = t.add(), t.add()
    t.acquire(a, 400.0)  # one long generation
    t.acquire(b, 10.0)
    t.acquire(b, 10.0)  # two short ones
    assert t.pick(20.0) == b  # fewer requests on a, but far less work on b
    assert t.work(b) == 40.0 and t.outstanding(b) == 3


def test_release_returns_work_and_resets_at_idle(table_cls: Any) -> None:
    t = checked(table_cls(seed=2))
    a = t.add()
    for cost in (0.1, 0.2, 0.3):
        t.acquire(a, cost)
    t.release(a, 0.1)
    t.release(a, 0.3)
    assert t.work(a) == pytest.approx(0.2)
    t.release(a, 0.2)
    assert t.work(a) == 0.0 and t.outstanding(a) == 0 and t.total_outstanding() == 0
    with pytest.raises(ValueError, match="no outstanding requests"):
        t.release(a, 1.0)


def test_estimates_steer_work(table_cls: Any) -> None:
    """cost = estimate x (work + cost): a slot twice as slow gets a new request only when
    the fast one holds more than twice its work."""
    t = checked(table_cls(seed=3))
    fast, slow = t.add(), t.add()
    t.observe(fast, 0.01, 0.0)
    t.observe(slow, 0.02, 0.0)
    assert t.pick(1.0) == fast  # 1 x 0.01 < 1 x 0.02
    t.acquire(fast, 1.0)  # fast: work 2
    assert t.pick(1.0) == slow  # (2 + 1) x 0.01 = 0.03 > (0 + 1) x 0.02


def test_peak_ewma(table_cls: Any) -> None:
    t = checked(table_cls(seed=4, decay_s=10.0))
    a = t.add()
    assert t.estimate(a) == 0.0
    t.observe(a, 0.5, 100.0)
    assert t.estimate(a) == 0.5  # the first sample is taken as is
    t.observe(a, 2.0, 101.0)
    assert t.estimate(a) == 2.0  # a peak replaces it at once
    t.observe(a, 1.0, 101.0)
    assert t.estimate(a) == 2.0  # no time has passed: a lower sample weighs nothing
    t.observe(a, 1.0, 111.0)  # decay_s later: weight 1 - e^-1 on the new sample
    assert t.estimate(a) == pytest.approx(2.0 * math.exp(-1) + 1.0 * (1 - math.exp(-1)))
    with pytest.raises(ValueError, match="positive finite"):
        t.observe(a, 0.0, 112.0)
    with pytest.raises(ValueError, match="positive finite"):
        t.observe(a, math.inf, 112.0)


def test_new_slot_is_scored_with_the_mean_estimate(table_cls: Any) -> None:
    t = checked(table_cls(seed=5))
    a, b = t.add(), t.add()
    t.observe(a, 1.0, 0.0)
    t.observe(b, 3.0, 0.0)
    c = t.add()  # no sample: scored as 2.0, so it beats b (3.0) but not a (1.0)
    assert t.pick(1.0) == a
    t.acquire(a, 1.0)  # a: work 2 -> 3 x 1.0 = 3 > c's 2
    assert t.pick(1.0) == c


def test_mean_estimate_over_pickable_slots_with_a_sample(table_cls: Any) -> None:
    t = checked(table_cls(seed=11))
    a, b, _ = t.add(), t.add(), t.add()
    assert t.mean_estimate() == 0.0
    t.observe(a, 1.0, 0.0)
    t.observe(b, 3.0, 0.0)
    assert t.mean_estimate() == 2.0  # c has no sample yet
    t.set_available(b, False)
    assert t.mean_estimate() == 1.0


def test_weights_divide_the_score(table_cls: Any) -> None:
    t = checked(table_cls(seed=6))
    small, big = t.add(1.0), t.add(4.0)
    t.acquire(big, 2.5)
    assert t.pick(1.0) == big  # (2.5 + 1) / 4 < (0 + 1) / 1: four times the capacity
    assert t.pick(1.0) == small  # (3.5 + 1) / 4 > 1


def test_limit_skips_full_slots(table_cls: Any) -> None:
    t = checked(table_cls(seed=7))
    a, b = t.add(), t.add()
    t.acquire(a, 1.0)
    t.acquire(b, 100.0)
    assert t.pick(1.0, 1) == -1  # both at the limit of one in flight
    assert t.pick(1.0, 2) == a
    assert t.pick(1.0, 2) == b  # a is full now, however little work b's rival holds


def test_unavailable_and_removed(table_cls: Any) -> None:
    t = checked(table_cls(seed=8))
    a, b = t.add(), t.add()
    t.acquire(a, 5.0)
    t.set_available(b, False)
    assert t.pick(1.0) == a  # b holds no work, but it is draining
    t.remove(a)
    assert t.pick(1.0) == -1 and len(t) == 2
    with pytest.raises(ValueError, match="was removed"):
        t.set_available(a, True)
    t.release(a, 5.0)
    t.release(a, 1.0)
    assert len(t) == 1 and t.add() == a  # the id is free only after the last release


def test_bad_arguments(table_cls: Any) -> None:
    t = table_cls(seed=9)
    with pytest.raises(ValueError, match="decay_s"):
        table_cls(decay_s=0.0)
    with pytest.raises(ValueError, match="weight"):
        t.add(-1.0)
    a = t.add()
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="cost"):
            t.pick(bad)
        with pytest.raises(ValueError, match="cost"):
            t.acquire(a, bad)
    with pytest.raises(IndexError, match="not in the table"):
        t.release(7, 1.0)
    assert t.total_outstanding() == 0


def test_external_load_counts_as_work_of_the_mean_cost(table_cls: Any) -> None:
    t = checked(table_cls(seed=11))
    a, b = t.add(), t.add()
    t.set_external(a, 2.0)  # nothing of ours there yet: a mean cost of 1
    assert (t.external(a), t.external_work(a)) == (2.0, 2.0)
    assert t.pick(1.0) == b and t.pick(1.0) == b  # b: 0 + 1, then 1 + 1, against 2 + 1
    t.acquire(a, 4.0)
    t.acquire(a, 6.0)
    t.set_external(a, 1.5)  # our requests there cost 5 on average
    assert (t.outstanding(a), t.work(a), t.external_work(a)) == (2, 10.0, 7.5)
    t.release(a, 4.0)
    t.release(a, 6.0)
    t.set_external(a, 1.0)  # idle: the last mean seen
    assert t.external_work(a) == 5.0
    t.set_external(a, 0.0)
    assert t.pick(1.0) == a  # 0 + 0 + 1 against b's 2 + 1


def test_limit_reads_the_local_count_not_external_load(table_cls: Any) -> None:
    t = checked(table_cls(seed=12))
    a, b = t.add(), t.add()
    t.set_external(a, 30.0)
    t.acquire(b, 1.0)
    assert t.pick(1.0, 1) == a  # heavily loaded elsewhere, but this router sent it nothing
    assert t.pick(1.0, 1) == -1


def test_external_load_arguments(table_cls: Any) -> None:
    t = table_cls(seed=13)
    a = t.add()
    for bad in (-1.0, math.inf, math.nan, float(core.MAX_EXTERNAL) + 1.0):
        with pytest.raises(ValueError, match="external load"):
            t.set_external(a, bad)
    with pytest.raises(IndexError, match="not in the table"):
        t.set_external(3, 1.0)
    t.set_external(a, 2.0)
    t.remove(a)
    assert t.add() == a and t.external(a) == 0.0 and t.external_work(a) == 0.0


def test_ties_spread_uniformly(table_cls: Any) -> None:
    """Idle slots with equal estimates tie: the pick must be uniform over them, not
    "always the lowest index" (which sends all low-load traffic to one instance)."""
    t = checked(table_cls(seed=10))
    slots = [t.add() for _ in range(8)]
    seen: Counter[int] = Counter()
    for _ in range(8000):
        slot = t.pick(3.0)
        seen[slot] += 1
        t.release(slot, 3.0)
    counts = [seen[s] for s in slots]
    assert _chi_square(counts, [1000.0] * 8) < CHI2_P001[7], counts


# -- the service-time line (dispatch ahead) -------------------------------------------------


def test_service_line_fits_fixed_plus_per_unit_cost(table_cls: Any) -> None:
    t = checked(table_cls(seed=1))
    slot = t.add()
    for k, cost in enumerate((3, 40, 7, 120, 15, 60, 1, 200, 33, 90)):
        assert t.service_time(slot, 10.0) == (-1.0 if k < core.SERVICE_MIN_SAMPLES else
                                              pytest.approx(0.024))
        t.observe_service(slot, cost, 0.004 + 0.002 * cost)
    for cost in (0.0, 1.0, 50.0, 400.0):
        assert t.service_time(slot, cost) == pytest.approx(0.004 + 0.002 * cost, rel=1e-6)


def test_service_line_fallbacks(table_cls: Any) -> None:
    t = checked(table_cls(seed=1))
    flat, falling, fresh = t.add(), t.add(), t.add()
    for k in range(2 * core.SERVICE_MIN_SAMPLES):
        t.observe_service(flat, 2.0, 0.2 if k % 2 else 0.1)  # one cost: no slope to fit
        t.observe_service(falling, (1.0, 10.0, 20.0)[k % 3], (0.3, 0.2, 0.1)[k % 3])
    # Exponentially weighted: the later samples count a little more.
    assert t.service_time(flat, 2.0) == pytest.approx(0.15, rel=0.02)
    assert t.service_time(flat, 4.0) == pytest.approx(0.3, rel=0.02)  # scaled by cost
    assert t.service_time(falling, 100.0) == pytest.approx(0.2, rel=0.05)  # the mean
    assert t.service_time(fresh, 1.0) == -1.0


def test_service_line_forgets_and_resets(table_cls: Any) -> None:
    t = checked(table_cls(seed=1, service_alpha=0.1))
    slot = t.add()
    for cost in range(1, 101):
        t.observe_service(slot, cost, 0.001 * cost)  # the instance was fast
    for cost in range(1, 101):
        t.observe_service(slot, cost, 0.003 * cost)  # and turned three times slower
    assert t.service_time(slot, 100.0) == pytest.approx(0.3, rel=0.01)
    t.remove(slot)
    assert t.add() == slot  # the id is reused: nothing of the old line stays
    assert t.service_time(slot, 100.0) == -1.0


def test_service_line_ignores_absurd_costs_and_checks_arguments(table_cls: Any) -> None:
    t = checked(table_cls(seed=1))
    slot = t.add()
    for cost in range(1, 11):
        t.observe_service(slot, cost, 0.01 * cost)
    t.observe_service(slot, 1e200, 5.0)  # cost² overflows: ignored, not poisoning the sums
    assert t.service_time(slot, 20.0) == pytest.approx(0.2)
    for bad in ((-1.0, 0.1), (float("inf"), 0.1), (1.0, -0.1), (1.0, float("nan"))):
        with pytest.raises(ValueError):
            t.observe_service(slot, *bad)
    with pytest.raises(ValueError, match="cost"):
        t.service_time(slot, float("nan"))
    with pytest.raises(IndexError):
        t.service_time(7, 1.0)
    for alpha in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="service_alpha"):
            table_cls(service_alpha=alpha)


# -- hint quality: how well costs predict service time ------------------------------------


def _serve(t: Any, slots: list[int], requests: int, seed: int,
           hint: Any) -> None:
    """Requests of lognormal length (median 40, sigma 1) on ``slots`` in turn, each taking
    2 ms + 2 ms per token; ``hint(rng, length)`` is the cost the client stated."""
    import random

    rng = random.Random(seed)
    for k in range(requests):
        length = max(1, round(rng.lognormvariate(math.log(40), 1.0)))
        t.observe_service(slots[k % len(slots)], hint(rng, length), 0.002 + 0.002 * length)


def test_exact_hints_have_no_residual_and_full_quality(table_cls: Any) -> None:
    t = checked(table_cls(seed=1))
    slots = [t.add(), t.add()]
    assert t.residual_sd() == -1.0 and t.hint_quality() == 1.0  # trusted until shown
    _serve(t, slots, 400, seed=2, hint=lambda rng, length: length + 1.0)
    assert 0.0 <= t.residual_sd() < 0.01
    assert t.hint_quality() > 0.99


@pytest.mark.parametrize("sigma", [0.3, 0.7])
def test_noisy_service_times_show_as_their_sigma(table_cls: Any, sigma: float) -> None:
    """Each request takes its line's time times lognormal(0, sigma): the residual spread is
    sigma, and the costs still explain most of the spread of service time."""
    import random

    t = checked(table_cls(seed=1))
    slots = [t.add(), t.add()]
    noise = random.Random(5)
    for k in range(600):
        cost = max(1.0, round(noise.lognormvariate(math.log(40), 1.0)))
        seconds = (0.002 + 0.002 * cost) * noise.lognormvariate(0.0, sigma)
        t.observe_service(slots[k % 2], cost, seconds)
    assert t.residual_sd() == pytest.approx(sigma, rel=0.25)
    assert 0.2 < t.hint_quality() < 0.95


def test_noisy_and_absent_hints_lower_the_quality(table_cls: Any) -> None:
    """A hint off by lognormal(0, 0.7) explains part of the spread of service time; a
    constant one (no hint: every request costs 1) explains none of it."""
    noisy = checked(table_cls(seed=1))
    _serve(noisy, [noisy.add(), noisy.add()], 600, seed=3,
           hint=lambda rng, length: 1.0 + round(length * rng.lognormvariate(0.0, 0.7)))
    absent = checked(table_cls(seed=1))
    _serve(absent, [absent.add(), absent.add()], 600, seed=3, hint=lambda rng, length: 1.0)
    assert 0.5 < noisy.residual_sd() < 1.0 and 0.1 < noisy.hint_quality() < 0.8
    assert absent.residual_sd() > 0.7 and absent.hint_quality() < 0.05


def test_pick_falls_back_to_outstanding_when_hints_say_nothing(table_cls: Any) -> None:
    """Slot a runs one request stated to cost 100, slot b three of cost 1. Trusting the
    hint, a new request goes to b (less work); with a hint shown to carry no information,
    to a (fewer requests, as peak-EWMA x outstanding would choose)."""
    for hint, expected in (("exact", "b"), ("absent", "a")):
        t = checked(table_cls(seed=1))
        a, b = t.add(), t.add()
        if hint == "exact":
            _serve(t, [a, b], 200, seed=4, hint=lambda rng, length: length + 1.0)
        else:  # stated costs unrelated to the lengths
            _serve(t, [a, b], 200, seed=4,
                   hint=lambda rng, length: float(rng.randint(1, 100)))
        for slot in (a, b):
            t.observe(slot, 0.002, 1.0)
        t.acquire(a, 100.0)
        for _ in range(3):
            t.acquire(b, 1.0)
        assert t.pick(1.0) == {"a": a, "b": b}[expected], (hint, t.hint_quality())


# -- differential: C vs twin over any operation sequence ---------------------------------

COSTS = st.sampled_from([0.0, 0.5, 1.0, 3.0, 40.0, 1e6])
OPS = st.lists(st.tuples(
    st.sampled_from(["pick", "pick", "pick", "release", "release", "release", "acquire",
                     "observe", "observe", "add", "remove", "set_weight", "set_available",
                     "observe_service", "observe_service", "service_time",
                     "set_external", "set_external"]),
    st.integers(-1, 9),
    COSTS,
    st.sampled_from([1e-4, 0.01, 0.2, 5.0]),
    st.integers(0, 3),
), min_size=1, max_size=200)
SETUP = st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=1, max_size=8)


Op = tuple[str, int, float, float, int]


def _apply(t: Any, weights: list[float], ops: list[Op]) -> list[Any]:
    out: list[Any] = [t.add(w) for w in weights]
    now = 0.0
    for name, slot, cost, sample, limit in ops:
        now += sample  # the clock moves by varied steps, so decay weights vary
        try:
            if name == "pick":
                result = t.pick(cost, limit)
            elif name in ("release", "acquire"):
                result = getattr(t, name)(slot, cost)
            elif name == "observe":
                result = t.observe(slot, sample, now)
            elif name == "observe_service":
                result = t.observe_service(slot, cost, sample * (1 + limit))
            elif name == "service_time":
                result = t.service_time(slot, cost)
            elif name == "add":
                result = t.add(cost or 1.0)
            elif name == "set_weight":
                result = t.set_weight(slot, sample)
            elif name == "set_available":
                result = t.set_available(slot, bool(limit & 1))
            elif name == "set_external":
                result = t.set_external(slot, cost * (limit - 1))
            else:
                result = t.remove(slot)
        except (ValueError, IndexError) as exc:
            result = (type(exc).__name__, str(exc))
        t.check()
        estimates = [t.estimate(s) for s, *_ in t.snapshot()]
        work = [(t.work(s), t.external(s), t.external_work(s)) for s, *_ in t.snapshot()]
        out += [result, t.snapshot(), estimates, work, t.total_outstanding(), t.pickable(),
                t.mean_estimate(), t.residual_sd(), t.hint_quality()]
    return out


@needs_c
@settings(max_examples=600, deadline=None)
@given(seed=st.integers(-(2**70), 2**70), weights=SETUP, ops=OPS)
def test_c_and_twin_agree(seed: int, weights: list[float], ops: list[Op]) -> None:
    assert core.CWorkTable is not None, "the compiled core did not load"
    assert _apply(core.CWorkTable(seed), weights, ops) == \
        _apply(core.PyWorkTable(seed), weights, ops)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), weights=SETUP, ops=OPS)
def test_invariants_hold_for_any_sequence(seed: int, weights: list[float], ops: list[Op]) -> None:
    t = core.WorkTable(seed)
    _apply(t, weights, ops)
    assert sum(count for _, count, _, _ in t.snapshot()) == t.total_outstanding() >= 0


def test_balancer_cost_from_hints() -> None:
    """What the router charges a request: the hint plus base, fallbacks for requests that
    carry no usable value, and hints replaced at run time (SIGHUP reload)."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.grpc import service_pb2 as pb
    from tritonmesh.balancer import Balancer
    from tritonmesh.config import WorkHint

    def request(model: str, **inputs: np.ndarray) -> bytes:
        req = pb.ModelInferRequest(model_name=model)
        for name, values in inputs.items():
            tensor = grpcclient.InferInput(name, list(values.shape), "FP32" if
                                           values.dtype == np.float32 else "INT32")
            tensor.set_data_from_numpy(values)
            req.inputs.append(tensor._get_tensor())
            req.raw_input_contents.append(tensor._get_content())
        return req.SerializeToString()

    balancer = Balancer([], work_hints={"g": WorkHint(input="MAX_TOKENS", base=2.0)})
    assert balancer.cost("g", request("g", MAX_TOKENS=np.array([40], np.int32))) == 42.0
    assert balancer.cost("g", request("g", OTHER=np.array([40], np.int32))) == 2.0
    assert balancer.cost("g", request("g", MAX_TOKENS=np.array([-50], np.int32))) == 0.0
    assert balancer.cost("g", request("g", MAX_TOKENS=np.array([np.nan], np.float32))) == 2.0
    assert balancer.cost("g", b"\xff\xff") == 2.0  # malformed: Triton will answer for it
    assert balancer.cost("other", b"") == 1.0  # no hint: one request, one unit
    balancer.set_work_hints({"g": WorkHint(input="MAX_TOKENS")})
    assert balancer.cost("g", request("g", OTHER=np.array([40], np.int32))) == 1.0
    assert balancer.cost("g", request("g", MAX_TOKENS=np.array([7, 8], np.int32))) == 15.0
