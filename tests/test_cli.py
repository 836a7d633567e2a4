"""The commands a user types: `tritonmesh up`, `serve`, `status`, run as real processes."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from harness import descendants, processes, wait_gone
from tritonmesh.native_config import native_available
from tritonmesh.workers.tritonserver import default_model_repository

pytestmark = pytest.mark.triton

TRITONMESH = str(Path(sys.executable).parent / "tritonmesh")


class Running:
    """A tritonmesh process whose output is read until its banner says where it serves."""

    def __init__(self, args: list[str], timeout: float = 180.0,
                 env: dict[str, str] | None = None):
        self.process = subprocess.Popen(
            [TRITONMESH, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=env)
        self.lines: list[str] = []
        try:
            self._read_banner(timeout)
        except BaseException:
            self.process.kill()
            self.process.communicate()
            raise
        # The rest of the output, read as it comes, so that a test can wait for a log line.
        self._more: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read_rest, daemon=True)
        self._reader.start()

    def _read_rest(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:
            for line in self.process.stdout:
                self._more.put(line)
        self._more.put(None)

    def expect(self, text: str, timeout: float = 30.0) -> None:
        """Wait for a line containing ``text``; fail if the process ends first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._more.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                raise AssertionError(f"no {text!r} in {timeout:.0f}s:\n"
                                     + "".join(self.lines)) from None
            if line is None:
                self.process.wait()
                raise AssertionError(f"tritonmesh ended (code {self.process.returncode}) "
                                     f"before printing {text!r}:\n" + "".join(self.lines))
            self.lines.append(line)
            if text in line:
                return

    def _read_banner(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self.process.stdout is not None
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise AssertionError("tritonmesh exited early:\n" + "".join(self.lines))
            self.lines.append(line)
            if line.startswith("Stop with Ctrl-C"):
                break
            assert time.monotonic() < deadline, "no banner:\n" + "".join(self.lines)
        text = "".join(self.lines)
        found = re.search(r"serving Triton's gRPC protocol on (\S+)", text)
        assert found, text
        self.address = found.group(1)
        metrics = re.search(r"curl -s http://(\S+)/metrics", text)
        self.metrics = metrics.group(1) if metrics else None
        admin = re.search(r"tritonmesh status --address (\S+)", text)
        self.admin = admin.group(1) if admin else None

    def children(self, name: str) -> list[int]:
        return [pid for pid, (ppid, comm, _) in processes().items()
                if ppid == self.process.pid and comm == name]

    def interrupt(self, timeout: float = 60.0) -> str:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=timeout)
        self._reader.join(timeout)
        while (line := self._more.get_nowait()) is not None:
            self.lines.append(line)
        return "".join(self.lines)


def _identity(address: str) -> list[float]:
    with grpcclient.InferenceServerClient(address) as client:
        x = grpcclient.InferInput("INPUT0", [3], "FP32")
        x.set_data_from_numpy(np.array([1, 2, 3], dtype=np.float32))
        return client.infer("identity", [x]).as_numpy("OUTPUT0").tolist()


def test_up_starts_workers_and_router_and_stops_cleanly() -> None:
    running = Running(["up", "--workers", "1", "--port", "0", "--metrics-port", "0",
                       "--admin-port", "0"])
    try:
        workers = running.children("tritonserver")
        assert len(workers) == 1
        assert _identity(running.address) == [1, 2, 3]
        # The banner's status command, on the admin listener; the data port has no admin API.
        assert running.admin is not None and running.admin != running.address
        status = subprocess.run([TRITONMESH, "status", "--address", running.admin],
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stderr
        assert "LEAST_OUTSTANDING_REQUESTS" in status.stdout and "healthy" in status.stdout
        # It serves the default data path (native where built), and says so at start and
        # in status.
        path = os.environ.get("TRITONMESH_DATA_PATH") or (
            "native" if native_available() else "grpc")
        assert f"(data path: {path}, " in "".join(running.lines)
        assert f"data path: {path} (" in status.stdout
        assert "router processes:" not in status.stdout  # one process: its counts are live
        status = subprocess.run([TRITONMESH, "status", "--address", running.address],
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 1 and "Method not found" in status.stderr, status.stderr
        # Neither signal kills it: up has no configuration file to reload, and memory
        # snapshots are off.
        running.process.send_signal(signal.SIGHUP)
        running.expect("SIGHUP ignored: there is no configuration file to reload")
        running.process.send_signal(signal.SIGUSR1)
        running.expect("SIGUSR1 ignored: memory snapshots are off")
        assert _identity(running.address) == [1, 2, 3]
    finally:
        out = running.interrupt()
    assert running.process.returncode == 0, out
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}"), f"worker {pid} survived"


def test_sigkill_of_the_router_leaves_no_worker_process() -> None:
    """SIGKILL (the OOM killer, say) runs no cleanup in the router: tritonserver dies by
    its PDEATHSIG, and the guard in each worker's group takes the Python backend stubs."""
    running = Running(["up", "--workers", "1", "--port", "0", "--metrics-port", "0",
                       "--admin-port", "0"])
    try:
        assert _identity(running.address) == [1, 2, 3]
        tree = descendants(running.process.pid)
        names = sorted(set(tree.values()))
        assert "tritonserver" in names and "sh" in names, names  # the worker and its guard
        assert any(name.startswith("triton_python") for name in names), names  # its stubs
        prefixes = _shm_prefixes(tree)
        assert prefixes and all(_shm_regions(p) for p in prefixes), prefixes
    finally:
        running.process.kill()
        running.process.wait(timeout=30)
    wait_gone(tree)
    # The guard removed the regions before it killed the group.
    assert [r for p in prefixes for r in _shm_regions(p)] == []


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_serve_config_file_with_metrics(tmp_path: Path, worker_addresses: list[str],
                                        loop: str) -> None:
    """On either event loop (the default one is tests/test_loop.py's business)."""
    config = tmp_path / "endpoint.yaml"
    config.write_text(
        "listen: 127.0.0.1:0\nmetrics_listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n"
        "variants:\n"
        "  - name: AllTraffic\n    routing_strategy: POWER_OF_TWO_CHOICES\n"
        f"    instances: {worker_addresses[:2]!r}\n"
    )
    running = Running(["--event-loop", loop, "serve", "--config", str(config)])
    try:
        assert f"  event loop: {loop}\n" in running.lines
        for _ in range(4):
            assert _identity(running.address) == [1, 2, 3]
        assert running.metrics is not None
        with urllib.request.urlopen(f"http://{running.metrics}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        finished = re.findall(r'^tritonmesh_instance_requests_total\{[^}]*\} (\S+)$', metrics,
                              re.MULTILINE)
        assert sum(float(v) for v in finished) == 4.0, metrics
        assert "tritonmesh_instance_outstanding_requests" in metrics
        running.process.send_signal(signal.SIGUSR1)  # snapshots are off: ignored, with a line
        running.expect("SIGUSR1 ignored: memory snapshots are off")
        assert _identity(running.address) == [1, 2, 3]
    finally:
        running.interrupt()
    assert running.process.returncode == 0


def test_memory_snapshots_on_sigusr1(tmp_path: Path, worker_addresses: list[str]) -> None:
    import tracemalloc

    config = tmp_path / "endpoint.yaml"
    config.write_text("listen: 127.0.0.1:0\nmetrics_listen: null\nadmin_listen: 127.0.0.1:0\n"
                      "variants:\n"
                      f"  - name: AllTraffic\n    instances: {worker_addresses[:1]!r}\n")
    snapshots = tmp_path / "snapshots"
    running = Running(["serve", "--config", str(config)],
                      env={**os.environ, "TRITONMESH_MEMORY_SNAPSHOTS": str(snapshots)})
    try:
        paths: list[Path] = []
        for n in (1, 2):
            assert _identity(running.address) == [1, 2, 3]
            running.process.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 60
            while len(paths := sorted(snapshots.glob("*.tracemalloc"))) < n:
                assert time.monotonic() < deadline, "no snapshot written"
                time.sleep(0.1)
        first, second = (tracemalloc.Snapshot.load(str(p)) for p in paths)
        # Real traces of the router's own code, comparable line by line.
        files = {s.traceback[0].filename for s in second.statistics("filename")}
        assert any(f.endswith(os.path.join("router", "proxy.py")) or "tritonmesh" in f
                   for f in files), sorted(files)[:20]
        assert second.compare_to(first, "lineno")
    finally:
        running.interrupt()
    assert running.process.returncode == 0


def _shm_prefixes(tree: dict[int, str]) -> list[str]:
    """The shared-memory prefixes of the tritonservers in a process tree."""
    prefixes = []
    for pid, name in tree.items():
        if name == "tritonserver":
            for arg in Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0"):
                if arg.startswith("--backend-config=python,shm-region-prefix-name="):
                    prefixes.append(arg.split("=", 2)[2])
    return prefixes


def _shm_regions(prefix: str) -> list[str]:
    return [p.name for p in Path("/dev/shm").glob(f"{prefix}*")]


SLOW_MODEL = """
import time


class TritonPythonModel:
    def initialize(self, args):
        time.sleep(3600)

    def execute(self, requests):
        return []
"""


@pytest.mark.parametrize(("command", "sig"), [
    (["up", "--workers", "2", "--port", "0", "--metrics-port", "0"], signal.SIGTERM),
    (["workers", "--count", "2"], signal.SIGINT),
])
def test_a_signal_while_workers_start_stops_them(tmp_path: Path, command: list[str],
                                                 sig: signal.Signals) -> None:
    """The workers load a model that never finishes initializing: the start can only end
    by the signal, which stops the workers started so far (stubs and regions too)."""
    repository = tmp_path / "repo"
    shutil.copytree(default_model_repository() / "identity", repository / "identity")
    (repository / "slow_to_load" / "1").mkdir(parents=True)
    (repository / "slow_to_load" / "1" / "model.py").write_text(SLOW_MODEL)
    shutil.copy(repository / "identity" / "config.pbtxt", repository / "slow_to_load")
    process = subprocess.Popen([TRITONMESH, *command, "--model-repository", str(repository)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Until both workers' stubs are up (their regions exist): mid-start.
        deadline = time.monotonic() + 120
        while True:
            tree = descendants(process.pid)
            prefixes = _shm_prefixes(tree)
            if len(prefixes) == 2 and all(_shm_regions(p) for p in prefixes):
                break
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, f"workers never started: {tree}"
            time.sleep(0.1)
        process.send_signal(sig)
        out, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 128 + sig, out
    assert f"tritonmesh: {sig.name} received while starting; stopped what had started" in out
    assert "Traceback" not in out and "Stop with Ctrl-C" not in out, out
    wait_gone(tree)
    assert [r for p in prefixes for r in _shm_regions(p)] == []


def test_a_worker_that_cannot_start_is_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "repo" / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text('backend: "python"\nthis is not protobuf text\n')
    result = subprocess.run([TRITONMESH, "up", "--workers", "2", "--port", "0",
                             "--metrics-port", "0", "--model-repository", str(tmp_path / "repo")],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    found = re.search(r"^tritonmesh: Triton worker (\d) exited with code \S+ while starting "
                      r"\(its log: (\S+)\)", result.stderr, re.MULTILINE)
    assert found, result.stderr
    assert "failed to load" in Path(found.group(2)).read_text()


def test_invalid_config_is_reported(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("variants:\n  - name: a\n    instances: [nowhere]\n")
    result = subprocess.run([TRITONMESH, "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "variants[0].instances[0]: expected HOST:PORT" in result.stderr


def test_unknown_event_loop_is_reported(tmp_path: Path) -> None:
    env = {**os.environ, "TRITONMESH_EVENT_LOOP": "trio"}
    result = subprocess.run([TRITONMESH, "workers", "--count", "1"], capture_output=True,
                            text=True, timeout=60, env=env)
    assert result.returncode == 2
    assert "event loop must be one of auto, uvloop, asyncio, got 'trio'" in result.stderr
    assert "Traceback" not in result.stderr and "never awaited" not in result.stderr


def test_status_of_nothing_says_so() -> None:
    result = subprocess.run([TRITONMESH, "status", "--address", "127.0.0.1:9", "--timeout", "2"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "cannot reach tritonmesh" in result.stderr
