"""The extension list and three switches; everything else is in pyproject.toml.

The native data path's extension (``_core/_h2.pyx``) links libnghttp2 and is built only
where its header is found (pkg-config, else /usr/include); it has no pure-Python twin.

TRITONMESH_NO_EXTENSIONS=1  build and install the pure-Python twin only.
TRITONMESH_DEBUG=1          compile the core with its invariant checks after every operation.
TRITONMESH_ASAN=1           compile with AddressSanitizer, for the fuzz (.ci/fuzz builds it into
                            build/asan, never in place); run it under LD_PRELOAD of libasan.
"""

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NO_EXTENSIONS = os.environ.get("TRITONMESH_NO_EXTENSIONS", "") not in ("", "0")
DEBUG = os.environ.get("TRITONMESH_DEBUG", "") not in ("", "0")
ASAN = os.environ.get("TRITONMESH_ASAN", "") not in ("", "0")

# -O1 and frame pointers: ASan's reports then name the line that read out of bounds.
COMPILE = ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"] if ASAN else ["-O3"]
LINK = ["-fsanitize=address"] if ASAN else []



def nghttp2_flags() -> tuple[list[str], list[str]] | None:
    """libnghttp2's include and library directories, or None without its header."""
    if shutil.which("pkg-config"):
        found = subprocess.run(["pkg-config", "--cflags-only-I", "--libs-only-L", "libnghttp2"],
                               capture_output=True, text=True, check=False)
        if found.returncode == 0:
            flags = found.stdout.split()
            include = [f[2:] for f in flags if f.startswith("-I")]
            if any(Path(d, "nghttp2", "nghttp2.h").exists() for d in include or ["/usr/include"]):
                return include, [f[2:] for f in flags if f.startswith("-L")]
    if Path("/usr/include/nghttp2/nghttp2.h").exists():
        return [], []
    return None


ext_modules = []
if not NO_EXTENSIONS:
    from Cython.Build import cythonize

    nghttp2 = nghttp2_flags()
    h2 = [] if nghttp2 is None else [
        Extension(
            "tritonmesh._core._h2",
            ["_core/_h2.pyx"],
            include_dirs=nghttp2[0],
            library_dirs=nghttp2[1],
            libraries=["nghttp2"],
            extra_compile_args=COMPILE,
            extra_link_args=LINK,
        ),
    ]

    ext_modules = cythonize(
        [
            *h2,
            Extension(
                "tritonmesh._core._outstanding_c",
                ["_core/_outstanding_c.pyx"],
                include_dirs=["_core"],
                define_macros=[("TRITONMESH_DEBUG", "1" if DEBUG else "0")],
                extra_compile_args=COMPILE,
                extra_link_args=LINK,
            ),
            Extension(
                "tritonmesh._core._work_c",
                ["_core/_work_c.pyx"],
                include_dirs=["_core"],
                define_macros=[("TRITONMESH_DEBUG", "1" if DEBUG else "0")],
                extra_compile_args=COMPILE,
                extra_link_args=LINK,
            ),
            Extension(
                "tritonmesh._core._shared_c",
                ["_core/_shared_c.pyx"],
                include_dirs=["_core"],
                define_macros=[("TRITONMESH_DEBUG", "1" if DEBUG else "0")],
                extra_compile_args=COMPILE,
                extra_link_args=LINK,
            ),
            Extension(
                "tritonmesh._core._wire_c",
                ["_core/_wire_c.pyx"],
                extra_compile_args=COMPILE,
                extra_link_args=LINK,
            ),
        ],
        compiler_directives={"language_level": "3"},
        nthreads=len(os.sched_getaffinity(0)),
    )


class ParallelBuildExt(build_ext):
    """Compiles the extensions side by side, one per CPU this process may use: every install
    (``make install``, a user's ``pip install``, the fuzz's ASan build) builds them all."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if not self.parallel:
            self.parallel = len(os.sched_getaffinity(0))


setup(ext_modules=ext_modules, cmdclass={"build_ext": ParallelBuildExt})
