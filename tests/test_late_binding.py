"""Late binding: with a per-instance concurrency limit, requests wait in the router and go to
the first instance that frees up, instead of queueing inside one busy Triton."""

from __future__ import annotations

import concurrent.futures
import queue
import time
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
from harness import LongStream, generate_inputs, generate_unary, wait_for
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.triton


def test_queued_request_goes_to_the_first_free_instance(make_router: Any) -> None:
    router = make_router(strategy="LEAST_OUTSTANDING_REQUESTS", workers=2, max_concurrency=1)
    variant = router.balancer.variants[0]
    busy = LongStream(router.address)
    try:
        (held,) = [i for i in router.instances() if i.outstanding == 1]
        (free,) = [i for i in router.instances() if i is not held]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(generate_unary, router.address, 40)  # ~0.2 s on the free instance
            wait_for(lambda: free.outstanding == 1, "the first request to start")
            second = pool.submit(generate_unary, router.address, 5)
            wait_for(lambda: len(variant.waiters) == 1, "the second request to queue")
            assert held.outstanding == 1  # not stacked behind the long generation
            assert first.result(timeout=60) == list(range(40))
            assert second.result(timeout=60) == list(range(5))
        assert held.requests == 0 and free.requests == 2
    finally:
        busy.stop()
    router.wait_idle()


def test_full_queue_is_resource_exhausted(make_router: Any) -> None:
    router = make_router(workers=1, max_concurrency=1, max_queue=1)
    variant = router.balancer.variants[0]
    busy = LongStream(router.address, max_tokens=400)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(generate_unary, router.address, 2)
            wait_for(lambda: len(variant.waiters) == 1, "a request to queue")
            with pytest.raises(InferenceServerException) as info:
                generate_unary(router.address, 2)
            assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
            assert "1 requests are already waiting" in info.value.message()
            busy.stop()
            assert waiting.result(timeout=60) == [0, 1]
    finally:
        busy.stop()
    router.wait_idle()


def test_deadline_while_queued(make_router: Any) -> None:
    router = make_router(workers=1, max_concurrency=1)
    busy = LongStream(router.address, max_tokens=400)
    try:
        with pytest.raises(InferenceServerException) as info:
            generate_unary(router.address, 2, timeout=0.3)
        assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        variant = router.balancer.variants[0]

        async def still_waiting() -> bool:  # read on the router's loop, not beside it
            return len(variant.waiters) > 0

        # The client's deadline fires on its side; the router's wait ends on its own timer
        # or the call's cancellation, a moment later on a loaded machine: bounded, not 0.
        deadline = time.monotonic() + 10
        while router.loop.run(still_waiting()):
            assert time.monotonic() < deadline, "a request whose deadline passed still waits"
            time.sleep(0.01)
    finally:
        busy.stop()
    router.wait_idle()


def test_stream_requests_wait_their_turn(make_router: Any) -> None:
    router = make_router(strategy="LEAST_OUTSTANDING_REQUESTS", workers=2, max_concurrency=1)
    results: queue.Queue[Any] = queue.Queue()
    peak = 0
    with grpcclient.InferenceServerClient(router.address) as client:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        for k in range(5):
            client.async_stream_infer("generate", generate_inputs(6), request_id=f"r{k}",
                                      enable_empty_final_response=True)
        got = []
        while len(got) < 5 * 7:
            got.append(results.get(timeout=60))
            peak = max(peak, *(i.outstanding for i in router.instances()))
        client.stop_stream()
    assert all(error is None for _, error in got)
    by_id: dict[str, int] = {}
    for result, _ in got:
        by_id[result.get_response().id] = by_id.get(result.get_response().id, 0) + 1
    assert by_id == {f"r{k}": 7 for k in range(5)}
    assert peak <= 1
    router.wait_idle()


@pytest.mark.parametrize("order", ["FIFO", "LEAST_SLACK"])
def test_queue_order(make_router: Any, order: str) -> None:
    """Two requests wait behind a busy instance: a short one, then a long one. FIFO serves
    the short one first; LEAST_SLACK the long one, whose length leaves it less time to
    spare (its latest start, deadline - expected service, is earlier)."""
    from tritonmesh.config import WorkHint

    hints = {m: WorkHint(input="MAX_TOKENS") for m in ("generate", "generate_unary")}
    router = make_router(strategy="LEAST_OUTSTANDING_WORK", workers=1, max_concurrency=1,
                         work_hints=hints, queue_order=order)
    variant = router.balancer.variants[0]
    assert generate_unary(router.address, 4) == list(range(4))  # teaches seconds per token
    assert variant.work is not None and variant.work.mean_estimate() > 0
    busy = LongStream(router.address)
    finished: list[int] = []
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        def generate(n: int) -> None:
            assert generate_unary(router.address, n) == list(range(n))
            finished.append(n)

        try:
            short = pool.submit(generate, 2)
            wait_for(lambda: len(variant.waiters) == 1, "the short request to wait")
            long = pool.submit(generate, 100)
            wait_for(lambda: len(variant.waiters) == 2, "the long request to wait")
        finally:
            busy.stop()
        short.result(timeout=60)
        long.result(timeout=60)
    assert finished == ([2, 100] if order == "FIFO" else [100, 2])
