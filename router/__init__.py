"""tritonmesh: a gRPC inference router in front of a fleet of Triton Inference Servers.

The package import stays light (the native core must be importable without
grpc); the public names load on first use.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# Before anything imports grpc (it reads this once): the supervisor starts router processes,
# and the router Triton workers, by fork + exec from its event loop (uvloop's spawn forks)
# while gRPC's threads run, and gRPC's fork handlers then crash about one child in 70 with
# SIGSEGV before its exec (bench/grpc_fork_crash.py). No tritonmesh process forks to go on
# using gRPC, so the handlers are off unless the environment asks for them.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

__version__ = "0.1.0"
__all__ = ["EndpointConfig", "Router", "__version__", "load_config", "run_endpoint"]

if TYPE_CHECKING:
    from tritonmesh.config import EndpointConfig, load_config
    from tritonmesh.endpoint import run_endpoint
    from tritonmesh.server import Router

_LAZY = {
    "EndpointConfig": "tritonmesh.config",
    "load_config": "tritonmesh.config",
    "Router": "tritonmesh.server",
    "run_endpoint": "tritonmesh.endpoint",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tritonmesh' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
