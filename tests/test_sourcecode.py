"""Lint, types and generated code are part of the test suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(args: list[str], **kwargs: object) -> None:
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            **kwargs)  # type: ignore[call-overload]
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"


def test_ruff() -> None:
    _run([str(BIN / "ruff"), "check", "."])


def test_cython_lint() -> None:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    _run([str(BIN / "cython-lint"), "--max-line-length", "100",
          *map(str, sorted((ROOT / "_core").glob("*.pyx")))], env=env)


def test_mypy_strict(tmp_path: Path) -> None:
    """mypy --strict over the package as it is imported (router/ is tritonmesh, ...).

    mypy cannot follow setuptools' package_dir mapping, so it checks a tree of links
    laid out like the installed package.
    """
    pkg = tmp_path / "tritonmesh"
    pkg.mkdir()
    for item in (ROOT / "router").iterdir():
        # Generated code is not ours to type-check: without it, tritonmesh._pb is Any.
        if item.name not in ("__pycache__", "_pb"):
            (pkg / item.name).symlink_to(item)
    (pkg / "_core").symlink_to(ROOT / "_core")
    (pkg / "workers").symlink_to(ROOT / "workers")
    env = {**os.environ, "MYPYPATH": str(tmp_path)}
    _run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
          "-p", "tritonmesh"], env=env)


def test_generated_protos_are_fresh(tmp_path: Path) -> None:
    """router/_pb/ is exactly what proto/generate.py makes from proto/*.proto."""
    _run([sys.executable, "proto/generate.py", str(tmp_path)])
    generated = {p.name: p.read_text() for p in tmp_path.iterdir() if p.is_file()}
    checked_in = {p.name: p.read_text() for p in (ROOT / "router" / "_pb").iterdir()
                  if p.is_file()}
    assert generated == checked_in, "run: python proto/generate.py"


@pytest.mark.parametrize("module", ["tritonmesh._core", "tritonmesh.wire"])
def test_core_imports_without_grpc(module: str) -> None:
    """The native core and the wire peek must not pull grpc in."""
    code = (f"import sys, {module}; "
            "assert not [m for m in sys.modules if m == 'grpc' or m.startswith('grpc.')]")
    _run([sys.executable, "-c", code])
