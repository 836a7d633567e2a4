"""Staying up: dead and dying workers, draining, membership changes, shutdown.

Load here is bounded in count and time and goes only to 127.0.0.1.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from harness import (
    LongStream,
    LoopThread,
    admin_stub,
    descendants,
    generate_inputs,
    make_config,
    start_pool,
    start_router,
)
from tritonclient.utils import InferenceServerException
from tritonmesh._pb import tritonmesh_admin_pb2 as apb
from tritonmesh.balancer import Instance
from tritonmesh.health import HealthChecker
from tritonmesh.workers.launcher import free_ports

pytestmark = pytest.mark.triton


def _unary_generate(address: str, max_tokens: int, timeout: float = 60) -> list[int]:
    with grpcclient.InferenceServerClient(address) as client:
        result = client.infer("generate_unary", generate_inputs(max_tokens),
                              client_timeout=timeout)
        return [int(v) for v in result.as_numpy("TOKENS")]


def _identity(address: str) -> None:
    with grpcclient.InferenceServerClient(address) as client:
        x = grpcclient.InferInput("INPUT0", [1], "FP32")
        x.set_data_from_numpy(np.ones(1, dtype=np.float32))
        client.infer("identity", [x], client_timeout=30)


@pytest.mark.parametrize("streamed", [False, True])
def test_drain_timeout_cancels_and_releases(make_router: Any, worker_addresses: list[str],
                                            streamed: bool) -> None:
    """A drain that times out removes the instance with requests still on it; they are
    cancelled, every count returns to zero, and the router keeps serving."""
    router = make_router(strategy="LEAST_OUTSTANDING_REQUESTS", workers=2)
    leaving = router.instances()[1]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        if streamed:
            busy = LongStream(router.address)  # 2000 tokens, about 4 s
        else:
            slow = [pool.submit(_unary_generate, router.address, 2000) for _ in range(2)]
        deadline = time.monotonic() + 30
        while leaving.outstanding == 0:  # a long request runs on the leaving instance
            assert time.monotonic() < deadline
            time.sleep(0.005)
        removed = admin_stub(router.admin_address).RemoveInstance(
            apb.RemoveInstanceRequest(variant="AllTraffic", address=leaving.address,
                                      drain_timeout_s=0.2), timeout=30)
        assert not removed.drained
        if streamed:
            # The stream stays open; its request on the removed instance fails in-stream.
            deadline = time.monotonic() + 30
            while not isinstance(outcome := busy.results.get(timeout=30),
                                 InferenceServerException):
                assert time.monotonic() < deadline, "no error for the cancelled request"
            assert "was removed from the router" in outcome.message()
            busy.stop()
        else:
            outcomes = []
            for future in slow:
                try:
                    outcomes.append(len(future.result(timeout=60)))
                except InferenceServerException as exc:
                    outcomes.append(exc.status())
            # The one on the removed instance is cancelled at once, with that status;
            # the other runs to its end.
            assert sorted(map(str, outcomes)) == ["2000", "StatusCode.CANCELLED"]
    router.wait_idle()
    assert leaving.outstanding == 0
    assert _unary_generate(router.address, 3) == [0, 1, 2]


def test_drain_under_load_fails_nothing(make_router: Any, worker_addresses: list[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests running on the leaving instance when its drain begins all finish, and
    successfully; the router's own record, taken on its loop as the drain begins, says
    how many there were (at least one, or the test proves nothing)."""
    from tritonmesh import membership

    router = make_router(strategy="LEAST_OUTSTANDING_REQUESTS", workers=2)
    leaving = worker_addresses[1]
    instance = next(i for i in router.instances() if i.address == leaving)
    at_drain: list[tuple[int, int, int]] = []
    drain = membership.drain

    async def recorded_drain(drained: Any, timeout_s: float) -> bool:
        # Nothing runs on the loop between this and the drain's stop of new picks.
        at_drain.append((drained.outstanding, drained.requests, drained.errors))
        return await drain(drained, timeout_s)

    monkeypatch.setattr(membership, "drain", recorded_drain)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        # 100 tokens, about 0.5 s each: four clients keep both instances busy for seconds.
        work = [pool.submit(_unary_generate, router.address, 100) for _ in range(24)]
        deadline = time.monotonic() + 30
        while instance.outstanding == 0:  # requests are in flight on the leaving instance
            assert time.monotonic() < deadline
            time.sleep(0.005)
        admin = admin_stub(router.admin_address)
        removed = admin.RemoveInstance(
            apb.RemoveInstanceRequest(variant="AllTraffic", address=leaving,
                                      drain_timeout_s=60), timeout=90)
        results = [f.result(timeout=120) for f in work]
    ((in_flight, served, errors),) = at_drain
    assert in_flight > 0
    # Each of them ended there, none failed, and nothing new was sent there.
    assert (instance.requests, instance.errors) == (served + in_flight, errors)
    assert removed.drained and removed.instance.outstanding == 0
    assert all(r == list(range(100)) for r in results)
    listing = admin.ListInstances(apb.ListInstancesRequest(), timeout=10)
    assert [i.address for i in listing.instances] == [worker_addresses[0]]
    # And back again: the instance serves new requests.
    added = admin.AddInstance(apb.AddInstanceRequest(variant="AllTraffic", address=leaving),
                              timeout=10)
    assert added.state == "ACTIVE"
    for _ in range(6):
        _identity(router.address)
    served = {i.address: i.requests for i in router.instances()}
    assert served[leaving] > 0
    with pytest.raises(grpc.RpcError) as info:
        admin.AddInstance(apb.AddInstanceRequest(variant="AllTraffic", address=leaving),
                          timeout=10)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_instance_that_fails_fast_is_taken_out(make_router: Any,
                                               worker_addresses: list[str]) -> None:
    """A Triton that lost its model answers every request for it at once, with an error:
    to least-outstanding routing it looks idle and would attract everything. It must leave
    the pick set instead, and come back once the model is back."""
    router = make_router(strategy="LEAST_OUTSTANDING_REQUESTS", workers=2, models=["identity"])
    bad_address = worker_addresses[0]
    (bad,) = [i for i in router.instances() if i.address == bad_address]
    values = np.ones(4, dtype=np.float32)
    inputs = [grpcclient.InferInput("INPUT0", [4], "FP32")]
    inputs[0].set_data_from_numpy(values)
    with grpcclient.InferenceServerClient(bad_address) as direct, \
            grpcclient.InferenceServerClient(router.address) as client:
        direct.unload_model("identity")
        try:
            failed = sent = 0
            deadline = time.monotonic() + 20
            while bad.pickable:  # until a health check or the outlier detector sees it
                assert time.monotonic() < deadline, f"still picked after {sent} requests"
                sent += 1
                try:
                    client.infer("identity", inputs)
                except InferenceServerException as exc:
                    failed += 1
                    assert "identity" in exc.message()
            assert failed < sent  # the healthy instance served the rest meanwhile
            before = bad.requests
            for _ in range(50):  # raises on any failure
                client.infer("identity", inputs)
            assert bad.requests == before
        finally:
            direct.load_model("identity")
    deadline = time.monotonic() + 30
    while not bad.pickable:
        assert time.monotonic() < deadline, "the instance did not come back"
        time.sleep(0.05)


def test_health_checks_fail_open(make_router: Any, worker_addresses: list[str]) -> None:
    """Failed health checks never take a variant's last healthy instance out: requests keep
    going to it and get Triton's own answer, rather than the router's "no healthy instance"
    for a whole fleet that a starved machine made miss its probes."""
    router = make_router(strategy="LEAST_OUTSTANDING_REQUESTS", workers=1, models=["identity"])
    (only,) = router.instances()
    inputs = [grpcclient.InferInput("INPUT0", [2], "FP32")]
    inputs[0].set_data_from_numpy(np.ones(2, dtype=np.float32))
    checker = router.router.health
    assert checker is not None
    with grpcclient.InferenceServerClient(worker_addresses[0]) as direct, \
            grpcclient.InferenceServerClient(router.address) as client:
        direct.unload_model("identity")
        try:
            for _ in range(3):  # more failed rounds than unhealthy_threshold
                router.loop.run(checker.check_once())
            assert checker._streak[only] <= -3 and only.healthy
            with pytest.raises(InferenceServerException) as info:
                client.infer("identity", inputs)
            assert "identity" in info.value.message()
            assert "no healthy instance" not in info.value.message()  # Triton's own answer
            assert _serving(router.address) is False  # readiness still tells the truth
        finally:
            direct.load_model("identity")
    router.loop.run(checker.check_once())
    assert _serving(router.address) is True
    with grpcclient.InferenceServerClient(router.address) as client:
        assert client.infer("identity", inputs).as_numpy("OUTPUT0").tolist() == [1.0, 1.0]


def test_an_instance_removed_mid_probe_costs_the_round_nothing(
        make_router: Any, worker_addresses: list[str]) -> None:
    """An instance removed, and its channel closed, while a health round is probing it: its
    probe fails on the closed channel, and the round still records every other instance
    (the round used to fail whole, and its logged traceback kept the removed Upstream)."""
    router = make_router(workers=2)
    variant = router.balancer.by_name["AllTraffic"]
    checker = router.router.health
    assert checker is not None

    async def add() -> Any:
        return variant.add(variant.connect(worker_addresses[2]))

    doomed = router.loop.run(add())

    class RemovedMidProbe(HealthChecker):
        async def probe(self, instance: Instance) -> bool:
            if instance is doomed:
                variant.remove(instance)
                await instance.upstream.close(grace=0)
            return await super().probe(instance)

    racing = RemovedMidProbe(router.balancer, checker.config)
    router.loop.run(racing.check_once())
    assert doomed.removed
    assert sorted(i.address for i in racing._streak) == sorted(worker_addresses[:2])
    assert set(racing._streak.values()) == {1}  # both live instances passed, once
    router.loop.run(racing.check_once())
    assert set(racing._streak.values()) == {2}


def _serving(address: str) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=5)
    return bool(status.status == health_pb2.HealthCheckResponse.SERVING)


def test_new_instance_slow_starts(make_router: Any, worker_addresses: list[str]) -> None:
    """An instance added while serving is not handed every new request because it has none
    outstanding: it starts at a tenth of its weight and ramps up over slow_start_s."""
    router = make_router(strategy="LEAST_OUTSTANDING_REQUESTS", workers=1, slow_start_s=2.0)
    variant = router.balancer.variants[0]
    (old,) = router.instances()
    busy = LongStream(router.address)
    try:
        router.loop.run(router.router.update_instances(
            {"AllTraffic": worker_addresses[:2]}))
        (new,) = [i for i in router.instances() if i is not old]
        assert variant.table.snapshot()[new.slot][2] == pytest.approx(0.1)
        # old: 1 outstanding, (1 + 1) / 1 = 2; new: (0 + 1) / 0.1 = 10. Without slow start
        # these would all go to the new instance; with it they go to old while it ramps.
        for _ in range(3):
            assert _unary_generate(router.address, 1) == [0]
        assert new.requests == 0 and old.requests == 3
        deadline = time.monotonic() + 30
        while variant.table.snapshot()[new.slot][2] < 1.0:
            assert time.monotonic() < deadline, "the ramp did not finish"
            time.sleep(0.05)
        assert _unary_generate(router.address, 1) == [0]
        assert new.requests == 1  # full weight, idle: least outstanding
    finally:
        busy.stop()


def test_dead_instance_is_ejected_and_requests_go_elsewhere(loop_thread: LoopThread,
                                                           worker_addresses: list[str]
                                                           ) -> None:
    dead = f"127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    config, instances = make_config([dead, worker_addresses[0]],
                                    strategy="LEAST_OUTSTANDING_REQUESTS")
    router = start_router(loop_thread, config, instances)
    try:
        for _ in range(20):
            _identity(router.address)  # every one succeeds: never-sent requests retry
        by_address = {i.address: i for i in router.instances()}
        assert not by_address[dead].pickable  # ejected, or failed its health checks
        assert by_address[dead].requests <= 2  # it failed fast, then left the pick set
        assert by_address[worker_addresses[0]].requests == 20
        router.wait_idle()
    finally:
        router.stop()


def test_every_instance_down_is_an_immediate_clear_unavailable(loop_thread: LoopThread) -> None:
    dead = [f"127.0.0.1:{p}" for p in free_ports(2)]
    config, instances = make_config(dead)
    router = start_router(loop_thread, config, instances)
    try:
        for _ in range(3):
            start = time.monotonic()
            with pytest.raises(InferenceServerException) as info:
                _identity(router.address)
            assert info.value.status() == "StatusCode.UNAVAILABLE"
            assert time.monotonic() - start < 10  # no hang waiting on dead connections
        assert "no healthy instance" in info.value.message()
        router.wait_idle()
    finally:
        router.stop()


def test_graceful_shutdown_finishes_in_flight(loop_thread: LoopThread,
                                              worker_addresses: list[str]) -> None:
    config, instances = make_config(worker_addresses[:1])
    router = start_router(loop_thread, config, instances)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_unary_generate, router.address, 100)  # about 0.5 s of work
        deadline = time.monotonic() + 30
        while router.total_outstanding() == 0:
            assert time.monotonic() < deadline, "the request never reached the router"
            time.sleep(0.01)
        loop_thread.run(router.router.stop(grace=30))
        assert pending.result(timeout=60) == list(range(100))
    assert router.total_outstanding() == 0


def test_sigkill_under_load_fails_only_in_flight(loop_thread: LoopThread) -> None:
    pool = start_pool(loop_thread, 3, restart=True)
    config, instances = make_config(pool.addresses, strategy="LEAST_OUTSTANDING_REQUESTS")
    router = start_router(loop_thread, config, instances)
    victim = pool.workers[0]
    outcomes: queue.Queue[tuple[float, str]] = queue.Queue()
    stop_at = time.monotonic() + 8.0

    def user() -> None:
        while time.monotonic() < stop_at:
            try:
                _unary_generate(router.address, 20, timeout=30)  # about 0.1 s each
                outcomes.put((time.monotonic(), "ok"))
            except InferenceServerException as exc:
                outcomes.put((time.monotonic(), f"{exc.status()} {exc.message()}"))

    try:
        with concurrent.futures.ThreadPoolExecutor(6) as threads:
            users = [threads.submit(user) for _ in range(6)]
            time.sleep(2.0)
            in_flight = next(i for i in router.instances()
                             if i.address == victim.address).outstanding
            assert victim.pid is not None
            killed_at = time.monotonic()
            os.kill(victim.pid, signal.SIGKILL)
            for u in users:
                u.result(timeout=60)  # no client hangs
        results = []
        while not outcomes.empty():
            results.append(outcomes.get())
        failures = [(t, r) for t, r in results if r != "ok"]
        # Only requests in flight on the killed worker fail, and they say UNAVAILABLE.
        assert failures, "the killed worker had requests in flight"
        assert len(failures) <= in_flight + 1, (in_flight, failures)
        assert all(r.startswith("StatusCode.UNAVAILABLE") for _, r in failures), failures
        # Traffic moved to the others within a second.
        late_ok = [t for t, r in results if r == "ok" and t > killed_at + 1.0]
        assert late_ok and all(t < killed_at + 1.0 for t, _ in failures)
        # The supervisor restarts the worker; health checks bring it back into the pick set.
        deadline = time.monotonic() + 120
        while True:
            instance = next(i for i in router.instances() if i.address == victim.address)
            if instance.pickable and victim.returncode is None and victim.pid is not None:
                try:
                    _identity(victim.address)
                    break
                except InferenceServerException:
                    pass
            assert time.monotonic() < deadline, "the restarted worker never rejoined"
            time.sleep(0.2)
        router.wait_idle()
    finally:
        router.stop()
        loop_thread.run(pool.stop(grace=5.0), timeout=60)


def test_worker_killed_mid_stream_fails_only_its_request(loop_thread: LoopThread) -> None:
    """Two long generations on one client stream, one per instance; the worker under one of
    them is killed. That request ends with an in-stream error, the other runs to its last
    token, the stream goes on serving, and nothing stays outstanding."""
    pool = start_pool(loop_thread, 2)
    config, instances = make_config(pool.addresses, strategy="LEAST_OUTSTANDING_REQUESTS")
    router = start_router(loop_thread, config, instances)
    victim = pool.workers[0]
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    inputs = generate_inputs(300)
    try:
        with grpcclient.InferenceServerClient(router.address) as client:
            client.start_stream(callback=lambda result, error: results.put((result, error)))
            for rid in ("a", "b"):
                client.async_stream_infer("generate", inputs, request_id=rid)
            # Least outstanding puts them on different instances (1 vs 0 at the second pick).
            deadline = time.monotonic() + 30
            while router.total_outstanding() < 2:
                assert time.monotonic() < deadline, "the requests never reached the router"
                time.sleep(0.01)
            assert sorted(i.outstanding for i in router.instances()) == [1, 1]
            first, error = results.get(timeout=30)  # generation is under way
            assert error is None
            assert victim.pid is not None
            os.kill(victim.pid, signal.SIGKILL)
            tokens: dict[str, int] = {first.get_response().id: 1}
            errors = []
            while max(tokens.values(), default=0) < 300 or not errors:
                try:
                    result, error = results.get(timeout=60)
                except queue.Empty:
                    counts = [i.outstanding for i in router.instances()]
                    raise AssertionError(f"stuck: tokens {tokens}, errors {errors}, "
                                         f"outstanding {counts}") from None
                if error is not None:
                    errors.append(str(error))
                else:
                    rid = result.get_response().id
                    tokens[rid] = tokens.get(rid, 0) + 1
            (survivor,) = [rid for rid, n in tokens.items() if n >= 300]
            assert tokens[survivor] == 300, tokens  # every token, none lost or doubled
            assert len(errors) == 1 and f"upstream instance {victim.address}" in errors[0], errors
            # Health checks take the dead instance out; the same stream keeps serving.
            (dead,) = [i for i in router.instances() if i.address == victim.address]
            deadline = time.monotonic() + 30
            while dead.pickable:
                assert time.monotonic() < deadline, "the dead instance stayed in the pick set"
                time.sleep(0.05)
            client.async_stream_infer("generate", inputs, request_id="c")
            more = [results.get(timeout=60) for _ in range(300)]
            assert all(e is None for _, e in more)
            assert {r.get_response().id for r, _ in more} == {"c"}
            client.stop_stream()
        router.wait_idle()
    finally:
        router.stop()
        loop_thread.run(pool.stop(grace=5.0), timeout=60)


@pytest.mark.parametrize(("message", "blamed"), [
    ("Stub process 'generate_0_0' is not healthy.", True),  # Triton 2.51, the stub died
    ("Request for unknown model: 'x' is not found", False),  # the client's mistake
    ("PROMPT_TOKENS must be >= 0 and MAX_TOKENS between 0 and 100000, got -1 and 4", False),
    ("", False),
])
def test_which_in_stream_errors_blame_the_instance(message: str, blamed: bool) -> None:
    from tritonmesh.outlier import blames_instance

    assert blames_instance(message) is blamed


def _stream_one(client: grpcclient.InferenceServerClient,
                results: queue.Queue[tuple[Any, Any]], tokens: int) -> str | None:
    """One generation on the client's stream: None if every token came, else the error."""
    client.async_stream_infer("generate", generate_inputs(tokens))
    for _ in range(tokens):
        _, error = results.get(timeout=60)
        if error is not None:
            return str(error)
    return None


def test_in_stream_failures_of_a_broken_instance_eject_it(loop_thread: LoopThread) -> None:
    """Triton's Python backend stub dies: the model still reports READY, so health checks
    pass, and every stream request there fails at once, in-stream, with no status code.
    To least-outstanding routing that instance looks idle; the outlier detector must read
    the in-stream errors, take it out, and let the stream's requests go elsewhere."""
    pool = start_pool(loop_thread, 2)
    config, instances = make_config(pool.addresses, strategy="LEAST_OUTSTANDING_REQUESTS")
    router = start_router(loop_thread, config, instances)
    victim = pool.workers[0]
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    try:
        assert victim.pid is not None
        stubs = [pid for pid in descendants(victim.pid)
                 if b"/generate/1/model.py" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(stubs) == 1, stubs
        # Ejected for 30 s, not 1: the follow-up requests below must not race the back-off.
        router.balancer.outliers.base_ejection_s = 30.0
        os.kill(stubs[0], signal.SIGKILL)
        (bad,) = [i for i in router.instances() if i.address == victim.address]
        with grpcclient.InferenceServerClient(router.address) as client:
            client.start_stream(callback=lambda result, error: results.put((result, error)))
            failed = sent = 0
            while bad.pickable:
                assert sent < 50, f"still picked after {sent} requests ({failed} failed)"
                sent += 1
                error = _stream_one(client, results, 4)
                if error is not None:
                    failed += 1
                    assert "is not healthy" in error, error
            assert failed >= 5  # the detector's run of consecutive failures, no fewer
            # Out of the pick set: the stream's next requests all succeed elsewhere.
            before = bad.requests
            for _ in range(10):
                assert _stream_one(client, results, 4) is None
            assert bad.requests == before
            client.stop_stream()
        router.wait_idle()
    finally:
        router.stop()
        loop_thread.run(pool.stop(grace=5.0), timeout=60)


def test_sighup_reload_adds_and_drains(tmp_path: Path, worker_addresses: list[str]) -> None:
    tritonmesh = str(Path(sys.executable).parent / "tritonmesh")
    config = tmp_path / "endpoint.yaml"

    def write(addresses: list[str]) -> None:
        config.write_text("listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n"
                          "metrics_listen: null\nvariants:\n"
                          f"  - name: AllTraffic\n    instances: {addresses!r}\n")

    def listed(address: str) -> list[str]:
        response = admin_stub(address).ListInstances(apb.ListInstancesRequest(), timeout=10)
        return sorted(i.address for i in response.instances)

    write(worker_addresses[:1])
    process = subprocess.Popen([tritonmesh, "serve", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        address = admin = ""
        for line in process.stdout:
            if "serving Triton's gRPC protocol on" in line:
                address = line.split()[-1]
            if line.startswith("  admin API: "):  # the banner's line, not the log's
                admin = line.split()[-1]
                break
        assert address and admin, "no banner"
        assert listed(admin) == worker_addresses[:1]
        for wanted in (sorted(worker_addresses[1:3]), sorted(worker_addresses[:1])):
            write(wanted)
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while listed(admin) != wanted:
                assert time.monotonic() < deadline, f"reload did not apply {wanted}"
                time.sleep(0.1)
            _identity(address)
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)
    assert process.returncode == 0


def test_a_failed_request_is_released_before_its_client_hears(make_router: Any) -> None:
    """grpc.aio's abort() sends the status before it raises: a release in a finally block
    after it ran once the client already had its error (a count still 1, a failure not
    yet recorded). The answer must come after the release."""
    router = make_router(strategy="LEAST_OUTSTANDING_REQUESTS", workers=1)
    (instance,) = router.instances()
    inputs = [grpcclient.InferInput("INPUT0", [4], "FP32")]
    inputs[0].set_data_from_numpy(np.ones(4, dtype=np.float32))
    before = instance.requests
    with grpcclient.InferenceServerClient(router.address) as client:
        for n in range(1, 501):
            with pytest.raises(InferenceServerException, match="no_such_model"):
                client.infer("no_such_model", inputs)
            assert (instance.outstanding, instance.requests - before) == (0, n)
