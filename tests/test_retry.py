"""The endpoint-wide retry budget: unit rules on a fake clock, then a real refusal."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from harness import make_config, start_router
from tritonclient.utils import InferenceServerException
from tritonmesh.config import HealthCheckConfig, RetryConfig
from tritonmesh.metrics import BalancerCollector
from tritonmesh.retry import RetryBudget
from tritonmesh.workers.launcher import free_ports


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_floor_allows_min_per_s_times_ttl_then_refuses_until_the_window_moves() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.0, min_per_s=1.0, ttl_s=10.0, clock=clock)
    assert [budget.withdraw(1, None) for _ in range(10)] == [None] * 10
    assert budget.withdraw(1, None) == "budget"
    clock.now += 5.0  # half the window later the ten retries still count
    assert budget.withdraw(1, None) == "budget"
    clock.now += 5.5
    assert budget.withdraw(1, None) is None
    assert budget.retried == 11 and budget.refused["budget"] == 2


def test_ratio_follows_recent_requests_only() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.5, min_per_s=0.0, ttl_s=10.0, clock=clock)
    assert budget.withdraw(1, None) == "budget"  # no traffic, no floor: nothing to spend
    for _ in range(10):
        budget.deposit()
    assert budget.available() == 5.0
    assert [budget.withdraw(1, 1.0) for _ in range(6)] == [None] * 5 + ["budget"]
    clock.now += 11.0  # those requests and retries left the window
    assert budget.available() == 0.0
    for _ in range(4):
        budget.deposit()
    assert budget.available() == 2.0


def test_per_request_limit_and_deadline_come_first() -> None:
    budget = RetryBudget(max_per_request=2, ratio=1.0, min_per_s=100.0)
    assert budget.withdraw(3, None) == "per_request"
    assert budget.withdraw(1, 0.0) == "deadline"
    assert budget.withdraw(2, 0.5) is None
    assert budget.refused == {"per_request": 1, "deadline": 1, "budget": 0}


def test_a_reload_keeps_the_totals_and_applies_the_limits() -> None:
    from tritonmesh.balancer import Balancer

    balancer = Balancer([])
    assert balancer.retry_budget.withdraw(1, None) is None
    assert balancer.retry_budget.withdraw(5, None) == "per_request"
    balancer.set_retries(RetryConfig(max_per_request=5))
    budget = balancer.retry_budget
    assert budget.max_per_request == 5 and budget.withdraw(5, None) is None
    assert budget.retried == 2 and budget.refused["per_request"] == 1


@pytest.mark.triton
@pytest.mark.parametrize(("retries", "failures"), [
    (RetryConfig(), 0),  # the default budget: the never-sent request goes elsewhere
    (RetryConfig(budget_ratio=0.0, min_per_s=0.0), 1),  # no budget: it fails, and says why
])
def test_a_dead_instance_costs_one_request_only_without_budget(
        loop_thread: Any, worker_addresses: list[str], retries: RetryConfig,
        failures: int) -> None:
    dead = f"127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    config, instances = make_config(worker_addresses[:1], strategy="ROUND_ROBIN")
    # No health check will find the dead instance first: only a request does.
    config = dataclasses.replace(config, retries=retries,
                                 health_check=HealthCheckConfig(interval_s=600.0))
    router = start_router(loop_thread, config, instances)
    # Joins at run time, healthy until proven otherwise, as after a SIGHUP or an admin add.
    loop_thread.run(router.router.update_instances({"AllTraffic": [worker_addresses[0], dead]}))
    errors = []
    try:
        with grpcclient.InferenceServerClient(router.address) as client:
            for _ in range(10):
                tensor = grpcclient.InferInput("INPUT0", [2], "FP32")
                tensor.set_data_from_numpy(np.ones(2, dtype=np.float32))
                try:
                    client.infer("identity", [tensor])
                except InferenceServerException as exc:
                    errors.append(exc)
        # Round robin sends the second request to the dead instance; the failed connection
        # ejects it at once, so exactly one request ever meets it.
        assert len(errors) == failures
        budget = router.balancer.retry_budget
        assert budget.retried == 1 - failures and budget.refused["budget"] == failures
        for error in errors:
            assert error.status() == "StatusCode.UNAVAILABLE"
            assert "not retried: the endpoint's retry budget is spent" in error.message()
        families = {m.name: m for m in BalancerCollector(router.balancer).collect()}
        refused = {s.labels["reason"]: s.value
                   for s in families["tritonmesh_retries_refused"].samples}
        assert refused["budget"] == failures
        router.wait_idle()
    finally:
        router.stop()
