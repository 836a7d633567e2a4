"""Soak: a long, bounded mix of traffic and faults; at the end nothing may be outstanding.

    python bench/soak.py [--requests 100000] [--max-seconds 900] [--users 16]

Starts 3 real Triton workers (restarted when they die) and `tritonmesh serve` as its own
process in front of them, then sends a mix of unary calls and streams: 10% cancelled
by the client mid-call (half unary, half streams after their first token), 5% with a
deadline shorter than their work, and a SIGKILL of a random worker every --kill-every
seconds. It samples the router's RSS, and at the end asks the admin API for every
instance's outstanding count: all must be zero. Prints a JSON report. Loopback only;
stops by itself at --requests or --max-seconds, whichever comes first.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException
from tritonmesh._pb import tritonmesh_admin_pb2 as apb
from tritonmesh._pb import tritonmesh_admin_pb2_grpc as apb_grpc
from tritonmesh.endpoint import MEMORY_SNAPSHOTS_ENV
from tritonmesh.workers.launcher import WorkerPool, free_ports


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _tensor(name: str, dtype: str, values: np.ndarray) -> aioclient.InferInput:
    t = aioclient.InferInput(name, list(values.shape), dtype)
    t.set_data_from_numpy(values)
    return t


def _generate(tokens: int) -> list[aioclient.InferInput]:
    return [_tensor("PROMPT_TOKENS", "INT32", np.array([4], np.int32)),
            _tensor("MAX_TOKENS", "INT32", np.array([tokens], np.int32))]


# --mix: every kind of traffic, or one kind alone (to tell which path a growth lies on).
MIXES = {"all": None, "identity": 0.3, "streams": 0.9, "unary-cancels": 0.02,
         "stream-cancels": 0.07}


async def user(address: str, rng: random.Random, stop: asyncio.Event,
               counts: collections.Counter[str], budget: list[int], mix: str = "all") -> None:
    fixed = MIXES[mix]
    async with aioclient.InferenceServerClient(address) as client:
        while not stop.is_set() and budget[0] > 0:
            budget[0] -= 1
            roll = rng.random() if fixed is None else fixed
            try:
                if roll < 0.05:
                    # A client that gives up mid-call: the call is cancelled under it.
                    try:
                        await asyncio.wait_for(client.infer(
                            "generate_unary", _generate(rng.randint(5, 20))), 0.01)
                        counts["unary ok before its cancel"] += 1
                    except TimeoutError:
                        counts["unary cancelled by client"] += 1
                elif roll < 0.10:
                    # A stream the client cancels after its first token.
                    async def cancelled() -> Any:
                        yield {"model_name": "generate", "inputs": _generate(12)}

                    responses = client.stream_infer(cancelled(), stream_timeout=60)
                    async for _, error in responses:
                        responses.cancel()
                        counts["stream cancelled by client" if error is None
                               else f"stream error: {str(error)[:60]}"] += 1
                        break
                elif roll < 0.60:
                    await client.infer("identity", [_tensor("INPUT0", "FP32",
                                                            np.ones(8, np.float32))])
                    counts["unary ok"] += 1
                elif roll < 0.75:
                    # 1 in 3 of these has a deadline shorter than its work.
                    timeout = 0.02 if rng.random() < 0.33 else 30
                    await client.infer("generate_unary", _generate(rng.randint(1, 10)),
                                       client_timeout=timeout)
                    counts["unary generate ok"] += 1
                else:
                    tokens = rng.randint(1, 12)

                    async def one(n: int = tokens) -> Any:
                        yield {"model_name": "generate", "inputs": _generate(n)}

                    responses = client.stream_infer(one(), stream_timeout=60)
                    got = 0
                    async for _, error in responses:
                        if error is not None:
                            counts[f"stream error: {str(error)[:60]}"] += 1
                            break
                        got += 1
                    else:
                        counts["stream ok" if got == tokens else "stream short"] += 1
            except InferenceServerException as exc:
                counts[str(exc.status())] += 1


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    async with WorkerPool(3, restart=True) as pool:
        port, admin_port = free_ports(2)
        address = f"127.0.0.1:{port}"
        admin_address = f"127.0.0.1:{admin_port}"
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "soak.yaml"
            config.write_text(
                f"listen: {address}\nadmin_listen: {admin_address}\nmetrics_listen: null\n"
                "health_check: {interval_s: 0.5}\n"
                "variants:\n  - name: AllTraffic\n"
                "    routing_strategy: LEAST_OUTSTANDING_REQUESTS\n"
                f"    instances: {pool.addresses!r}\n")
            tritonmesh = str(Path(sys.executable).parent / "tritonmesh")
            env = dict(os.environ)
            snapshots = Path(tmp) / "snapshots"
            if args.tracemalloc:
                env[MEMORY_SNAPSHOTS_ENV] = str(snapshots)
            router = await asyncio.create_subprocess_exec(
                tritonmesh, "--log-level", args.router_log_level, "serve", "--config", str(config),
                stdout=asyncio.subprocess.DEVNULL, env=env)
            try:
                report = await soak(args, pool, router.pid, address, admin_address)
                if args.tracemalloc:
                    report["tracemalloc_growth"] = await asyncio.to_thread(compare_snapshots,
                                                                          snapshots)
                return report
            finally:
                router.send_signal(signal.SIGINT)
                await asyncio.wait_for(router.wait(), 60)


def compare_snapshots(directory: Path) -> list[str]:
    """The lines whose live Python allocations grew most between the two snapshots."""
    deadline = time.monotonic() + 60
    while len(list(directory.glob("*.tracemalloc"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)  # a snapshot of a traced process takes a few seconds
    first, last = sorted(directory.glob("*.tracemalloc"), key=lambda p: p.stat().st_mtime)[:2]
    before = tracemalloc.Snapshot.load(str(first))
    after = tracemalloc.Snapshot.load(str(last))
    total = sum(s.size for s in after.statistics("filename")) - sum(
        s.size for s in before.statistics("filename"))
    top = after.compare_to(before, "lineno")[:12]
    return [f"total {total / 1024:+.1f} KiB", *(str(s) for s in top)]


async def soak(args: argparse.Namespace, pool: WorkerPool, router_pid: int,
               address: str, admin_address: str) -> dict[str, Any]:
    admin = apb_grpc.AdminStub(grpc.aio.insecure_channel(admin_address))
    deadline = time.monotonic() + 60
    while True:
        try:
            await admin.ListInstances(apb.ListInstancesRequest(), timeout=2)
            break
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    rng = random.Random(args.seed)
    stop = asyncio.Event()
    counts: collections.Counter[str] = collections.Counter()
    budget = [args.requests]
    samples: list[tuple[float, float, int]] = []
    kills = 0
    started = time.monotonic()
    users = [asyncio.create_task(user(address, random.Random(rng.random()), stop, counts, budget,
                                      args.mix))
             for _ in range(args.users)]
    next_kill = started + args.kill_every
    snapshot_at_warmup = args.tracemalloc
    while any(not u.done() for u in users):
        await asyncio.sleep(1.0)
        now = time.monotonic()
        if snapshot_at_warmup and now - started >= 30:
            os.kill(router_pid, signal.SIGUSR1)  # the baseline, after the warm-up
            snapshot_at_warmup = False
        samples.append((round(now - started, 1), round(rss_mib(router_pid), 1),
                        args.requests - budget[0]))
        if now - started > args.max_seconds:
            stop.set()
        if args.kill_every > 0 and now >= next_kill and not stop.is_set():
            victim = rng.choice(pool.workers)
            if victim.pid is not None and victim.returncode is None:
                os.kill(victim.pid, signal.SIGKILL)
                kills += 1
            next_kill = now + args.kill_every
    await asyncio.gather(*users, return_exceptions=True)
    # Every request has ended; give cancelled calls a moment to be noticed upstream.
    outstanding: dict[str, int] = {}
    for _ in range(50):
        listing = await admin.ListInstances(apb.ListInstancesRequest(), timeout=5)
        outstanding = {i.address: i.outstanding for i in listing.instances}
        if not any(outstanding.values()):
            break
        await asyncio.sleep(0.1)
    if args.tracemalloc:
        os.kill(router_pid, signal.SIGUSR1)
    after_warmup = [s for s in samples if s[0] >= 30] or samples
    # Flat: after warm-up, what the router holds must not grow with the requests served.
    # 2 MiB is noise for a 67 MiB process; the cancel leak of grpc/grpc#43360 grows 6 MiB
    # per 100k cancelled requests.
    growth = after_warmup[-1][1] - after_warmup[0][1]
    return {
        "memory_flat": growth <= 2.0,
        "requests_sent": args.requests - budget[0],
        "seconds": round(time.monotonic() - started, 1),
        "worker_kills": kills,
        "outcomes": dict(counts.most_common()),
        "outstanding_at_end": outstanding,
        "router_rss_mib": {"first_after_30s": after_warmup[0][1], "growth": round(growth, 1),
                           "peak": max(s[1] for s in samples), "last": samples[-1][1]},
        "rss_samples": samples[:: max(1, len(samples) // 20)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--max-seconds", type=float, default=900)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--kill-every", type=float, default=20.0, help="seconds; 0: no kills")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mix", choices=sorted(MIXES), default="all",
                        help="all kinds of traffic (default), or one kind alone: identity "
                             "unary, generate streams, or calls the client cancels")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="trace the router's Python allocations; report what grew "
                             "between 30 s in and the end (slows the router)")
    parser.add_argument("--router-log-level", default="ERROR",
                        help="the router's log level (its log goes to stderr)")
    report = asyncio.run(main_async(parser.parse_args()))
    print(json.dumps(report, indent=2))
    if any(report["outstanding_at_end"].values()):
        raise SystemExit("outstanding counts did not return to zero")
    if not report["memory_flat"]:
        raise SystemExit("the router's memory grew after warm-up")


if __name__ == "__main__":
    main()
