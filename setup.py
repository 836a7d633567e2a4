"""The extension list and three switches; everything else is in pyproject.toml.

TRITONMESH_NO_EXTENSIONS=1  build and install the pure-Python twin only.
TRITONMESH_DEBUG=1          compile the core with its invariant checks after every operation.
TRITONMESH_ASAN=1           compile with AddressSanitizer, for the fuzz (.ci/fuzz builds it into
                            build/asan, never in place); run it under LD_PRELOAD of libasan.
"""

import os

from setuptools import Extension, setup

NO_EXTENSIONS = os.environ.get("TRITONMESH_NO_EXTENSIONS", "") not in ("", "0")
DEBUG = os.environ.get("TRITONMESH_DEBUG", "") not in ("", "0")
ASAN = os.environ.get("TRITONMESH_ASAN", "") not in ("", "0")

# -O1 and frame pointers: ASan's reports then name the line that read out of bounds.
COMPILE = ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"] if ASAN else ["-O3"]
LINK = ["-fsanitize=address"] if ASAN else []

ext_modules = []
if not NO_EXTENSIONS:
    from Cython.Build import cythonize

    ext_modules = cythonize(
        [
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
    )

setup(ext_modules=ext_modules)
