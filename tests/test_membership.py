"""tritonmesh.membership on a real Variant and its table, without Triton or gRPC (the
channels are stand-ins that record being closed), then through a real router over a
recording fake Triton."""

from __future__ import annotations

import asyncio

import pytest
from harness import LoopThread, RecordingTriton, make_config, start_router
from tritonmesh.balancer import Variant
from tritonmesh.config import RoutingStrategy, VariantConfig
from tritonmesh.membership import Drains, active, drain, reconcile


class _Channel:
    """What membership needs of an Upstream: its address, and close."""

    def __init__(self, address: str):
        self.address = address
        self.closed = False

    async def close(self, grace: float | None = None) -> None:
        self.closed = True


def _variant() -> Variant:
    config = VariantConfig("AllTraffic", routing_strategy=RoutingStrategy.ROUND_ROBIN,
                           instances=("127.0.0.1:1",), slow_start_s=0.0)
    variant = Variant(config, seed=1)
    variant.connect = _Channel  # type: ignore[assignment,method-assign]
    return variant


def test_reconcile_adds_the_new_drains_the_gone_and_keeps_the_rest() -> None:
    async def scenario() -> None:
        variant = _variant()
        drains = Drains()
        first = await reconcile(variant, ["a:1", "b:1"], active(variant), drains=drains,
                                drain_timeout_s=5.0)
        assert sorted(first.added) == ["a:1", "b:1"] and not first.draining
        kept = first.added["a:1"]
        busy = first.added["b:1"]
        while (picked := variant.pick()) is not busy:  # one request in flight on "b:1"
            assert picked is kept
            variant.give_back(kept)
        # Listed twice, "c:1" still joins once.
        second = await reconcile(variant, ["a:1", "c:1", "c:1"], active(variant),
                                 drains=drains, drain_timeout_s=5.0)
        assert list(second.added) == ["c:1"] and list(second.draining) == ["b:1"]
        await asyncio.sleep(0)  # the drain's task starts
        assert busy.state == "DRAINING" and sorted(active(variant)) == ["a:1", "c:1"]
        assert not second.draining["b:1"].done()  # it waits for the request in flight
        variant.give_back(busy)
        await second.drained()
        assert second.draining["b:1"].result() is True
        assert busy.state == "REMOVED" and busy.upstream.closed  # type: ignore[attr-defined]
        assert not kept.upstream.closed  # type: ignore[attr-defined]
        assert len(drains) == 0 and variant.table.total_outstanding() == 0

    asyncio.run(scenario())


def test_reconcile_probes_and_leaves_alone() -> None:
    """An address the probe refuses (or whose probe fails) is not added and its channel is
    closed; an address in ``leave_alone`` (a static instance, say) is not added twice."""
    async def scenario() -> None:
        variant = _variant()
        asked: list[str] = []

        async def probe(upstream: _Channel) -> bool:  # type: ignore[override]
            asked.append(upstream.address)
            if upstream.address == "broken:1":
                raise ConnectionError("refused")
            return upstream.address == "ready:1"

        change = await reconcile(variant, ["ready:1", "loading:1", "broken:1", "static:1"],
                                 {}, drains=Drains(), drain_timeout_s=5.0,
                                 leave_alone={"static:1"}, probe=probe)  # type: ignore[arg-type]
        assert sorted(asked) == ["broken:1", "loading:1", "ready:1"]
        assert list(change.added) == ["ready:1"] and list(active(variant)) == ["ready:1"]

    asyncio.run(scenario())


def test_a_drain_outlives_a_cancelled_wait_and_times_out() -> None:
    """Whoever waits for a drain may go (a reload cancelled, a RemoveInstance caller
    gone): the drain still ends, by its timeout here, and removes the instance and closes
    its channel; the request still on it releases cleanly afterwards."""
    async def scenario() -> None:
        variant = _variant()
        drains = Drains()
        instance = (await reconcile(variant, ["a:1"], {}, drains=drains,
                                    drain_timeout_s=5.0)).added["a:1"]
        assert variant.pick() is instance
        change = await reconcile(variant, [], active(variant), drains=drains,
                                 drain_timeout_s=0.2)
        waiting = asyncio.get_running_loop().create_task(change.drained())
        await asyncio.sleep(0)
        waiting.cancel()
        await drains.wait()
        assert change.draining["a:1"].result() is False  # a request was still running
        assert instance.state == "REMOVED" and instance.upstream.closed  # type: ignore[attr-defined]
        variant.give_back(instance)
        assert variant.table.total_outstanding() == 0

    asyncio.run(scenario())


def test_drain_of_an_idle_instance_is_immediate() -> None:
    async def scenario() -> None:
        variant = _variant()
        instance = variant.add(_Channel("a:1"))  # type: ignore[arg-type]
        assert await asyncio.wait_for(drain(instance, 60.0), 5.0) is True
        assert instance.state == "REMOVED" and not list(variant.live_instances())

    asyncio.run(scenario())


@pytest.mark.parametrize("slow_start", [True, False])
def test_added_instances_ramp_only_with_slow_start(slow_start: bool) -> None:
    """With slow start a joining instance takes a tenth of its weight at first: against an
    established one, it gets far fewer of 1,000 weighted-random picks."""
    async def scenario() -> None:
        config = VariantConfig("AllTraffic", instances=("127.0.0.1:1",), slow_start_s=60.0)
        variant = Variant(config, seed=3)
        variant.connect = _Channel  # type: ignore[assignment,method-assign]
        old = variant.add(_Channel("old:1"))  # type: ignore[arg-type]
        new = (await reconcile(variant, ["new:1"], {}, drains=Drains(), drain_timeout_s=1.0,
                               slow_start=slow_start)).added["new:1"]
        picks = {old: 0, new: 0}
        for _ in range(1000):
            picked = variant.pick()
            assert picked is not None
            picks[picked] += 1
            variant.give_back(picked)
        if slow_start:
            assert picks[new] < 200, picks
        else:
            assert picks[new] > 350, picks
        await variant.close()

    asyncio.run(scenario())


# -- through the router: Router.update_instances (SIGHUP reloads) over a recording fake ---


def test_a_reload_listing_an_address_twice_adds_it_once(loop_thread: LoopThread,
                                                        recording_triton: RecordingTriton
                                                        ) -> None:
    config, instances = make_config([recording_triton.address])
    router = start_router(loop_thread, config, instances)
    try:
        other = "127.0.0.1:1"  # never dialled: nothing is sent in this test
        changed = loop_thread.run(router.router.update_instances(
            {"AllTraffic": [recording_triton.address, other, other]}))
        assert changed == (1, 0)
        assert sorted(i.address for i in router.instances()) == sorted(
            [recording_triton.address, other])
    finally:
        router.stop()


def test_a_cancelled_reload_still_finishes_its_drains(loop_thread: LoopThread,
                                                      recording_triton: RecordingTriton) -> None:
    """A reload that is cancelled (the router stopping, say) while an instance drains:
    the drain goes on, and the instance leaves once its last request ends, instead of
    staying DRAINING, out of the pick set and unremovable, for good."""
    config, instances = make_config([recording_triton.address])
    router = start_router(loop_thread, config, instances)
    (instance,) = router.instances()

    async def scenario() -> None:
        assert instance.variant.pick() is instance  # a request in flight on it
        reload = asyncio.get_running_loop().create_task(
            router.router.update_instances({"AllTraffic": []}, drain_timeout_s=60.0))
        for _ in range(10):  # the reload starts the drain; the drain stops new picks
            await asyncio.sleep(0)
            if instance.state != "ACTIVE":
                break
        reload.cancel()
        await asyncio.gather(reload, return_exceptions=True)
        assert instance.state == "DRAINING"
        instance.variant.give_back(instance)
        await asyncio.wait_for(router.router.drains.wait(), 10.0)
        assert instance.state == "REMOVED"

    try:
        loop_thread.run(scenario())
    finally:
        router.stop()
