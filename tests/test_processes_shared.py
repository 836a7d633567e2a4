"""What K router processes share beyond the counts: sequence pins (tritonmesh.sharedpins),
outlier ejections (tritonmesh.fleetoutliers), the retry budget (tritonmesh.fleetbudget)
and slow start (the shared table's weights), against real Triton, in both builds."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.service_pb2 as pb
from harness import LoopThread, RecordingTriton, admin_stub, wait_for
from test_processes import (  # noqa: F401
    Endpoint,
    _gained,
    _in_background,
    _inferences,
    _logged_by_every_router,
    _metric,
    _write_config,
    endpoints,
)
from tritonclient.utils import InferenceServerException
from tritonmesh._pb import tritonmesh_admin_pb2 as apb
from tritonmesh.fleetbudget import SharedRetryCounts
from tritonmesh.fleetoutliers import SharedEjections
from tritonmesh.members import members_path
from tritonmesh.retry import RetryBudget
from tritonmesh.sharedpins import SharedPins


def _identity(value: float) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("INPUT0", [1], "FP32")
    tensor.set_data_from_numpy(np.full(1, value, np.float32))
    return [tensor]


def _on_a_new_connection(address: str, sequence_id: int, start: bool, end: bool, *,
                         sequence: bool = True) -> None:
    # A connection of its own (gRPC shares one between like channels by default): the
    # kernel hands each to any of the router processes.
    with grpcclient.InferenceServerClient(
            address, channel_args=[("grpc.use_local_subchannel_pool", 1)]) as client:
        if not sequence:
            client.infer("identity", _identity(0))
            return
        client.infer("identity", _identity(sequence_id), sequence_id=sequence_id,
                     sequence_start=start, sequence_end=end)


@pytest.mark.triton
@pytest.mark.parametrize("processes", [2, 3])
def test_a_sequence_reaches_one_instance_from_every_router_process(
        tmp_path: Path, worker_addresses: list[str], endpoints: list[Endpoint],  # noqa: F811
        processes: int) -> None:
    workers = worker_addresses[:2]
    endpoint = Endpoint(_write_config(tmp_path / "c.json", workers, processes), processes)
    endpoints.append(endpoint)
    address = endpoint.running.address
    steps = 6
    for sequence_id in range(101, 109):
        before = [_inferences(w) for w in workers]
        for step in range(steps):
            _on_a_new_connection(address, sequence_id, step == 0, step == steps - 1)
        gained = _gained(workers, before, steps)
        assert sorted(gained) == [0, steps], (sequence_id, gained)
    endpoint.quiescent()
    # 48 connections: the kernel spread them over every router process, so the pins
    # above were made in one process and followed in the others.
    served = [endpoint.updates(i) for i in range(1, processes + 1)]
    assert all(served), served
    pins = SharedPins.attach(f"tritonmesh-{endpoint.pid}-pins", 1)
    try:
        assert len(pins) == 0  # every sequence ended: no pin left
    finally:
        pins.close()


class _Failing(RecordingTriton):
    """Ready, every model ready, and every inference fails INTERNAL: what health checks
    cannot see and outlier detection must."""

    async def model_infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.seen.append(("ModelInfer", pb.ModelInferRequest.FromString(request).id))
        await context.abort(grpc.StatusCode.INTERNAL, "this instance is broken")
        raise AssertionError("abort returned")


@pytest.fixture
def failing_triton(loop_thread: LoopThread) -> Iterator[_Failing]:
    fake = _Failing(loop_thread)
    yield fake
    fake.stop()


def _try(address: str) -> None:
    with contextlib.suppress(InferenceServerException):
        _on_a_new_connection(address, 0, False, False, sequence=False)


@pytest.mark.triton
@pytest.mark.parametrize("processes", [2, 3])
def test_an_ejection_holds_in_every_router_process(
        tmp_path: Path, worker_addresses: list[str], failing_triton: _Failing,
        endpoints: list[Endpoint], processes: int) -> None:  # noqa: F811
    endpoint = Endpoint(_write_config(tmp_path / "c.json",
                                      [worker_addresses[0], failing_triton.address],
                                      processes), processes)
    endpoints.append(endpoint)
    address = endpoint.running.address
    with open(members_path(endpoint.pid), encoding="utf-8") as f:
        (slot,) = [s for s, _, a, _ in json.load(f)["members"]["AllTraffic"]
                   if a == failing_triton.address]
    ejections = SharedEjections.attach(f"tritonmesh-{endpoint.pid}-ejections")
    try:
        for _ in range(200):  # five failures in a row in one process eject it
            if ejections.until(0, slot):
                break
            _try(address)
        assert ejections.until(0, slot), "never ejected"
        # Requests sent while one ejection lasted, each on a new connection (so from every
        # process): none reaches the failing instance.
        inside, processes_seen = 0, set()
        for _ in range(300):
            if inside >= 8 * processes and len(processes_seen) == processes:
                break
            until = ejections.until(0, slot)
            calls = len(failing_triton.seen)
            served = [endpoint.updates(i) for i in range(1, processes + 1)]
            _try(address)
            if until and ejections.until(0, slot) == until:
                assert len(failing_triton.seen) == calls, "sent to an ejected instance"
                inside += 1
                processes_seen |= {i for i in range(1, processes + 1)
                                   if endpoint.updates(i) != served[i - 1]}
        assert inside >= 8 * processes and len(processes_seen) == processes, \
            (inside, processes_seen)
        # It returns after its back-off, on the supervisor's next passing probe.
        wait_for(lambda: not ejections.until(0, slot), "the ejection to end", timeout=60)
    finally:
        ejections.close()
    endpoint.quiescent()


def test_the_retry_budget_is_the_fleets() -> None:
    """Two router processes' budgets over one retry table (both builds, no gRPC): the
    floor is spent once for the fleet, and one process's requests earn the other's
    retries once exchanged."""
    table = SharedRetryCounts.create(3, tag=f"retries-test-{os.getpid()}")
    first = SharedRetryCounts.attach(table.name, 1)
    second = SharedRetryCounts.attach(table.name, 2)
    try:
        one = RetryBudget(ratio=0.5, min_per_s=0.5, ttl_s=10.0)  # a floor of 5 retries
        two = RetryBudget(ratio=0.5, min_per_s=0.5, ttl_s=10.0)
        assert [one.withdraw(1, None) for _ in range(5)] == [None] * 5
        first.exchange(one)
        second.exchange(two)
        assert two.others == (0, 5) and two.available() == 0.0
        assert two.withdraw(1, None) == "budget"  # alone, it would have had 5
        for _ in range(4):
            one.deposit()
        first.exchange(one)
        second.exchange(two)
        assert two.available() == 2.0
        assert [two.withdraw(1, None) for _ in range(3)] == [None, None, "budget"]
        # A process that exits leaves the fleet's counts (the supervisor's reclaim).
        table.clear(1)
        second.exchange(two)
        assert two.others == (0, 0) and two.available() == 3.0
    finally:
        for t in (first, second, table):
            t.close()
        table.unlink()


@pytest.mark.triton
def test_slow_start_reaches_every_router_process(
        tmp_path: Path, worker_addresses: list[str], endpoints: list[Endpoint]  # noqa: F811
        ) -> None:
    """The supervisor ramps a new instance's weight in the shared table, which every
    process picks by: while it is below half, an idle fleet's least-outstanding picks
    all go to the old instance, from every process."""
    old, new = worker_addresses[:2]
    endpoint = Endpoint(_write_config(tmp_path / "c.json", [old], 2, slow_start_s=120), 2)
    endpoints.append(endpoint)
    running = endpoint.running
    assert running.admin is not None
    admin_stub(running.admin).AddInstance(apb.AddInstanceRequest(variant="AllTraffic",
                                                                 address=new))
    _logged_by_every_router(running, f"{new} joined", 2)
    (slot,) = [s for s, *_ in endpoint.table.snapshot() if s != 0]
    before = [_inferences(old), _inferences(new)]
    served = [endpoint.updates(i) for i in (1, 2)]
    for _ in range(16):
        _on_a_new_connection(running.address, 0, False, False, sequence=False)
    assert endpoint.table.weight(slot) < 0.5  # still ramping (120 s, from 0.1)
    assert _gained([old, new], before, 16) == [16, 0]
    assert all(endpoint.updates(i) > s for i, s in zip((1, 2), served, strict=True))
    endpoint.quiescent()


@pytest.mark.triton
def test_a_pin_outlives_the_router_process_that_made_it(
        tmp_path: Path, worker_addresses: list[str], endpoints: list[Endpoint]  # noqa: F811
        ) -> None:
    """A pin belongs to no process: SIGKILL the one that pinned a sequence, and the rest of
    the sequence, through the other process and the restarted one, reaches its instance."""
    workers = worker_addresses[:2]
    endpoint = Endpoint(_write_config(tmp_path / "c.json", workers, 2), 2)
    endpoints.append(endpoint)
    address = endpoint.running.address
    before = [_inferences(w) for w in workers]
    served = [endpoint.updates(i) for i in (1, 2)]
    _on_a_new_connection(address, 77, True, False)
    (maker,) = [i for i in (1, 2) if endpoint.updates(i) != served[i - 1]]
    pid = endpoint.router_pids()[maker]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: endpoint.table.pid(maker) not in (0, pid), "the router process restarted",
             timeout=60)
    served = [endpoint.updates(i) for i in (1, 2)]

    def both_served() -> bool:
        return all(endpoint.updates(i) > served[i - 1] for i in (1, 2))

    # The kernel hashes each new connection to a process: eight may all reach one (1 in
    # 128), so the sequence goes on, on new connections, until both have served (at most
    # 64 requests), and its last request ends it.
    sent = 0
    while True:
        last = (sent >= 7 and both_served()) or sent == 63
        _on_a_new_connection(address, 77, False, last)
        sent += 1
        if last:
            break
    gained = _gained(workers, before, 1 + sent)
    assert sorted(gained) == [0, 1 + sent], gained
    assert both_served()
    endpoint.quiescent()


@pytest.mark.triton
def test_the_per_model_concurrency_gauge_is_the_fleets(
        tmp_path: Path, worker_addresses: list[str], endpoints: list[Endpoint]  # noqa: F811
        ) -> None:
    """Each router process counts the requests it holds per model; the supervisor's
    /metrics serves their sum (prometheus_client's livesum gauges), and a killed process's
    share leaves it."""
    endpoint = Endpoint(_write_config(tmp_path / "c.json", worker_addresses[:2], 2,
                                      metrics=True), 2)
    endpoints.append(endpoint)
    gauge = "tritonmesh_model_concurrent_requests"
    # Six generations of 1,200 tokens (6 s each at 5 ms a token) from six connections.
    thread, result = _in_background(endpoint.running.address, 6, max_tokens=1200)
    wait_for(lambda: endpoint.total() == 6, "six requests in flight")
    wait_for(lambda: _metric(endpoint, gauge) == 6, "the fleet's concurrency on /metrics",
             timeout=30)
    thread.join(90)
    assert result == [(6, [])]
    endpoint.quiescent()
    wait_for(lambda: _metric(endpoint, gauge) == 0, "the gauge back to 0", timeout=30)
    # A process SIGKILLed while it holds requests: its gauge file goes with it.
    thread, result = _in_background(endpoint.running.address, 6, max_tokens=1200)
    wait_for(lambda: endpoint.total() == 6, "six requests in flight")
    wait_for(lambda: _metric(endpoint, gauge) == 6, "the fleet's concurrency on /metrics",
             timeout=30)
    victim = max((1, 2), key=endpoint.held)
    held = endpoint.held(victim)
    pid = endpoint.router_pids()[victim]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: endpoint.table.pid(victim) not in (0, pid), "the router process restarted",
             timeout=60)
    wait_for(lambda: _metric(endpoint, gauge) <= 6 - held, "the killed process's share gone",
             timeout=30)
    thread.join(90)
    endpoint.quiescent()
