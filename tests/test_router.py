"""The router, end to end: unmodified tritonclient -> tritonmesh -> real Triton on loopback.

Every test ends with every outstanding count back at zero (the ``make_router`` fixture
checks it at teardown).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import Counter
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException
from tritonmesh.config import AuthConfig

pytestmark = pytest.mark.triton


def _identity_inputs(values: np.ndarray, module: Any = grpcclient) -> list[Any]:
    x = module.InferInput("INPUT0", list(values.shape), "FP32")
    x.set_data_from_numpy(values)
    return [x]


def _generate_inputs(prompt: int, max_tokens: int, module: Any = grpcclient) -> list[Any]:
    p = module.InferInput("PROMPT_TOKENS", [1], "INT32")
    p.set_data_from_numpy(np.array([prompt], dtype=np.int32))
    m = module.InferInput("MAX_TOKENS", [1], "INT32")
    m.set_data_from_numpy(np.array([max_tokens], dtype=np.int32))
    return [p, m]


class StreamCollector:
    """Collects stream callbacks; ``wait_finals(n)`` returns once n requests completed."""

    def __init__(self) -> None:
        self.results: queue.Queue[tuple[Any, Any]] = queue.Queue()

    def __call__(self, result: Any, error: Any) -> None:
        self.results.put((result, error))

    def take(self, n: int, timeout: float = 30.0) -> list[tuple[Any, Any]]:
        return [self.results.get(timeout=timeout) for _ in range(n)]


# -- unary -----------------------------------------------------------------------------


def test_identity_matches_direct(make_router: Any, worker_addresses: list[str]) -> None:
    router = make_router()
    values = np.arange(16, dtype=np.float32)
    with grpcclient.InferenceServerClient(router.address) as via, \
            grpcclient.InferenceServerClient(worker_addresses[0]) as direct:
        got = via.infer("identity", _identity_inputs(values), request_id="abc")
        want = direct.infer("identity", _identity_inputs(values), request_id="abc")
        np.testing.assert_array_equal(got.as_numpy("OUTPUT0"), want.as_numpy("OUTPUT0"))
        assert got.get_response().id == "abc"
        assert got.get_response().model_name == want.get_response().model_name


def test_generate_unary_and_aio_client(make_router: Any) -> None:
    router = make_router()

    async def run() -> list[np.ndarray]:
        async with aioclient.InferenceServerClient(router.address) as client:
            results = await asyncio.gather(*(
                client.infer("generate_unary", _generate_inputs(4, n, aioclient))
                for n in (1, 5, 9)
            ))
            return [r.as_numpy("TOKENS") for r in results]

    tokens = asyncio.run(run())
    assert [t.tolist() for t in tokens] == [list(range(n)) for n in (1, 5, 9)]


def test_compression_passes_through(make_router: Any) -> None:
    router = make_router()
    values = np.linspace(0, 1, 1000, dtype=np.float32)
    with grpcclient.InferenceServerClient(router.address) as client:
        result = client.infer("identity", _identity_inputs(values), compression_algorithm="gzip")
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), values)


def test_unknown_model_same_as_triton(make_router: Any, worker_addresses: list[str]) -> None:
    router = make_router()
    values = np.zeros(2, dtype=np.float32)
    errors = []
    for address in (router.address, worker_addresses[0]):
        with grpcclient.InferenceServerClient(address) as client, \
                pytest.raises(InferenceServerException) as info:
            client.infer("no_such_model", _identity_inputs(values))
        errors.append((info.value.status(), info.value.message()))
    assert errors[0] == errors[1]


def test_arbitrary_model_names_leave_no_state_behind(make_router: Any) -> None:
    """A client sending made-up model names (a typo loop, a scanner) must not grow the
    router's memory: nothing is kept per name the configuration does not list."""
    router = make_router()
    balancer = router.balancer
    before = (dict(balancer._serving), len(balancer.decoupled._known))
    collect = StreamCollector()
    with grpcclient.InferenceServerClient(router.address) as client:
        client.start_stream(callback=collect)
        for i in range(50):
            with pytest.raises(InferenceServerException):
                client.infer(f"made_up_{i}", _identity_inputs(np.zeros(1, np.float32)))
            client.async_stream_infer(f"made_up_stream_{i}", _identity_inputs(
                np.zeros(1, np.float32)), request_id=str(i))
        got = collect.take(50)
        client.stop_stream()
    assert all(error is not None and "unknown model" in str(error) for _, error in got)
    assert (dict(balancer._serving), len(balancer.decoupled._known)) == before


def test_decoupled_model_on_model_infer_same_as_triton(make_router: Any,
                                                       worker_addresses: list[str]) -> None:
    router = make_router()
    errors = []
    for address in (router.address, worker_addresses[0]):
        with grpcclient.InferenceServerClient(address) as client, \
                pytest.raises(InferenceServerException) as info:
            client.infer("generate", _generate_inputs(1, 2))
        errors.append((info.value.status(), info.value.message()))
    assert errors[0] == errors[1]
    assert errors[0][0] == "StatusCode.UNIMPLEMENTED"


def test_malformed_bytes_get_invalid_argument_and_router_keeps_serving(make_router: Any) -> None:
    router = make_router()
    with grpc.insecure_channel(router.address) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as info:
            infer(b"\x0a\xff\xff\xff\xff\x0f garbage", timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed ModelInferRequest" in info.value.details()
        metadata = channel.unary_unary("/inference.GRPCInferenceService/ModelMetadata")
        with pytest.raises(grpc.RpcError) as info:
            metadata(b"\xff\xff", timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with grpcclient.InferenceServerClient(router.address) as client:
        values = np.ones(3, dtype=np.float32)
        result = client.infer("identity", _identity_inputs(values))
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), values)


GARBAGE = (b"\x0a\xff\xff\xff\xff\x0f", b"\xff\xff", b"\x0b")  # huge length, bad varint, group


@pytest.mark.parametrize("method", [m.name for m in
                                    pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
                                    if not m.client_streaming])
def test_garbage_on_every_rpc_gets_a_clear_status(make_router: Any, worker_addresses: list[str],
                                                  method: str) -> None:
    """Bytes that are no protobuf message, on every unary RPC: INVALID_ARGUMENT naming the
    message (never OK, never a hang, never Triton's INTERNAL "Unable to parse request"), and
    the router keeps serving."""
    router = make_router()
    path = f"/inference.GRPCInferenceService/{method}"
    with grpc.insecure_channel(router.address) as channel:
        call = channel.unary_unary(path)
        for raw in GARBAGE:
            with pytest.raises(grpc.RpcError) as info:
                call(raw, timeout=10)
            code = info.value.code()
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, raw, code)
            assert "malformed" in info.value.details(), (method, info.value.details())
            assert info.value.details(), (method, raw)
    with grpcclient.InferenceServerClient(router.address) as client:
        assert client.is_server_ready()
        result = client.infer("identity", _identity_inputs(np.ones(2, dtype=np.float32)))
        assert result.as_numpy("OUTPUT0").tolist() == [1.0, 1.0]


def test_deadline_exceeded_releases(make_router: Any, caplog: pytest.LogCaptureFixture) -> None:
    router = make_router()
    # 200 tokens at the default 5 ms per token take 1 s, far longer than the deadlines; the
    # shortest expire on the router's side as its upstream call fails.
    for timeout in (0.3, *[0.02] * 20):
        with grpcclient.InferenceServerClient(router.address) as client, \
                pytest.raises(InferenceServerException) as info:
            client.infer("generate_unary", _generate_inputs(1, 200), client_timeout=timeout)
        assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    router.wait_idle()
    # The router did not try to answer calls gRPC had already ended (an error log each).
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


# Connection-level keys a gRPC client can send that do reach the server (gRPC itself drops
# te, content-type, grpc-*), and the router's own routing key.
_HOP_BY_HOP_SENT = ("connection", "keep-alive", "host", "proxy-connection",
                    "transfer-encoding", "upgrade", "x-target-variant")


def test_metadata_passes_through_and_hop_by_hop_does_not(
        loop_thread: Any, recording_triton: Any) -> None:
    """What reaches the instance: every key the client set, values unchanged, and its
    deadline; none of the hop-by-hop keys nor the routing key. Triton does not report
    request metadata, so the instance is a gRPC server on loopback that records it; what is
    under test is the router's forwarding, which is the same whatever answers upstream."""
    from harness import make_config, start_router

    config, instances = make_config([recording_triton.address], strategy="RANDOM",
                                    variant_options={"upstream_cancellation": "forward"})
    router = start_router(loop_thread, config, instances)
    user = {"authorization": "Bearer t", "x-trace": "7", "x-tenant": "a b,c"}
    hop_by_hop = {key: "AllTraffic" if key == "x-target-variant" else "v"
                  for key in _HOP_BY_HOP_SENT}
    try:
        with grpcclient.InferenceServerClient(router.address) as client:
            result = client.infer("identity", _identity_inputs(np.ones(2, dtype=np.float32)),
                                  headers={**user, **hop_by_hop}, client_timeout=5.0,
                                  request_id="r1")
        assert result.get_response().id == "r1"
        ((_, metadata, remaining),) = [c for c in recording_triton.calls if c[0] == "ModelInfer"]
        assert {k: metadata.get(k) for k in user} == user
        assert not set(hop_by_hop) & set(metadata), metadata
        # The deadline went upstream (grpc-timeout's encoding rounds up by a few ms).
        assert remaining is not None and 0 < remaining <= 5.5
        router.wait_idle()
    finally:
        router.stop()


# -- streaming -------------------------------------------------------------------------


@pytest.mark.parametrize("empty_final", [False, True])
def test_stream_decoupled_with_and_without_empty_final(make_router: Any,
                                                       empty_final: bool) -> None:
    router = make_router()
    collect = StreamCollector()
    with grpcclient.InferenceServerClient(router.address) as client:
        client.start_stream(callback=collect)
        client.async_stream_infer("generate", _generate_inputs(2, 5), request_id="g1",
                                  enable_empty_final_response=empty_final)
        got = collect.take(6 if empty_final else 5)
        client.stop_stream()
    assert all(error is None for _, error in got)
    tokens = [r.as_numpy("TOKEN") for r, _ in got]
    assert [int(t[0]) for t in tokens[:5]] == [0, 1, 2, 3, 4]
    finals = [r.get_response().parameters["triton_final_response"].bool_param for r, _ in got]
    if empty_final:
        assert tokens[5] is None and finals == [False] * 5 + [True]
    else:
        assert finals == [False] * 5
    assert collect.results.empty()  # no injected empty final leaked to the client


def test_many_streams_interleaved_models(make_router: Any) -> None:
    router = make_router(strategy="LEAST_OUTSTANDING_REQUESTS")
    n_streams, per_stream = 4, 6
    failures: list[str] = []

    def one_stream(k: int) -> None:
        collect = StreamCollector()
        with grpcclient.InferenceServerClient(router.address) as client:
            client.start_stream(callback=collect)
            expected = 0
            for j in range(per_stream):
                rid = f"s{k}-r{j}"
                if j % 2:
                    values = np.full(3, k * 100 + j, dtype=np.float32)
                    client.async_stream_infer("identity", _identity_inputs(values), request_id=rid)
                    expected += 1
                else:
                    client.async_stream_infer("generate", _generate_inputs(1, 3), request_id=rid,
                                              enable_empty_final_response=True)
                    expected += 4
            got = collect.take(expected)
            client.stop_stream()
        by_id: dict[str, list[Any]] = {}
        for result, error in got:
            if error is not None:
                failures.append(str(error))
                continue
            by_id.setdefault(result.get_response().id, []).append(result)
        for j in range(per_stream):
            results = by_id.get(f"s{k}-r{j}", [])
            if j % 2:
                if [r.as_numpy("OUTPUT0").tolist() for r in results] != [[k * 100 + j] * 3]:
                    failures.append(f"stream {k} request {j}: {results}")
            else:
                tokens = [None if r.as_numpy("TOKEN") is None else int(r.as_numpy("TOKEN")[0])
                          for r in results]
                if tokens != [0, 1, 2, None]:  # per-request order holds after merging
                    failures.append(f"stream {k} request {j}: tokens {tokens}")

    threads = [threading.Thread(target=one_stream, args=(k,)) for k in range(n_streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures
    assert not any(t.is_alive() for t in threads)


def test_stream_unknown_model_in_stream_same_as_triton(make_router: Any,
                                                       worker_addresses: list[str]) -> None:
    router = make_router()
    seen = []
    for address in (router.address, worker_addresses[0]):
        collect = StreamCollector()
        with grpcclient.InferenceServerClient(address) as client:
            client.start_stream(callback=collect)
            client.async_stream_infer("no_such_model", _generate_inputs(1, 1), request_id="u1")
            ((_, error),) = collect.take(1)
            # The stream stays usable after the error.
            client.async_stream_infer("identity", _identity_inputs(np.ones(1, np.float32)))
            ((ok, ok_error),) = collect.take(1)
            client.stop_stream()
        assert ok_error is None and ok.as_numpy("OUTPUT0").tolist() == [1.0]
        seen.append(str(error))
    assert seen[0] == seen[1]


def test_client_cancel_mid_stream_releases(make_router: Any) -> None:
    router = make_router()
    collect = StreamCollector()
    with grpcclient.InferenceServerClient(router.address) as client:
        client.start_stream(callback=collect)
        client.async_stream_infer("generate", _generate_inputs(1, 400), request_id="long")
        collect.take(1)  # generation has started
        assert router.total_outstanding() == 1
        client.stop_stream(cancel_requests=True)
    router.wait_idle()


def test_streams_cancelled_at_any_point_release_everything(make_router: Any) -> None:
    """Clients that vanish mid-generation, at varied points while tokens are being written
    back: whichever of the router's pump and its handler notices first, every count
    returns to zero. (A pump that died writing to a gone client once took its pending
    request with it.)"""
    router = make_router(workers=2)

    async def one(after_tokens: int) -> None:
        async with aioclient.InferenceServerClient(router.address) as client:
            async def requests() -> Any:
                yield {"model_name": "generate", "inputs": _generate_inputs(1, 200, aioclient),
                       "request_id": f"r{after_tokens}"}
                yield {"model_name": "generate", "inputs": _generate_inputs(1, 3, aioclient)}
                await asyncio.sleep(30)  # keep the stream open; the cancel ends it

            stream = client.stream_infer(requests())
            seen = 0
            async for _result, error in stream:
                assert error is None
                seen += 1
                if seen >= after_tokens:
                    break
            stream.cancel()  # type: ignore[attr-defined]

    async def run() -> None:
        for round_ in range(3):
            await asyncio.gather(*(one(1 + 3 * k + round_) for k in range(8)))

    asyncio.run(run())
    router.wait_idle()
    assert all(i.outstanding == 0 for i in router.instances())


def test_stream_half_close_waits_for_finals(make_router: Any) -> None:
    router = make_router()
    collect = StreamCollector()
    with grpcclient.InferenceServerClient(router.address) as client:
        client.start_stream(callback=collect)
        client.async_stream_infer("generate", _generate_inputs(1, 6))
        client.stop_stream()  # half-close right away; every token must still arrive
    got = []
    while not collect.results.empty():
        got.append(collect.results.get())
    assert [int(r.as_numpy("TOKEN")[0]) for r, e in got if e is None] == list(range(6))


# -- routing ---------------------------------------------------------------------------


def _served_counts(router: Any) -> Counter[str]:
    return Counter({i.address: i.requests for i in router.instances()})


def test_lor_sends_new_requests_to_the_idle_instance(make_router: Any) -> None:
    router = make_router(strategy="LEAST_OUTSTANDING_REQUESTS", workers=2)
    collect = StreamCollector()
    with grpcclient.InferenceServerClient(router.address) as client:
        client.start_stream(callback=collect)
        client.async_stream_infer("generate", _generate_inputs(1, 2000), request_id="long")
        collect.take(1)  # the long request is now outstanding on one instance
        (busy,) = [i for i in router.instances() if i.outstanding == 1]
        before = _served_counts(router)
        for _ in range(10):
            client.infer("identity", _identity_inputs(np.ones(1, np.float32)))
        after = _served_counts(router)
        assert busy.outstanding == 1  # the long one was running throughout
        client.stop_stream(cancel_requests=True)
    gained = {addr: after[addr] - before[addr] for addr in after}
    assert gained[busy.address] == 0
    assert sum(gained.values()) == 10


def test_least_outstanding_work_weighs_requests_by_their_hint(make_router: Any) -> None:
    """One long generation on one instance outweighs several short ones on the other:
    LEAST_OUTSTANDING_WORK sends every short request to the other instance, where
    LEAST_OUTSTANDING_REQUESTS would alternate once the counts tie."""
    from tritonmesh.config import WorkHint

    hints = {m: WorkHint(input="MAX_TOKENS") for m in ("generate", "generate_unary")}
    router = make_router(strategy="LEAST_OUTSTANDING_WORK", workers=2, work_hints=hints)
    collect = StreamCollector()
    with grpcclient.InferenceServerClient(router.address) as client:
        client.start_stream(callback=collect)
        # 2000 tokens: about 10 s, so it is still running when the short ones are done.
        client.async_stream_infer("generate", _generate_inputs(1, 2000), request_id="long")
        collect.take(1)
        (busy,) = [i for i in router.instances() if i.outstanding == 1]
        assert busy.work_ahead() == 2000.0

        async def shorts() -> list[int]:
            async with aioclient.InferenceServerClient(router.address) as aio:
                results = await asyncio.gather(*(
                    aio.infer("generate_unary", _generate_inputs(1, 20, aioclient))
                    for _ in range(6)))
            return [r.as_numpy("TOKENS").size for r in results]

        before = _served_counts(router)
        assert asyncio.run(shorts()) == [20] * 6  # 6 x 20 = 120 < 2000 at every pick
        after = _served_counts(router)
        assert busy.outstanding == 1  # the long one was running throughout
        client.stop_stream(cancel_requests=True)
    gained = {addr: after[addr] - before[addr] for addr in after}
    assert gained[busy.address] == 0 and sum(gained.values()) == 6, gained
    # Finished requests taught the idle instance its speed: seconds per token, > 0.
    (other,) = [i for i in router.instances() if i is not busy]
    assert other.variant.work is not None and other.variant.work.estimate(other.slot) > 0


def test_random_spreads_by_variant_weight(make_router: Any) -> None:
    router = make_router(variants=[("light", 1.0, "RANDOM", 0), ("heavy", 3.0, "RANDOM", 1)])
    n = 400
    with grpcclient.InferenceServerClient(router.address) as client:
        for _ in range(n):
            client.infer("identity", _identity_inputs(np.ones(1, np.float32)))
    heavy = sum(i.requests for i in router.instances() if i.variant.name == "heavy")
    # Binomial(400, 0.75): mean 300, sd 8.7; +-6 sd fails by chance about once in 1e9 runs.
    assert 248 <= heavy <= 352, heavy


def test_target_variant_header(make_router: Any) -> None:
    router = make_router(variants=[("a", 1.0, "RANDOM", 0), ("b", 1.0, "RANDOM", 1)])
    with grpcclient.InferenceServerClient(router.address) as client:
        for _ in range(20):
            client.infer("identity", _identity_inputs(np.ones(1, np.float32)),
                         headers={"x-target-variant": "b"})
        with pytest.raises(InferenceServerException) as info:
            client.infer("identity", _identity_inputs(np.ones(1, np.float32)),
                         headers={"x-target-variant": "nope"})
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "unknown target variant 'nope'" in info.value.message()
    served = {i.variant.name: i.requests for i in router.instances()}
    assert served == {"a": 0, "b": 20}


def test_sequence_stays_on_one_instance(make_router: Any) -> None:
    router = make_router(strategy="ROUND_ROBIN", workers=2)
    with grpcclient.InferenceServerClient(router.address) as client:
        for seq in (11, 12):
            before = _served_counts(router)
            for k in range(6):
                client.infer("identity", _identity_inputs(np.ones(1, np.float32)),
                             sequence_id=seq, sequence_start=k == 0, sequence_end=k == 5)
            gained = _served_counts(router) - before
            assert len(gained) == 1 and sum(gained.values()) == 6, gained
    assert not router.balancer.sequences  # ended sequences are forgotten


# -- server-wide RPCs ------------------------------------------------------------------


def test_health_and_metadata_rpcs(make_router: Any, worker_addresses: list[str]) -> None:
    router = make_router()
    with grpcclient.InferenceServerClient(router.address) as via, \
            grpcclient.InferenceServerClient(worker_addresses[0]) as direct:
        assert via.is_server_live() and via.is_server_ready()
        assert via.is_model_ready("generate") and not via.is_model_ready("no_such_model")
        assert via.get_server_metadata() == direct.get_server_metadata()
        for model in ("identity", "generate", "generate_unary"):
            assert via.get_model_metadata(model) == direct.get_model_metadata(model)
            assert via.get_model_config(model) == direct.get_model_config(model)
        with pytest.raises(InferenceServerException) as via_err:
            via.get_model_metadata("no_such_model")
        with pytest.raises(InferenceServerException) as direct_err:
            direct.get_model_metadata("no_such_model")
        assert via_err.value.message() == direct_err.value.message()
        assert via_err.value.status() == direct_err.value.status()
        index = {m.name for m in via.get_model_repository_index().models}
        assert {"identity", "generate", "generate_unary"} <= index


def test_statistics_sum_over_instances(make_router: Any, worker_addresses: list[str]) -> None:
    router = make_router(workers=2)

    def counts(address: str) -> int:
        with grpcclient.InferenceServerClient(address) as c:
            stats = c.get_inference_statistics("identity").model_stats
            return sum(s.inference_stats.success.count for s in stats)

    before = [counts(a) for a in worker_addresses[:2]]
    with grpcclient.InferenceServerClient(router.address) as client:
        for _ in range(8):
            client.infer("identity", _identity_inputs(np.ones(1, np.float32)))
        via = sum(s.inference_stats.success.count
                  for s in client.get_inference_statistics("identity").model_stats)
    after = [counts(a) for a in worker_addresses[:2]]
    assert via == sum(after)
    assert sum(after) - sum(before) == 8


def test_repository_load_unload_broadcast(make_router: Any,
                                          worker_addresses: list[str]) -> None:
    # Control RPCs take an admin token (tests/test_security.py has the refusals).
    router = make_router(workers=2, auth=AuthConfig(admin_tokens=frozenset({"admin-token"})))
    admin = {"authorization": "Bearer admin-token"}
    with grpcclient.InferenceServerClient(router.address) as client:
        client.unload_model("identity", headers=admin)
        for address in worker_addresses[:2]:
            with grpcclient.InferenceServerClient(address) as direct:
                assert not direct.is_model_ready("identity")
        client.load_model("identity", headers=admin)
        for address in worker_addresses[:2]:
            with grpcclient.InferenceServerClient(address) as direct:
                assert direct.is_model_ready("identity")
        with pytest.raises(InferenceServerException) as info:
            client.load_model("no_such_model", headers=admin)
    assert "failed on 2 of 2 instances" in info.value.message()


def test_shared_memory_is_refused_clearly(make_router: Any) -> None:
    router = make_router(auth=AuthConfig(admin_tokens=frozenset({"admin-token"})))
    with grpcclient.InferenceServerClient(router.address) as client:
        assert client.get_system_shared_memory_status().regions == {}
        with pytest.raises(InferenceServerException) as info:
            client.register_system_shared_memory("r", "/key", 64,
                                                 headers={"authorization": "Bearer admin-token"})
    assert info.value.status() == "StatusCode.UNIMPLEMENTED"
    assert "local to one Triton host" in info.value.message()


def test_log_settings_broadcast(make_router: Any) -> None:
    router = make_router()
    with grpcclient.InferenceServerClient(router.address) as client:
        settings = client.get_log_settings(as_json=True)
        assert "log_info" in settings["settings"]


def test_grpc_health_and_admin(make_router: Any) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from tritonmesh._pb import tritonmesh_admin_pb2 as apb
    from tritonmesh._pb import tritonmesh_admin_pb2_grpc as apb_grpc

    router = make_router(workers=2)
    with grpc.insecure_channel(router.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    # The admin API has its own listener (tests/test_security.py: not on the data port).
    with grpc.insecure_channel(router.admin_address) as channel:
        listing = apb_grpc.AdminStub(channel).ListInstances(apb.ListInstancesRequest(), timeout=5)
    assert len(listing.instances) == 2
    assert all(i.state == "ACTIVE" and i.healthy and i.outstanding == 0
               for i in listing.instances)


def test_server_ready_raw_bytes(make_router: Any) -> None:
    router = make_router()
    with grpc.insecure_channel(router.address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ServerReady")
        assert pb.ServerReadyResponse.FromString(
            call(pb.ServerReadyRequest().SerializeToString(), timeout=5)).ready
