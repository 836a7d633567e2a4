"""``tritonmesh probe live|ready``: a Kubernetes exec probe (or a shell check) over Triton's
own ServerLive / ServerReady, for ports a kubelet's gRPC probe cannot reach (TLS) and for
liveness, which must not depend on the instances behind the router.

Exit status 0 when the answer is yes, 1 when it is no or the router cannot be reached.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_probe_parser"]


def _cmd_probe(args: argparse.Namespace) -> int:
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonmesh.cli import _admin_channel
    from tritonmesh.workers.upstream import method_path

    name, request, response = {
        "live": ("ServerLive", pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ready": ("ServerReady", pb.ServerReadyRequest, pb.ServerReadyResponse),
    }[args.what]
    with _admin_channel(args) as channel:
        call = channel.unary_unary(method_path(name),
                                   request_serializer=request.SerializeToString,
                                   response_deserializer=response.FromString)
        try:
            answer: Any = call(request(), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"{name} at {args.address}: {exc.code().name}: {exc.details()}",
                  file=sys.stderr)
            return 1
    ok = bool(answer.live if args.what == "live" else answer.ready)
    if not ok:
        print(f"{name} at {args.address}: not {args.what}", file=sys.stderr)
    return 0 if ok else 1


def add_probe_parser(sub: Any) -> None:
    probe = sub.add_parser("probe", help="ask a router (or a Triton) ServerLive or ServerReady; "
                                         "exit 0 if yes (for Kubernetes exec probes)")
    probe.add_argument("what", choices=["live", "ready"])
    probe.add_argument("--address", default="127.0.0.1:8001")
    probe.add_argument("--timeout", type=float, default=2.0)
    probe.add_argument("--tls", action="store_true", help="connect over TLS")
    probe.add_argument("--ca-file", default=None)
    probe.add_argument("--cert-file", default=None)
    probe.add_argument("--key-file", default=None)
    probe.add_argument("--server-name", default=None)
    probe.set_defaults(func=_cmd_probe)
