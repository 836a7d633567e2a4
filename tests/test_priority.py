"""Priorities: Triton's request ``priority`` (or ``x-tritonmesh-priority``) orders late
binding's queue by class, oldest first within a class, with aging; a full queue sheds its
lowest class first.

The queue's rules are checked on the balancer alone first (no Triton), then end to end: the
order in which a busy Triton serves queued requests, and a flood of a full queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
from harness import LongStream, generate_inputs, local_balancer, request_info
from tritonclient.utils import InferenceServerException
from tritonmesh.balancer import Balancer, Lease, NoInstanceError
from tritonmesh.forwarding import priority_of

# -- the queue's rules, without Triton ----------------------------------------------------------


async def _queue(balancer: Balancer, priorities: list[int]) -> list[asyncio.Task[Lease]]:
    """Queue one request per priority, in this order (each starts waiting before the next)."""
    tasks = []
    for priority in priorities:
        tasks.append(asyncio.get_running_loop().create_task(
            balancer.acquire(request_info(priority=priority), b"", None, 30.0)))
        await asyncio.sleep(0)  # it starts waiting
    return tasks


async def _served_order(held: Lease, tasks: list[asyncio.Task[Lease]]) -> list[int]:
    """Free the one slot and let the waiters through one at a time; their indexes in order."""
    order = []
    lease = held
    pending = set(tasks)
    while pending:
        lease.release(True)
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1  # one slot: one waiter at a time
        (task,) = done
        order.append(tasks.index(task))
        lease = task.result()
    lease.release(True)
    return order


def test_higher_classes_go_first_and_each_class_in_arrival_order() -> None:
    async def scenario() -> None:
        async with local_balancer(max_concurrency=1, priority_aging_s=60.0) as (balancer, _):
            held = await balancer.acquire(request_info(), b"", None, None)
            tasks = await _queue(balancer, [3, 2, 3, 1, 2, 1])
            assert await _served_order(held, tasks) == [3, 5, 1, 4, 0, 2]
            assert balancer.total_outstanding() == 0

    asyncio.run(scenario())


def test_a_request_without_priority_is_in_the_default_class() -> None:
    async def scenario() -> None:
        async with local_balancer(max_concurrency=1, default_priority=2,
                                  priority_aging_s=60.0) as (balancer, _):
            held = await balancer.acquire(request_info(), b"", None, None)
            tasks = await _queue(balancer, [3, 0, 1])  # 0: none given, class 2
            assert await _served_order(held, tasks) == [2, 1, 0]

    asyncio.run(scenario())


def test_a_lower_class_is_not_starved() -> None:
    """A priority-2 request that has waited longer than aging_s goes ahead of a newer
    priority-1 request."""
    async def scenario() -> None:
        async with local_balancer(max_concurrency=1, priority_aging_s=0.05) as (balancer, _):
            held = await balancer.acquire(request_info(), b"", None, None)
            (low,) = await _queue(balancer, [2])
            await asyncio.sleep(0.1)  # longer than aging_s
            (high,) = await _queue(balancer, [1])
            assert await _served_order(held, [low, high]) == [0, 1]

    asyncio.run(scenario())


def test_a_full_queue_sheds_its_lowest_class_first() -> None:
    async def scenario() -> None:
        async with local_balancer(max_concurrency=1, max_queue=2,
                                  priority_aging_s=60.0) as (balancer, _):
            held = await balancer.acquire(request_info(), b"", None, None)
            low, middle = await _queue(balancer, [3, 2])
            (high,) = await _queue(balancer, [1])  # full: the priority-3 request makes room
            with pytest.raises(NoInstanceError) as shed:
                await low
            assert shed.value.code_name == "RESOURCE_EXHAUSTED"
            assert "shed from the full queue" in str(shed.value)
            # Nothing waiting is of a lower class than a new priority-2 request: refused.
            with pytest.raises(NoInstanceError) as refused:
                await balancer.acquire(request_info(priority=2), b"", None, 30.0)
            assert refused.value.code_name == "RESOURCE_EXHAUSTED"
            assert "none of a lower priority than this one (2)" in str(refused.value)
            assert await _served_order(held, [middle, high]) == [1, 0]
            assert balancer.total_outstanding() == 0

    asyncio.run(scenario())


def test_priority_metadata_values() -> None:
    assert priority_of(None) == 0
    assert priority_of("2") == 2
    for bad in ("0", "-1", "high", "", str(1 << 63)):
        refused = priority_of(bad)
        assert isinstance(refused, str) and "x-tritonmesh-priority" in refused


# -- end to end, against a real Triton worker ---------------------------------------------------


def _wait_for(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _generate(address: str, priority: int, by_metadata: bool) -> float:
    """One short generation at ``priority``; when it finished."""
    with grpcclient.InferenceServerClient(address) as client:
        if by_metadata:
            client.infer("generate_unary", generate_inputs(2), client_timeout=60,
                         headers={"x-tritonmesh-priority": str(priority)})
        else:
            client.infer("generate_unary", generate_inputs(2), client_timeout=60,
                         priority=priority)
    return time.monotonic()


@pytest.mark.triton
def test_triton_serves_queued_requests_by_priority(make_router: Any) -> None:
    """One instance, one request at a time: queued low- then high-priority requests reach
    Triton high first (the parameter and the metadata key alike), each class in order."""
    router = make_router(workers=1, max_concurrency=1,
                         variant_options={"priority_aging_s": 60.0})
    variant = router.balancer.variants[0]
    busy = LongStream(router.address, max_tokens=400)
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            sent = []
            for n, priority in enumerate((3, 3, 3, 1, 1, 1)):
                sent.append(pool.submit(_generate, router.address, priority, n % 2 == 1))
                _wait_for(lambda n=n: len(variant.waiters) == n + 1, f"request {n} to queue")
            busy.stop()  # the instance frees: the queue drains one request at a time
            finished = [f.result(timeout=60) for f in sent]
        order = sorted(range(6), key=lambda i: finished[i])
        assert order == [3, 4, 5, 0, 1, 2]
    finally:
        busy.stop()
    router.wait_idle()


@pytest.mark.triton
def test_a_flood_of_a_full_queue_sheds_low_priority_first(make_router: Any) -> None:
    router = make_router(workers=1, max_concurrency=1, max_queue=3,
                         variant_options={"priority_aging_s": 60.0})
    variant = router.balancer.variants[0]
    busy = LongStream(router.address, max_tokens=400)
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            low = [pool.submit(_generate, router.address, 5, False) for _ in range(3)]
            _wait_for(lambda: len(variant.waiters) == 3, "the low-priority requests to queue")
            high = [pool.submit(_generate, router.address, 1, False) for _ in range(3)]
            shed = []
            for future in low:
                with pytest.raises(InferenceServerException) as info:
                    future.result(timeout=60)
                shed.append(info.value)
            _wait_for(lambda: len(variant.waiters) == 3, "the high-priority requests to queue")
            busy.stop()
            for future in high:
                future.result(timeout=60)
        for error in shed:
            assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
            assert "shed from the full queue" in error.message()
        with pytest.raises(InferenceServerException) as info:
            with grpcclient.InferenceServerClient(router.address) as client:
                client.infer("generate_unary", generate_inputs(2),
                             headers={"x-tritonmesh-priority": "urgent"})
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    finally:
        busy.stop()
    router.wait_idle()
