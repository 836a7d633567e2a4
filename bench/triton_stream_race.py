"""Reproduce Triton 2.51's crash on mixed streaming, directly and through tritonmesh.

    python bench/triton_stream_race.py [--rounds 100] [--via-router]

One real Triton worker with the demo models. Each round, 4 client threads each open a
``ModelStreamInfer`` stream and send 6 requests on it, alternating ``identity``
(non-decoupled) and ``generate`` (decoupled, 3 tokens). Sent to Triton directly, the
worker dies (SIGSEGV in the stream's response allocator, or SIGABRT on
``!byte_buffer->Valid()``) within a few dozen rounds. Either model alone on streams, or
``identity`` over unary ModelInfer beside streamed ``generate``, survives. With
``--via-router`` the same traffic goes through tritonmesh, which sends stream requests
for non-decoupled models upstream as ModelInfer (tritonmesh.decoupled). Prints one JSON
line; loopback only; stops after --rounds or at the first crash.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import threading
import time
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonmesh.config import EndpointConfig, RoutingStrategy, VariantConfig
from tritonmesh.server import Router
from tritonmesh.workers.launcher import WorkerPool


def one_stream(address: str, k: int, errors: list[str]) -> None:
    answers: queue.Queue[Any] = queue.Queue()
    with grpcclient.InferenceServerClient(address) as client:
        client.start_stream(callback=lambda result, error: answers.put(error))
        for j in range(6):
            if j % 2:
                tensor = grpcclient.InferInput("INPUT0", [3], "FP32")
                tensor.set_data_from_numpy(np.full(3, j, np.float32))
                client.async_stream_infer("identity", [tensor], request_id=f"{k}-{j}")
            else:
                inputs = []
                for name, value in (("PROMPT_TOKENS", 1), ("MAX_TOKENS", 3)):
                    tensor = grpcclient.InferInput(name, [1], "INT32")
                    tensor.set_data_from_numpy(np.array([value], np.int32))
                    inputs.append(tensor)
                client.async_stream_infer("generate", inputs, request_id=f"{k}-{j}",
                                          enable_empty_final_response=True)
        try:
            for _ in range(3 + 3 * 4):  # 3 identity answers, 3 x (3 tokens + empty final)
                error = answers.get(timeout=20)
                if error is not None:
                    errors.append(str(error))
        except queue.Empty:
            errors.append("no answer in 20 s")
        client.stop_stream()


async def main(rounds: int, via_router: bool) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    async with WorkerPool(1) as pool:
        address, router = pool.addresses[0], None
        if via_router:
            variant = VariantConfig("AllTraffic", 1.0,
                                    RoutingStrategy.LEAST_OUTSTANDING_REQUESTS,
                                    instances=tuple(pool.addresses))
            config = EndpointConfig(listen="127.0.0.1:0", metrics_listen=None, admin_listen=None,
                                    variants=(variant,))
            router = Router(config, {"AllTraffic": list(pool.addresses)})
            await router.start()
            address = router.address
        errors: list[str] = []
        started = time.monotonic()
        done = 0
        for _ in range(rounds):
            threads = [threading.Thread(target=one_stream, args=(address, k, errors))
                       for k in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                await loop.run_in_executor(None, t.join)
            if errors or not pool.exits.empty():
                break
            done += 1
        exit_code = None if pool.exits.empty() else pool.exits.get_nowait()[1]
        if router is not None:
            await router.stop(grace=1.0)
        return {"via_router": via_router, "rounds_asked": rounds, "rounds_survived": done,
                "worker_exit_code": exit_code, "errors": errors[:3],
                "seconds": round(time.monotonic() - started, 1)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--via-router", action="store_true")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.rounds, args.via_router))))
