"""Which process of a K-process router spends the CPU: idle, then under h2load.

    python bench/process_tree_cpu.py --processes 1 2 --users 8 --seconds 10 --idle 30

One ``identity`` worker; for each K, ``tritonmesh serve`` with ``processes: K`` (metrics on,
as deployed), then: each process's share of a core while no request arrives, and each
process's CPU µs per request under h2load (the load of ``bench/native_overhead.py``). The
supervisor should cost next to nothing in both: it owns the control plane, no request
passes through it. Loopback only; it ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

from native_overhead import body, cpu_seconds, load, router
from tritonmesh.workers.launcher import WorkerPool


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo.extend(children.get(out[-1], ()))
    return out


def role(pid: int, top: int, processes: int) -> str:
    if pid == top:
        return "supervisor" if processes > 1 else "router"
    return "router process"


async def measure(worker: str, k: int, args: argparse.Namespace, d: Path) -> None:
    async with router(d, "native", worker, processes=k, metrics=True) as (address, top):
        await asyncio.sleep(3)  # every router process up and settled
        pids = tree(top)
        before = {p: cpu_seconds(p) for p in pids}
        await asyncio.sleep(args.idle)
        idle = {p: (cpu_seconds(p) - before[p]) / args.idle for p in pids}
        await load(d, address, args.users, 2, None)  # connections made, code warm
        before = {p: cpu_seconds(p) for p in pids}
        rate, p50, _, _ = await load(d, address, args.users, args.seconds, None)
        spent = {p: cpu_seconds(p) - before[p] for p in pids}
        done = rate * args.seconds
        print(f"K={k}: {rate:.0f} req/s at {args.users} users, P50 {p50:.2f} ms")
        for p in pids:
            print(f"  {role(p, top, len(pids)):<15} pid {p:<7} idle {idle[p]:6.2%} of a core"
                  f"   under load {spent[p] / done * 1e6:6.1f} µs/req")
        print(f"  {'all':<27} idle {sum(idle.values()):6.2%} of a core   under load "
              f"{sum(spent.values()) / done * 1e6:6.1f} µs/req")


async def main(args: argparse.Namespace) -> None:
    if shutil.which("h2load") is None:
        sys.exit("h2load is missing: apt-get install nghttp2-client")
    with tempfile.TemporaryDirectory(prefix="process-tree-cpu-") as tmp:
        d = Path(tmp)
        (d / "body.bin").write_bytes(body())
        async with WorkerPool(1) as pool:
            for k in args.processes:
                await measure(pool.addresses[0], k, args, d)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--idle", type=float, default=30.0, help="seconds measured idle")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main(parser.parse_args()))
