"""Router replicas with and without load reports (issue 18): does blending Triton's own view
of load give several replicas one router's tail latency?

One pool of real Triton workers (the bench's timed demo ``generate_unary``: one request
executes at a time per worker, the rest queue inside Triton). Three setups, each a cell of
closed-loop users (``tritonmesh bench``'s load generator and lognormal lengths), every
router a ``tritonmesh serve`` process of its own, LEAST_OUTSTANDING_REQUESTS:

* one router in front of every worker;
* ``--replicas`` routers in front of the same workers, local counts only;
* the same replicas with ``load_report`` (Triton's metrics every ``--interval-s``).

Users are split evenly over the replicas (user ``u`` draws the same lengths in every
setup). Per setup: P50/P99 latency of the requests started in the measured window,
requests/s, and per worker the requests Triton counted in the window (and their spread).

    python bench/replicas.py --users 16 --instances 4 --replicas 2 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import tritonclient.grpc.aio as aioclient
from tritonmesh.bench.experiment import percentile, timed_repository
from tritonmesh.bench.loadgen import Outcome, Workload, run_users
from tritonmesh.bench.targets import terminate
from tritonmesh.workers.launcher import WorkerPool, free_ports

MODEL = "generate_unary"


def _config(port: int, workers: list[tuple[str, str]], interval_s: float | None) -> str:
    report = ""
    if interval_s is not None:
        pairs = "".join(f"        {grpc!r}: {metrics!r}\n" for grpc, metrics in workers)
        report = (f"    load_report:\n      interval_s: {interval_s}\n"
                  f"      metrics_addresses:\n{pairs}")
    return (f"listen: 127.0.0.1:{port}\nmetrics_listen: null\nadmin_listen: null\n"
            f"variants:\n  - name: AllTraffic\n    routing_strategy: LEAST_OUTSTANDING_REQUESTS\n"
            f"    instances: {[g for g, _ in workers]!r}\n{report}")


async def _ready(address: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with aioclient.InferenceServerClient(address) as client:
        while True:
            try:
                if await client.is_server_ready():
                    return
            except Exception:  # not listening yet
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.2)


async def _counts(workers: list[str]) -> list[int]:
    async def one(address: str) -> int:
        async with aioclient.InferenceServerClient(address) as client:
            stats = await client.get_inference_statistics(MODEL)
        return sum(s.inference_stats.success.count for s in stats.model_stats)

    return list(await asyncio.gather(*(one(a) for a in workers)))


async def run_setup(label: str, replicas: int, interval_s: float | None,
                    workers: list[tuple[str, str]], users: int, workload: Workload,
                    warmup_s: float, measure_s: float, tmp: Path) -> dict[str, object]:
    grpc = [g for g, _ in workers]
    processes = []
    addresses = []
    logs = []
    tritonmesh = str(Path(sys.executable).parent / "tritonmesh")
    try:
        for r, port in enumerate(free_ports(replicas)):
            conf = tmp / f"{label.replace(' ', '_')}-{r}.yaml"
            conf.write_text(_config(port, workers, interval_s))
            log = open(tmp / f"{conf.stem}.log", "wb")  # noqa: ASYNC230 (closed below)
            logs.append(log)
            processes.append(await asyncio.create_subprocess_exec(
                tritonmesh, "--log-level", "WARNING", "serve", "--config", str(conf),
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT))
            addresses.append(f"127.0.0.1:{port}")
        await asyncio.gather(*(_ready(a) for a in addresses))
        share = users // replicas
        begin = time.monotonic()
        before: list[int] = []

        async def after_warmup() -> None:
            await asyncio.sleep(warmup_s)
            before.extend(await _counts(grpc))

        snap = asyncio.create_task(after_warmup())
        results = await asyncio.gather(*(
            run_users(a, share, workload, warmup_s + measure_s, False, first_user=r * share)
            for r, a in enumerate(addresses)))
        await snap
        await asyncio.sleep(1.0)  # a request is counted just after its answer left
        after = await _counts(grpc)
    finally:
        await asyncio.gather(*(terminate(p, 15.0) for p in processes))
        for log in logs:
            log.close()
    outcomes: list[Outcome] = [o for rs in results for o in rs]
    start, end = begin + warmup_s, begin + warmup_s + measure_s
    ok = [o.end - o.start for o in outcomes if start <= o.start < end and o.error is None]
    errors = sum(1 for o in outcomes if start <= o.start < end and o.error is not None)
    done = sum(1 for o in outcomes if o.error is None and start <= o.end < end)
    per_instance = [a - b for a, b in zip(after, before, strict=True)]
    mean = statistics.fmean(per_instance)
    return {
        "setup": label, "replicas": replicas, "users": users, "instances": len(workers),
        "requests": len(ok), "errors": errors,
        "p50_s": round(percentile(ok, 50), 4), "p99_s": round(percentile(ok, 99), 4),
        "req_per_s": round(done / measure_s, 2),
        "per_instance_requests": per_instance,
        "per_instance_cv": round(statistics.pstdev(per_instance) / mean, 3) if mean else 0.0,
    }


async def main(args: argparse.Namespace) -> list[dict[str, object]]:
    workload = Workload(median_tokens=args.median_tokens, decode_ms=args.decode_ms,
                        seed=args.seed)
    setups = [("1 router", 1, None),
              (f"{args.replicas} replicas, local counts", args.replicas, None),
              (f"{args.replicas} replicas, load reports", args.replicas, args.interval_s)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tritonmesh-replicas-") as name:
        tmp = Path(name)
        repo = timed_repository(workload, tmp)
        async with WorkerPool(args.instances, repo) as pool:
            workers = [(w.address, f"{w.host}:{w.metrics_port}") for w in pool.workers]
            for _ in range(args.repeat):
                for label, replicas, interval in setups:
                    row = await run_setup(label, replicas, interval, workers, args.users,
                                          workload, args.warmup, args.duration, tmp)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=80)
    parser.add_argument("--instances", type=int, default=20)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--interval-s", type=float, default=0.1)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--median-tokens", type=float, default=40.0)
    parser.add_argument("--decode-ms", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=1, help="run the three setups N times")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    arguments = parser.parse_args()
    if arguments.users % arguments.replicas:
        parser.error("--users must split evenly over --replicas")
    table = asyncio.run(main(arguments))
    if arguments.out:
        Path(arguments.out).write_text(json.dumps(table, indent=1))
