"""A plain native ``ModelInfer`` (no metadata the router acts on, no deadline) goes the short
way through the policy: no ``Request`` unless a retry needs one, the plain request headers
looked up in one step, the instance's counts taken in ``Lease.release``. One with a
deadline goes the general way. Both must leave the router knowing the same things."""

from __future__ import annotations

from typing import Any

import pytest
import tritonclient.grpc as grpcclient
from harness import identity_inputs, serve_on
from tritonclient.utils import InferenceServerException
from tritonmesh.native_config import native_available

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not native_available(), reason=(
        "the native data path's extension (tritonmesh._core._h2) is not built here")),
]


def _seen(router: Any) -> dict[str, float]:
    """What the router knows of its one instance's requests: its own counts, the outlier
    detector's, the retry budget's window, and the request metrics' totals."""
    (instance,) = router.balancer.instances()
    seen: dict[str, float] = {
        "requests": instance.requests, "errors": instance.errors,
        "latency observations": sum(instance.latency_buckets),
        "failures in a row": instance.failures, "outstanding": instance.outstanding,
        "budget window": router.balancer.retry_budget.window()[0],
    }
    for family in router.balancer.metrics.families("e"):
        for sample in family.samples:
            if sample.name.endswith(("_total", "_count")) or "code" in sample.labels:
                key = f"{sample.name} {sample.labels.get('code', '')}"
                seen[key] = seen.get(key, 0.0) + sample.value
    return seen


def _calls(router: Any, client_timeout: float | None) -> dict[str, float]:
    """Three answered calls after a run of two failures, then two that Triton refuses;
    returns what the router learned from them."""
    (instance,) = router.balancer.instances()
    before = _seen(router)
    instance.failures = 2  # the router is idle: its loop does not touch the count now
    with grpcclient.InferenceServerClient(router.address) as client:
        for _ in range(3):
            client.infer("identity", identity_inputs(), client_timeout=client_timeout)
        router.wait_idle()
        answered = instance.failures
        for _ in range(2):
            with pytest.raises(InferenceServerException) as caught:
                client.infer("no_such_model", identity_inputs(), client_timeout=client_timeout)
            assert caught.value.status() == "StatusCode.NOT_FOUND"
    router.wait_idle()
    after = _seen(router)
    learned = {key: after[key] - before.get(key, 0.0) for key in after}
    learned["failures in a row after the answers"] = answered
    return learned


def test_a_plain_call_is_counted_as_one_with_a_deadline(monkeypatch: pytest.MonkeyPatch,
                                                        make_router: Any) -> None:
    serve_on(monkeypatch, "native")
    router = make_router(workers=1)
    plain = _calls(router, None)
    with_deadline = _calls(router, 30.0)  # grpc-timeout: the general path
    assert plain == with_deadline
    assert (plain["requests"], plain["errors"], plain["latency observations"]) == (5, 2, 5)
    assert plain["budget window"] == 5 and plain["outstanding"] == 0
    assert plain["failures in a row after the answers"] == 0  # they ended the run of two
    assert plain["tritonmesh_model_invocation_errors_total NOT_FOUND"] == 2
