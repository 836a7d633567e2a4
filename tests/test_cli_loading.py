"""What each command loads: the benchmark harness only for `tritonmesh bench`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Runs the CLI's main in a fresh interpreter, then prints the tritonmesh.bench modules loaded.
_PROGRAM = """
import json, sys
from tritonmesh.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
bench = [m for m in sys.modules if m == "tritonmesh.bench" or m.startswith("tritonmesh.bench.")]
print(json.dumps({"code": code, "bench": sorted(bench)}))
"""


def _run(*argv: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", _PROGRAM, *argv], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.stdout.strip(), done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize(("argv", "code"), [
    (["--help"], 0),
    # Port 1 on loopback: nothing listens, so status reports it cannot reach the router.
    (["status", "--address", "127.0.0.1:1", "--timeout", "2"], 1),
    (["status", "--bogus"], 2),
], ids=["help", "status", "status-bad-argument"])
def test_commands_other_than_bench_do_not_load_the_harness(argv: list[str], code: int) -> None:
    result = _run(*argv)
    assert result == {"code": code, "bench": []}


def test_bench_loads_the_harness_and_parses_its_own_arguments() -> None:
    result = _run("bench", "--help")
    loaded = result["bench"]
    assert result["code"] == 0 and isinstance(loaded, list), result
    assert "tritonmesh.bench.cli" in loaded
    bad = _run("bench", "--scale", "2/1", "--no-such-option")
    assert bad["code"] == 2, bad
