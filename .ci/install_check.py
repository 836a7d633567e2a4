"""The install path a user takes, on a clean machine: a fresh virtualenv, a plain
``pip install '.[local]'`` (no test extras, no constraints), then ``tritonmesh workers``.

Checks that the build prints no setuptools warning, that pip resolves the tested versions
(constraints.txt) of the packages the fleet depends on, that both workers serve, and that
SIGINT stops the command with nothing left behind (processes, shared-memory regions).
Standard library only: it runs before anything is installed. Usage:
``python3 .ci/install_check.py`` from anywhere; a few minutes (most of it pip).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The packages a plain install must resolve exactly as tested: the ones whose drift broke
# the fleet (protobuf 7 pulled tritonclient 2.41 and nvidia-pytriton 0.5.0 with it).
EXACT = ("protobuf", "tritonclient", "nvidia-pytriton", "numpy", "grpcio")
# What setuptools says when package data is declared badly.
BUILD_WARNINGS = ("would be ignored", "BuildBackendWarning", "SetuptoolsDeprecationWarning")
START_TIMEOUT_S = 300
STOP_TIMEOUT_S = 60

SERVE_CHECK = """
import sys
import numpy as np
import tritonclient.grpc as g
for address in sys.argv[1:]:
    with g.InferenceServerClient(address) as client:
        x = g.InferInput("INPUT0", [3], "FP32")
        x.set_data_from_numpy(np.array([1, 2, 3], dtype=np.float32))
        assert client.infer("identity", [x]).as_numpy("OUTPUT0").tolist() == [1, 2, 3], address
        print("serving:", address)
"""


def tested_versions() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonical(name)] = version.strip()
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions(python: Path) -> dict[str, str]:
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"],
                            check=True, capture_output=True, text=True).stdout
    return {canonical(p["name"]): p["version"] for p in json.loads(listed)}


def install(work: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], check=True)
    python = work / "venv" / "bin" / "python"
    # Leave the project's own tree as it was: build from a copy.
    source = work / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "*.so", "__pycache__", ".*_cache"))
    log = work / "install.log"
    with open(log, "w") as out:
        done = subprocess.run([str(python), "-m", "pip", "install", "-v", "--no-cache-dir",
                               ".[local]"], cwd=source, stdout=out, stderr=subprocess.STDOUT)
    text = log.read_text(errors="replace")
    if done.returncode:
        sys.exit(f"pip install '.[local]' failed:\n{text[-5000:]}")
    warned = [line for line in text.splitlines() if any(w in line for w in BUILD_WARNINGS)]
    assert not warned, "the build printed setuptools warnings:\n" + "\n".join(warned)
    print("installed; no setuptools warnings in the build log")
    return python


def check_versions(python: Path) -> None:
    pins, got = tested_versions(), installed_versions(python)
    wrong = {name: (got.get(name), pins[name]) for name in EXACT if got.get(name) != pins[name]}
    assert not wrong, f"a plain install resolved untested versions (got, tested): {wrong}"
    drift = {n: (got.get(n), v) for n, v in pins.items() if n not in EXACT and got.get(n) != v}
    if drift:
        print(f"note: other packages differ from constraints.txt (got, tested): {drift}")
    print("resolved the tested set:", {name: got[name] for name in EXACT})


def shm_regions(prefixes: list[str]) -> list[str]:
    return [p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(tuple(prefixes))]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def run_workers(python: Path, work: Path) -> None:
    tritonmesh = python.parent / "tritonmesh"
    out_path = work / "workers.out"
    with open(out_path, "w") as out:
        process = subprocess.Popen([str(tritonmesh), "workers", "--count", "2"],
                                   stdout=out, stderr=subprocess.STDOUT, cwd=work)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "Stop with Ctrl-C" not in out_path.read_text():
            assert process.poll() is None, "tritonmesh workers exited:\n" + out_path.read_text()
            assert time.monotonic() < deadline, "workers not ready:\n" + out_path.read_text()
            time.sleep(0.5)
        banner = out_path.read_text()
        workers = re.findall(r"grpc (\S+) .* pid (\d+)  shm (\S+)\*", banner)
        assert len(workers) == 2, banner
        addresses = [address for address, _, _ in workers]
        pids = [int(pid) for _, pid, _ in workers]
        prefixes = [prefix for _, _, prefix in workers]
        assert len(set(prefixes)) == 2, banner
        assert all(shm_regions([p]) for p in prefixes), (prefixes, shm_regions(prefixes))
        subprocess.run([str(python), "-c", SERVE_CHECK, *addresses], check=True, timeout=120)
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=STOP_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = out_path.read_text()
    assert code == 0, f"exit code {code} after SIGINT:\n{output}"
    assert "Traceback" not in output, output
    left = [pid for pid in pids if alive(pid)]
    assert not left, f"tritonserver processes left running: {left}"
    assert not shm_regions(prefixes), f"shared memory left: {shm_regions(prefixes)}"
    print("two workers served and stopped on SIGINT; nothing left behind")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="tritonmesh-install-check-") as tmp:
        work = Path(tmp)
        python = install(work)
        check_versions(python)
        run_workers(python, work)


if __name__ == "__main__":
    os.environ.pop("PIP_CONSTRAINT", None)  # a plain install: what a user's pip resolves
    main()
