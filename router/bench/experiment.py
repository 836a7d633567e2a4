"""The experiments: SageMaker's routing comparison, and what the router itself costs.

Routing: closed-loop users against an endpoint whose instance count grows with them
(4 users/1 instance, 20/5, 40/10, 60/15, 80/20), every target serving the same seeded
requests on the same real Triton workers (the `generate` demo model: one request at a
time per instance). Overhead: the `identity` model, direct vs through each router.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tritonclient.grpc.aio as aioclient
from tritonmesh.bench.loadgen import Outcome, Workload, run_users
from tritonmesh.bench.targets import Target, running
from tritonmesh.workers.launcher import WorkerPool
from tritonmesh.workers.tritonserver import default_model_repository

__all__ = ["Cell", "CellResult", "routing_experiment", "timed_repository"]

QUICK_SCALE = ((4, 1), (20, 5))
FULL_SCALE = ((4, 1), (20, 5), (40, 10), (60, 15), (80, 20))


@dataclass(frozen=True)
class Cell:
    users: int
    instances: int
    target: Target


@dataclass
class CellResult:
    users: int
    instances: int
    target: str
    mode: str
    requests: int
    errors: int
    p50_s: float
    p90_s: float
    p99_s: float
    max_s: float
    queued_p50_s: float
    queued_p99_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    req_per_s: float
    req_per_min_per_instance: float
    work_share_cv: float  # coefficient of variation of requests per instance (Triton's count)
    error_samples: list[str] = field(default_factory=list)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    # Nearest rank: the smallest value with at least q% of the values at or below it.
    k = min(len(ordered) - 1, max(0, math.ceil(q / 100.0 * len(ordered)) - 1))
    return ordered[k]


def timed_repository(workload: Workload, into: Path) -> Path:
    """A copy of the demo repository with the workload's per-token times written in."""
    repo = into / "models"
    shutil.copytree(default_model_repository(), repo)
    for model in ("generate", "generate_unary"):
        config = repo / model / "config.pbtxt"
        text = config.read_text()
        text = text.replace('key: "prefill_ms_per_token" value: { string_value: "0.05" }',
                            f'key: "prefill_ms_per_token" value: '
                            f'{{ string_value: "{workload.prefill_ms}" }}')
        text = text.replace('key: "decode_ms_per_token" value: { string_value: "5" }',
                            f'key: "decode_ms_per_token" value: '
                            f'{{ string_value: "{workload.decode_ms}" }}')
        config.write_text(text)
    return repo


async def _inference_counts(workers: Sequence[str], model: str) -> list[int]:
    counts = []
    for address in workers:
        async with aioclient.InferenceServerClient(address) as client:
            stats = await client.get_inference_statistics(model)
            counts.append(sum(s.inference_stats.success.count + s.inference_stats.fail.count
                              for s in stats.model_stats))
    return counts


def summarize(cell: Cell, outcomes: list[Outcome], window: tuple[float, float],
              workload: Workload, shares: list[int], streaming: bool) -> CellResult:
    start, end = window
    measured = [o for o in outcomes if o.start >= start and o.end <= end]
    ok = [o for o in measured if o.error is None]
    latency = [o.end - o.start for o in ok]
    queued = [o.end - o.start - workload.service_s(o.tokens) for o in ok]
    ttft = [o.ttft for o in ok if o.ttft is not None]
    seconds = end - start
    mean_share = statistics.fmean(shares) if shares else 0.0
    cv = statistics.pstdev(shares) / mean_share if mean_share else 0.0
    return CellResult(
        users=cell.users, instances=cell.instances, target=cell.target.label,
        mode="stream" if streaming else "unary", requests=len(ok),
        errors=len(measured) - len(ok),
        p50_s=percentile(latency, 50), p90_s=percentile(latency, 90),
        p99_s=percentile(latency, 99), max_s=max(latency, default=float("nan")),
        queued_p50_s=percentile(queued, 50), queued_p99_s=percentile(queued, 99),
        ttft_p50_s=percentile(ttft, 50) if ttft else None,
        ttft_p99_s=percentile(ttft, 99) if ttft else None,
        req_per_s=len(ok) / seconds,
        req_per_min_per_instance=len(ok) / seconds * 60 / cell.instances,
        work_share_cv=round(cv, 3),
        error_samples=sorted({o.error for o in measured if o.error})[:3],
    )


async def run_cell(cell: Cell, workers: Sequence[str], workload: Workload, warmup_s: float,
                   measure_s: float, streaming: bool) -> CellResult:
    chosen = list(workers[: cell.instances])
    model = "generate" if streaming else "generate_unary"
    async with running(cell.target, chosen) as address:
        begin = time.monotonic()
        before: list[int] = []

        async def snapshot_after_warmup() -> None:
            await asyncio.sleep(warmup_s)
            before.extend(await _inference_counts(chosen, model))

        snap = asyncio.create_task(snapshot_after_warmup())
        outcomes = await run_users(address, cell.users, workload, warmup_s + measure_s,
                                   streaming)
        await snap
        after = await _inference_counts(chosen, model)
    shares = [a - b for a, b in zip(after, before, strict=True)]
    window = (begin + warmup_s, begin + warmup_s + measure_s)
    return summarize(cell, outcomes, window, workload, shares, streaming)


async def routing_experiment(
    targets: Sequence[Target], scale: Sequence[tuple[int, int]], workload: Workload,
    warmup_s: float, measure_s: float, streaming: bool,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[CellResult]:
    """Every target at every (users, instances) point, on one pool of real workers."""
    cells = [Cell(u, n, t) for u, n in scale for t in targets]
    results = []
    with tempfile.TemporaryDirectory(prefix="tritonmesh-bench-") as tmp:
        repo = timed_repository(workload, Path(tmp))
        async with WorkerPool(max(n for _, n in scale), repo) as pool:
            for i, cell in enumerate(cells):
                if progress:
                    progress(i, len(cells), f"{cell.users} users / {cell.instances} instances: "
                                            f"{cell.target.label}")
                results.append(await run_cell(cell, pool.addresses, workload, warmup_s,
                                              measure_s, streaming))
            if progress:
                progress(len(cells), len(cells), "done")
    return results


def progress_bar(i: int, total: int, label: str) -> None:
    width = 30
    filled = width * i // max(total, 1)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {i}/{total} {label[:70]:<70}")
    if i == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def as_dicts(results: Sequence[CellResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
