"""bench/queue_sim.py, the queueing model the docs quote for what orders and placements can
reach: its invariants, so that a figure it prints is one the model can stand behind."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path
from types import ModuleType

import pytest


@pytest.fixture(scope="module")
def sim() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "bench" / "queue_sim.py"
    spec = importlib.util.spec_from_file_location("queue_sim", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["queue_sim"] = module
    spec.loader.exec_module(module)
    return module


def _mean(done: list[tuple[float, float]]) -> float:
    return statistics.fmean(r for _, r in done)


def test_every_order_of_one_queue_has_the_same_mean(sim: ModuleType) -> None:
    """Little's law on a closed loop with the instances never idle: an order changes who
    waits, not how long on average. An order whose mean dropped would be starving requests
    (the simulation only counts those that finish)."""
    means = {w: _mean(sim.trace(w, 20, 5, 20_000, 0.75)) for w in (-1.0, 0.0, 1.0, 3.0)}
    assert max(means.values()) == pytest.approx(min(means.values()), rel=0.01), means


def test_random_placement_idles_instances_and_least_outstanding_does_not(
        sim: ModuleType) -> None:
    """RANDOM leaves instances idle while others queue, so its closed-loop mean is higher;
    least-outstanding placement never idles an instance while another has two, so its mean
    equals the central queue's."""
    central = _mean(sim.trace(0.0, 20, 5, 20_000, 0.75))
    least = _mean(sim.trace(0.0, 20, 5, 20_000, 0.75, placement="least"))
    rand = _mean(sim.trace(0.0, 20, 5, 20_000, 0.75, placement="random"))
    assert least == pytest.approx(central, rel=0.02)
    assert rand > 1.1 * central


def test_one_instance_leaves_nothing_to_place(sim: ModuleType) -> None:
    """At 4 users / 1 instance every placement is the same FIFO queue: the same responses."""
    fifo = sim.trace(0.0, 4, 1, 5_000, 0.75)
    assert sim.trace(0.0, 4, 1, 5_000, 0.75, placement="random") == fifo
    assert sim.trace(0.0, 4, 1, 5_000, 0.75, placement="least") == fifo


def test_sweep_finds_least_slack_best_with_several_instances(sim: ModuleType) -> None:
    result = sim.sweep(20, 5, 30_000, 0.75)
    assert 0.5 <= result["best_weight"] <= 1.5
    assert result["best_p99_vs_fifo"] < 0.9


def test_the_hand_over_model_without_round_trip_is_the_central_queue(sim: ModuleType) -> None:
    """trace_ahead with no round trip and no dispatch ahead serves exactly as trace does."""
    for weight in (0.0, 1.0):
        assert sim.trace_ahead(weight, 20, 5, 5_000, 1.0) == sim.trace(weight, 20, 5, 5_000, 1.0)


def test_dispatch_ahead_recovers_the_round_trip_with_exact_hints(sim: ModuleType) -> None:
    late = sim.trace_ahead(0.0, 20, 5, 20_000, 1.0, rtt=0.002)
    ahead = sim.trace_ahead(0.0, 20, 5, 20_000, 1.0, rtt=0.002, ahead=0.01)
    assert sim._throughput(ahead) > sim._throughput(late)


def test_ungated_dispatch_ahead_on_no_hint_strands_requests_and_the_gate_stops_it(
        sim: ModuleType) -> None:
    """With no information every prediction is the median: sending ahead commits requests
    behind long ones, and the P99 pays. The gate (residual spread learned online) never
    sends ahead then, so it serves exactly as late binding."""
    none = float("inf")
    late = sim.trace_ahead(0.0, 20, 5, 20_000, 1.0, noise=none, rtt=0.001)
    ahead = sim.trace_ahead(0.0, 20, 5, 20_000, 1.0, noise=none, rtt=0.001, ahead=0.01)
    gated = sim.trace_ahead(0.0, 20, 5, 20_000, 1.0, noise=none, rtt=0.001, ahead=0.01,
                            gate=0.2)
    assert sim._p99(ahead) > 1.05 * sim._p99(late)
    assert gated == late


def test_learned_residual_spread_tells_hint_qualities_apart(sim: ModuleType) -> None:
    spreads = {}
    for noise in (0.0, 0.7, float("inf")):
        requests = sim._Requests(1.0, 1, noise, "none")
        for _ in range(5_000):
            s, x = requests.draw()
            requests.learn(s, x)
        spreads[noise] = requests.residual_sd()
    assert spreads[0.0] < 0.05  # rounding to whole tokens only
    assert spreads[0.7] == pytest.approx((1 / (1 + 1 / 0.49)) ** 0.5, rel=0.1)
    assert spreads[float("inf")] == pytest.approx(1.0, rel=0.1)
