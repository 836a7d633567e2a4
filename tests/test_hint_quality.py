"""Hint quality in use: what the router does with how well request costs predict service
time (``WorkTable.residual_sd`` and ``hint_quality``, tested in test_work.py).

Dispatch ahead sends early only while the costs are shown to predict the running request's
end; LEAST_SLACK orders by cost only as far as the costs explain service time (FIFO when
they explain nothing); the quality is a metric and a line of ``tritonmesh status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from harness import generate_inputs
from tritonmesh._core import SERVICE_MIN_SAMPLES, WorkTable
from tritonmesh.balancer import Instance, Variant
from tritonmesh.config import QueueOrder, RoutingStrategy, VariantConfig, WorkHint
from tritonmesh.dispatch_ahead import AHEAD_MAX_RESIDUAL_SD
from tritonmesh.metrics import BalancerCollector
from tritonmesh.workers.upstream import Upstream

# Seconds a request of each cost took: as its cost says, or off by a factor of two either
# way (a log residual of +-0.69, far past the dispatch-ahead gate).
EXACT: Callable[[int, float], float] = lambda k, cost: 0.1 * cost  # noqa: E731
NOISY: Callable[[int, float], float] = lambda k, cost: 0.1 * cost * (2.0 if k % 2 else 0.5)  # noqa: E731


@contextlib.asynccontextmanager
async def _one_instance(queue_order: QueueOrder, ahead_s: float, taught: Callable[
        [int, float], float]) -> AsyncIterator[tuple[Variant, Instance]]:
    """A LEAST_OUTSTANDING_WORK variant, limit 1, one instance at an address nothing
    listens on (nothing is sent), its line and hint quality taught by ``taught``."""
    config = VariantConfig("AllTraffic", routing_strategy=RoutingStrategy.LEAST_OUTSTANDING_WORK,
                           instances=("127.0.0.1:1",), max_concurrency=1,
                           queue_order=queue_order, dispatch_ahead_s=ahead_s)
    variant = Variant(config, seed=1)
    variant.table = variant.work = WorkTable(1)
    upstream = Upstream("127.0.0.1:1")
    try:
        instance = variant.add(upstream)
        for k in range(4 * SERVICE_MIN_SAMPLES):
            cost = float(1 + k % 7)
            variant.work.observe_service(instance.slot, cost, taught(k, cost))
        variant.work.observe(instance.slot, 0.1, 1.0)
        yield variant, instance
    finally:
        await variant.close()
        await upstream.close()


@pytest.mark.parametrize("taught", [EXACT, NOISY], ids=["exact", "noisy"])
def test_dispatch_ahead_only_when_costs_predict_the_end(taught: Any) -> None:
    """With costs that predict service time the instance's timer is set to hand over the
    next request before the running one ends; with costs off by 2x it is not, and the
    next request waits for the end, as plain late binding does."""
    async def scenario() -> None:
        async with _one_instance(QueueOrder.FIFO, 0.15, taught) as (variant, instance):
            assert variant.work is not None
            residual = variant.work.residual_sd()
            assert variant.pick(2.0) is instance
            assert variant.ahead is not None
            plan = variant.ahead.plan(instance)
            if taught is EXACT:
                assert residual < 0.01
                assert plan is not None and plan.free_at > 0.0 and plan.timer is not None
            else:
                assert residual > AHEAD_MAX_RESIDUAL_SD
                assert plan is not None and plan.free_at == 0.0 and plan.timer is None
            variant.give_back(instance, 2.0)
            assert instance.outstanding == 0 and variant.ahead.plan(instance) is None

    asyncio.run(scenario())


# Costs that say nothing of service time: each request took a time of its own, whatever
# its cost (the costs explain none of the spread: quality 0).
UNRELATED: Callable[[int, float], float] = lambda k, cost: 0.05 * (1 + (k * 5) % 11)  # noqa: E731


@pytest.mark.parametrize("taught", [EXACT, UNRELATED], ids=["exact", "unrelated"])
def test_least_slack_blends_toward_fifo(taught: Any) -> None:
    """Two requests wait: a short one, then a long one. With costs that predict service
    time, the long one goes first (less slack: it must start sooner); with costs that
    explain nothing, the order is the arrival order."""
    async def scenario() -> None:
        async with _one_instance(QueueOrder.LEAST_SLACK, 0.0, taught) as (variant, instance):
            assert variant.work is not None
            quality = variant.work.hint_quality()
            assert quality > 0.99 if taught is EXACT else quality == 0.0
            assert variant.pick(1.0) is instance  # busy: the next ones wait
            loop = asyncio.get_running_loop()
            short = loop.create_task(variant.wait(10.0, 1.0))
            await asyncio.sleep(0)  # queued first
            long = loop.create_task(variant.wait(10.0, 100.0))
            await asyncio.sleep(0)
            variant.give_back(instance, 1.0)  # the instance frees: one waiter gets it
            done, _ = await asyncio.wait({short, long}, return_when=asyncio.FIRST_COMPLETED)
            first, second, cost = (long, short, 100.0) if taught is EXACT else \
                (short, long, 1.0)
            assert done == {first}
            variant.give_back(await first, cost)
            variant.give_back(await asyncio.wait_for(second, 5.0), 101.0 - cost)
            assert instance.outstanding == 0

    asyncio.run(scenario())


def _generate(address: str, tokens: int, hint: int | None) -> int:
    inputs = generate_inputs(tokens)
    with grpcclient.InferenceServerClient(address) as client:
        result = client.infer("generate_unary", inputs, client_timeout=60,
                              parameters=None if hint is None else {"length_hint": hint})
    answer = result.as_numpy("TOKENS")
    return 0 if answer is None else int(np.size(answer))


@pytest.mark.triton
def test_quality_is_a_metric_and_in_status(make_router: Any) -> None:
    """Through the router, on a real worker: requests whose length_hint is their length
    teach a quality near 1 and a small residual; requests without one, a quality near 0.
    Both show as metrics and in `tritonmesh status`."""
    hints = {"generate_unary": WorkHint(parameter="length_hint", base=1)}
    # Spread over a wide range, and long enough that a few milliseconds of the machine's
    # jitter are a small part of each.
    lengths = (12, 100, 25, 160, 40, 15, 70, 20, 120, 50) * 3
    seen = {}
    for label, with_hint in (("exact", True), ("none", False)):
        router = make_router(strategy="LEAST_OUTSTANDING_WORK", workers=1, max_concurrency=1,
                             work_hints=hints)
        for tokens in lengths:
            assert _generate(router.address, tokens, tokens if with_hint else None) == tokens
        router.wait_idle()
        families = {m.name: m for m in BalancerCollector(router.balancer).collect()}
        (quality,) = families["tritonmesh_variant_hint_quality"].samples
        (residual,) = families["tritonmesh_variant_hint_residual_sd"].samples
        seen[label] = (quality.value, residual.value)
        status = subprocess.run(
            [str(Path(sys.executable).parent / "tritonmesh"), "status", "--address",
             router.admin_address], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        assert f"work hints: quality {quality.value:.2f}, residual SD {residual.value:.2f}" \
            in status.stdout
    assert seen["exact"][0] > 0.8 and seen["exact"][1] < AHEAD_MAX_RESIDUAL_SD, seen
    assert seen["none"][0] < 0.2 and seen["none"][1] > 0.5, seen
