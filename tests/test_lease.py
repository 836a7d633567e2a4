"""A pick is a lease: ``Balancer.acquire`` waits when the variant is full and returns a
``Lease`` whose ``release`` gives everything back exactly once. No gRPC call is made here:
instances point at an address nothing listens on, and only the accounting is exercised.
"""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from harness import local_balancer, request_info
from tritonclient.grpc import service_pb2 as pb
from tritonmesh.balancer import QUEUE_TIMEOUT, Balancer, NoInstanceError
from tritonmesh.config import ShadowConfig, VariantConfig, WorkHint
from tritonmesh.routing import RoutingStrategy
from tritonmesh.variant import Variant
from tritonmesh.workers.upstream import Upstream


def test_release_gives_back_once_and_observes_once() -> None:
    async def scenario() -> None:
        async with local_balancer() as (balancer, (instance,)):
            lease = await balancer.acquire(request_info(), b"", None, None)
            assert lease.instance is instance and instance.outstanding == 1
            lease.release(True)
            lease.release(False)  # a second ending changes nothing
            lease.abandon()
            assert instance.outstanding == 0
            assert (instance.requests, instance.errors) == (1, 0)

    asyncio.run(scenario())


def test_abandon_gives_back_and_learns_nothing() -> None:
    async def scenario() -> None:
        async with local_balancer() as (balancer, (instance,)):
            lease = await balancer.acquire(request_info(), b"", None, None)
            lease.abandon()
            lease.release(True)
            assert instance.outstanding == 0 and instance.requests == 0

    asyncio.run(scenario())


def test_acquire_waits_in_arrival_order_when_full() -> None:
    async def scenario() -> None:
        async with local_balancer(max_concurrency=1) as (balancer, (instance,)):
            first = await balancer.acquire(request_info(), b"", None, None)
            assert balancer.try_acquire(request_info(), b"", None) is None  # full: would wait
            loop = asyncio.get_running_loop()
            second = loop.create_task(balancer.acquire(request_info(), b"", None, 10.0))
            third = loop.create_task(balancer.acquire(request_info(), b"", None, 10.0))
            await asyncio.sleep(0)  # one turn of the loop: both tasks start waiting
            assert len(instance.variant.waiters) == 2
            assert not second.done() and not third.done()
            first.release(True)  # the freed slot goes to the oldest waiter, at once
            lease = await second
            assert lease.instance is instance and not third.done()
            assert instance.outstanding == 1
            lease.release(True)
            (await third).release(True)
            assert instance.outstanding == 0 and not instance.variant.waiters

    asyncio.run(scenario())


def test_waiting_past_the_deadline_is_deadline_exceeded() -> None:
    async def scenario() -> None:
        async with local_balancer(max_concurrency=1) as (balancer, (instance,)):
            held = await balancer.acquire(request_info(), b"", None, None)
            with pytest.raises(NoInstanceError) as info:
                await balancer.acquire(request_info(), b"", None, 0.05)
            assert info.value.code_name == "DEADLINE_EXCEEDED"
            assert str(info.value) == QUEUE_TIMEOUT
            held.release(True)
            assert instance.outstanding == 0 and not instance.variant.waiters

    asyncio.run(scenario())


def test_a_full_queue_is_resource_exhausted() -> None:
    async def scenario() -> None:
        async with local_balancer(max_concurrency=1, max_queue=1) as (balancer, (instance,)):
            held = await balancer.acquire(request_info(), b"", None, None)
            waiting = asyncio.get_running_loop().create_task(
                balancer.acquire(request_info(), b"", None, 10.0))
            await asyncio.sleep(0)  # one turn of the loop: it starts waiting
            assert len(instance.variant.waiters) == 1
            with pytest.raises(NoInstanceError) as info:
                await balancer.acquire(request_info(), b"", None, 10.0)
            assert info.value.code_name == "RESOURCE_EXHAUSTED"
            assert "1 requests are already waiting" in str(info.value)
            held.release(True)
            (await waiting).release(True)
            assert instance.outstanding == 0

    asyncio.run(scenario())


def test_a_cancelled_waiter_leaves_nothing_behind() -> None:
    async def scenario() -> None:
        async with local_balancer(max_concurrency=1) as (balancer, (instance,)):
            held = await balancer.acquire(request_info(), b"", None, None)
            loop = asyncio.get_running_loop()
            gone = loop.create_task(balancer.acquire(request_info(), b"", None, 10.0))
            behind = loop.create_task(balancer.acquire(request_info(), b"", None, 10.0))
            await asyncio.sleep(0)  # one turn of the loop: both tasks start waiting
            assert len(instance.variant.waiters) == 2
            gone.cancel()
            with pytest.raises(asyncio.CancelledError):
                await gone
            assert len(instance.variant.waiters) == 1
            # Counted as the client saw it: an invocation cancelled in the queue.
            stats = balancer.metrics._stats["AllTraffic"]["other"]
            assert stats.errors == {"CANCELLED": 1} and stats.concurrent == 1
            held.release(True)  # the slot goes to the one still waiting
            lease = await asyncio.wait_for(behind, 5.0)
            lease.release(True)
            assert instance.outstanding == 0 and not instance.variant.waiters

    asyncio.run(scenario())


def test_a_waiter_cancelled_as_the_slot_reaches_it_leaves_nothing_behind() -> None:
    """Handed the slot and cancelled before it runs again: either it gives the slot on
    to the next in line, or (asyncio.wait_for keeps a result that came first) it returns
    the lease to its holder, who releases it. Either way, nothing stays counted."""
    async def scenario() -> None:
        async with local_balancer(max_concurrency=1) as (balancer, (instance,)):
            held = await balancer.acquire(request_info(), b"", None, None)
            loop = asyncio.get_running_loop()
            gone = loop.create_task(balancer.acquire(request_info(), b"", None, 10.0))
            behind = loop.create_task(balancer.acquire(request_info(), b"", None, 10.0))
            await asyncio.sleep(0)  # one turn of the loop: both tasks start waiting
            assert len(instance.variant.waiters) == 2
            held.release(True)  # hands the slot to ``gone``...
            gone.cancel()  # ...which is cancelled before it runs again
            try:
                kept = await gone
            except asyncio.CancelledError:
                kept = None
            if kept is not None:
                assert not behind.done()
                kept.release(True)
            lease = await asyncio.wait_for(behind, 5.0)
            lease.release(True)
            assert instance.outstanding == 0 and not instance.variant.waiters

    asyncio.run(scenario())


def test_the_last_release_ends_a_drain() -> None:
    async def scenario() -> None:
        async with local_balancer() as (balancer, (instance,)):
            lease = await balancer.acquire(request_info(), b"", None, None)
            drained = instance.variant.set_draining(instance)
            assert not drained.is_set()
            with pytest.raises(NoInstanceError) as info:  # nothing new goes to it
                await balancer.acquire(request_info(), b"", None, None)
            assert info.value.code_name == "UNAVAILABLE"
            lease.release(True)
            assert drained.is_set()

    asyncio.run(scenario())


def test_a_sequence_stays_on_its_instance() -> None:
    async def scenario() -> None:
        async with local_balancer(3) as (balancer, _):
            start = await balancer.acquire(request_info(sequence_id=7, start=True), b"", None, None)
            pinned = start.instance
            leases = [await balancer.acquire(request_info(sequence_id=7), b"", None, None)
                      for _ in range(5)]
            assert {lease.instance for lease in leases} == {pinned}
            end = await balancer.acquire(request_info(sequence_id=7, end=True), b"", None, None)
            assert end.instance is pinned and not balancer.sequences
            for lease in (start, *leases, end):
                lease.release(True)
            assert balancer.total_outstanding() == 0

    asyncio.run(scenario())


def test_a_retry_avoids_the_instance_that_failed_while_another_is_free() -> None:
    async def scenario() -> None:
        async with local_balancer(2) as (balancer, (a, b)):
            for _ in range(10):
                lease = await balancer.acquire(request_info(), b"", None, None, avoid=a)
                assert lease.instance is b
                lease.release(True)
        async with local_balancer(1) as (balancer, (only,)):
            lease = await balancer.acquire(request_info(), b"", None, None, avoid=only)
            assert lease.instance is only  # the only one: tried again
            lease.release(True)

    asyncio.run(scenario())


def test_detectors_keep_their_own_flags() -> None:
    """The outlier detector's ejection and the health checker's verdict are separate flags;
    the instance is picked only when both let it, and neither clears the other's."""
    async def scenario() -> None:
        async with local_balancer(2) as (balancer, (a, b)):
            outliers = balancer.outliers
            outliers.eject(a, "test")
            assert a.ejected and a.healthy and not a.pickable
            # A passing probe before the back-off is over does not bring it back...
            outliers.probe_passed(a)
            assert a.ejected
            # ...and the health checker marking it unhealthy, then healthy, does not either.
            a.healthy = False
            a.variant.sync(a)
            a.healthy = True
            a.variant.sync(a)
            assert a.ejected and not a.pickable
            for _ in range(5):
                lease = await balancer.acquire(request_info(), b"", None, None)
                assert lease.instance is b
                lease.release(True)
            a.ejected_until = time.monotonic()  # the back-off is over
            outliers.probe_passed(a)
            assert a.pickable
            # An unhealthy instance stays out whatever the outlier detector says.
            b.healthy = False
            b.variant.sync(b)
            outliers.success(b)
            outliers.probe_passed(b)
            assert not b.pickable and not b.ejected

    asyncio.run(scenario())


def test_a_plain_request_leases_as_a_targeted_one() -> None:
    """``try_acquire`` takes a plain request (no target, pin or instance to avoid) in fewer
    steps than one naming its variant; both must lease, wait and refuse alike."""
    async def scenario() -> None:
        async with local_balancer(max_concurrency=1) as (balancer, (instance,)):
            stats = balancer.metrics.started(instance.variant, "identity")
            stats.concurrent -= 1  # only looked up
            for target in (None, "AllTraffic"):
                lease = balancer.try_acquire(request_info(), b"", target)
                assert lease is not None and lease.instance is instance
                assert (lease.cost, lease.ahead, lease.stats) == (1.0, 0.0, stats)
                assert instance.outstanding == 1 and stats.concurrent == 1
                # Full: None, the request may wait; nothing more counted.
                assert balancer.try_acquire(request_info(), b"", target) is None
                assert instance.outstanding == 1 and stats.concurrent == 1
                lease.release(True)
                assert instance.outstanding == 0 and stats.concurrent == 0
            instance.healthy = False
            instance.variant.sync(instance)
            refusals = []
            for target in (None, "AllTraffic"):
                with pytest.raises(NoInstanceError) as info:
                    balancer.try_acquire(request_info(), b"", target)
                refusals.append((info.value.code_name, str(info.value)))
            assert refusals[0] == refusals[1] == (
                "UNAVAILABLE", "no healthy instance in variant 'AllTraffic' can serve model "
                "'identity' right now")
            assert stats.invocations == 2 and instance.outstanding == 0

    asyncio.run(scenario())


def test_a_plain_request_goes_where_the_variants_serve_its_model() -> None:
    """The short path chooses a variant as the general one does: a model goes to the
    variants that list it (never a shadow), and among several, only to one with an
    instance to take it."""
    async def scenario() -> None:
        variants = [
            Variant(VariantConfig("Listed", instances=("127.0.0.1:1",),
                                  models=frozenset({"only_here"})), seed=1),
            Variant(VariantConfig("Down", instances=("127.0.0.1:3",),
                                  models=frozenset({"identity"})), seed=1),
            Variant(VariantConfig("Open", instances=("127.0.0.1:2",),
                                  models=frozenset({"identity"})), seed=1),
            Variant(VariantConfig("Shadow", instances=("127.0.0.1:4",),
                                  shadow=ShadowConfig("Open", 1.0)), seed=1),
        ]
        upstreams = [Upstream(v.config.instances[0]) for v in variants]
        try:
            listed, down, open_, shadow = (
                v.add(u) for v, u in zip(variants, upstreams, strict=True))
            down.healthy = False
            down.variant.sync(down)
            balancer = Balancer(variants, rng=random.Random(7))
            for _ in range(50):
                for model, expected in (("only_here", listed), ("identity", open_)):
                    lease = balancer.try_acquire(request_info(model), b"", None)
                    assert lease is not None and lease.instance is expected, model
                    lease.release(True)
            assert shadow.requests == down.requests == 0
        finally:
            for v in variants:
                await v.close()
            for u in upstreams:
                await u.close()

    asyncio.run(scenario())


def test_sequences_and_work_costs_stay_off_the_short_path() -> None:
    """A sequence's request stays on its pinned instance and a LEAST_OUTSTANDING_WORK
    request is counted at its hint's cost, through the same ``try_acquire`` call."""
    async def scenario() -> None:
        async with local_balancer(instances=4) as (balancer, _):
            first = balancer.try_acquire(request_info(sequence_id=9, start=True), b"", None)
            assert first is not None
            pinned = first.instance
            first.release(True)
            for _ in range(20):
                lease = balancer.try_acquire(request_info(sequence_id=9), b"", None)
                assert lease is not None and lease.instance is pinned
                lease.release(True)
        async with local_balancer(routing_strategy=RoutingStrategy.LEAST_OUTSTANDING_WORK
                                  ) as (balancer, (instance,)):
            balancer.set_work_hints({"g": WorkHint(input="MAX_TOKENS", base=2.0)})
            request = pb.ModelInferRequest(model_name="g")
            tensor = grpcclient.InferInput("MAX_TOKENS", [1], "INT32")
            tensor.set_data_from_numpy(np.array([40], np.int32))
            request.inputs.append(tensor._get_tensor())
            request.raw_input_contents.append(tensor._get_content())
            lease = balancer.try_acquire(request_info("g"), request.SerializeToString(), None)
            assert lease is not None and lease.cost == 42.0
            lease.release(True)
            assert instance.outstanding == 0

    asyncio.run(scenario())
