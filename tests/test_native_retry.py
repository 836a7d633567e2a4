"""Retries after a per-try timeout (``x-tritonmesh-retry-on: timeout``) served on the
native data path: the try on an instance that does not answer is reset and charged, and the
held first message goes whole to another instance, within ``retries.*``, as on grpc.aio's."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from harness import LoopThread, RouterHandle, make_config, serve_on, start_router, wait_for
from test_native_path import Holding
from tritonclient.utils import InferenceServerException
from tritonmesh.config import HealthCheckConfig, RetryConfig
from tritonmesh.native_config import native_available

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not native_available(), reason=(
        "the native data path's extension (tritonmesh._core._h2) is not built here")),
]

_RETRY_ON = {"x-tritonmesh-retry-on": "timeout"}


@pytest.fixture
def holding(loop_thread: LoopThread) -> Iterator[Holding]:
    fake = Holding(loop_thread)
    yield fake
    fake.stop()


@contextlib.contextmanager
def _native_router(monkeypatch: pytest.MonkeyPatch, loop_thread: LoopThread,
                   addresses: list[str]) -> Iterator[RouterHandle]:
    """A router serving ``data_path: native`` (a ModelInfer on grpc.aio's path fails the
    test) over ``addresses`` in round robin, with a 0.5 s per-try timeout and one retry per
    request, forwarding cancellations; health checks stay out of the way."""
    serve_on(monkeypatch, "native")
    # Holding never answers: a timed-out try is cancelled at once, not absorbed.
    config, instances = make_config(addresses, strategy="ROUND_ROBIN",
                                    variant_options={"per_try_timeout_s": 0.5,
                                                     "upstream_cancellation": "forward"})
    config = dataclasses.replace(config, health_check=HealthCheckConfig(interval_s=600.0),
                                 retries=RetryConfig(max_per_request=1))
    router = start_router(loop_thread, config, instances)
    try:
        yield router
        router.wait_idle()
    finally:
        router.stop()


def _large_inputs() -> tuple[list[grpcclient.InferInput], np.ndarray]:
    """identity's input of 2 MiB: more than a stream window, so the first try's first
    message left the router under flow control and the retry sends the peek's copy."""
    values = np.arange(1 << 19, dtype=np.float32)
    tensor = grpcclient.InferInput("INPUT0", [values.size], "FP32")
    tensor.set_data_from_numpy(values)
    return [tensor], values


def test_a_per_try_timeout_is_retried_natively(monkeypatch: pytest.MonkeyPatch,
                                               loop_thread: LoopThread, holding: Holding,
                                               worker_addresses: list[str]) -> None:
    inputs, values = _large_inputs()
    with _native_router(monkeypatch, loop_thread, [holding.address, worker_addresses[0]]) \
            as router, grpcclient.InferenceServerClient(router.address) as client:
        (hung,) = [i for i in router.instances() if i.address == holding.address]
        for k in range(2):  # round robin: one of them meets the instance that never answers
            result = client.infer("identity", inputs, request_id=f"r{k}", headers=_RETRY_ON,
                                  client_timeout=60)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), values)
            assert result.get_response().id == f"r{k}"
        (held,) = [request_id for _, request_id in holding.seen]
        # The try was cancelled upstream, charged to its instance, and the request retried
        # once.
        wait_for(lambda: holding.cancelled == [held], "the timed-out try's cancellation")
        assert hung.errors == 1 and router.balancer.retry_budget.retried == 1


def test_a_retry_past_max_per_request_says_why(monkeypatch: pytest.MonkeyPatch,
                                               loop_thread: LoopThread,
                                               holding: Holding) -> None:
    """The only instance does not answer (the timed-out one is left out of a retry's pick
    only while the variant has another): the retry meets it again, and past
    ``retries.max_per_request`` (1) the client gets DEADLINE_EXCEEDED naming the instance
    and why it was not sent again."""
    with _native_router(monkeypatch, loop_thread, [holding.address]) as router, \
            grpcclient.InferenceServerClient(router.address) as client:
        with pytest.raises(InferenceServerException) as caught:
            client.infer("identity", _large_inputs()[0], request_id="twice",
                         headers=_RETRY_ON, client_timeout=60)
        assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert f"upstream instance {holding.address} did not answer within " \
               "per_try_timeout_s (0.5 s) (not retried: this request's retries are used up)" \
               in (caught.value.message() or "")
        wait_for(lambda: holding.cancelled == ["twice", "twice"], "both tries' cancellations")
        assert router.balancer.retry_budget.retried == 1


def test_a_sequence_is_not_moved(monkeypatch: pytest.MonkeyPatch, loop_thread: LoopThread,
                                 holding: Holding) -> None:
    with _native_router(monkeypatch, loop_thread, [holding.address]) as router, \
            grpcclient.InferenceServerClient(router.address) as client:
        with pytest.raises(InferenceServerException) as caught:
            client.infer("identity", _large_inputs()[0], request_id="s", sequence_id=7,
                         sequence_start=True, headers=_RETRY_ON, client_timeout=60)
        assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert (caught.value.message() or "").endswith(
            f"upstream instance {holding.address} did not answer within per_try_timeout_s "
            "(0.5 s)")
        wait_for(lambda: holding.cancelled == ["s"], "the try's cancellation")
        assert router.balancer.retry_budget.retried == 0
