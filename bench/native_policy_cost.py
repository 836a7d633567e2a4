"""What the native path's Python policy costs per ModelInfer: the router's CPU with it, and
with a stand-in that only opens the upstream stream, side by side, interleaved.

    python bench/native_policy_cost.py --users 1 --seconds 10 --rounds 3

Two ``tritonmesh serve`` on ``data_path: native`` over one ``identity`` worker, loaded in
turn by h2load as in ``bench/native_overhead.py``. The second one's ``NativeInfer.start`` is
replaced (a ``sitecustomize`` on its ``PYTHONPATH``; nothing in the package changes) by one
that sends every call to the first instance's open connection and answers nothing itself:
no wire peek, retry budget, pick, lease, request metrics, outlier detector or release. The
difference of the two is the policy's CPU per request; the stand-in's figure is what the
engine, uvloop and the kernel cost without it. Loopback only; it ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from native_overhead import body, load, router
from tritonmesh.workers.launcher import WorkerPool

STAND_IN = '''
from tritonmesh import native_infer


class _Call:
    __slots__ = ("client", "upstream")

    def __init__(self, client):
        self.client = client
        self.upstream = None

    def trailers(self, code, http_status):
        self.client.handler = None

    def closed(self, stream, error_code):
        self.client.handler = None


def start(self, stream, message):
    instance = self.balancer.variants[0].instances[0]
    connection = self.pool.get(instance.address)
    if connection is None:  # the first call: connect, and let the client try again
        native_infer.asyncio.ensure_future(self.pool.connect(instance.address))
        native_infer.refuse(stream, "UNAVAILABLE", "connecting")
        return
    call = _Call(stream)
    headers = self.request_headers(instance, native_infer.MODEL_INFER, None, stream.metadata)
    call.upstream = connection.open_stream(headers, stream, call, None)


native_infer.NativeInfer.start = start
'''


async def main(args: argparse.Namespace) -> None:
    if shutil.which("h2load") is None:
        sys.exit("h2load is missing: apt-get install nghttp2-client")
    with tempfile.TemporaryDirectory(prefix="native-policy-") as tmp:
        d = Path(tmp)
        (d / "body.bin").write_bytes(body())
        (d / "stand_in").mkdir()
        (d / "stand_in" / "sitecustomize.py").write_text(STAND_IN)
        (d / "bare").mkdir()  # its config beside the other's: router() names it by path
        async with contextlib.AsyncExitStack() as stack:
            pool = await stack.enter_async_context(WorkerPool(1))
            policy = await stack.enter_async_context(router(d, "native", pool.addresses[0]))
            saved = os.environ.get("PYTHONPATH")
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(d / "stand_in"), saved]))
            try:  # the environment the stand-in's process starts with
                bare = await stack.enter_async_context(
                    router(d / "bare", "native", pool.addresses[0]))
            finally:
                if saved is None:
                    del os.environ["PYTHONPATH"]
                else:
                    os.environ["PYTHONPATH"] = saved
            targets = {"with the policy": policy, "stand-in": bare}
            for address, pid in targets.values():  # connections made, code warm
                await load(d, address, args.users, 2, pid)
            cpu: dict[str, list[float]] = {name: [] for name in targets}
            for round_ in range(1, args.rounds + 1):
                for name, (address, pid) in targets.items():
                    rate, _, _, micros = await load(d, address, args.users, args.seconds, pid)
                    assert micros is not None
                    cpu[name].append(micros)
                    print(f"round {round_}: {name:<15} {rate:7.0f} req/s, router CPU "
                          f"{micros:5.0f} µs per request")
            full, stand_in = (statistics.median(cpu[n]) for n in targets)
            print(f"{args.users} users, medians: {full:.0f} µs with the policy, {stand_in:.0f} "
                  f"without: the policy {full - stand_in:.0f} µs per request")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main(parser.parse_args()))
