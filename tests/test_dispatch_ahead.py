"""Dispatch ahead: late binding hands an instance its next waiting request shortly before the
running one is expected to end, so the instance does not idle for the router's round trip.

The variant's timers are checked on their own first (no Triton), then end to end through
the router against a real worker. The service-time line they read is the core's
(``WorkTable.service_time``, tested in test_work.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
from harness import LongStream, generate_inputs, generate_unary
from tritonclient.utils import InferenceServerException
from tritonmesh._core import SERVICE_MIN_SAMPLES, WorkTable
from tritonmesh.balancer import Instance, Variant
from tritonmesh.config import QueueOrder, RoutingStrategy, VariantConfig, WorkHint
from tritonmesh.dispatch_ahead import AHEAD_MAX_RESIDUAL_SD, Plan
from tritonmesh.metrics import BalancerCollector
from tritonmesh.workers.upstream import Upstream

# -- the variant's timers, without Triton -----------------------------------------------------


def _plan(variant: Variant, instance: Instance) -> Plan:
    assert variant.ahead is not None
    plan = variant.ahead.plan(instance)
    assert plan is not None
    return plan


def _timer(variant: Variant, instance: Instance) -> asyncio.TimerHandle | None:
    assert variant.ahead is not None
    plan = variant.ahead.plan(instance)
    return None if plan is None else plan.timer


@contextlib.asynccontextmanager
async def _one_instance(ahead_s: float, *, teach: bool = True, service_alpha: float = 0.02
                        ) -> AsyncIterator[tuple[Variant, Instance]]:
    """A dispatch-ahead variant with one instance (an address nothing listens on: these
    tests never send), its line taught 0.1 s per unit of cost unless ``teach`` is False
    (twice the samples a line needs: the second half shows the costs predict exactly)."""
    config = VariantConfig("AllTraffic", routing_strategy=RoutingStrategy.LEAST_OUTSTANDING_WORK,
                           instances=("127.0.0.1:1",), max_concurrency=1,
                           queue_order=QueueOrder.FIFO, dispatch_ahead_s=ahead_s)
    variant = Variant(config, seed=1)
    variant.table = variant.work = WorkTable(1, service_alpha=service_alpha)
    upstream = Upstream("127.0.0.1:1")
    try:
        instance = variant.add(upstream)
        if teach:
            for cost in range(1, 2 * SERVICE_MIN_SAMPLES + 1):
                variant.work.observe_service(instance.slot, float(cost), 0.1 * cost)
        yield variant, instance
    finally:
        await variant.close()
        await upstream.close()


def test_next_request_is_handed_over_before_the_running_one_ends() -> None:
    async def scenario() -> None:
        async with _one_instance(0.15) as (variant, instance):
            loop = asyncio.get_running_loop()
            sent = loop.time()
            assert variant.pick(2.0) is instance  # expected to end 0.2 s from now
            expected = variant.work.service_time(instance.slot, 2.0)
            assert expected == pytest.approx(0.2)
            assert sent + expected <= _plan(variant, instance).free_at <= loop.time() + expected
            timer = _timer(variant, instance)
            assert timer is not None and timer.when() == _plan(variant, instance).free_at - 0.15
            waiting = loop.create_task(variant.wait(10.0, 1.0))
            behind = loop.create_task(variant.wait(10.0, 1.0))
            got = await asyncio.wait_for(waiting, 5.0)
            # The router's record, not the clock: the first waiting request was handed over
            # ahead, one over the limit while the first still runs (nothing released it),
            # by the timer due 0.15 s before the first's expected end, not before it; the
            # one behind it waits, as one request ahead is all an instance gets.
            assert got is instance
            assert instance.sent_ahead == 1
            assert instance.outstanding == 2
            assert loop.time() >= timer.when() - time.get_clock_info("monotonic").resolution
            assert not behind.done() and _timer(variant, instance) is None
            behind.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await behind
            variant.give_back(instance, 2.0)  # the first ends, earlier than predicted
            assert instance.outstanding == 1
            # The one sent ahead starts now: its expected end is anchored on this end (0.1 s
            # from now), not chained on the first one's prediction (0.3 s after it was sent).
            assert _plan(variant, instance).free_at == pytest.approx(loop.time() + 0.1, abs=0.01)
            variant.give_back(instance, 1.0)
            assert instance.outstanding == 0 and _timer(variant, instance) is None

    asyncio.run(scenario())


def test_an_instance_due_with_nobody_waiting_takes_the_next_arrival() -> None:
    async def scenario() -> None:
        async with _one_instance(0.5) as (variant, instance):
            assert variant.pick(1.0) is instance  # ends in 0.1 s: due at once
            await asyncio.sleep(0.01)  # the timer runs; nobody is waiting yet
            assert variant.ahead is not None and instance in variant.ahead._due
            assert variant.pick(1.0) is None  # the limit still holds for a plain pick
            got = await asyncio.wait_for(variant.wait(10.0, 1.0), 5.0)
            assert got is instance and instance.outstanding == 2
            variant.give_back(instance, 1.0)
            variant.give_back(instance, 1.0)
            assert instance.outstanding == 0

    asyncio.run(scenario())


def test_nothing_is_handed_over_before_the_line_is_learned() -> None:
    async def scenario() -> None:
        async with _one_instance(10.0, teach=False) as (variant, instance):
            assert variant.pick(1.0) is instance
            waiting = asyncio.get_running_loop().create_task(variant.wait(10.0, 1.0))
            await asyncio.sleep(0.05)
            assert not waiting.done() and _timer(variant, instance) is None
            variant.give_back(instance, 1.0)  # the first ends: the waiter gets its turn
            assert await asyncio.wait_for(waiting, 5.0) is instance
            variant.give_back(instance, 1.0)

    asyncio.run(scenario())


def test_an_unhealthy_instance_is_not_handed_anything_ahead() -> None:
    async def scenario() -> None:
        async with _one_instance(0.5) as (variant, instance):
            assert variant.pick(1.0) is instance
            instance.healthy = False  # as the health checker does
            variant.sync(instance)
            waiting = asyncio.get_running_loop().create_task(variant.wait(10.0, 1.0))
            await asyncio.sleep(0.05)
            assert not waiting.done() and instance.outstanding == 1
            waiting.cancel()
            variant.give_back(instance, 1.0)

    asyncio.run(scenario())


def test_requests_teach_the_line_from_when_they_were_sent() -> None:
    """A request sent ahead is timed from when the router sent it, its wait in Triton's
    queue included: the line errs long (a late hand-over costs a round trip, an early one
    a wait behind the running request), and stays right when Triton runs two requests side
    by side. Failures teach nothing."""
    async def scenario() -> None:
        # service_alpha 1: the line is the last sample, so each step is exact.
        async with _one_instance(0.1, teach=False, service_alpha=1.0) as (variant, instance):
            assert variant.work is not None
            for _ in range(SERVICE_MIN_SAMPLES):
                variant.work.observe_service(instance.slot, 1.0, 1.0)
            variant.count(instance, 1.0)
            variant.count(instance, 1.0)  # sent while the first runs
            variant.give_back(instance, 1.0)
            instance.learn(0.05, True, 0.0, 1.0)
            assert variant.work.service_time(instance.slot, 1.0) == pytest.approx(0.05)
            variant.give_back(instance, 1.0)
            instance.learn(0.09, True, 0.0, 1.0)  # 0.04 of it behind the first
            assert variant.work.service_time(instance.slot, 1.0) == pytest.approx(0.09)
            instance.learn(7.0, False, 0.0, 1.0)
            assert variant.work.service_time(instance.slot, 1.0) == pytest.approx(0.09)

    asyncio.run(scenario())


def test_a_removed_instance_ends_its_timer_and_releases_cleanly() -> None:
    """Removed with a request still on it (a drain that timed out): its timer stops, and
    the last release (which frees the slot) neither fails nor re-arms anything."""
    async def scenario() -> None:
        async with _one_instance(0.05) as (variant, instance):
            assert variant.pick(5.0) is instance
            assert _timer(variant, instance) is not None
            variant.set_draining(instance)
            variant.remove(instance)
            assert _timer(variant, instance) is None
            variant.give_back(instance, 5.0)
            assert instance.outstanding == 0 and _timer(variant, instance) is None
            assert variant.table.total_outstanding() == 0

    asyncio.run(scenario())


# -- end to end, against a real Triton worker --------------------------------------------------


@pytest.mark.triton
def test_through_the_router(make_router: Any) -> None:
    """A request waiting behind a 300-token generation (1.5 s) goes to Triton before that
    ends (the instance holds two), and both answers are whole. (A lead of 1 s: the line,
    taught on shorter requests, extrapolates to this long one; a prediction up to 1 s long
    still hands over in time, and a short one hands over at once.)"""
    hints = {m: WorkHint(input="MAX_TOKENS", base=1) for m in ("generate", "generate_unary")}
    router = make_router(strategy="LEAST_OUTSTANDING_WORK", workers=1, max_concurrency=1,
                         work_hints=hints, dispatch_ahead_s=1.0)
    (instance,) = router.instances()
    work = router.balancer.variants[0].work
    assert work is not None
    # Teaches the line, and then that the hint predicts it (dispatch ahead's gate): long
    # enough that a few milliseconds of the machine's jitter are a small part of each. On
    # a loaded machine a late answer can keep the gate shut for a while: teach on, up to
    # 40 more, until it opens (the router idle, so every answer has been learned from).
    teaching = (20, 45, 30, 60, 25, 50, 35, 40, 55, 28)
    for n, tokens in enumerate(teaching * 6):
        if n >= 2 * len(teaching):
            router.wait_idle()
            if 0.0 <= work.residual_sd() <= AHEAD_MAX_RESIDUAL_SD:
                break
        assert generate_unary(router.address, tokens) == list(range(tokens))
    router.wait_idle()
    assert 0.0 <= work.residual_sd() <= AHEAD_MAX_RESIDUAL_SD, work.residual_sd()
    assert 0.3 < work.service_time(instance.slot, 301.0) < 3.0
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        long = pool.submit(generate_unary, router.address, 300)
        deadline = time.monotonic() + 30
        while instance.outstanding == 0:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        short = pool.submit(generate_unary, router.address, 4)
        peak = 0
        while not long.done():
            peak = max(peak, instance.outstanding)
            time.sleep(0.002)
        assert long.result() == list(range(300))
        assert short.result(timeout=60) == list(range(4))
    assert peak == 2  # handed over while the long one still ran
    assert instance.sent_ahead == 1
    families = {m.name: m for m in BalancerCollector(router.balancer).collect()}
    (sample,) = families["tritonmesh_instance_dispatched_ahead"].samples
    assert sample.value == 1 and sample.labels["instance"] == instance.address
    router.wait_idle()


@pytest.mark.triton
def test_streams_and_cancels_leave_nothing_outstanding(make_router: Any) -> None:
    """Stream requests and abandoned unary calls under dispatch ahead: every count returns
    to zero and every answer that came is whole."""
    hints = {m: WorkHint(input="MAX_TOKENS", base=1) for m in ("generate", "generate_unary")}
    router = make_router(strategy="LEAST_OUTSTANDING_WORK", workers=2, max_concurrency=1,
                         work_hints=hints, dispatch_ahead_s=0.05)
    for tokens in (1, 5, 20, 2, 40, 10, 3, 30, 8, 15) * 2:
        assert generate_unary(router.address, tokens) == list(range(tokens))
    busy = LongStream(router.address, max_tokens=60)
    with grpcclient.InferenceServerClient(router.address) as client:
        for tokens in (3, 25, 7):
            with pytest.raises(InferenceServerException) as info:  # while it waits or runs
                client.infer("generate_unary", generate_inputs(tokens * 10), client_timeout=0.05)
            assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda n: generate_unary(router.address, n), [6, 30, 2, 50, 9]))
    busy.stop()
    assert results == [list(range(n)) for n in (6, 30, 2, 50, 9)]
    router.wait_idle()
