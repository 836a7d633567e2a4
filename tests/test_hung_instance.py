"""A hung instance (a real Triton, SIGSTOPped): the per-try timeout frees the requests stuck
on it, the outlier detector ejects it, and requests marked safe go elsewhere."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import signal
from collections.abc import Iterator
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
from harness import LoopThread, RouterHandle, identity_inputs, make_config, start_pool, start_router
from tritonclient.utils import InferenceServerException
from tritonmesh.config import HealthCheckConfig, RetryConfig, VariantConfig

pytestmark = pytest.mark.triton


@contextlib.contextmanager
def _one_to_stop(loop_thread: LoopThread, strategy: str, cancellation: str = "absorb"
                 ) -> Iterator[tuple[Any, RouterHandle]]:
    """Two real workers behind a router whose variant has a 1 s per-try timeout and whose
    health checks stay out of the way (only requests find a hung instance); the first worker
    is the test's to SIGSTOP, and it is SIGCONTed, by PID, whatever happens (before the
    counts are checked: absorbed calls end when it answers them)."""
    pool = start_pool(loop_thread, 2)
    stopped = pool.workers[0]
    assert stopped.pid is not None
    try:
        config, instances = make_config(pool.addresses, strategy=strategy)
        variant: VariantConfig = dataclasses.replace(
            config.variants[0], per_try_timeout_s=1.0, upstream_cancellation=cancellation)
        # The retry budget's floor covers the few retries.
        config = dataclasses.replace(config, variants=(variant,),
                                     health_check=HealthCheckConfig(interval_s=600.0),
                                     retries=RetryConfig(max_per_request=1))
        router = start_router(loop_thread, config, instances)
        try:
            yield stopped, router
            os.kill(stopped.pid, signal.SIGCONT)
            router.wait_idle()
        finally:
            os.kill(stopped.pid, signal.SIGCONT)
            router.stop()
    finally:
        loop_thread.run(pool.stop(grace=5.0), timeout=60)


@pytest.mark.parametrize("cancellation", ["absorb", "forward"])
@pytest.mark.parametrize("retry", [True, False])
def test_a_stopped_instance_costs_only_per_try_timeouts(loop_thread: LoopThread,
                                                       retry: bool, cancellation: str) -> None:
    """Its clients are answered after the per-try timeout either way; an absorbed attempt
    stays counted on the instance (Triton holds it) until Triton answers it."""
    with _one_to_stop(loop_thread, "RANDOM", cancellation) as (stopped, router):
        (hung,) = [i for i in router.instances() if i.address == stopped.address]
        headers = {"x-tritonmesh-retry-on": "timeout"} if retry else None
        failures = []
        os.kill(stopped.pid, signal.SIGSTOP)
        with grpcclient.InferenceServerClient(router.address) as client:
            for _ in range(40):
                try:
                    result = client.infer("identity", identity_inputs(), headers=headers,
                                          client_timeout=60)
                    assert result.as_numpy("OUTPUT0").tolist() == [0, 1, 2]
                except InferenceServerException as exc:
                    failures.append(exc)
        # Five per-try timeouts in a row eject it; after that RANDOM never picks it.
        assert hung.ejections == 1 and hung.ejected and not hung.pickable
        if cancellation == "absorb":
            assert (hung.outstanding, hung.errors) == (5, 0)
            os.kill(stopped.pid, signal.SIGCONT)
            router.wait_idle()
        else:
            assert hung.outstanding == 0
        assert hung.errors == 5
        if retry:
            assert failures == []
            assert router.balancer.retry_budget.retried == 5
        else:
            assert len(failures) == 5
            for exc in failures:
                assert exc.status() == "StatusCode.DEADLINE_EXCEEDED"
                assert f"upstream instance {stopped.address} did not answer within " \
                       "per_try_timeout_s (1 s)" in (exc.message() or "")


def test_an_unknown_retry_on_value_is_refused(make_router: Any) -> None:
    router = make_router()
    with grpcclient.InferenceServerClient(router.address) as client:
        with pytest.raises(InferenceServerException) as refused:
            client.infer("identity", identity_inputs(),
                         headers={"x-tritonmesh-retry-on": "timeout,5xx"})
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "x-tritonmesh-retry-on: unknown value '5xx' (known: timeout)" in \
        (refused.value.message() or "")


def test_a_stream_request_sent_as_unary_gets_the_per_try_timeout(loop_thread: LoopThread) -> None:
    with _one_to_stop(loop_thread, "ROUND_ROBIN") as (stopped, router):
        results: queue.Queue[Any] = queue.Queue()
        with grpcclient.InferenceServerClient(router.address) as client:
            client.start_stream(callback=lambda result, error: results.put((result, error)),
                                stream_timeout=60)
            # identity's policy (not decoupled) is asked once, while nothing hangs.
            client.async_stream_infer("identity", identity_inputs(), request_id="warm")
            assert results.get(timeout=30)[1] is None
            os.kill(stopped.pid, signal.SIGSTOP)
            for k in range(2):  # round robin: one of them meets the stopped worker
                client.async_stream_infer("identity", identity_inputs(), request_id=f"r{k}")
            answers = [results.get(timeout=30) for _ in range(2)]
            client.stop_stream()
        errors = [str(error) for _, error in answers if error is not None]
        assert len(errors) == 1, answers
        assert f"upstream instance {stopped.address} did not answer within " \
               "per_try_timeout_s (1 s)" in errors[0]
