"""Big messages: the router's memory during and after bursts of large requests.

    python bench/big_messages.py [--mib 100] [--concurrent 4] [--rounds 3]
                                 [--trim-interval-s 10] [--arena-max N] [--streams N]

Starts one real Triton worker and `tritonmesh serve` as its own process in front of it
(``limits.memory_trim_interval_s`` as given; ``--arena-max`` sets ``MALLOC_ARENA_MAX`` for
the router), sends ``--rounds`` bursts of ``--concurrent`` identity requests of ``--mib``
MiB each, and prints the router's RSS before, its peak (VmHWM) and its RSS once the trim
interval (plus a second) has passed after the last burst. With ``--streams N``, each burst
is N short ``generate`` streams instead (``--concurrent`` at a time). Loopback only, bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc.aio as aioclient
from tritonmesh.workers.launcher import WorkerPool, free_ports


def status_mib(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def burst(address: str, mib: int, concurrent: int) -> None:
    values = np.ones(mib * 2**20 // 4, np.float32)
    async with aioclient.InferenceServerClient(address) as client:
        async def one() -> None:
            x = aioclient.InferInput("INPUT0", list(values.shape), "FP32")
            x.set_data_from_numpy(values)
            result = await client.infer("identity", [x], client_timeout=120)
            assert result.as_numpy("OUTPUT0").shape == values.shape
        await asyncio.gather(*(one() for _ in range(concurrent)))


async def streams(address: str, count: int, concurrent: int) -> None:
    def inputs() -> list[aioclient.InferInput]:
        tensors = []
        for name, value in (("PROMPT_TOKENS", 1), ("MAX_TOKENS", 4)):
            t = aioclient.InferInput(name, [1], "INT32")
            t.set_data_from_numpy(np.array([value], np.int32))
            tensors.append(t)
        return tensors

    async with aioclient.InferenceServerClient(address) as client:
        async def one() -> None:
            async def requests() -> Any:
                yield {"model_name": "generate", "inputs": inputs()}
            async for _result, error in client.stream_infer(requests()):
                assert error is None, error
        for start in range(0, count, concurrent):
            await asyncio.gather(*(one() for _ in range(min(concurrent, count - start))))


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    async with WorkerPool(1) as pool:
        address = f"127.0.0.1:{free_ports(1)[0]}"
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "big.yaml"
            config.write_text(
                f"listen: {address}\nmetrics_listen: null\n"
                f"limits: {{memory_trim_interval_s: {args.trim_interval_s}}}\n"
                f"variants:\n  - name: AllTraffic\n    instances: {pool.addresses!r}\n")
            env = dict(os.environ)
            if args.arena_max:
                env["MALLOC_ARENA_MAX"] = str(args.arena_max)
            router = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).parent / "tritonmesh"), "serve", "--config",
                str(config), stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL, env=env)
            try:
                for _ in range(100):
                    try:
                        async with aioclient.InferenceServerClient(address) as c:
                            if await c.is_server_ready():
                                break
                    except Exception:  # not listening yet
                        pass
                    await asyncio.sleep(0.2)
                before = status_mib(router.pid, "VmRSS")
                for _ in range(args.rounds):
                    if args.streams:
                        await streams(address, args.streams, args.concurrent)
                    else:
                        await burst(address, args.mib, args.concurrent)
                await asyncio.sleep(max(args.trim_interval_s, 0) + 1.0)
                return {"mib": 0 if args.streams else args.mib, "streams": args.streams,
                        "concurrent": args.concurrent, "rounds": args.rounds,
                        "trim_interval_s": args.trim_interval_s, "arena_max": args.arena_max,
                        "rss_before_mib": round(before),
                        "rss_peak_mib": round(status_mib(router.pid, "VmHWM")),
                        "rss_after_mib": round(status_mib(router.pid, "VmRSS"))}
            finally:
                router.send_signal(signal.SIGINT)
                await asyncio.wait_for(router.wait(), 60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trim-interval-s", type=float, default=10.0)
    parser.add_argument("--arena-max", type=int, default=0)
    parser.add_argument("--streams", type=int, default=0)
    print(json.dumps(asyncio.run(main_async(parser.parse_args()))))


if __name__ == "__main__":
    main()
