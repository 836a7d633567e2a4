"""Live weights: ``UpdateVariantWeights`` (and ``tritonmesh weights``) and a SIGHUP reload shift
traffic between variants under load; bad updates are refused whole, with the status named."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from harness import LoopThread, RouterHandle, make_config, start_router
from tritonmesh._pb import tritonmesh_admin_pb2 as apb
from tritonmesh._pb import tritonmesh_admin_pb2_grpc as apb_grpc
from tritonmesh.config import load_config
from tritonmesh.endpoint import _reload

pytestmark = pytest.mark.triton

TRITONMESH = str(Path(sys.executable).parent / "tritonmesh")
CLIENTS = 8
PHASE = 400  # requests counted per phase


def _write(path: Path, addresses: list[str], weight_a: float, weight_b: float) -> None:
    path.write_text(
        "listen: 127.0.0.1:0\nmetrics_listen: null\nadmin_listen: 127.0.0.1:0\nvariants:\n"
        f"  - {{name: A, weight: {weight_a}, instances: [{addresses[0]}]}}\n"
        f"  - {{name: B, weight: {weight_b}, instances: [{addresses[1]}]}}\n")


class _Load:
    """``CLIENTS`` closed-loop clients sending identity requests until stopped."""

    def __init__(self, address: str):
        self.stop = threading.Event()
        self.failures: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(address,), daemon=True)
                        for _ in range(CLIENTS)]
        for t in self.threads:
            t.start()

    def _run(self, address: str) -> None:
        x = grpcclient.InferInput("INPUT0", [4], "FP32")
        x.set_data_from_numpy(np.arange(4, dtype=np.float32))
        with grpcclient.InferenceServerClient(address) as client:
            while not self.stop.is_set():
                try:
                    client.infer("identity", [x], client_timeout=30)
                except Exception as exc:  # every failure fails the test
                    self.failures.append(exc)
                    return

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def _served(handle: RouterHandle) -> dict[str, int]:
    """Requests finished per variant (read on the router's loop)."""
    async def read() -> dict[str, int]:
        return {v.name: sum(i.requests for i in v.live_instances())
                for v in handle.balancer.variants}
    return handle.loop.run(read())


def _share_of_a(handle: RouterHandle, load: _Load) -> float:
    """A's share of the next ``PHASE`` requests, after ``CLIENTS`` more that may have been
    picked under the weights before."""
    def wait_for(n: int) -> dict[str, int]:
        start = sum(_served(handle).values())
        while True:
            now = _served(handle)
            if sum(now.values()) - start >= n:
                return now
            assert not load.failures, load.failures
            threading.Event().wait(0.02)

    before = wait_for(CLIENTS)
    after = wait_for(PHASE)
    total = sum(after.values()) - sum(before.values())
    return (after["A"] - before["A"]) / total


def _bounds(p: float, n: int = PHASE) -> tuple[float, float]:
    """Five standard deviations around ``p`` for ``n`` requests: a share outside is a
    one-in-3.5-million event, and these intervals do not overlap."""
    sd = math.sqrt(p * (1 - p) / n)
    return p - 5 * sd, p + 5 * sd


@pytest.fixture
def two_variants(loop_thread: LoopThread, worker_addresses: list[str],
                 tmp_path: Path) -> Iterator[tuple[RouterHandle, Path, list[Any]]]:
    path = tmp_path / "endpoint.yaml"
    _write(path, worker_addresses, 1, 1)
    config = dataclasses.replace(load_config(path), health_check=make_config(
        worker_addresses)[0].health_check)
    handle = start_router(loop_thread, config, {"A": worker_addresses[:1],
                                                "B": worker_addresses[1:2]}, seed=None)
    yield handle, path, [config]
    handle.wait_idle()
    handle.stop()


def test_weights_shift_traffic_under_load_by_rpc_cli_and_sighup(
        two_variants: tuple[RouterHandle, Path, list[Any]], worker_addresses: list[str]) -> None:
    handle, path, running = two_variants
    load = _Load(handle.address)
    try:
        shares = [_share_of_a(handle, load)]
        with grpc.insecure_channel(handle.admin_address) as channel:
            apb_grpc.AdminStub(channel).UpdateVariantWeights(apb.UpdateVariantWeightsRequest(
                variants=[apb.VariantWeight(variant="A", weight=9),
                          apb.VariantWeight(variant="B", weight=1)]), timeout=10)
        shares.append(_share_of_a(handle, load))
        cli = subprocess.run([TRITONMESH, "weights", "--address", handle.admin_address,
                              "A=1", "B=9"], capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert cli.stdout.splitlines() == ["variant A: weight 1", "variant B: weight 9"]
        shares.append(_share_of_a(handle, load))
        # What SIGHUP runs: the file's weights apply live.
        _write(path, worker_addresses, 4, 1)
        handle.loop.run(_reload(handle.router, path, running))
        shares.append(_share_of_a(handle, load))
    finally:
        load.close()
    assert not load.failures, load.failures
    for share, p in zip(shares, (0.5, 0.9, 0.1, 0.8), strict=True):
        low, high = _bounds(p)
        assert low <= share <= high, (shares, p)


def _refused(stub: Any, *entries: apb.VariantWeight) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub.UpdateVariantWeights(apb.UpdateVariantWeightsRequest(variants=entries),
                                  timeout=10)
    return info.value


def test_bad_weight_updates_are_refused_whole(make_router: Any) -> None:
    router = make_router(variants=[("A", 1.0, "RANDOM", 0), ("B", 2.0, "RANDOM", 1)])
    variants = router.balancer.by_name
    with grpc.insecure_channel(router.admin_address) as channel:
        stub = apb_grpc.AdminStub(channel)
        cases = [
            ((apb.VariantWeight(variant="A", weight=5), apb.VariantWeight(variant="Nope")),
             grpc.StatusCode.NOT_FOUND, "no variant 'Nope'"),
            ((apb.VariantWeight(variant="A", weight=5), apb.VariantWeight(variant="B", weight=-1)),
             grpc.StatusCode.INVALID_ARGUMENT, "variant 'B': weight must be"),
            ((apb.VariantWeight(variant="A", weight=math.nan),),
             grpc.StatusCode.INVALID_ARGUMENT, "got nan"),
            ((apb.VariantWeight(variant="A", weight=math.inf),),
             grpc.StatusCode.INVALID_ARGUMENT, "got inf"),
            ((apb.VariantWeight(variant="A", weight=0), apb.VariantWeight(variant="B", weight=0)),
             grpc.StatusCode.INVALID_ARGUMENT, "every variant's weight would be 0"),
            ((apb.VariantWeight(variant="A", weight=1, max_concurrency_per_instance=0),),
             grpc.StatusCode.INVALID_ARGUMENT, "max_concurrency_per_instance must be at least 1"),
            ((apb.VariantWeight(variant="A", weight=1), apb.VariantWeight(variant="A", weight=2)),
             grpc.StatusCode.INVALID_ARGUMENT, "named twice"),
            ((), grpc.StatusCode.INVALID_ARGUMENT, "no variants given"),
        ]
        for entries, code, words in cases:
            error = _refused(stub, *entries)
            assert (error.code(), words in (error.details() or "")) == (code, True), \
                (entries, error)
            assert (variants["A"].weight, variants["B"].weight) == (1.0, 2.0)  # nothing changed
        # One variant at 0 is allowed (SageMaker's too), and capacity goes with it.
        response = stub.UpdateVariantWeights(apb.UpdateVariantWeightsRequest(variants=[
            apb.VariantWeight(variant="B", weight=0, max_concurrency_per_instance=3)]),
            timeout=10)
        assert [(v.name, v.weight, v.max_concurrency_per_instance)
                for v in response.variants] == [("A", 1.0, 0), ("B", 0.0, 3)]
        assert variants["B"].limit == 3
    # Never on the data port.
    with grpc.insecure_channel(router.address) as channel:
        error = _refused(apb_grpc.AdminStub(channel), apb.VariantWeight(variant="A", weight=2))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert variants["A"].weight == 1.0


def test_weights_cli_says_what_was_refused(make_router: Any) -> None:
    router = make_router(variants=[("A", 1.0, "RANDOM", 0)])
    result = subprocess.run([TRITONMESH, "weights", "--address", router.admin_address, "Z=1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "weights not changed: [NOT_FOUND] no variant 'Z'" in result.stderr
    result = subprocess.run([TRITONMESH, "weights", "--address", router.admin_address,
                             "A=heavy"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "'A=heavy': WEIGHT must be a number" in result.stderr
