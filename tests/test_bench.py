"""`tritonmesh bench` end to end at the smallest scale: real workers, real router processes."""

from __future__ import annotations

import json
import math
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import descendants, wait_gone
from tritonmesh.bench.experiment import percentile
from tritonmesh.bench.loadgen import Request, Workload, hint_label, parse_hint

pytestmark = [pytest.mark.triton, pytest.mark.bench]


def test_percentile_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99
    assert percentile(values, 100) == 100 and percentile([7.0], 99) == 7.0


def test_every_target_gets_the_same_requests() -> None:
    w = Workload(seed=3)
    first = [w.draw(w.lengths(u)) for u in range(5)]
    assert first == [w.draw(w.lengths(u)) for u in range(5)]
    assert all(1 <= r.tokens <= w.max_tokens for r in first)


def test_hints_are_what_real_clients_send() -> None:
    """Every hint serves the same requests; only the hint differs: the length itself (the
    oracle), the length times lognormal noise, the cap the client asks for, or nothing."""
    def draws(hint: str) -> list[Request]:
        w = Workload(seed=3, hint=hint)
        rng = w.lengths(0)
        return [w.draw(rng) for _ in range(2000)]

    exact, noisy, none = draws("exact"), draws("noisy:0.7"), draws("none")
    assert [r.seed for r in noisy] == [r.seed for r in exact] == [r.seed for r in none]
    assert [r.tokens for r in noisy] == [r.tokens for r in exact] == [r.tokens for r in none]
    assert all(r.hint == r.tokens and r.cap == 2000 for r in exact)
    assert all(r.hint is None for r in none)
    errors = [math.log(r.hint / r.tokens) for r in noisy if r.hint and r.tokens > 20]
    assert 0.6 < statistics.pstdev(errors) < 0.8 and abs(statistics.fmean(errors)) < 0.1
    capped = draws("cap:30")
    assert all(r.cap == r.hint == 30 and 1 <= r.tokens <= 30 for r in capped)
    assert {r.tokens for r in capped if r.tokens < 30}  # the cap is a cap, not the length
    assert hint_label("exact") == "exact (oracle)" and hint_label("none") == "none"
    for bad in ("noisy", "noisy:0", "noisy:x", "cap:0", "exact:1", "oracle"):
        with pytest.raises(ValueError, match="hint must be exact, noisy:SIGMA"):
            parse_hint(bad)


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
        "tritonmesh LEAST_OUTSTANDING_WORK (late binding, 1/instance, least slack)",
        "tritonmesh LEAST_OUTSTANDING_WORK (late binding, 1/instance, least slack, "
        "dispatch ahead 10 ms)"}
    for row in rows:
        assert row["errors"] == 0, row["error_samples"]
        assert row["requests"] > 0 and row["users"] == 2 and row["instances"] == 1
        # Every request ran to its last token, and Triton executed each exactly once.
        assert row["completed"] == row["requests"]
        assert row["triton_executed"] == row["sent"]
        assert row["utilization"] > 0
        assert row["p50_s"] <= row["p99_s"] <= row["max_s"]
        assert (row["ttft_p99_s"] is not None) == stream
        assert row["cpu_us_per_request"] > 0  # the router's process tree, read from /proc
    report_md = (tmp_path / "routing.md").read_text()
    assert report_md.count("| 2 | 1 | exact (oracle) | tritonmesh ") == 6  # a row per target
    side_by_side = report_md.split("## Side by side")[1]
    assert side_by_side.count("| 2 | 1 |") == 1  # and the comparison of the scale point
    assert (tmp_path / "p99_latency.png").stat().st_size > 0


def test_hints_side_by_side(tmp_path: Path) -> None:
    """--hint with several values runs a table per hint in one run, over the same
    requests (each ran to the length the model drew, so none is an error), the exact one
    labeled as the oracle; a hint that is none of the kinds is refused, naming them."""
    tritonmesh = str(Path(sys.executable).parent / "tritonmesh")
    args = [tritonmesh, "--log-level", "WARNING", "bench", "--scale", "2/1", "--warmup", "1",
            "--duration", "2", "--no-peers", "--targets", "LEAST_OUTSTANDING_WORK (late",
            "--median-tokens", "10", "--hint", "exact", "noisy:0.7", "cap:25", "none",
            "--out", str(tmp_path)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "routing.json").read_text())
    assert report["meta"]["hints"] == ["exact", "noisy:0.7", "cap:25", "none"]
    rows = report["rows"]
    assert sorted({r["hint"] for r in rows}) == ["cap:25", "exact (oracle)", "noisy:0.7",
                                                 "none"]
    assert len(rows) == 4 * 2  # two late-binding LEAST_OUTSTANDING_WORK targets per hint
    for row in rows:
        assert row["errors"] == 0, row["error_samples"]
        assert row["requests"] > 0 and row["completed"] == row["requests"]
    side_by_side = (tmp_path / "routing.md").read_text().split("## Side by side")[1]
    assert side_by_side.count("| 2 | 1 | ") == 4 and "| exact (oracle) |" in side_by_side
    refused = subprocess.run([*args[:-2], "--hint", "noisy:-1"], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2 and "hint must be exact, noisy:SIGMA" in refused.stderr


def test_repeated_runs(tmp_path: Path) -> None:
    """--repeat runs the table again, on a new draw, and reports each ratio's spread over
    the runs."""
    tritonmesh = str(Path(sys.executable).parent / "tritonmesh")
    args = [tritonmesh, "--log-level", "WARNING", "bench", "--scale", "2/1", "--warmup", "1",
            "--duration", "2", "--no-peers", "--targets", "tritonmesh RANDOM",
            "tritonmesh LEAST_OUTSTANDING_REQUESTS", "--median-tokens", "10", "--repeat", "2",
            "--out", str(tmp_path)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "routing.json").read_text())
    assert report["meta"]["runs"] == 2
    # Each pass draws from its own seed (run r: seed + r - 1), every target of a pass alike.
    assert {(r["run"], r["seed"]) for r in report["rows"]} == {(1, 7), (2, 8)}
    assert sorted((r["run"], r["target"]) for r in report["rows"]) == [
        (run, target) for run in (1, 2) for target in (
            "tritonmesh LEAST_OUTSTANDING_REQUESTS",
            "tritonmesh LEAST_OUTSTANDING_REQUESTS (late binding, 1/instance)",
            "tritonmesh RANDOM")]
    over = (tmp_path / "routing.md").read_text().split("## Over the 2 runs")[1]
    # one line for the scale point (and hint), over 2 runs
    assert over.count("| 2 | 1 | exact (oracle) | 2 |") == 1


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
        assert row["cpu_us_per_request"] > 0


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
    assert "recommended_p99_vs_best_peer" not in cmp  # the recommended target did not run


def test_comparison_per_hint_with_the_recommended_configuration() -> None:
    """A comparison per hint; the recommended configuration against the best peer and
    against LOR + late binding, whichever tritonmesh target had the best P99."""
    from tritonmesh.bench.report import LATE_BINDING, RECOMMENDED, comparison

    rows = [{"users": 20, "instances": 5, "hint": hint, "target": target, "p99_s": p99,
             "req_per_min_per_instance": 400.0, "errors": 0}
            for hint, values in (("exact (oracle)", (0.8, 1.0, 1.0)), ("none", (1.1, 1.0, 1.05)))
            for target, p99 in zip((RECOMMENDED, LATE_BINDING, "haproxy leastconn maxconn 1"),
                                   values, strict=True)]
    exact, none = comparison(rows)
    assert (exact["hint"], none["hint"]) == ("exact (oracle)", "none")
    assert exact["recommended_p99_vs_best_peer"] == pytest.approx(0.8)
    assert exact["recommended_p99_vs_late_binding"] == pytest.approx(0.8)
    assert none["recommended_p99_vs_best_peer"] == pytest.approx(1.1 / 1.05)
    assert none["recommended_p99_vs_late_binding"] == pytest.approx(1.1)
    assert none["best_tritonmesh"] == LATE_BINDING.removeprefix("tritonmesh ")


def test_spread_over_runs() -> None:
    from tritonmesh.bench.report import comparison, spread

    def row(run: int, target: str, p99: float, thr: float) -> dict[str, object]:
        return {"run": run, "users": 20, "instances": 5, "target": target, "p99_s": p99,
                "req_per_min_per_instance": thr, "errors": 0}

    rows = []
    for run, (ours, peer) in enumerate([((0.8, 500.0), (1.0, 510.0)),
                                        ((0.7, 520.0), (1.0, 500.0))], start=1):
        rows += [row(run, "tritonmesh X", *ours), row(run, "nginx b", *peer),
                 row(run, "tritonmesh LEAST_OUTSTANDING_REQUESTS", 2.0, 505.0),
                 row(run, "tritonmesh RANDOM", 4.0, 400.0)]
    compared = comparison(rows)
    assert [(c["run"], c["best_tritonmesh"]) for c in compared] == [(1, "X"), (2, "X")]
    assert compared[0]["throughput_vs_best_peer"] == pytest.approx(505 / 510)  # LOR's
    assert compared[0]["best_p99_throughput_vs_best_peer"] == pytest.approx(500 / 510)  # X's
    (over,) = spread(compared)
    assert over["runs"] == 2
    assert over["p99_vs_best_peer"] == pytest.approx((0.75, 0.7, 0.8))
    assert over["best_p99_throughput_vs_best_peer"] == pytest.approx(
        ((500 / 510 + 520 / 500) / 2, 500 / 510, 520 / 500))
    assert over["lor_p99_vs_random"] == pytest.approx((0.5, 0.5, 0.5))


def test_sigterm_stops_workers_and_targets(tmp_path: Path) -> None:
    """A bench ended with SIGTERM (a CI timeout, say) stops what it started: the Triton
    workers, their Python backend stubs and the router under test."""
    tritonmesh = str(Path(sys.executable).parent / "tritonmesh")
    bench = subprocess.Popen(
        [tritonmesh, "--log-level", "WARNING", "bench", "--scale", "2/1", "--warmup", "1",
         "--duration", "120", "--no-peers", "--targets", "tritonmesh RANDOM",
         "--median-tokens", "10", "--out", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # until a worker and the router under test run
            started = descendants(bench.pid)
            if {"tritonserver", "tritonmesh"} <= set(started.values()):
                break
            assert bench.poll() is None, bench.communicate()[1]
            assert time.monotonic() < deadline, f"not started: {started}"
            time.sleep(0.2)
        time.sleep(1.0)  # load is running
        started = descendants(bench.pid)
        bench.send_signal(signal.SIGTERM)
        _, err = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
    assert bench.returncode == 128 + signal.SIGTERM, err
    assert "terminated" in err
    wait_gone(started)


BURNER = '''
import os, subprocess, sys

def burn(seconds):
    start = sum(os.times()[:2])
    while sum(os.times()[:2]) - start < seconds:
        pass

def cpu(t):
    return t.user + t.system + t.children_user + t.children_system

if sys.argv[1] == "leaf":
    burn(0.3)
    print(cpu(os.times()), flush=True)
    if sys.argv[2] == "stay":
        sys.stdin.read()
    sys.exit(0)
subprocess.run([sys.executable, __file__, "leaf", "exit"], check=True, stdout=subprocess.DEVNULL)
staying = subprocess.Popen([sys.executable, __file__, "leaf", "stay"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
staying_cpu = float(staying.stdout.readline())
burn(0.3)
print(cpu(os.times()) + staying_cpu, flush=True)
sys.stdin.read()
staying.stdin.close()
staying.wait()
'''


def test_process_tree_cpu_agrees_with_what_the_processes_report(tmp_path: Path) -> None:
    """The bench's CPU column reads /proc for a target's whole tree; here the tree is a
    process that burns CPU, a child it ran and waited for (only in its cutime by now) and
    a child still running. /proc must agree with what they report of themselves through
    os.times (getrusage): two independent readings of the same CPU, not a speed check."""
    from tritonmesh.bench.cpu import process_tree, tree_cpu_s

    script = tmp_path / "burner.py"
    script.write_text(BURNER)
    with subprocess.Popen([sys.executable, str(script), "root"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as root:
        try:
            assert root.stdout is not None and root.stdin is not None
            reported = float(root.stdout.readline())
            assert len(process_tree(root.pid)) == 2  # the root and the child still running
            # about 0.3 s in each of the three, and the interpreters' start-up
            assert reported > 0.9
            assert tree_cpu_s(root.pid) == pytest.approx(reported, abs=0.1)
            root.stdin.close()
            assert root.wait(timeout=30) == 0
        finally:
            if root.poll() is None:
                root.kill()
    with pytest.raises(ProcessLookupError):
        tree_cpu_s(root.pid)


def test_router_options_are_written_only_where_they_differ() -> None:
    """--processes and --data-path: a tritonmesh target per value, labeled with it; the
    router's keys are written only when not its real default (native where it serves), so
    that a router that does not know them yet runs its default."""
    import yaml
    from tritonmesh.bench.targets import (
        Target,
        _tritonmesh_conf,
        default_data_path,
        tritonmesh_variants,
    )
    from tritonmesh.config import parse_config
    from tritonmesh.native_config import native_available

    peer = Target("nginx", "random")
    expanded = tritonmesh_variants([Target("tritonmesh", "RANDOM"), peer], [1, 2],
                                   ["grpc", "native"])
    assert [t.label for t in expanded] == [
        "tritonmesh RANDOM (K=1, grpc)", "tritonmesh RANDOM (K=1, native)",
        "tritonmesh RANDOM (K=2, grpc)", "tritonmesh RANDOM (K=2, native)", "nginx random"]
    assert tritonmesh_variants([Target("tritonmesh", "RANDOM")], None, None) == [
        Target("tritonmesh", "RANDOM")]
    workers = ["127.0.0.1:8001"]
    for target in (expanded[0], Target("tritonmesh", "RANDOM")):
        config = parse_config(yaml.safe_load(_tritonmesh_conf(9000, workers, target)))
        assert list(config.variants[0].instances) == workers
    written = yaml.safe_load(_tritonmesh_conf(9000, workers, expanded[3]))
    # K=2's default is the same as K=1's (native where built): written only where it differs.
    assert (written["processes"], written.get("data_path")) == (
        2, None if default_data_path(2).path == "native" else "native")
    # At K=1 the router's default is native where this build serves it, else grpc: the
    # other one is written.
    default = default_data_path(1).path
    assert default == ("native" if native_available() else "grpc")
    for target in expanded[:2]:
        written = yaml.safe_load(_tritonmesh_conf(9000, workers, target))
        assert written.get("data_path") == (None if target.data_path == default
                                            else target.data_path)


@pytest.mark.parametrize(("target", "key"), [
    ({"processes": 0}, "processes"), ({"data_path": "no-such-path"}, "data_path")])
def test_a_target_the_router_refuses_fails_with_its_message(target: dict[str, object],
                                                           key: str) -> None:
    """A configuration the installed router refuses ends the target at once with the
    router's own message, rather than waiting for it to serve."""
    import asyncio

    from tritonmesh.bench.targets import Target, TargetFailed, running

    async def start() -> None:
        async with running(Target("tritonmesh", "RANDOM", **target), ["127.0.0.1:1"]):
            pass

    with pytest.raises(TargetFailed, match="the target exited with 2") as failed:
        asyncio.run(start())
    assert "invalid configuration: " in str(failed.value)
    assert f"endpoint.yaml: {key}: " in str(failed.value)


@pytest.mark.skipif(not shutil.which("nghttpx"),
                    reason="nghttpx is not installed (.ci/run installs nghttp2-proxy)")
def test_overhead_rounds_with_cpu_per_request(tmp_path: Path) -> None:
    """--mode overhead: Triton direct and nghttpx take turns for two rounds; every request
    is answered through nghttpx's gRPC proxying, and each row has CPU per request: the
    target's process tree (none for direct) and Triton's."""
    tritonmesh = str(Path(sys.executable).parent / "tritonmesh")
    args = [tritonmesh, "--log-level", "WARNING", "bench", "--mode", "overhead", "--users", "1",
            "--duration", "0.25", "--rounds", "2", "--targets", "nghttpx", "--out", str(tmp_path)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "overhead.json").read_text())
    assert report["meta"]["rounds"] == 2
    rows = {r["target"]: r for r in report["rows"]}
    assert set(rows) == {"direct", "nghttpx round-robin"}
    for row in rows.values():
        assert row["errors"] == 0 and row["req_per_s"] > 0 and len(row["per_round"]) == 2
        assert row["triton_cpu_us_per_request"] > 0
    assert rows["direct"]["cpu_us_per_request"] is None
    assert rows["nghttpx round-robin"]["cpu_us_per_request"] > 0
    assert "| CPU µs/req | Triton CPU µs/req |" in (tmp_path / "overhead.md").read_text()
