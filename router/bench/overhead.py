"""What the router itself costs: the `identity` model, direct vs through each router."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tritonclient.grpc.aio as aioclient
from tritonmesh.bench.experiment import percentile
from tritonmesh.bench.targets import Target, running
from tritonmesh.workers.launcher import WorkerPool
from tritonmesh.workers.tritonserver import default_model_repository

__all__ = ["overhead_experiment"]


async def _load(address: str, users: int, seconds: float) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    until = time.monotonic() + seconds

    async def user() -> None:
        nonlocal errors
        async with aioclient.InferenceServerClient(address) as client:
            x = aioclient.InferInput("INPUT0", [16], "FP32")
            x.set_data_from_numpy(np.arange(16, dtype=np.float32))
            while time.monotonic() < until:
                start = time.perf_counter()
                try:
                    await client.infer("identity", [x])
                except Exception:  # counted, not raised: a router under test may fail
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(user() for _ in range(users)))
    return latencies, errors


async def overhead_experiment(
    targets: Sequence[Target], users: Sequence[int], seconds: float,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Triton alone, then each target in front of it: P50/P99 and req/s per user count.

    Each cell runs ``users`` closed-loop users for ``seconds`` after up to a second of
    warm-up; added latency and throughput are relative to Triton alone at that count.
    """
    rows: list[dict[str, Any]] = []
    everything = [Target("direct", ""), *targets]
    total = len(users) * len(everything)
    async with WorkerPool(1, default_model_repository()) as pool:
        for n in users:
            baseline: dict[str, Any] = {}
            for target in everything:
                if progress:
                    progress(len(rows), total, f"{n} users: {target.label or 'direct'}")
                async with running(target, pool.addresses) as address:
                    await _load(address, n, min(1.0, seconds))  # warm-up
                    latencies, errors = await _load(address, n, seconds)
                row: dict[str, Any] = {
                    "target": target.label or "direct", "users": n,
                    "p50_ms": percentile(latencies, 50) * 1e3,
                    "p99_ms": percentile(latencies, 99) * 1e3,
                    "req_per_s": len(latencies) / seconds, "errors": errors,
                }
                if target.kind == "direct":
                    baseline = row
                row["added_p50_ms"] = row["p50_ms"] - baseline["p50_ms"]
                row["added_p99_ms"] = row["p99_ms"] - baseline["p99_ms"]
                row["throughput_vs_direct"] = row["req_per_s"] / baseline["req_per_s"]
                rows.append(row)
    if progress:
        progress(total, total, "done")
    return rows
