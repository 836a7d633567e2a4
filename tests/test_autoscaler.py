"""Autoscaling local workers: a scripted load scales a variant out to a second real Triton
worker and, when it falls, back in (drained, then stopped) with no failed request."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
from harness import LoopThread, generate_inputs
from tritonmesh.autoscale_config import Autoscaling
from tritonmesh.config import (
    ConfigError,
    EndpointConfig,
    HealthCheckConfig,
    LocalWorkers,
    VariantConfig,
    load_config,
)
from tritonmesh.endpoint import open_endpoint


class _Clients:
    """Closed-loop clients, each sending 50 ms generate_unary requests until stopped."""

    def __init__(self, address: str, count: int):
        self.address = address
        self.failures: list[BaseException] = []
        self.sent = 0
        self.stops = [threading.Event() for _ in range(count)]
        self.threads = [threading.Thread(target=self._run, args=(stop,), daemon=True)
                        for stop in self.stops]
        for t in self.threads:
            t.start()

    def _run(self, stop: threading.Event) -> None:
        with grpcclient.InferenceServerClient(self.address) as client:
            while not stop.is_set():
                try:
                    client.infer("generate_unary", generate_inputs(max_tokens=10),
                                 client_timeout=60)
                    self.sent += 1
                except Exception as exc:  # every failure fails the test
                    self.failures.append(exc)
                    return

    def keep(self, count: int) -> None:
        """Stop all but ``count`` clients (and wait for those stopped)."""
        for stop, thread in zip(self.stops[count:], self.threads[count:], strict=True):
            stop.set()
            thread.join(timeout=60)


def _until(what: str, check: Any, clients: _Clients, timeout: float = 180.0) -> None:
    """Wait for ``check()``; a deadline that passes is a failure, not a measurement."""
    deadline = time.monotonic() + timeout
    while not check():
        assert not clients.failures, clients.failures
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


@pytest.mark.triton
def test_scales_out_under_load_and_back_in_without_a_failed_request(
        loop_thread: LoopThread) -> None:
    spec = Autoscaling(min=1, max=2, target_concurrency=2, scale_out_cooldown_s=1.0,
                       scale_in_cooldown_s=2.0, interval_s=0.2, drain_timeout_s=30.0)
    config = EndpointConfig(
        name="scaling", listen="127.0.0.1:0", metrics_listen=None, admin_listen=None,
        variants=(VariantConfig("AllTraffic", local_workers=LocalWorkers(1, None, spec),
                                slow_start_s=0.0),),
        health_check=HealthCheckConfig(interval_s=0.5, timeout_s=1.0), shutdown_grace_s=1.0)
    stack = contextlib.AsyncExitStack()
    router = loop_thread.run(stack.enter_async_context(open_endpoint(config)), timeout=300)
    try:
        (scaler,) = router.autoscalers
        variant = router.balancer.by_name["AllTraffic"]
        first = scaler.pool.workers[0].address
        assert scaler.workers == 1
        # Six clients on one worker that runs one request at a time: about six outstanding,
        # three times the target; max is 2.
        clients = _Clients(router.address, 6)
        _until("a second worker joined", lambda: scaler.workers == 2, clients)
        (added,) = scaler.added
        second = [i for i in variant.live_instances() if i.address == added.address]
        # On the native data path: whether the router still had its connection to the
        # worker when the worker was told to stop (a drained instance's is closed first).
        native, connected_at_stop = router.native, []
        stop = added.stop

        async def stop_after_checking(grace: float = 10.0) -> None:
            assert native is not None
            connected_at_stop.append(native.pool.get(added.address) is not None)
            await stop(grace)

        if native is not None:
            added.stop = stop_after_checking  # type: ignore[method-assign]
        _until("the new worker served requests", lambda: second[0].requests >= 20, clients)
        # One client left: one worker carries it (1 <= target), so the newest drains and
        # stops while that client goes on.
        clients.keep(1)
        _until("scaled back in", lambda: scaler.workers == 1 and scaler.scaled_in == 1,
               clients)
        served = clients.sent
        _until("requests still served", lambda: clients.sent >= served + 10, clients)
        clients.keep(0)
        assert not clients.failures, clients.failures
        assert (scaler.scaled_out, scaler.scaled_in) == (1, 1)
        assert [i.address for i in variant.live_instances()] == [first]
        assert added.process is not None and added.process.returncode is not None
        assert connected_at_stop == ([] if native is None else [False])
        assert router.balancer.total_outstanding() == 0
    finally:
        loop_thread.run(stack.aclose(), timeout=120)


def test_autoscaling_keys_are_checked_by_name(tmp_path: Path) -> None:
    path = tmp_path / "endpoint.yaml"
    cases = {
        "{min: 1, max: 3, target_concurrency: 2}": None,
        "{min: 2, max: 1, target_concurrency: 2}": "local_workers.max: must be at least min",
        "{min: 1, max: 2}": "local_workers.target_concurrency: required",
        "{min: 1, max: 2, target_concurrency: 0}": "local_workers.target_concurrency: expected",
        "{min: 0, max: 2, target_concurrency: 1}": "local_workers.min: expected an integer",
        "{min: 1, max: 2, target_concurrency: 1, scale_in_cooldown_s: -1}":
            "local_workers.scale_in_cooldown_s: expected a finite number >= 0",
        "{min: 1, max: 2, target_concurrency: 1, interval_s: 0}": "local_workers.interval_s",
        "{count: 2, min: 1, max: 2, target_concurrency: 1}": "local_workers.count: not with",
    }
    for text, error in cases.items():
        path.write_text(f"variants:\n  - name: A\n    local_workers: {text}\n")
        if error is None:
            workers = load_config(path).variants[0].local_workers
            assert workers is not None and workers.count == 1
            assert workers.autoscaling == Autoscaling(min=1, max=3, target_concurrency=2.0)
        else:
            with pytest.raises(ConfigError, match=error):
                load_config(path)
