"""The experiments: SageMaker's routing comparison, and what the router itself costs.

Routing: closed-loop users against an endpoint whose instance count grows with them
(4 users/1 instance, 20/5, 40/10, 60/15, 80/20), every target serving the same seeded
requests on the same real Triton workers (the `generate` demo model: one request at a
time per instance). Overhead: the `identity` model, direct vs through each router.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import tritonclient.grpc.aio as aioclient
from tritonmesh.bench.cpu import tree_cpu_s
from tritonmesh.bench.loadgen import Outcome, Workload, hint_label, run_users
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
    run: int = 1  # which pass over the table (``--repeat``)
    hint: str = "exact"  # what the requests tell the router of their length (``--hint``)


@dataclass
class CellResult:
    users: int
    instances: int
    target: str
    mode: str
    requests: int  # started in the measured window
    completed: int  # of those, answered in full (every token)
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
    busy_share_cv: float  # the same for compute time per instance (Triton's compute_infer)
    utilization: float  # mean fraction of the measured window the instances spent computing
    sent: int  # every request of the cell, warm-up and tail included
    triton_executed: int  # what the workers' own statistics counted for the cell
    error_samples: list[str] = field(default_factory=list)
    run: int = 1  # which pass over the table (``--repeat``)
    seed: int = 7  # the lengths' seed this run drew from
    hint: str = "exact (oracle)"  # hint_label of the cell's --hint
    # CPU of the target's process tree over the window / requests completed in it
    cpu_us_per_request: float | None = None


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    # Nearest rank: the smallest value with at least q% of the values at or below it.
    k = min(len(ordered) - 1, max(0, math.ceil(q / 100.0 * len(ordered)) - 1))
    return ordered[k]


def timed_repository(workload: Workload, into: Path) -> Path:
    """A copy of the demo repository with the workload's per-token times and length
    distribution written in."""
    repo = into / "models"
    shutil.copytree(default_model_repository(), repo)
    for model in ("generate", "generate_unary"):
        config = repo / model / "config.pbtxt"
        text = config.read_text()
        for key, value in (("prefill_ms_per_token", workload.prefill_ms),
                           ("decode_ms_per_token", workload.decode_ms),
                           ("length_median_tokens", workload.median_tokens),
                           ("length_sigma", workload.sigma)):
            pattern = rf'(key: "{key}" value: {{ string_value: )"[^"]*"'
            text, found = re.subn(pattern, rf'\g<1>"{value}"', text)
            if found != 1:  # a silent no-op would time the wrong workload
                raise RuntimeError(f"{config}: no parameter {key!r} to rewrite")
        config.write_text(text)
    return repo


async def _worker_stats(workers: Sequence[str], model: str) -> list[tuple[int, int]]:
    """(requests, compute ns) per worker, from Triton's own statistics."""

    async def one(address: str) -> tuple[int, int]:
        async with aioclient.InferenceServerClient(address) as client:
            response = await client.get_inference_statistics(model)
        count = busy = 0
        for s in response.model_stats:
            count += s.inference_stats.success.count + s.inference_stats.fail.count
            busy += s.inference_stats.compute_infer.ns
        return count, busy

    return list(await asyncio.gather(*(one(a) for a in workers)))


async def _settled_stats(workers: Sequence[str], model: str,
                         timeout: float = 5.0) -> list[tuple[int, int]]:
    """Statistics once the last requests are in them.

    A decoupled model's request is counted when ``execute`` returns, just after its
    final response has reached the client: read until two reads agree.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    previous = await _worker_stats(workers, model)
    while True:
        await asyncio.sleep(0.2)
        current = await _worker_stats(workers, model)
        if current == previous or loop.time() > deadline:
            return current
        previous = current


def _cv(values: Sequence[float]) -> float:
    mean = statistics.fmean(values) if values else 0.0
    return round(statistics.pstdev(values) / mean, 3) if mean else 0.0


def summarize(cell: Cell, outcomes: list[Outcome], window: tuple[float, float],
              workload: Workload, shares: list[tuple[int, int]], busy_ns: list[int],
              busy_span_s: float, executed: int, streaming: bool) -> CellResult:
    """One cell's figures.

    Latency is over the requests started in the measured window (each ran to its end,
    however long: nothing is cut off by the window's end); throughput counts the
    requests completed inside the window.
    """
    start, end = window
    seconds = end - start
    measured = [o for o in outcomes if start <= o.start < end]
    ok = [o for o in measured if o.error is None]
    done = [o for o in outcomes if o.error is None and start <= o.end < end]
    latency = [o.end - o.start for o in ok]
    queued = [o.end - o.start - workload.service_s(o.tokens) for o in ok]
    ttft = [o.ttft for o in ok if o.ttft is not None]
    busy = [ns / 1e9 for _, ns in shares]
    cell_busy = [ns / 1e9 for ns in busy_ns]
    return CellResult(
        users=cell.users, instances=cell.instances, target=cell.target.label,
        mode="stream" if streaming else "unary", requests=len(measured), completed=len(ok),
        errors=len(measured) - len(ok),
        p50_s=percentile(latency, 50), p90_s=percentile(latency, 90),
        p99_s=percentile(latency, 99), max_s=max(latency, default=float("nan")),
        queued_p50_s=percentile(queued, 50), queued_p99_s=percentile(queued, 99),
        ttft_p50_s=percentile(ttft, 50) if ttft else None,
        ttft_p99_s=percentile(ttft, 99) if ttft else None,
        req_per_s=len(done) / seconds,
        req_per_min_per_instance=len(done) / seconds * 60 / cell.instances,
        work_share_cv=_cv([float(n) for n, _ in shares]),
        busy_share_cv=_cv(busy),
        # Over the whole cell (warm-up and tail in it): a counter read mid-run holds the
        # whole compute time of a request in flight, so only reads taken idle are exact.
        utilization=round(statistics.fmean(cell_busy) / busy_span_s, 3) if cell_busy else 0.0,
        sent=len(outcomes), triton_executed=executed,
        error_samples=sorted({o.error for o in measured if o.error})[:3], run=cell.run,
        seed=workload.seed, hint=hint_label(cell.hint),
    )


async def run_cell(cell: Cell, workers: Sequence[str], workload: Workload, warmup_s: float,
                   measure_s: float, streaming: bool) -> CellResult:
    chosen = list(workers[: cell.instances])
    model = "generate" if streaming else "generate_unary"
    async with running(cell.target, chosen) as serving:
        initial = await _settled_stats(chosen, model)
        begin = time.monotonic()
        before: list[tuple[int, int]] = []
        cpu: list[float] = []  # the target's CPU seconds at the window's start and end

        def read_cpu() -> None:
            # A target that died mid-cell shows in its errors; its CPU stays unknown.
            if serving.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    cpu.append(tree_cpu_s(serving.pid))

        async def snapshot_after_warmup() -> None:
            await asyncio.sleep(warmup_s)
            read_cpu()
            before.extend(await _worker_stats(chosen, model))

        async def cpu_at_window_end() -> None:
            await asyncio.sleep(warmup_s + measure_s)
            read_cpu()

        snaps = [asyncio.create_task(snapshot_after_warmup()),
                 asyncio.create_task(cpu_at_window_end())]
        outcomes = await run_users(serving.address, cell.users, workload,
                                   warmup_s + measure_s, streaming)
        await asyncio.gather(*snaps)
        after = await _settled_stats(chosen, model)
    shares = [(a[0] - b[0], a[1] - b[1]) for a, b in zip(after, before, strict=True)]
    executed = sum(a[0] - i[0] for a, i in zip(after, initial, strict=True))
    busy = [a[1] - i[1] for a, i in zip(after, initial, strict=True)]
    window = (begin + warmup_s, begin + warmup_s + measure_s)
    span = max((o.end for o in outcomes), default=window[1]) - begin
    result = summarize(cell, outcomes, window, workload, shares, busy, span, executed,
                       streaming)
    completed = result.req_per_s * measure_s
    if len(cpu) == 2 and completed:
        result.cpu_us_per_request = (cpu[1] - cpu[0]) / completed * 1e6
    return result


async def routing_experiment(
    targets: Sequence[Target], scale: Sequence[tuple[int, int]], workload: Workload,
    warmup_s: float, measure_s: float, streaming: bool,
    progress: Callable[[int, int, str], None] | None = None, repeats: int = 1,
    hints: Sequence[str] = (),
) -> list[CellResult]:
    """Every target at every (users, instances) point, on one pool of real workers.

    With ``repeats`` > 1 the whole table runs that many times, one pass after another,
    so that a drift in the machine over the run spreads over every target alike. Pass r
    draws its lengths with seed ``workload.seed + r - 1``: every target of a pass serves the
    same requests, and the passes differ, so the spread covers the draw as well as the
    machine (with one seed, two passes mostly repeat each other's tail). Each of ``hints``
    (default: the workload's) is a table of its own over the same requests.
    """
    cells = [Cell(u, n, t, run, hint) for run in range(1, repeats + 1)
             for u, n in scale for hint in (hints or (workload.hint,)) for t in targets]
    results = []
    with tempfile.TemporaryDirectory(prefix="tritonmesh-bench-") as tmp:
        repo = timed_repository(workload, Path(tmp))
        async with WorkerPool(max(n for _, n in scale), repo) as pool:
            for i, cell in enumerate(cells):
                if progress:
                    run = f"run {cell.run}/{repeats}: " if repeats > 1 else ""
                    progress(i, len(cells), f"{run}{cell.users}/{cell.instances}, "
                                            f"{hint_label(cell.hint)}: {cell.target.label}")
                drawn = replace(workload, seed=workload.seed + cell.run - 1, hint=cell.hint)
                results.append(await run_cell(cell, pool.addresses, drawn, warmup_s,
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
