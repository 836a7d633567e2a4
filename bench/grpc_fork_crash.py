"""gRPC's fork handlers crash children spawned from a uvloop loop while gRPC is busy.

    python bench/grpc_fork_crash.py [--rounds 150] [--fork-support 1|0] [--loop uvloop|asyncio]

A grpc.aio server and four tasks calling it run on the loop; meanwhile the loop spawns
pairs of short-lived children (``asyncio.create_subprocess_exec``, as the supervisor starts
router processes and the launcher Triton workers). uvloop spawns with fork(), so gRPC's
pthread_atfork handlers run; with them on (``GRPC_ENABLE_FORK_SUPPORT=1``, gRPC core's
default) some children die of SIGSEGV in an ``event_engine`` thread before their exec. The
stdlib loop spawns with vfork/posix_spawn, which runs no fork handlers. Prints the children's
exit codes (-11: SIGSEGV). Loopback only; it ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys


async def main(rounds: int) -> dict[int, int]:
    import grpc

    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")

    async def busy() -> None:
        while True:
            try:
                await channel.unary_unary("/bench.Fork/Call")(b"", timeout=1)
            except grpc.aio.AioRpcError:
                pass

    callers = [asyncio.ensure_future(busy()) for _ in range(4)]
    codes: dict[int, int] = {}
    for _ in range(rounds):
        children = [await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import time; time.sleep(0.05)") for _ in range(2)]
        for child in children:
            code = await child.wait()
            codes[code] = codes.get(code, 0) + 1
    for caller in callers:
        caller.cancel()
    await asyncio.gather(*callers, return_exceptions=True)
    await channel.close()
    await server.stop(0)
    return codes


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--fork-support", choices=("0", "1"), default="1")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    os.environ["GRPC_ENABLE_FORK_SUPPORT"] = args.fork_support  # before grpc is imported
    if args.loop == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    codes = loop.run_until_complete(main(args.rounds))
    loop.close()
    print(f"loop {args.loop}, GRPC_ENABLE_FORK_SUPPORT={args.fork_support}: exit codes "
          f"{dict(sorted(codes.items()))} ({codes.get(-11, 0)} of {sum(codes.values())} "
          "children SIGSEGV)")
