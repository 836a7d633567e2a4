"""Test harness: an asyncio loop in a thread, hosting real Triton workers and routers.

Tests drive the router with unmodified, blocking tritonclient from the main thread
while the router (a grpc.aio server) runs on this loop, as it would in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonmesh._pb import tritonmesh_admin_pb2_grpc as apb_grpc
from tritonmesh.balancer import Balancer, Instance, Variant
from tritonmesh.config import (
    AuthConfig,
    EndpointConfig,
    HealthCheckConfig,
    LimitsConfig,
    QueueOrder,
    RoutingStrategy,
    VariantConfig,
    WorkHint,
)
from tritonmesh.loop import new_event_loop
from tritonmesh.proxy import Proxy
from tritonmesh.server import Router
from tritonmesh.wire import RequestInfo
from tritonmesh.workers.launcher import WorkerPool
from tritonmesh.workers.upstream import Upstream

T = TypeVar("T")


class LoopThread:
    """An event loop running forever in a daemon thread: the kind the router's command runs
    on (uvloop; ``TRITONMESH_EVENT_LOOP=asyncio`` for the stdlib's, as `make test-twin`
    does, so that both loops pass every test)."""

    def __init__(self) -> None:
        self.loop = new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-loop",
                                       daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class RouterHandle:
    """A running Router and the thread-safe views of it that tests assert on."""

    def __init__(self, loop: LoopThread, router: Router):
        self.loop = loop
        self.router = router

    @property
    def address(self) -> str:
        return self.router.address

    @property
    def admin_address(self) -> str:
        address = self.router.admin_address
        assert address is not None, "the admin API is off"
        return address

    @property
    def balancer(self) -> Balancer:
        assert self.router.balancer is not None
        return self.router.balancer

    def instances(self) -> list[Instance]:
        return list(self.balancer.instances())

    def total_outstanding(self) -> int:
        return self.balancer.total_outstanding()

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until every outstanding count is zero; fail with the counts if not."""
        deadline = time.monotonic() + timeout
        while self.total_outstanding():
            if time.monotonic() > deadline:
                counts = {i.address: i.outstanding for i in self.instances()}
                raise AssertionError(f"outstanding counts never returned to zero: {counts}")
            time.sleep(0.01)

    def stop(self) -> None:
        self.loop.run(self.router.stop(grace=1.0))


def make_config(addresses: Sequence[str], *, strategy: str = "LEAST_OUTSTANDING_REQUESTS",
                variants: Sequence[tuple[str, float, str, int]] | None = None,
                workers: int | None = None, max_concurrency: int | None = None,
                max_queue: int = 1024, work_hints: dict[str, WorkHint] | None = None,
                queue_order: str = "FIFO", models: Sequence[str] | None = None,
                slow_start_s: float = 0.0, dispatch_ahead_s: float = 0.0,
                auth: AuthConfig | None = None, limits: dict[str, Any] | None = None,
                variant_options: dict[str, Any] | None = None,
                ) -> tuple[EndpointConfig, dict[str, list[str]]]:
    """A router config over the given Triton addresses.

    ``variants`` lists (name, weight, strategy, index of the worker address); without it,
    one variant "AllTraffic" over the first ``workers`` addresses (default: all).
    ``limits``: keys of the ``limits`` block (the rest at their defaults);
    ``variant_options``: more VariantConfig fields for that one variant.
    """
    if variants is None:
        chosen = list(addresses[: workers or len(addresses)])
        spec = [VariantConfig("AllTraffic", 1.0, RoutingStrategy(strategy),
                              None if models is None else frozenset(models),
                              tuple(chosen), max_concurrency=max_concurrency,
                              max_queue=max_queue, queue_order=QueueOrder(queue_order),
                              slow_start_s=slow_start_s,
                              dispatch_ahead_s=dispatch_ahead_s, **(variant_options or {}))]
        instances = {"AllTraffic": chosen}
    else:
        spec = [VariantConfig(name, weight, RoutingStrategy(s), None, (addresses[i],))
                for name, weight, s, i in variants]
        instances = {name: [addresses[i]] for name, _, _, i in variants}
    config = EndpointConfig(
        name="test", listen="127.0.0.1:0", metrics_listen=None, admin_listen="127.0.0.1:0",
        variants=tuple(spec),
        health_check=HealthCheckConfig(interval_s=0.5, timeout_s=1.0), shutdown_grace_s=1.0,
        work_hints=work_hints or {}, auth=auth or AuthConfig(),
        limits=LimitsConfig(**(limits or {})),
    )
    return config, instances


def serve_on(monkeypatch: pytest.MonkeyPatch, data_path: str) -> None:
    """Routers made from here on (in this process and those it starts) serve
    ``data_path``; on ``native``, a ModelInfer or ModelStreamInfer that reaches this
    process's grpc.aio path fails the test."""
    monkeypatch.setenv("TRITONMESH_DATA_PATH", data_path)
    if data_path != "native":
        return

    async def refuse(self: Proxy, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise AssertionError("ModelInfer reached the grpc.aio path")

    async def refuse_stream(self: Proxy, requests: AsyncIterator[bytes],
                            context: grpc.aio.ServicerContext) -> None:
        raise AssertionError("ModelStreamInfer reached the grpc.aio path")

    monkeypatch.setattr(Proxy, "model_infer", refuse)
    monkeypatch.setattr(Proxy, "model_stream_infer", refuse_stream)


def start_router(loop: LoopThread, config: EndpointConfig,
                 instances: dict[str, list[str]], seed: int | None = 1234) -> RouterHandle:
    router = Router(config, instances, seed=seed)
    loop.run(router.start())
    return RouterHandle(loop, router)


def generate_inputs(max_tokens: int, prompt_tokens: int = 1) -> list[Any]:
    """The demo ``generate`` / ``generate_unary`` inputs, for the blocking client."""
    tensors = []
    for name, value in (("PROMPT_TOKENS", prompt_tokens), ("MAX_TOKENS", max_tokens)):
        t = grpcclient.InferInput(name, [1], "INT32")
        t.set_data_from_numpy(np.array([value], dtype=np.int32))
        tensors.append(t)
    return tensors


def identity_inputs() -> list[Any]:
    """The demo ``identity`` model's input, [0, 1, 2], for the blocking client."""
    tensor = grpcclient.InferInput("INPUT0", [3], "FP32")
    tensor.set_data_from_numpy(np.arange(3, dtype=np.float32))
    return [tensor]


def generate_unary(address: str, max_tokens: int, timeout: float | None = 60) -> list[int]:
    """``generate_unary``'s tokens for ``max_tokens``, asked at ``address``."""
    with grpcclient.InferenceServerClient(address) as client:
        result = client.infer("generate_unary", generate_inputs(max_tokens), client_timeout=timeout)
        return [int(v) for v in result.as_numpy("TOKENS")]


def wait_for(condition: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def admin_stub(address: str) -> Any:
    """A plaintext client of the router's admin API at ``address``."""
    return apb_grpc.AdminStub(grpc.insecure_channel(address))


class LongStream:
    """A long streamed generation holding one instance busy until stopped."""

    def __init__(self, address: str, max_tokens: int = 2000):
        self.results: queue.Queue[Any] = queue.Queue()
        self.client = grpcclient.InferenceServerClient(address)
        self.client.start_stream(callback=lambda result, error: self.results.put(error or result))
        self.client.async_stream_infer("generate", generate_inputs(max_tokens), request_id="long")
        self.results.get(timeout=30)  # generating

    def stop(self) -> None:
        self.client.stop_stream(cancel_requests=True)
        self.client.close()


def start_pool(loop: LoopThread, count: int, *, restart: bool = False) -> WorkerPool:
    """A private pool of real Triton workers, for tests that kill one."""
    async def start() -> WorkerPool:
        pool = WorkerPool(count, restart=restart)
        await pool.start()
        return pool

    return loop.run(start(), timeout=180)


def processes() -> dict[int, tuple[int, str, str]]:
    """Every process on the machine: pid -> (parent pid, name, state letter), from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # it ended while we looked
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        state, ppid = text.rsplit(")", 1)[1].split()[:2]
        found[int(stat.parent.name)] = (int(ppid), name, state)
    return found


def descendants(root: int) -> dict[int, str]:
    """Every process under ``root``, by pid, with its name."""
    table = processes()
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, name, _) in table.items():
            if ppid == parent:
                found[pid] = name
                todo.append(pid)
    return found


def wait_gone(pids: dict[int, str], timeout: float = 15.0) -> None:
    """Until none of ``pids`` runs (a zombie, ended but not reaped, counts as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        table = processes()
        left = {pid: name for pid, name in pids.items()
                if pid in table and table[pid][2] != "Z"}
        if not left:
            return
        assert time.monotonic() < deadline, f"left running: {left}"
        time.sleep(0.1)


class RecordingTriton:
    """A gRPC server on loopback that answers like Triton and records what reaches it, for
    tests of what the router forwards and how, which Triton itself does not report.

    ``calls``: per call, its method, metadata and the seconds left of its deadline (or
    None). ``seen``: per inference request, the RPC that carried it and its id.
    ``config_asks``: the models whose ModelConfig was asked. It is ready, and so is every
    model; ModelConfig gives the models of ``DECOUPLED`` their transaction policy (others
    get Triton's unknown-model status); an inference is answered with its own model name
    and id, and on a stream as a final response with an output (not an empty final).
    A subclass overrides a method to answer otherwise."""

    DECOUPLED = {"generate": True, "identity": False}

    def __init__(self, loop: LoopThread):
        self.loop = loop
        self.calls: list[tuple[str, dict[str, str], float | None]] = []
        self.seen: list[tuple[str, str]] = []
        self.config_asks: list[str] = []
        # While set, ModelInfer calls wait for it before they answer (a slow instance).
        self.hold: asyncio.Event | None = None
        self.server, port = loop.run(self._start())
        self.address = f"127.0.0.1:{port}"

    async def model_config(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        name = pb.ModelConfigRequest.FromString(request).name
        self.config_asks.append(name)
        if name not in self.DECOUPLED:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"Request for unknown model: '{name}'")
        config = mc.ModelConfig(name=name)
        config.model_transaction_policy.decoupled = self.DECOUPLED[name]
        return pb.ModelConfigResponse(config=config).SerializeToString()  # type: ignore[no-any-return]

    async def model_infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        parsed = pb.ModelInferRequest.FromString(request)
        self.seen.append(("ModelInfer", parsed.id))
        if self.hold is not None:
            await self.hold.wait()
        return pb.ModelInferResponse(  # type: ignore[no-any-return]
            model_name=parsed.model_name, id=parsed.id).SerializeToString()

    async def model_stream_infer(self, requests: Any,
                                 context: grpc.aio.ServicerContext) -> Any:
        self._record("ModelStreamInfer", context)
        async for request in requests:
            parsed = pb.ModelInferRequest.FromString(request)
            self.seen.append(("ModelStreamInfer", parsed.id))
            response = pb.ModelStreamInferResponse()
            response.infer_response.id = parsed.id
            response.infer_response.outputs.add(name="OUT")
            response.infer_response.parameters["triton_final_response"].bool_param = True
            yield response.SerializeToString()

    def _record(self, method: str, context: grpc.aio.ServicerContext) -> None:
        metadata = {k: v if isinstance(v, str) else v.decode()
                    for k, v in context.invocation_metadata() or ()}
        self.calls.append((method, metadata, context.time_remaining()))

    async def _start(self) -> tuple[grpc.aio.Server, int]:
        def unary(method: str, answer: Any) -> grpc.RpcMethodHandler:
            async def recorded(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                self._record(method, context)
                return await answer(request, context)  # type: ignore[no-any-return]
            return grpc.unary_unary_rpc_method_handler(recorded)

        def fixed(response: Any) -> Any:
            raw = response.SerializeToString()

            async def answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                return raw  # type: ignore[no-any-return]
            return answer

        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService", {
                "ServerReady": unary("ServerReady", fixed(pb.ServerReadyResponse(ready=True))),
                "ModelReady": unary("ModelReady", fixed(pb.ModelReadyResponse(ready=True))),
                "RepositoryModelLoad": unary("RepositoryModelLoad",
                                             fixed(pb.RepositoryModelLoadResponse())),
                "ModelConfig": unary("ModelConfig", self.model_config),
                "ModelInfer": unary("ModelInfer", self.model_infer),
                "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                    self.model_stream_infer),
            }),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    def stop(self) -> None:
        self.loop.run(self.server.stop(0))


def request_info(model: str = "identity", sequence_id: int | None = None, *,
                 start: bool = False, end: bool = False, priority: int = 0) -> RequestInfo:
    """What the wire peek reads from a request, for tests that call the balancer directly."""
    return RequestInfo(model, "", "", sequence_id, start, end, False, priority)


@contextlib.asynccontextmanager
async def local_balancer(instances: int = 1, **variant: object
                         ) -> AsyncIterator[tuple[Balancer, list[Instance]]]:
    """A balancer with one variant (``variant``: more VariantConfig fields) over
    ``instances`` addresses nothing listens on: for accounting tests that send nothing."""
    config = VariantConfig("AllTraffic", instances=tuple(f"127.0.0.1:{i + 1}"
                                                         for i in range(instances)),
                           **variant)  # type: ignore[arg-type]
    v = Variant(config, seed=1)
    upstreams = [Upstream(address) for address in config.instances]
    try:
        added = [v.add(u) for u in upstreams]
        yield Balancer([v]), added
    finally:
        await v.close()
        for u in upstreams:
            await u.close()
