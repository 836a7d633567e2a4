"""Tokens per second through the router's ``ModelStreamInfer``, against Triton direct.

    python bench/stream_rate.py --streams 4 --tokens 200 --seconds 10 --rounds 3

One ``generate`` worker with no per-token delay (Triton's Python backend streams as fast as
it can), a router on ``data_path: grpc`` and one on ``data_path: native``, each in a process
of its own, and Triton direct, taking turns. ``--streams`` gRPC streams each send one
request of ``--tokens`` tokens after another, over grpcio's own client with raw bytes (no
protobuf parsing in the client, so that the client takes as little of the shared CPU as it
can). Printed per target: tokens/s, and the router process's CPU µs per token
(/proc/PID/stat). Loopback only; it ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import grpc
from native_overhead import cpu_seconds, router
from tritonclient.grpc import service_pb2 as pb
from tritonmesh.bench.experiment import timed_repository
from tritonmesh.bench.loadgen import Workload
from tritonmesh.workers.launcher import WorkerPool

STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def request(tokens: int) -> bytes:
    message = pb.ModelInferRequest(model_name="generate")
    # The empty final response ends each request on the stream where the client sees it.
    message.parameters["triton_enable_empty_final_response"].bool_param = True
    for name, value in (("PROMPT_TOKENS", 0), ("MAX_TOKENS", tokens)):
        tensor = message.inputs.add(name=name, datatype="INT32", shape=[1])
        tensor.contents.int_contents.append(value)
    raw: bytes = message.SerializeToString()
    return raw


async def one_stream(address: str, body: bytes, tokens: int, until: float) -> int:
    """Requests one after another on one stream until ``until``; the tokens received."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(STREAM)()
        received = 0
        while time.monotonic() < until:
            await call.write(body)
            for _ in range(tokens + 1):  # the tokens, then the empty final response
                if await call.read() is grpc.aio.EOF:
                    raise RuntimeError(f"{address}: the stream ended early")
                received += 1
        await call.done_writing()
        if await call.code() != grpc.StatusCode.OK:
            raise RuntimeError(f"{address}: {await call.details()}")
        return received - (received // (tokens + 1))  # finals are not tokens


async def load(address: str, pid: int | None, streams: int, tokens: int,
               seconds: float) -> tuple[float, float | None]:
    """(tokens/s, router CPU µs per token)."""
    body = request(tokens)
    before = cpu_seconds(pid) if pid else 0.0
    start = time.monotonic()
    counts = await asyncio.gather(*(one_stream(address, body, tokens, start + seconds)
                                    for _ in range(streams)))
    took = time.monotonic() - start
    total = sum(counts)
    cpu = (cpu_seconds(pid) - before) / total * 1e6 if pid else None
    return total / took, cpu


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="stream-rate-") as tmp:
        d = Path(tmp)
        repo = timed_repository(Workload(decode_ms=0.0, prefill_ms=0.0), d)
        async with WorkerPool(1, repo) as pool, \
                router(d, "grpc", pool.addresses[0]) as grpc_router, \
                router(d, "native", pool.addresses[0]) as native_router:
            targets = {"Triton direct": (pool.addresses[0], None),
                       "data_path grpc": grpc_router, "data_path native": native_router}
            for address, pid in targets.values():  # connections and code warm
                await load(address, pid, args.streams, args.tokens, 1.0)
            print(f"{'round':>5}  {'target':<17} {'tokens/s':>9} {'router CPU µs/token':>20}")
            sums = {name: 0.0 for name in targets}
            for r in range(args.rounds):
                for name, (address, pid) in targets.items():
                    rate, cpu = await load(address, pid, args.streams, args.tokens,
                                           args.seconds)
                    sums[name] += rate
                    print(f"{r + 1:>5}  {name:<17} {rate:>9.0f} "
                          f"{'—' if cpu is None else f'{cpu:.0f}':>20}", flush=True)
            direct = sums["Triton direct"]
            print(f"against Triton direct: grpc {sums['data_path grpc'] / direct:.2f}x, "
                  f"native {sums['data_path native'] / direct:.2f}x tokens/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main(parser.parse_args()))
