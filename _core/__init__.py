"""tritonmesh's native core: the outstanding-request and outstanding-work tables, the
outstanding table in shared memory for several router processes, and the wire peek.

``OutstandingTable`` and ``WorkTable`` are the compiled implementations unless
``TRITONMESH_NO_EXTENSIONS=1`` is set (or the package was installed without extensions),
in which case they are the pure-Python twins. Both are always published under fixed
names: ``COutstandingTable``/``CWorkTable``/``CSharedTable`` (None when not built) and
``PyOutstandingTable``/``PyWorkTable``/``PySharedTable``; ``SharedTable`` is chosen the same
way. Nothing here imports grpc.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from tritonmesh._core._outstanding_py import MAX_EXTERNAL
from tritonmesh._core._outstanding_py import OutstandingTable as PyOutstandingTable
from tritonmesh._core._segment import unlink_stale
from tritonmesh._core._shared_py import SharedTable as PySharedTable
from tritonmesh._core._work_py import SERVICE_MIN_SAMPLES
from tritonmesh._core._work_py import WorkTable as PyWorkTable

__all__ = [
    "MAX_EXTERNAL",
    "NO_EXTENSIONS",
    "SERVICE_MIN_SAMPLES",
    "COutstandingTable",
    "CSharedTable",
    "CWorkTable",
    "OutstandingTable",
    "PyOutstandingTable",
    "PySharedTable",
    "PyWorkTable",
    "SharedTable",
    "WorkTable",
    "unlink_stale",
]

NO_EXTENSIONS: bool = os.environ.get("TRITONMESH_NO_EXTENSIONS", "") not in ("", "0")

COutstandingTable: type[PyOutstandingTable] | None
CWorkTable: type[PyWorkTable] | None
CSharedTable: type[PySharedTable] | None
if TYPE_CHECKING or NO_EXTENSIONS:
    COutstandingTable = None
    CWorkTable = None
    CSharedTable = None
    OutstandingTable = PyOutstandingTable
    WorkTable = PyWorkTable
    SharedTable = PySharedTable
else:
    try:
        from tritonmesh._core._outstanding_c import OutstandingTable as COutstandingTable
        from tritonmesh._core._shared_c import SharedTable as CSharedTable
        from tritonmesh._core._work_c import WorkTable as CWorkTable
    except ImportError:  # installed with TRITONMESH_NO_EXTENSIONS=1: only the twins exist
        COutstandingTable = None
        CWorkTable = None
        CSharedTable = None
        NO_EXTENSIONS = True
        OutstandingTable = PyOutstandingTable
        WorkTable = PyWorkTable
        SharedTable = PySharedTable
    else:
        OutstandingTable = COutstandingTable
        WorkTable = CWorkTable
        SharedTable = CSharedTable
