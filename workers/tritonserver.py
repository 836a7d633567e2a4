"""Where the ``tritonserver`` binary is, and how to run it from the nvidia-pytriton wheel.

The wheel ships Triton 2.x with the Python backend, but not ready to run as is:
the backend directory must be writable and hold the Python stub built for the
running interpreter, the stub must load *this* interpreter's libpython (not the
system one), and it must find the virtualenv's numpy through ``python3`` on PATH.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TritonInstall", "TritonNotInstalled", "default_model_repository",
           "find_tritonserver"]


class TritonNotInstalled(RuntimeError):
    pass


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backend_dir: Path  # a writable copy, with the matching Python stub in place
    env: dict[str, str]


def default_model_repository() -> Path:
    """The demo model repository shipped in the package (generate, generate_unary, identity)."""
    return Path(__file__).resolve().parent / "models"


@functools.cache
def find_tritonserver() -> TritonInstall:
    """Locate Triton in the nvidia-pytriton wheel and prepare it to run (once per process)."""
    try:
        import pytriton
    except ImportError:
        raise TritonNotInstalled(
            "local Triton workers need the tritonserver binary from nvidia-pytriton: "
            "pip install 'tritonmesh[local]'"
        ) from None
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    binary = root / "bin" / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not binary.exists():
        raise TritonNotInstalled(f"nvidia-pytriton is installed but {binary} is missing")
    if not stub.exists():
        raise TritonNotInstalled(f"nvidia-pytriton has no Python backend stub for Python {version}")
    backend_dir = Path(tempfile.mkdtemp(prefix="tritonmesh-backends-"))
    atexit.register(shutil.rmtree, backend_dir, True)
    shutil.copytree(root / "backends", backend_dir, dirs_exist_ok=True)
    shutil.copy2(stub, backend_dir / "python" / "triton_python_backend_stub")

    site_packages = root.parent.parent
    # This interpreter's libpython first: the stub must not load the system's.
    lib_dirs = [sysconfig.get_config_var("LIBDIR") or "",
                str(site_packages / "nvidia_pytriton.libs")]
    env = dict(os.environ)
    inherited = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([d for d in lib_dirs if d] + inherited)
    # The stub finds its prefix (and so numpy) through the python3 first on PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return TritonInstall(binary, backend_dir, env)
