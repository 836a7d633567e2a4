"""`tritonmesh bench`: the SageMaker routing experiment and the overhead measurement."""

from __future__ import annotations

import argparse
import asyncio
import shlex
import signal
import sys
import time
from collections.abc import Coroutine, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from tritonmesh.bench.experiment import (
    FULL_SCALE,
    QUICK_SCALE,
    as_dicts,
    progress_bar,
    routing_experiment,
)
from tritonmesh.bench.loadgen import Workload, parse_hint
from tritonmesh.bench.overhead import overhead_experiment
from tritonmesh.bench.report import write_results
from tritonmesh.bench.targets import (
    DATA_PATHS,
    STDLIB_LOOP,
    TargetFailed,
    available_targets,
    default_data_path,
    tritonmesh_variants,
)

__all__ = ["build_parser", "main"]

T = TypeVar("T")


def _scale(text: str) -> tuple[int, int]:
    users, _, instances = text.partition("/")
    return int(users), int(instances)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _hint(text: str) -> str:
    try:
        return parse_hint(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    bench = argparse.ArgumentParser(
        prog="tritonmesh bench",
        description="Reproduce SageMaker's routing experiment with real Triton, against "
                    "nginx and HAProxy when installed.")
    bench.add_argument("--mode", choices=["routing", "overhead"], default="routing")
    bench.add_argument("--full", action="store_true",
                       help="the whole published table: 4/1, 20/5, 40/10, 60/15, 80/20")
    bench.add_argument("--scale", type=_scale, nargs="+", metavar="USERS/INSTANCES",
                       help="scale points (default: 4/1 20/5)")
    bench.add_argument("--stream", action="store_true",
                       help="stream tokens (ModelStreamInfer, also reports time to first "
                            "token) instead of one response per request")
    bench.add_argument("--targets", nargs="+", metavar="LABEL",
                       help="only targets whose label contains one of these words")
    bench.add_argument("--no-peers", action="store_true", help="tritonmesh strategies only")
    bench.add_argument("--warmup", type=float, default=5.0, help="seconds excluded per cell")
    bench.add_argument("--duration", type=float, default=30.0, help="measured seconds per cell")
    bench.add_argument("--median-tokens", type=float, default=40.0)
    bench.add_argument("--sigma", type=float, default=0.75,
                       help="lognormal spread of output lengths (P99 / median = "
                            "e^(2.33 sigma)); 0.75 reproduces the peers' ratios of the "
                            "reference workload (docs/BENCHMARKS.md)")
    bench.add_argument("--decode-ms", type=float, default=2.0, help="per-token time")
    bench.add_argument("--hint", type=_hint, nargs="+", default=["exact"],
                       metavar="exact|noisy:SIGMA|cap:N|none",
                       help="what each request tells the router of its length (the "
                            "length_hint parameter; the peers ignore it): exact (the oracle "
                            "no real client has), the length times lognormal(0, SIGMA), the "
                            "cap N the client asks for (also sent as MAX_TOKENS), or none; "
                            "several: a table each, side by side in one run")
    bench.add_argument("--seed", type=int, default=7)
    bench.add_argument("--repeat", type=_positive, default=1, metavar="N",
                       help="run the whole table N times (run r draws with seed + r - 1) and "
                            "report the spread of each ratio over the runs")
    bench.add_argument("--users", type=int, nargs="+", default=[1, 8],
                       help="overhead mode: concurrent users")
    bench.add_argument("--rounds", type=_positive, default=1, metavar="N",
                       help="overhead mode: the targets take turns N times at each user "
                            "count; figures pool the rounds")
    bench.add_argument("--processes", type=_positive, nargs="+", metavar="K",
                       help="run each tritonmesh target with K router processes (the "
                            "processes key, written only when K is not 1); several: side "
                            "by side")
    bench.add_argument("--data-path", choices=DATA_PATHS, nargs="+",
                       help="run each tritonmesh target on this data path (the data_path "
                            "key, written only when not the router's default: native where "
                            "it serves, else grpc); several: side by side")
    bench.add_argument("--out", type=Path, default=None,
                       help="results directory (default bench/results/<timestamp>)")
    return bench


def main(argv: Sequence[str]) -> int:
    """``tritonmesh bench ARGV``: tritonmesh's CLI hands the arguments over unparsed."""
    return run_bench(build_parser().parse_args(argv))


async def _terminable(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work``; SIGTERM cancels it, so workers and targets are stopped on the way out
    (the default action would end the process at once and orphan them)."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await work
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def run_bench(args: argparse.Namespace) -> int:
    try:
        return _run_bench(args)
    except asyncio.CancelledError:
        print("bench: terminated; workers and targets stopped", file=sys.stderr)
        return 128 + signal.SIGTERM
    except TargetFailed as exc:
        print(f"\nbench: a target failed: {exc}", file=sys.stderr)  # below the progress line
        return 1


def _run_bench(args: argparse.Namespace) -> int:
    targets, notes = available_targets(peers=not args.no_peers)
    targets = tritonmesh_variants(targets, args.processes, args.data_path)
    if args.targets:
        targets = [t for t in targets if any(w.lower() in t.label.lower() for w in args.targets)]
    # Targets with no --data-path run on the router's own default: say which, per K.
    defaults = {t.processes: default_data_path(t.processes) for t in targets
                if t.kind == "tritonmesh" and not t.data_path}
    notes = [*notes, *(f"tritonmesh targets{'' if k is None else f' (K={k})'} run on the "
                       f"router's default data path: {d.path} ({d.why})"
                       for k, d in defaults.items())]
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    out = args.out or Path("bench/results") / time.strftime("%Y%m%d-%H%M%S")
    meta: dict[str, Any] = {"command": "tritonmesh " + shlex.join(sys.argv[1:]),
            "targets": [t.label for t in targets]}
    if args.mode == "overhead":
        # One backend: every strategy picks it, so one configuration per router (and per
        # process count and data path) says it all.
        first = {(t.kind, t.processes, t.data_path): t for t in reversed(targets)
                 if t.max_concurrency is None}
        chosen = [t for t in targets if first.get((t.kind, t.processes, t.data_path)) is t]
        ours = [t for t in chosen if t.kind == "tritonmesh"]
        if ours:  # and the same router on the stdlib's event loop
            chosen.insert(chosen.index(ours[-1]) + 1, STDLIB_LOOP)
        rows = asyncio.run(_terminable(overhead_experiment(
            chosen, args.users, args.duration, rounds=args.rounds, progress=progress_bar)))
        meta.update(users=args.users, seconds_per_cell=args.duration, rounds=args.rounds,
                    targets=[t.label for t in chosen])
    else:
        workload = Workload(median_tokens=args.median_tokens, sigma=args.sigma,
                            decode_ms=args.decode_ms, seed=args.seed, hint=args.hint[0])
        scale = args.scale or (FULL_SCALE if args.full else QUICK_SCALE)
        results = asyncio.run(_terminable(routing_experiment(
            targets, scale, workload, args.warmup, args.duration, args.stream,
            progress=progress_bar, repeats=args.repeat, hints=args.hint)))
        rows = as_dicts(results)
        meta.update(workload=asdict(workload), scale=list(scale), warmup_s=args.warmup,
                    measured_s=args.duration, mode="stream" if args.stream else "unary",
                    runs=args.repeat, seeds=[args.seed + r for r in range(args.repeat)],
                    hints=args.hint)
    written = write_results(out, args.mode, rows, meta, notes)
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


