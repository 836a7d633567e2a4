"""What the router learns of a hint's quality under the bench's workload, per hint.

    python bench/hint_quality_probe.py [--hint exact noisy:0.7 none] [--seconds 20]

Starts 5 real Triton workers (the bench's timed demo model: lengths lognormal, median 50,
sigma 1, 2 ms per token), and for each hint a tritonmesh router with the bench's
recommended configuration (LEAST_OUTSTANDING_WORK, limit 1, LEAST_SLACK, dispatch ahead
10 ms, ``work_hints`` on ``length_hint``) in a child process, 20 closed-loop users for
``--seconds``; then prints the variant's line of ``tritonmesh status``: the learned hint
quality and residual SD (dispatch ahead sends early only at a residual SD of 0.2 or less).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

from tritonmesh.bench.experiment import timed_repository
from tritonmesh.bench.loadgen import Workload, parse_hint, run_users
from tritonmesh.bench.targets import WORK_AWARE, _tritonmesh_conf, _wait_serving, terminate
from tritonmesh.workers.launcher import WorkerPool, free_ports


async def probe(hints: list[str], seconds: float) -> None:
    workload = Workload(median_tokens=50, sigma=1.0, decode_ms=2.0)
    tritonmesh = str(Path(sys.executable).parent / "tritonmesh")
    with tempfile.TemporaryDirectory(prefix="tritonmesh-hint-probe-") as tmp:
        async with WorkerPool(5, timed_repository(workload, Path(tmp))) as pool:
            for hint in hints:
                port, admin = free_ports(2)
                config = Path(tmp) / "endpoint.yaml"
                config.write_text(_tritonmesh_conf(port, pool.addresses, WORK_AWARE[2]).replace(
                    "admin_listen: null", f"admin_listen: 127.0.0.1:{admin}"))
                router = await asyncio.create_subprocess_exec(
                    tritonmesh, "--log-level", "WARNING", "serve", "--config", str(config),
                    stdout=subprocess.DEVNULL)
                try:
                    await _wait_serving(f"127.0.0.1:{port}", router)
                    done = await run_users(f"127.0.0.1:{port}", 20, Workload(
                        median_tokens=50, sigma=1.0, decode_ms=2.0, hint=hint), seconds, False)
                    status = await asyncio.create_subprocess_exec(
                        tritonmesh, "status", "--address", f"127.0.0.1:{admin}",
                        stdout=asyncio.subprocess.PIPE)
                    out, _ = await status.communicate()
                    line = next(s for s in out.decode().splitlines() if "work hints" in s)
                    print(f"{hint:<12} {len(done):>5} requests {line.strip()}", flush=True)
                finally:
                    await terminate(router, 10.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hint", type=parse_hint, nargs="+",
                        default=["exact", "noisy:0.7", "none"])
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    asyncio.run(probe(args.hint, args.seconds))


if __name__ == "__main__":
    main()
