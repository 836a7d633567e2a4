"""Per endpoint, variant and model metrics, checked against requests sent through real
Triton: counts exact, latencies positive and in the order the models' work implies, errors
counted by code and class, concurrency back to 0, labels only from the configuration."""

from __future__ import annotations

import queue
import threading
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from harness import LongStream, RouterHandle, generate_inputs
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException
from tritonmesh.metrics import BalancerCollector

pytestmark = pytest.mark.triton

MODELS = ["identity", "generate", "generate_unary"]


def _samples(handle: RouterHandle) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every tritonmesh_model_* sample as Prometheus would scrape it, by name and labels."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(BalancerCollector(handle.balancer, "test"))
    text = generate_latest(registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            if family.name.startswith("tritonmesh_model_") for s in family.samples}


def _get(samples: dict[Any, float], name: str, model: str, **labels: str) -> float:
    key = frozenset({"endpoint": "test", "variant": "AllTraffic", "model": model,
                     **labels}.items())
    return samples[(name, key)]


def _identity() -> list[Any]:
    x = grpcclient.InferInput("INPUT0", [4], "FP32")
    x.set_data_from_numpy(np.arange(4, dtype=np.float32))
    return [x]


def _infer_error(client: Any, model: str, inputs: list[Any], **kwargs: Any) -> str:
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, inputs, **kwargs)
    return str(info.value.status())


def test_a_variant_listing_no_models_names_what_triton_serves(make_router: Any) -> None:
    """Without ``models``, the labels are the models Triton reports READY (asked by the
    health checker before the router serves), and request names still never become one."""
    router = make_router()  # the variant lists no models
    with grpcclient.InferenceServerClient(router.address) as client:
        for _ in range(3):
            client.infer("identity", _identity())
        assert _infer_error(client, "no_such_model", _identity()) == "StatusCode.NOT_FOUND"
    router.wait_idle()
    s = _samples(router)
    invocations = "tritonmesh_model_invocations_total"
    assert (_get(s, invocations, "identity"), _get(s, invocations, "other")) == (3, 1)
    served = {dict(labels)["model"] for name, labels in s if name == invocations}
    assert {"identity", "generate", "generate_unary", "other"} <= served
    assert "no_such_model" not in served


def test_unary_counts_latencies_and_errors(make_router: Any) -> None:
    router = make_router(models=MODELS)
    with grpcclient.InferenceServerClient(router.address) as client:
        for _ in range(10):
            client.infer("identity", _identity())
        for _ in range(4):
            client.infer("generate_unary", generate_inputs(max_tokens=8))
        for _ in range(3):  # Triton's own refusal, a client error
            assert _infer_error(client, "generate_unary", generate_inputs(max_tokens=-1)) \
                == "StatusCode.INVALID_ARGUMENT"
        for _ in range(2):  # a name no variant lists: counted as "other", never by name
            assert _infer_error(client, "no_such_model", _identity()) \
                == "StatusCode.NOT_FOUND"
    router.wait_idle()
    s = _samples(router)
    invocations = "tritonmesh_model_invocations_total"
    assert [_get(s, invocations, m) for m in (*MODELS, "other")] == [10, 0, 7, 2]
    assert _get(s, "tritonmesh_model_invocation_errors_total", "generate_unary",
                code="INVALID_ARGUMENT", **{"class": "4xx"}) == 3
    assert _get(s, "tritonmesh_model_invocation_errors_total", "other",
                code="NOT_FOUND", **{"class": "4xx"}) == 2
    assert not any("no_such_model" in str(key) for key in s)
    assert all(_get(s, "tritonmesh_model_concurrent_requests", m) == 0
               for m in (*MODELS, "other"))
    for model, n in (("identity", 10), ("generate_unary", 7)):
        for name in ("latency", "overhead_latency", "queue_wait"):
            assert _get(s, f"tritonmesh_model_{name}_seconds_count", model) == n
        assert _get(s, "tritonmesh_model_latency_seconds_sum", model) > 0
        assert _get(s, "tritonmesh_model_overhead_latency_seconds_sum", model) > 0
        assert _get(s, "tritonmesh_model_queue_wait_seconds_sum", model) == 0  # no limit
    # 8 tokens at 5 ms each: every successful generate_unary took at least 40 ms in Triton.
    generated = _get(s, "tritonmesh_model_latency_seconds_bucket", "generate_unary", le="0.025")
    assert generated <= 3  # only the three refused ones can be that fast
    assert _get(s, "tritonmesh_model_latency_seconds_sum", "generate_unary") >= 4 * 0.040


def _stream(address: str, requests: list[tuple[str, list[Any]]]) -> list[Any]:
    """Send ``requests`` on one stream; every response or error, once all finals came."""
    results: queue.Queue[Any] = queue.Queue()
    with grpcclient.InferenceServerClient(address) as client:
        client.start_stream(callback=lambda result, error: results.put(error or result))
        for i, (model, inputs) in enumerate(requests):
            client.async_stream_infer(model, inputs, request_id=str(i))
        client.stop_stream()  # waits for every final
    out = []
    while not results.empty():
        out.append(results.get())
    return out


def test_stream_first_and_between_responses(make_router: Any) -> None:
    router = make_router(models=MODELS)
    responses = _stream(router.address, [
        *[("generate", generate_inputs(max_tokens=10)) for _ in range(3)],
        ("identity", _identity()),  # not decoupled: sent as ModelInfer, one response
        ("generate", [*generate_inputs(max_tokens=-1)]),  # Triton's in-stream error
    ])
    assert sum(isinstance(r, InferenceServerException) for r in responses) == 1
    router.wait_idle()
    s = _samples(router)
    assert _get(s, "tritonmesh_model_invocations_total", "generate") == 4
    assert _get(s, "tritonmesh_model_invocations_total", "identity") == 1
    assert _get(s, "tritonmesh_model_invocation_errors_total", "generate",
                code="UNKNOWN", **{"class": "5xx"}) == 1
    first = "tritonmesh_model_stream_time_to_first_response_seconds"
    between = "tritonmesh_model_stream_time_between_responses_seconds"
    # Ten tokens each: one first response and nine after it; the refused one answers once.
    assert _get(s, f"{first}_count", "generate") == 4
    assert _get(s, f"{between}_count", "generate") == 27
    assert _get(s, f"{first}_count", "identity") == 1
    assert _get(s, f"{between}_count", "identity") == 0
    # The first token comes after a 5 ms decode step; the whole generation after ten.
    assert _get(s, f"{first}_sum", "generate") >= 3 * 0.005
    assert _get(s, "tritonmesh_model_latency_seconds_sum", "generate") >= 3 * 0.050
    assert _get(s, "tritonmesh_model_concurrent_requests", "generate") == 0


def test_queue_wait_concurrency_and_refusals(make_router: Any) -> None:
    router = make_router(models=MODELS, workers=1, max_concurrency=1, max_queue=1)
    variant = router.balancer.by_name["AllTraffic"]
    long = LongStream(router.address)  # holds the only instance
    try:
        s = _samples(router)
        assert _get(s, "tritonmesh_model_concurrent_requests", "generate") == 1
        answers: queue.Queue[Any] = queue.Queue()

        def waiting() -> None:
            with grpcclient.InferenceServerClient(router.address) as client:
                answers.put(client.infer("identity", _identity(), client_timeout=60))
        waiter = threading.Thread(target=waiting)
        waiter.start()
        while not len(variant.waiters):
            threading.Event().wait(0.01)
        with grpcclient.InferenceServerClient(router.address) as client:
            # The queue (max_queue 1) is full: refused at once, a client-class error.
            assert _infer_error(client, "identity", _identity()) \
                == "StatusCode.RESOURCE_EXHAUSTED"
    finally:
        long.stop()
    waiter.join(timeout=60)
    assert answers.get_nowait().as_numpy("OUTPUT0") is not None
    with grpcclient.InferenceServerClient(router.address) as client:
        # Alone in the queue until its deadline, behind another long generation.
        long = LongStream(router.address)
        try:
            assert _infer_error(client, "identity", _identity(), client_timeout=0.3) \
                == "StatusCode.DEADLINE_EXCEEDED"
        finally:
            long.stop()
    router.wait_idle()
    s = _samples(router)
    errors = "tritonmesh_model_invocation_errors_total"
    assert _get(s, "tritonmesh_model_invocations_total", "identity") == 3
    assert _get(s, errors, "identity", code="RESOURCE_EXHAUSTED", **{"class": "4xx"}) == 1
    assert _get(s, errors, "identity", code="DEADLINE_EXCEEDED", **{"class": "5xx"}) == 1
    assert _get(s, errors, "generate", code="CANCELLED", **{"class": "4xx"}) == 2
    # Two waited (one until it was served, one until its deadline), one was refused at once.
    wait = "tritonmesh_model_queue_wait_seconds"
    assert _get(s, f"{wait}_count", "identity") == 3
    waited = _get(s, f"{wait}_sum", "identity")
    assert waited > 0
    # The router's own time includes the queue wait.
    assert _get(s, "tritonmesh_model_overhead_latency_seconds_sum", "identity") >= waited
    assert _get(s, "tritonmesh_model_concurrent_requests", "generate") == 0
