"""The ``tritonmesh`` command: up, serve, workers, status, weights."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from tritonmesh.config import (
    ConfigError,
    EndpointConfig,
    LocalWorkers,
    RoutingStrategy,
    VariantConfig,
    load_config,
)
from tritonmesh.loop import CHOICES, ENV, EventLoopError, loop_name
from tritonmesh.loop import run as run_on_loop

__all__ = ["main"]

EXAMPLE = """\
Try it (in another shell, same virtualenv):

  python - <<'PY'
  import numpy as np, queue, tritonclient.grpc as g
  c = g.InferenceServerClient("{address}")
  print("ready:", c.is_server_ready())
  print("models:", [m.name for m in c.get_model_repository_index().models])
  x = g.InferInput("INPUT0", [4], "FP32"); x.set_data_from_numpy(np.arange(4, dtype=np.float32))
  print("identity:", c.infer("identity", [x]).as_numpy("OUTPUT0"))
  q = queue.Queue()
  c.start_stream(callback=lambda result, error: q.put(error or result.as_numpy("TOKEN")))
  p = g.InferInput("PROMPT_TOKENS", [1], "INT32"); p.set_data_from_numpy(np.array([16], np.int32))
  m = g.InferInput("MAX_TOKENS", [1], "INT32"); m.set_data_from_numpy(np.array([8], np.int32))
  c.async_stream_infer("generate", [p, m])
  print("streamed tokens:", [int(q.get(timeout=30)[0]) for _ in range(8)]); c.stop_stream()
  PY

  {status}
  curl -s http://{metrics}/metrics | grep tritonmesh_   # Prometheus metrics
Stop with Ctrl-C (in-flight requests finish, workers stop).
"""


def _banner(router: object) -> None:
    from tritonmesh.server import Router

    assert isinstance(router, Router)
    assert router.balancer is not None
    tls = router.config.tls
    print(f"tritonmesh is serving Triton's gRPC protocol on {router.address}", flush=True)
    if tls is not None:
        mutual = tls.client_ca is not None
        print(f"  {'mutual TLS' if mutual else 'TLS'}: clients pass ssl=True, "
              "root_certificates=<CA file>"
              f"{', private_key=..., certificate_chain=...' if mutual else ''} "
              "to InferenceServerClient")
    print(f"  event loop: {loop_name(asyncio.get_running_loop())}")
    if router.config.processes > 1:
        print(f"  router processes: {router.config.processes} (SO_REUSEPORT), and a supervisor")
    for variant in router.balancer.variants:
        print(f"  variant {variant.name!r}: {variant.strategy.value}, weight {variant.weight:g}")
        for inst in variant.live_instances():
            health = "healthy" if inst.healthy else "UNHEALTHY"
            print(f"    instance {inst.address} ({health})")
    admin = router.admin_address
    token = router.admin_tokens.configured
    print(f"  admin API: {admin or 'off (admin_listen: null)'}"
          f"{', needs a token from auth.admin_tokens_file' if token else ''}")
    status = ("tritonmesh status --address " + admin
              + (" --token-file ADMIN_TOKEN_FILE" if token else "")
              + ("" if tls is None else " --ca-file CA_FILE")
              + "     # instances and their outstanding counts") if admin else \
        "(tritonmesh status needs the admin API: set admin_listen)"
    metrics = f"127.0.0.1:{router.metrics_port}" if router.metrics_port else "(metrics off)"
    print(EXAMPLE.format(address=router.address, metrics=metrics, status=status), flush=True)


def _cmd_up(args: argparse.Namespace) -> int:
    config = EndpointConfig(
        name="local",
        listen=f"{args.host}:{args.port}",
        metrics_listen=f"{args.host}:{args.metrics_port}" if args.metrics_port else None,
        # Loopback whatever --host says: the admin API changes the fleet.
        admin_listen=f"127.0.0.1:{args.admin_port}" if args.admin_port >= 0 else None,
        variants=(VariantConfig(
            name="AllTraffic",
            routing_strategy=RoutingStrategy(args.strategy),
            local_workers=LocalWorkers(args.workers, args.model_repository),
        ),),
    )
    print(f"starting {args.workers} local Triton workers and the router...", flush=True)
    return _serve(config, args, None)


def _cmd_serve(args: argparse.Namespace) -> int:
    return _serve(load_config(args.config), args, args.config)


def _serve(config: EndpointConfig, args: argparse.Namespace, config_path: str | None) -> int:
    """Run the endpoint in this process, or (``processes`` >= 2) supervise router processes."""
    from tritonmesh.endpoint import run_endpoint
    from tritonmesh.native_config import choose_data_path
    from tritonmesh.processconfig import check_processes, fit_auto, parse_processes

    if args.processes is not None:
        config = dataclasses.replace(config, processes=parse_processes(args.processes))
        if args.processes == "auto":
            config = fit_auto(config)
        check_processes(config)
    choose_data_path(config)  # an explicit native it cannot serve: exit 2 before any worker
    if config.processes < 2:
        return _run(run_endpoint(config, log_dir=args.log_dir, on_ready=_banner,
                                 config_path=config_path), args.event_loop)
    from tritonmesh.supervisor import ChildStartError, Supervisor

    # Router processes log as router[i]; this one says it is the supervisor.
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s supervisor %(name)s: %(message)s"))
    with Supervisor(config, args.event_loop) as supervisor:
        try:
            return _run(run_endpoint(config, log_dir=args.log_dir, on_ready=_banner,
                                     config_path=config_path, role=supervisor),
                        args.event_loop)
        except ChildStartError as exc:
            print(f"tritonmesh: {exc}", file=sys.stderr)
            return 1


def _cmd_workers(args: argparse.Namespace) -> int:
    from tritonmesh.workers.launcher import serve_workers

    return _run(serve_workers(args.count, args.model_repository, args.log_dir, args.restart),
                args.event_loop)


def _run(main: Coroutine[Any, Any, None], event_loop: str | None) -> int:
    """Run a long-running command: 0 after a graceful stop; one line on stderr and a
    non-zero code when a signal interrupted the start or a worker did not start."""
    from tritonmesh.signals import Interrupted
    from tritonmesh.workers.launcher import WorkerStartError
    from tritonmesh.workers.tritonserver import TritonNotInstalled

    try:
        run_on_loop(main, event_loop)
    except Interrupted as exc:
        print(f"tritonmesh: {exc}", file=sys.stderr)
        return exc.exit_code
    except WorkerStartError as exc:
        print(f"tritonmesh: {exc.summary}", file=sys.stderr)
        return 1
    except TritonNotInstalled as exc:
        print(f"tritonmesh: {exc}", file=sys.stderr)
        return 1
    return 0


def _admin_token(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """The call metadata with the first token of ``--token-file``, if given."""
    if args.token_file is None:
        return ()
    try:
        lines = Path(args.token_file).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read {args.token_file}: {exc.strerror or exc}") from None
    tokens = [t.strip() for t in lines if t.strip() and not t.strip().startswith("#")]
    if not tokens:
        raise ConfigError(f"{args.token_file} holds no token")
    return (("authorization", f"Bearer {tokens[0]}"),)


def _admin_channel(args: argparse.Namespace) -> Any:
    """A channel to the router's admin API: plaintext, or TLS when any TLS option is set."""
    import grpc
    from tritonmesh.workers.upstream import name_override

    if not (args.tls or args.ca_file or args.cert_file or args.key_file or args.server_name):
        return grpc.insecure_channel(args.address)
    if (args.cert_file is None) != (args.key_file is None):
        raise ConfigError("--cert-file and --key-file go together (mutual TLS)")

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None

    credentials = grpc.ssl_channel_credentials(read(args.ca_file), read(args.key_file),
                                               read(args.cert_file))
    return grpc.secure_channel(args.address, credentials,
                               options=name_override(args.server_name))


def _cmd_status(args: argparse.Namespace) -> int:
    import grpc
    from tritonmesh._pb import tritonmesh_admin_pb2 as apb
    from tritonmesh._pb import tritonmesh_admin_pb2_grpc as apb_grpc
    from tritonmesh.fleetmetrics import SYNC_S

    metadata = _admin_token(args)
    with _admin_channel(args) as channel:
        stub = apb_grpc.AdminStub(channel)
        try:
            response = stub.ListInstances(apb.ListInstancesRequest(), timeout=args.timeout,
                                          metadata=metadata)
        except grpc.RpcError as exc:
            print(f"cannot reach tritonmesh at {args.address}: {exc.details()}", file=sys.stderr)
            return 1
    if response.data_path:  # absent from a router older than the field
        print(f"data path: {response.data_path} ({response.data_path_reason})")
    if response.processes >= 2:
        print(f"router processes: {response.processes} (requests and errors: the fleet's, "
              f"up to {2 * SYNC_S:g} s old)")
    for v in response.variants:
        models = ", ".join(v.models) or "all models"
        print(f"variant {v.name}: {v.routing_strategy}, weight {v.weight:g}, {models}")
        if v.HasField("hint_quality"):
            learned = (f"residual SD {v.hint_residual_sd:.2f}"
                       if v.HasField("hint_residual_sd") else "not learned yet")
            print(f"  work hints: quality {v.hint_quality:.2f}, {learned}")
        mine = [i for i in response.instances if i.variant == v.name]
        reports = any(i.load_report not in ("", "off") for i in mine)
        print(f"  {'slot':>4}  {'address':<22} {'state':<9} {'health':<9} "
              f"{'outstanding':>11} {'requests':>9} {'errors':>7}"
              + (f" {'external':>8} {'report':<6}" if reports else ""))
        for i in mine:
            health = "healthy" if i.healthy else "unhealthy"
            print(f"  {i.slot:>4}  {i.address:<22} {i.state:<9} {health:<9} "
                  f"{i.outstanding:>11} {i.requests:>9} {i.errors:>7}"
                  + (f" {i.external_requests:>8.1f} {i.load_report:<6}" if reports else ""))
    return 0


def _admin_options(parser: argparse.ArgumentParser) -> None:
    """How a command reaches the router's admin API (``status``, ``weights``)."""
    parser.add_argument("--address", default="127.0.0.1:8003",
                        help="the router's admin_listen: HOST:PORT or unix:PATH")
    parser.add_argument("--token-file", default=None,
                        help="a file whose first token is sent as 'authorization: Bearer' "
                             "(auth.admin_tokens_file)")
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--tls", action="store_true",
                        help="connect over TLS (implied by the three options below)")
    parser.add_argument("--ca-file", default=None,
                        help="CA that signed the router's certificate (default: system roots)")
    parser.add_argument("--cert-file", default=None, help="client certificate (mutual TLS)")
    parser.add_argument("--key-file", default=None, help="client private key (mutual TLS)")
    parser.add_argument("--server-name", default=None,
                        help="the name in the router's certificate, when the address's host "
                             "is not")


def _pairs(values: Sequence[str], what: str, parse: Callable[[str], Any]) -> dict[str, Any]:
    """``NAME=VALUE`` arguments by name; a malformed one is a ConfigError naming it."""
    pairs: dict[str, Any] = {}
    for text in values:
        name, sep, value = text.partition("=")
        if not (sep and name):
            raise ConfigError(f"expected VARIANT={what}, got {text!r}")
        if name in pairs:
            raise ConfigError(f"variant {name!r} is given twice")
        try:
            pairs[name] = parse(value)
        except ValueError:
            raise ConfigError(f"{text!r}: {what} must be a number") from None
    return pairs


def _cmd_weights(args: argparse.Namespace) -> int:
    import grpc
    from tritonmesh._pb import tritonmesh_admin_pb2 as apb
    from tritonmesh._pb import tritonmesh_admin_pb2_grpc as apb_grpc

    weights = _pairs(args.weights, "WEIGHT", float)
    capacity = _pairs(args.capacity, "N", int)
    unweighted = sorted(set(capacity) - set(weights))
    if unweighted:
        raise ConfigError(f"--capacity for {', '.join(unweighted)}: give its weight too "
                          "(VARIANT=WEIGHT)")
    request = apb.UpdateVariantWeightsRequest(variants=[
        apb.VariantWeight(variant=name, weight=weight,
                          max_concurrency_per_instance=capacity.get(name))
        for name, weight in weights.items()])
    metadata = _admin_token(args)
    with _admin_channel(args) as channel:
        try:
            response = apb_grpc.AdminStub(channel).UpdateVariantWeights(
                request, timeout=args.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            print(f"tritonmesh: weights not changed: [{exc.code().name}] {exc.details()}",
                  file=sys.stderr)
            return 1
    for v in response.variants:
        limit = v.max_concurrency_per_instance
        print(f"variant {v.name}: weight {v.weight:g}"
              + (f", max_concurrency_per_instance {limit}" if limit else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tritonmesh", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--event-loop", choices=CHOICES, default=None,
                        help=f"asyncio event loop (default: ${ENV}, else auto: uvloop when "
                             "installed)")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start local Triton workers with the demo models, and the "
                                   "router in front of them")
    up.add_argument("--workers", type=int, default=4, help="number of Triton instances")
    up.add_argument("--strategy", default="LEAST_OUTSTANDING_REQUESTS",
                    choices=[s.value for s in RoutingStrategy])
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8001, help="router gRPC port (0: any free)")
    up.add_argument("--metrics-port", type=int, default=8002, help="Prometheus port (0: off)")
    up.add_argument("--admin-port", type=int, default=8003,
                    help="admin API port, on 127.0.0.1 whatever --host says (0: any free, "
                         "-1: off)")
    up.add_argument("--model-repository", default=None,
                    help="Triton model repository (default: the bundled demo models)")
    up.add_argument("--log-dir", default=None, help="where Triton logs go (default: a temp dir)")
    _processes_option(up)
    up.set_defaults(func=_cmd_up)

    serve = sub.add_parser("serve", help="serve an endpoint from a config file "
                                         "(YAML, TOML or SageMaker JSON)")
    serve.add_argument("--config", required=True)
    serve.add_argument("--log-dir", default=None)
    _processes_option(serve)
    serve.set_defaults(func=_cmd_serve)

    workers = sub.add_parser("workers", help="start local Triton workers only")
    workers.add_argument("--count", type=int, default=2)
    workers.add_argument("--model-repository", default=None)
    workers.add_argument("--log-dir", default=None)
    workers.add_argument("--restart", action="store_true", help="restart workers that exit")
    workers.set_defaults(func=_cmd_workers)

    status = sub.add_parser("status", help="list a running router's instances (admin API)")
    _admin_options(status)
    status.set_defaults(func=_cmd_status)

    weights = sub.add_parser(
        "weights", help="set variants' weights (and capacity) on a running router, all at "
                        "once (admin API; SageMaker's UpdateEndpointWeightsAndCapacities)")
    weights.add_argument("weights", nargs="+", metavar="VARIANT=WEIGHT",
                         help="a variant and its new weight (finite, >= 0)")
    weights.add_argument("--capacity", action="append", default=[],
                         metavar="VARIANT=N",
                         help="also set the variant's max_concurrency_per_instance "
                              "(repeatable)")
    _admin_options(weights)
    weights.set_defaults(func=_cmd_weights)

    from tritonmesh.probe import add_probe_parser

    add_probe_parser(sub)
    # The harness parses its own arguments, so no other command loads it (or numpy and the
    # peers' tooling with it).
    bench = sub.add_parser("bench", add_help=False,
                           help="reproduce SageMaker's routing experiment with real Triton, "
                                "against nginx and HAProxy when installed "
                                "(tritonmesh bench --help)")
    bench.set_defaults(func=_cmd_bench)
    return parser


def _processes_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--processes", default=None, metavar="K",
                        help="router processes serving the port (an integer >= 1, or 'auto': "
                             "one per CPU this process may use, or one where the "
                             "configuration needs one process); overrides the config's "
                             "'processes' (default 1; make up passes auto)")


def _cmd_bench(args: argparse.Namespace) -> int:
    from tritonmesh.bench.cli import main as bench_main

    code: int = bench_main(args.bench_argv)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.func is _cmd_bench:
        args.bench_argv = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code: int = args.func(args)
    except EventLoopError as exc:
        print(f"tritonmesh: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"tritonmesh: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
