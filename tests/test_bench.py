"""`tritonmesh bench` end to end at the smallest scale: real workers, real router processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tritonmesh.bench.experiment import percentile
from tritonmesh.bench.loadgen import Workload

pytestmark = pytest.mark.triton


def test_percentile_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99
    assert percentile(values, 100) == 100 and percentile([7.0], 99) == 7.0


def test_every_target_gets_the_same_requests() -> None:
    w = Workload(seed=3)
    first = [w.draw(w.lengths(u)) for u in range(5)]
    assert first == [w.draw(w.lengths(u)) for u in range(5)]
    assert all(1 <= t <= w.max_tokens for t in first)


@pytest.mark.parametrize("stream", [False, True])
def test_smallest_routing_experiment(tmp_path: Path, stream: bool) -> None:
    tritonmesh = str(Path(sys.executable).parent / "tritonmesh")
    args = [tritonmesh, "--log-level", "WARNING", "bench", "--scale", "2/1", "--warmup", "1",
            "--duration", "4", "--no-peers", "--targets", "RANDOM", "LEAST_OUTSTANDING",
            "--median-tokens", "10", "--out", str(tmp_path)]
    if stream:
        args.append("--stream")
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "routing.json").read_text())
    rows = report["rows"]
    assert {r["target"] for r in rows} == {
        "tritonmesh RANDOM", "tritonmesh LEAST_OUTSTANDING_REQUESTS",
        "tritonmesh LEAST_OUTSTANDING_REQUESTS (late binding, 1/instance)",
        "tritonmesh LEAST_OUTSTANDING_WORK",
        "tritonmesh LEAST_OUTSTANDING_WORK (late binding, 1/instance, least slack)"}
    for row in rows:
        assert row["errors"] == 0, row["error_samples"]
        assert row["requests"] > 0 and row["users"] == 2 and row["instances"] == 1
        # Every request ran to its last token, and Triton executed each exactly once.
        assert row["completed"] == row["requests"]
        assert row["triton_executed"] == row["sent"]
        assert row["utilization"] > 0
        assert row["p50_s"] <= row["p99_s"] <= row["max_s"]
        assert (row["ttft_p99_s"] is not None) == stream
    assert (tmp_path / "routing.md").read_text().count("| 2 | 1 |") == 5
    assert (tmp_path / "p99_latency.png").stat().st_size > 0
