"""Cancel many streams mid-generation against one Triton worker directly; count aborts.

    python bench/cancel_storm.py [--rounds 300] [--streams 16] [--empty-final mixed]

One real Triton worker (restarted when it dies) with the demo models, or those of
``--model-repository``. Each round opens ``--streams`` ModelStreamInfer streams at once,
each sending one ``generate`` request (64 tokens; ``--empty-final``: whether it asks for
an empty final response, as the router always does), and cancels every stream after its first
0 to 4 tokens plus up to one token's time: the model sees ``is_cancelled()`` while it is
generating, and the requests queued behind it are cancelled in Triton's queue. A worker
that dies (the intermittent abort under cancellation) is counted, with its exit code, and
restarted. Prints one JSON line; loopback only; bounded by --rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from typing import Any

import grpc
import grpc.aio
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonmesh.workers.launcher import WorkerPool
from tritonmesh.workers.upstream import method_path


def _request(k: int, empty_final: bool) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="generate", id=f"c{k}")
    # The router asks for it on every request (decoupled.py).
    request.parameters["triton_enable_empty_final_response"].bool_param = empty_final
    for name, value in (("PROMPT_TOKENS", 1), ("MAX_TOKENS", 64)):
        request.inputs.add(name=name, datatype="INT32", shape=[1])
        request.raw_input_contents.append(np.array([value], np.int32).tobytes())
    return request


async def one_stream(channel: grpc.aio.Channel, k: int, rng: random.Random,
                     empty_final: str) -> str:
    stream = channel.stream_stream(
        method_path("ModelStreamInfer"),
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelStreamInferResponse.FromString)
    call = stream()
    asked = empty_final == "always" or (empty_final == "mixed" and rng.random() < 0.5)
    await call.write(_request(k, asked))
    wanted = rng.randint(0, 4)
    try:
        for _ in range(wanted):
            response = await asyncio.wait_for(call.read(), 60)
            if response is grpc.aio.EOF:
                return "eof"
            if response.error_message:
                return "error"
        # Anywhere within a token's time: before, during or after the model's check.
        await asyncio.sleep(rng.uniform(0, 0.01))
    except (grpc.aio.AioRpcError, TimeoutError):
        return "rpc-error"
    finally:
        call.cancel()
    return f"cancelled after {wanted} tokens"


async def main(rounds: int, streams: int, repository: str | None, seed: int,
               empty_final: str) -> dict[str, Any]:
    rng = random.Random(seed)
    aborts: list[int] = []
    outcomes: dict[str, int] = {}
    pool = WorkerPool(1, repository, restart=True,
                      on_exit=lambda worker, code: aborts.append(code))
    started = time.monotonic()
    async with pool:
        for _ in range(rounds):
            worker = pool.workers[0]
            await worker._wait_ready(120)  # after a restart, until it serves again
            async with grpc.aio.insecure_channel(worker.address) as channel:
                results = await asyncio.gather(
                    *(one_stream(channel, k, rng, empty_final) for k in range(streams)))
            for result in results:
                outcomes[result] = outcomes.get(result, 0) + 1
        restarts = pool.workers[0].restarts
    return {"rounds": rounds, "streams_per_round": streams, "empty_final": empty_final,
            "aborts": len(aborts),
            "exit_codes": aborts, "restarts": restarts, "outcomes": outcomes,
            "seconds": round(time.monotonic() - started, 1)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--model-repository", default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--empty-final", choices=["mixed", "always", "never"], default="mixed",
                        help="which requests ask for an empty final response (the router "
                             "asks on all; mixed: half, at random)")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.rounds, args.streams, args.model_repository,
                                      args.seed, args.empty_final))))
