"""`tritonmesh bench` end to end at the smallest scale: real workers, real router processes."""

from __future__ import annotations

import json
import shutil
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
    report_md = (tmp_path / "routing.md").read_text()
    assert report_md.count("| 2 | 1 | tritonmesh ") == 5  # a row per target
    side_by_side = report_md.split("## Side by side")[1]
    assert side_by_side.count("| 2 | 1 |") == 1  # and the comparison of the scale point
    assert (tmp_path / "p99_latency.png").stat().st_size > 0


@pytest.mark.skipif(not (shutil.which("nginx") and shutil.which("haproxy")),
                    reason="nginx and haproxy are not installed (.ci/run installs them)")
def test_peers_side_by_side(tmp_path: Path) -> None:
    """nginx and HAProxy, configured by the bench, serve the same requests with nothing
    lost, as the peer columns of the published table need."""
    tritonmesh = str(Path(sys.executable).parent / "tritonmesh")
    args = [tritonmesh, "--log-level", "WARNING", "bench", "--scale", "2/1", "--warmup", "1",
            "--duration", "3", "--targets", "nginx least_conn", "haproxy leastconn maxconn 1",
            "--median-tokens", "10", "--out", str(tmp_path)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads((tmp_path / "routing.json").read_text())["rows"]
    assert {r["target"] for r in rows} == {"nginx least_conn", "haproxy leastconn maxconn 1"}
    for row in rows:
        assert row["errors"] == 0, row["error_samples"]
        assert row["requests"] > 0 and row["completed"] == row["requests"]
        assert row["triton_executed"] == row["sent"]


def test_comparison_ratios() -> None:
    from tritonmesh.bench.report import comparison

    def row(target: str, p99: float, thr: float, errors: int = 0) -> dict[str, object]:
        return {"users": 20, "instances": 5, "target": target, "p99_s": p99,
                "req_per_min_per_instance": thr, "errors": errors}

    rows = [row("tritonmesh RANDOM", 3.0, 300.0), row("tritonmesh LEAST_OUTSTANDING_REQUESTS",
                                                      2.0, 420.0),
            row("tritonmesh X", 0.9, 410.0), row("tritonmesh BROKEN", 0.1, 999.0, errors=3),
            row("haproxy a", 1.2, 400.0), row("nginx b", 1.0, 430.0)]
    (cmp,) = comparison(rows)
    assert cmp["best_tritonmesh"] == "X" and cmp["best_peer"] == "nginx b"  # errors disqualify
    assert cmp["p99_vs_best_peer"] == pytest.approx(0.9)
    assert cmp["throughput_vs_best_peer"] == pytest.approx(420 / 430)
    assert cmp["lor_p99_vs_random"] == pytest.approx(2 / 3)
    assert cmp["lor_throughput_vs_random"] == pytest.approx(1.4)
