"""tritonmesh's native core: the outstanding-request table and the wire peek.

``OutstandingTable`` is the compiled implementation unless ``TRITONMESH_NO_EXTENSIONS=1``
is set (or the package was installed without extensions), in which case it is the
pure-Python twin. Both are always published under fixed names: ``COutstandingTable``
(None when not built) and ``PyOutstandingTable``. Nothing here imports grpc.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from tritonmesh._core._outstanding_py import OutstandingTable as PyOutstandingTable

__all__ = ["NO_EXTENSIONS", "COutstandingTable", "OutstandingTable", "PyOutstandingTable"]

NO_EXTENSIONS: bool = os.environ.get("TRITONMESH_NO_EXTENSIONS", "") not in ("", "0")

COutstandingTable: type[PyOutstandingTable] | None
if TYPE_CHECKING or NO_EXTENSIONS:
    COutstandingTable = None
    OutstandingTable = PyOutstandingTable
else:
    try:
        from tritonmesh._core._outstanding_c import OutstandingTable as COutstandingTable
    except ImportError:  # installed with TRITONMESH_NO_EXTENSIONS=1: only the twin exists
        COutstandingTable = None
        NO_EXTENSIONS = True
        OutstandingTable = PyOutstandingTable
    else:
        OutstandingTable = COutstandingTable
