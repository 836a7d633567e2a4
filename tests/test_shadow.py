"""Shadow variants: a sampled copy of the live variant's ModelInfer requests goes to the
shadow, whose answers are measured, compared with the live ones, and discarded. The live
requests never wait for, or fail with, their shadow."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from harness import LoopThread, RecordingTriton, RouterHandle, make_config, start_router, wait_for
from tritonmesh.config import ShadowConfig
from tritonmesh.shadow import ShadowCollector
from tritonmesh.workers.launcher import free_ports

pytestmark = pytest.mark.triton


def _router(loop_thread: LoopThread, live: str, shadow: str, sample: float) -> RouterHandle:
    config, instances = make_config([live, shadow], variants=[
        ("AllTraffic", 1.0, "LEAST_OUTSTANDING_REQUESTS", 0),
        ("Candidate", 1.0, "LEAST_OUTSTANDING_REQUESTS", 1)])
    live_variant, candidate = config.variants
    candidate = dataclasses.replace(candidate, shadow=ShadowConfig("AllTraffic", sample))
    config = dataclasses.replace(config, variants=(live_variant, candidate))
    return start_router(loop_thread, config, instances)


def _identity(address: str, n: int, timeout: float = 30.0) -> None:
    with grpcclient.InferenceServerClient(address) as client:
        for i in range(n):
            x = grpcclient.InferInput("INPUT0", [1], "FP32")
            x.set_data_from_numpy(np.array([float(i)], np.float32))
            result = client.infer("identity", [x], client_timeout=timeout)
            assert result.as_numpy("OUTPUT0")[0] == float(i)


def _shadow_done(router: RouterHandle, timeout: float = 30.0) -> None:
    shadows = router.router.shadows
    assert shadows is not None
    deadline = time.monotonic() + timeout
    while shadows._tasks:
        assert time.monotonic() < deadline, f"{len(shadows._tasks)} shadow copies still running"
        time.sleep(0.01)


def _samples(router: RouterHandle) -> dict[tuple[str, ...], float]:
    shadows = router.router.shadows
    assert shadows is not None
    return {(s.name, *(s.labels[k] for k in sorted(s.labels))): s.value
            for family in ShadowCollector(shadows).collect() for s in family.samples}


def test_a_sample_of_live_requests_is_copied_and_compared(loop_thread: LoopThread,
                                                           worker_addresses: list[str]) -> None:
    router = _router(loop_thread, worker_addresses[0], worker_addresses[1], 0.5)
    try:
        _identity(router.address, 200)
        _shadow_done(router)
        by_variant = {i.variant.name: i for i in router.instances()}
        live, shadow = by_variant["AllTraffic"], by_variant["Candidate"]
        assert live.requests == 200  # every live request went to the live variant
        # Binomial(200, 0.5): 100 ± 7; outside 60..140 would be 5.6 standard deviations.
        assert 60 <= shadow.requests <= 140, shadow.requests
        samples = _samples(router)
        key = ("tritonmesh_shadow_requests_total", "identity", "AllTraffic", "OK", "Candidate")
        assert samples[key] == shadow.requests
        # The same model on both: every answer matches the live one.
        matched = ("tritonmesh_shadow_outputs_total", "true", "identity", "AllTraffic",
                   "Candidate")
        mismatched = (*matched[:1], "false", *matched[2:])
        assert (samples[matched], samples[mismatched]) == (shadow.requests, 0)
        router.wait_idle()
    finally:
        router.stop()


def test_a_slow_shadow_never_holds_the_live_requests(loop_thread: LoopThread,
                                                      worker_addresses: list[str]) -> None:
    """Every copy waits at a shadow that does not answer while the live requests all
    complete; when it answers, its (different) outputs are counted as mismatches."""
    fake = RecordingTriton(loop_thread)
    router = _router(loop_thread, worker_addresses[0], fake.address, 1.0)
    try:
        fake.hold = asyncio.Event()
        _identity(router.address, 10)
        (shadow,) = [i for i in router.instances() if i.variant.name == "Candidate"]
        assert shadow.outstanding == 10  # all ten copies still wait at the shadow
        # A copy's lease is taken before its call reaches the shadow: wait for the last.
        wait_for(lambda: sum(1 for call in fake.calls if call[0] == "ModelInfer") == 10,
                 "ten copies at the shadow")
        loop_thread.run(_set(fake.hold))
        _shadow_done(router)
        samples = _samples(router)
        mismatched = ("tritonmesh_shadow_outputs_total", "false", "identity", "AllTraffic",
                      "Candidate")
        assert samples[mismatched] == 10
        router.wait_idle()
    finally:
        router.stop()
        fake.stop()


def test_a_failing_shadow_never_fails_the_live_requests(loop_thread: LoopThread,
                                                         worker_addresses: list[str]) -> None:
    dead = f"127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    router = _router(loop_thread, worker_addresses[0], dead, 1.0)
    try:
        _identity(router.address, 10)
        _shadow_done(router)
        outcomes = {k[3]: v for k, v in _samples(router).items()
                    if k[0] == "tritonmesh_shadow_requests_total"}
        # Refused at the connection, or skipped once health checks took it out.
        assert sum(outcomes.values()) == 10 and "OK" not in outcomes, outcomes
        assert set(outcomes) <= {"UNAVAILABLE", "SKIPPED"}, outcomes
        router.wait_idle()
    finally:
        router.stop()


async def _set(event: asyncio.Event) -> None:
    event.set()
