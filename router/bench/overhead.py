"""What the router itself costs: the `identity` model, direct vs through each router."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc.aio as aioclient
from tritonmesh.bench.cpu import tree_cpu_s
from tritonmesh.bench.experiment import percentile
from tritonmesh.bench.targets import Serving, Target, TargetFailed, running
from tritonmesh.workers.launcher import WorkerPool
from tritonmesh.workers.tritonserver import default_model_repository

__all__ = ["overhead_experiment"]

DIRECT = Target("direct", "")


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


@dataclass
class _Tally:
    """One target at one user count, over the rounds."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    cpu_s: float = 0.0  # the target's process tree (nothing for Triton direct)
    triton_cpu_s: float = 0.0  # the Triton worker's process tree, over the same rounds
    rounds: list[dict[str, Any]] = field(default_factory=list)


async def _round(serving: Serving, triton: int, users: int, seconds: float,
                 tally: _Tally) -> None:
    """One measured round; CPU read right before and right after it."""
    cpu = tree_cpu_s(serving.pid) if serving.pid is not None else 0.0
    triton_cpu = tree_cpu_s(triton)
    latencies, errors = await _load(serving.address, users, seconds)
    cpu = tree_cpu_s(serving.pid) - cpu if serving.pid is not None else 0.0
    triton_cpu = tree_cpu_s(triton) - triton_cpu
    tally.latencies += latencies
    tally.errors += errors
    tally.cpu_s += cpu
    tally.triton_cpu_s += triton_cpu
    done = len(latencies)
    tally.rounds.append({
        "req_per_s": done / seconds, "errors": errors,
        "cpu_us_per_request": cpu / done * 1e6 if done and serving.pid is not None else None,
        "triton_cpu_us_per_request": triton_cpu / done * 1e6 if done else None})


def _row(target: Target, users: int, seconds: float, tally: _Tally) -> dict[str, Any]:
    done = len(tally.latencies)
    own = target.kind != "direct"
    return {
        "target": target.label or "direct", "users": users, "rounds": len(tally.rounds),
        "p50_ms": percentile(tally.latencies, 50) * 1e3,
        "p99_ms": percentile(tally.latencies, 99) * 1e3,
        "req_per_s": done / (seconds * len(tally.rounds)), "errors": tally.errors,
        "cpu_us_per_request": tally.cpu_s / done * 1e6 if done and own else None,
        "triton_cpu_us_per_request": tally.triton_cpu_s / done * 1e6 if done else None,
        "per_round": tally.rounds,
    }


async def overhead_experiment(
    targets: Sequence[Target], users: Sequence[int], seconds: float, rounds: int = 1,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Triton alone, then each target in front of it: P50/P99, req/s and CPU per request,
    per user count.

    Every target is started once, up front (one that fails stops the run before anything
    is measured), and stays up. At each user count the targets take turns, ``rounds``
    times over, so a drift in the machine spreads over all of them alike; each turn is up
    to a second of warm-up, then ``users`` closed-loop users for ``seconds``. Figures pool
    the rounds: latency percentiles over every request, req/s over every round's seconds,
    and CPU µs per request, the CPU (user + system) the target's whole process tree used in
    its measured rounds over the requests completed in them (none for Triton direct). Triton's
    own CPU per request is read alike, for every target. Added latency and throughput are
    relative to Triton alone at that user count.
    """
    rows: list[dict[str, Any]] = []
    everything = [DIRECT, *targets]
    total = len(users) * len(everything) * rounds
    async with contextlib.AsyncExitStack() as stack:
        # identity alone: the worker starts sooner, and Triton's CPU is that model's.
        repo = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tritonmesh-bench-")))
        shutil.copytree(default_model_repository() / "identity", repo / "identity")
        pool = await stack.enter_async_context(WorkerPool(1, repo))
        assert pool.workers[0].process is not None
        triton = pool.workers[0].process.pid
        serving = []
        for target in everything:
            if progress:
                progress(0, total, f"starting {target.label or 'direct'}")
            serving.append(await stack.enter_async_context(running(target, pool.addresses)))
        turn = 0
        for n in users:
            tallies = [_Tally() for _ in everything]
            for r in range(rounds):
                for target, where, tally in zip(everything, serving, tallies, strict=True):
                    if progress:
                        progress(turn, total, f"{n} users, round {r + 1}/{rounds}: "
                                              f"{target.label or 'direct'}")
                    await _load(where.address, n, min(1.0, seconds))  # warm-up
                    try:
                        await _round(where, triton, n, seconds, tally)
                    except ProcessLookupError as gone:
                        who = "the Triton worker" if gone.args == (triton,) else "the target"
                        raise TargetFailed(f"{target.label or 'direct'}: {who} exited "
                                           "mid-run") from None
                    turn += 1
            baseline = _row(DIRECT, n, seconds, tallies[0])
            for target, tally in zip(everything, tallies, strict=True):
                row = _row(target, n, seconds, tally)
                row["added_p50_ms"] = row["p50_ms"] - baseline["p50_ms"]
                row["added_p99_ms"] = row["p99_ms"] - baseline["p99_ms"]
                row["throughput_vs_direct"] = row["req_per_s"] / baseline["req_per_s"]
                rows.append(row)
    if progress:
        progress(total, total, "done")
    return rows
