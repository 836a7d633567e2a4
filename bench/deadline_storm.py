"""Unary requests with deadlines just above the router's floor, through the router to two
real Triton workers, with each ``upstream_cancellation`` in turn; count the workers that die.

    python bench/deadline_storm.py [--requests 20000] [--users 32] [--modes forward absorb]

Each request is an ``identity`` ModelInfer whose deadline is 5 to 12 ms
(``limits.min_upstream_deadline_ms`` is 5, so each reaches Triton with a few ms left): many
expire while Triton works on them, which on ``forward`` cancels them in Triton's gRPC
frontend (a deadline sent upstream, or the router's reset) and on ``absorb`` does not. A
worker that dies (Triton's cancellation race, server#7368/#8034) is counted with its exit
code and restarted. One JSON line per mode; loopback only; bounded by --requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import grpc
import grpc.aio
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonmesh.config import parse_config
from tritonmesh.server import Router
from tritonmesh.workers.launcher import WorkerPool
from tritonmesh.workers.upstream import method_path


def _request() -> bytes:
    request = pb.ModelInferRequest(model_name="identity")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[3])
    request.raw_input_contents.append(np.arange(3, dtype=np.float32).tobytes())
    return request.SerializeToString()  # type: ignore[no-any-return]


async def _user(address: str, count: int, first: int, outcomes: dict[str, int]) -> None:
    raw = _request()
    async with grpc.aio.insecure_channel(address) as channel:
        infer = channel.unary_unary(method_path("ModelInfer"))
        for i in range(count):
            try:
                await infer(raw, timeout=0.001 * (5 + (first + i) % 8))
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            outcomes[code] = outcomes.get(code, 0) + 1


async def storm(mode: str, requests: int, users: int) -> dict[str, Any]:
    deaths: list[int] = []
    pool = WorkerPool(2, restart=True, on_exit=lambda worker, code: deaths.append(code))
    outcomes: dict[str, int] = {}
    async with pool:
        config = parse_config({
            "listen": "127.0.0.1:0", "metrics_listen": None, "admin_listen": None,
            "variants": [{"name": "v", "routing_strategy": "ROUND_ROBIN",
                          "instances": [w.address for w in pool.workers],
                          "upstream_cancellation": mode}]})
        router = Router(config, {"v": [w.address for w in pool.workers]})
        await router.start()
        started = time.monotonic()
        try:
            await asyncio.gather(*(_user(router.address, requests // users, k * 7, outcomes)
                                   for k in range(users)))
        finally:
            seconds = time.monotonic() - started
            absorbed = sum(i.absorbed for i in router.balancer.instances()) \
                if router.balancer is not None else 0
            await router.stop(grace=5.0)
    return {"mode": mode, "requests": requests, "users": users, "worker_deaths": len(deaths),
            "exit_codes": deaths, "absorbed": absorbed, "outcomes": outcomes,
            "seconds": round(seconds, 1)}


async def main(modes: list[str], requests: int, users: int) -> None:
    for mode in modes:
        print(json.dumps(await storm(mode, requests, users)), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--modes", nargs="+", default=["forward", "absorb"],
                        choices=["forward", "absorb"])
    args = parser.parse_args()
    asyncio.run(main(args.modes, args.requests, args.users))
