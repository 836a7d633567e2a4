"""Start-up time and memory of local Triton workers (demo models).

    python bench/workers_bench.py [--counts 1 4 8]

For each count N: wall time from launch until all N workers report ServerReady and
ModelReady for every model, and the resident memory (RSS) of each worker's process
group (tritonserver plus its Python backend stubs), read from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

from tritonmesh.workers.launcher import WorkerPool


def group_rss_mib(pgid: int) -> tuple[float, float]:
    """(RSS of the tritonserver process, RSS of its whole process group), MiB."""
    server = total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) != pgid:
            continue
        rss = int(fields[21]) * page
        total += rss
        if int(stat.parent.name) == pgid:
            server = rss
    return server / 2**20, total / 2**20


async def measure(count: int) -> dict[str, object]:
    start = time.perf_counter()
    async with WorkerPool(count) as pool:
        ready_s = time.perf_counter() - start
        await asyncio.sleep(1.0)
        rss = [group_rss_mib(w.pid) for w in pool.workers if w.pid is not None]
    return {
        "workers": count,
        "all_ready_s": round(ready_s, 2),
        "tritonserver_rss_mib_mean": round(sum(r[0] for r in rss) / len(rss), 1),
        "group_rss_mib_mean": round(sum(r[1] for r in rss) / len(rss), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    results = [asyncio.run(measure(n)) for n in args.counts]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
