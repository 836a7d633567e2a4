"""The data plane cannot steer the fleet: the admin API's own listener, restricted control
RPCs, bearer tokens, and AddInstance's checks, against real Triton workers."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from harness import (
    LoopThread,
    RecordingTriton,
    RouterHandle,
    admin_stub,
    generate_inputs,
    make_config,
    start_router,
)
from test_tls import pki  # noqa: F401  # the test CA and certificates, shared
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException
from tritonmesh._pb import tritonmesh_admin_pb2 as apb
from tritonmesh.balancer import Variant
from tritonmesh.config import AuthConfig, ConfigError, ServerTLS, parse_config
from tritonmesh.workers.launcher import free_ports

pytestmark = pytest.mark.triton

ADMIN = {"authorization": "Bearer admin-1"}
DATA = {"authorization": "Bearer data-1"}
TOKENS = AuthConfig(data_tokens=frozenset({"data-1"}), admin_tokens=frozenset({"admin-1"}))


def _infer(address: str, headers: dict[str, str] | None = None) -> list[float]:
    with grpcclient.InferenceServerClient(address) as client:
        x = grpcclient.InferInput("INPUT0", [2], "FP32")
        x.set_data_from_numpy(np.array([1, 2], dtype=np.float32))
        result = client.infer("identity", [x], headers=headers, client_timeout=30)
        return [float(v) for v in result.as_numpy("OUTPUT0")]


def _refused(call: Any, code: str, *needles: str) -> None:
    with pytest.raises(InferenceServerException) as info:
        call()
    assert info.value.status() == f"StatusCode.{code}", info.value
    for needle in needles:
        assert needle in (info.value.message() or ""), info.value.message()


def _services(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
    return {s.name for s in response.list_services_response.service}


def _rpc_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# -- the admin API's own listener ---------------------------------------------------------


def test_admin_api_is_on_its_own_listener_only(make_router: Any) -> None:
    router = make_router(workers=2)
    assert router.admin_address != router.address
    # Not on the data port, nor advertised there.
    error = _rpc_error(lambda: admin_stub(router.address).ListInstances(
        apb.ListInstancesRequest(), timeout=10))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "tritonmesh.admin.v1.Admin" not in _services(router.address)
    assert "inference.GRPCInferenceService" in _services(router.address)
    # A hijack through the data port adds nothing.
    error = _rpc_error(lambda: admin_stub(router.address).AddInstance(
        apb.AddInstanceRequest(variant="AllTraffic", address="127.0.0.1:1"), timeout=10))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    # On the admin listener: the API and its reflection.
    listing = admin_stub(router.admin_address).ListInstances(apb.ListInstancesRequest(), timeout=10)
    assert len(listing.instances) == 2
    assert "tritonmesh.admin.v1.Admin" in _services(router.admin_address)


def test_admin_listener_on_a_unix_socket(loop_thread: LoopThread, worker_addresses: list[str],
                                         tmp_path: Path) -> None:
    config, instances = make_config(worker_addresses[:1])
    socket_path = tmp_path / "admin.sock"
    router = start_router(loop_thread, dataclasses.replace(
        config, admin_listen=f"unix:{socket_path}"), instances)
    try:
        assert router.admin_address == f"unix:{socket_path}"
        listing = admin_stub(router.admin_address).ListInstances(apb.ListInstancesRequest(),
                                                                 timeout=10)
        assert [i.address for i in listing.instances] == worker_addresses[:1]
    finally:
        router.stop()


def test_admin_api_off(loop_thread: LoopThread, worker_addresses: list[str]) -> None:
    config, instances = make_config(worker_addresses[:1])
    router = start_router(loop_thread, dataclasses.replace(config, admin_listen=None), instances)
    try:
        assert router.router.admin_address is None
        assert _infer(router.address) == [1.0, 2.0]
    finally:
        router.stop()


def test_security_keys_are_validated() -> None:
    base = {"variants": [{"name": "v", "instances": ["127.0.0.1:1"]}]}
    for extra, message in (
        ({"admin_listen": "127.0.0.1:8001"}, "admin_listen: must differ from listen"),
        ({"admin_listen": "nowhere"}, "admin_listen: expected HOST:PORT"),
        ({"admin_listen": "unix:"}, "admin_listen: unix: needs a path"),
        ({"instance_networks": ["10.0.0.300/8"]}, "instance_networks[0]: expected a network"),
        ({"auth": {"data_tokens_file": "/nonexistent/tokens"}},
         "auth.data_tokens_file: cannot read"),
        ({"auth": {"admin_token_file": "x"}}, "auth.admin_token_file: unknown key"),
    ):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            parse_config({**base, **extra})
    config = parse_config(base)
    assert config.admin_listen == "127.0.0.1:8003"
    assert [str(n) for n in config.instance_networks] == ["127.0.0.0/8", "::1/128"]
    assert parse_config({**base, "admin_listen": None}).admin_listen is None


def test_token_files_are_read_and_checked(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# operators\n\n  tok-a  \ntok-b\n")
    base = {"variants": [{"name": "v", "instances": ["127.0.0.1:1"]}]}
    config = parse_config({**base, "auth": {"admin_tokens_file": "tokens"}}, tmp_path)
    assert config.auth.admin_tokens == {"tok-a", "tok-b"} and config.auth.data_tokens is None
    assert "tok-a" not in repr(config)
    tokens.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match=r"auth\.admin_tokens_file: .* holds no token"):
        parse_config({**base, "auth": {"admin_tokens_file": "tokens"}}, tmp_path)
    tokens.write_text("two words\n")
    with pytest.raises(ConfigError, match="line 1: a token is printable ASCII without spaces"):
        parse_config({**base, "auth": {"admin_tokens_file": "tokens"}}, tmp_path)


# -- control RPCs on the data port --------------------------------------------------------


def test_control_rpcs_are_refused_without_the_admin_token(make_router: Any,
                                                          worker_addresses: list[str]) -> None:
    router = make_router(workers=2)
    with grpcclient.InferenceServerClient(router.address) as client:
        hint = "configure auth.admin_tokens_file"
        _refused(lambda: client.unload_model("identity"), "PERMISSION_DENIED",
                 "RepositoryModelUnload is restricted", hint)
        _refused(lambda: client.load_model("identity", files={"file:1/model.py": b"boom"},
                                           config='{"backend": "python"}'),
                 "PERMISSION_DENIED", "RepositoryModelLoad is restricted", hint)
        _refused(lambda: client.update_log_settings({"log_verbose_level": 1}),
                 "PERMISSION_DENIED", "LogSettings is restricted")
        _refused(lambda: client.update_trace_settings(settings={"trace_rate": "1"}),
                 "PERMISSION_DENIED", "TraceSetting is restricted")
        _refused(lambda: client.register_system_shared_memory("r", "/key", 64),
                 "PERMISSION_DENIED", "SystemSharedMemoryRegister is restricted")
        _refused(lambda: client.unregister_cuda_shared_memory("r"),
                 "PERMISSION_DENIED", "CudaSharedMemoryUnregister is restricted")
        # A token presented where none is configured is refused all the same.
        _refused(lambda: client.unload_model("identity", headers=ADMIN), "PERMISSION_DENIED")
        # Reads stay open.
        assert "log_info" in client.get_log_settings(as_json=True)["settings"]
        assert "trace_rate" in client.get_trace_settings(as_json=True)["settings"]
        assert _infer(router.address) == [1.0, 2.0]
    for address in worker_addresses[:2]:
        with grpcclient.InferenceServerClient(address) as direct:
            assert direct.is_model_ready("identity")


def test_control_rpcs_take_the_admin_token(make_router: Any, worker_addresses: list[str]) -> None:
    router = make_router(workers=2, auth=AuthConfig(admin_tokens=frozenset({"admin-1"})))
    with grpcclient.InferenceServerClient(router.address) as client:
        _refused(lambda: client.unload_model("identity", headers=DATA), "PERMISSION_DENIED",
                 "send 'authorization: Bearer <token>' with a token from auth.admin_tokens_file")
        _refused(lambda: client.unload_model("identity", headers={"authorization": "admin-1"}),
                 "PERMISSION_DENIED")
        # The data plane is open (no data tokens): inference needs nothing.
        assert _infer(router.address) == [1.0, 2.0]
        level = client.get_log_settings(as_json=True)["settings"]["log_verbose_level"]
        value = int(level.get("uint32Param", 0))
        client.update_log_settings({"log_verbose_level": value}, headers=ADMIN)
        client.unload_model("identity", headers=ADMIN)
        for address in worker_addresses[:2]:
            with grpcclient.InferenceServerClient(address) as direct:
                assert not direct.is_model_ready("identity")
        client.load_model("identity", headers=ADMIN)
    for address in worker_addresses[:2]:
        with grpcclient.InferenceServerClient(address) as direct:
            assert direct.is_model_ready("identity")


# -- bearer tokens ------------------------------------------------------------------------


def test_data_and_admin_tokens(make_router: Any, loop_thread: LoopThread) -> None:
    router = make_router(workers=2, auth=TOKENS)
    need = "send 'authorization: Bearer <token>' with a token from auth.data_tokens_file"
    _refused(lambda: _infer(router.address), "UNAUTHENTICATED", need)
    _refused(lambda: _infer(router.address, {"authorization": "Bearer data-2"}),
             "UNAUTHENTICATED", need)
    _refused(lambda: _infer(router.address, {"authorization": "data-1"}), "UNAUTHENTICATED")
    assert _infer(router.address, DATA) == [1.0, 2.0]
    assert _infer(router.address, {"authorization": "bearer data-1"}) == [1.0, 2.0]
    assert _infer(router.address, ADMIN) == [1.0, 2.0]  # an admin token serves both planes
    # Streams too, and server-wide RPCs.
    with grpcclient.InferenceServerClient(router.address) as client:
        _refused(lambda: client.is_server_ready(), "UNAUTHENTICATED")
        assert client.is_server_ready(headers=DATA)
        for headers, ok in ((None, False), (DATA, True)):
            got: list[Any] = []
            client.start_stream(callback=lambda result, error, got=got: got.append(
                error or result), headers=headers)
            with contextlib.suppress(InferenceServerException):  # the stream may be gone
                client.async_stream_infer("generate", generate_inputs(2))
            client.stop_stream()
            if ok:
                assert [r.as_numpy("TOKEN")[0] for r in got] == [0, 1]
            else:
                assert got and all(isinstance(e, InferenceServerException) for e in got)
                assert "StatusCode.UNAUTHENTICATED" in str(got[0].status())
        # A data token is no admin token.
        _refused(lambda: client.unload_model("identity", headers=DATA), "PERMISSION_DENIED")
    # Kubernetes probes send no headers: grpc.health.v1 stays open.
    with grpc.insecure_channel(router.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    # The admin listener takes admin tokens only.
    admin = admin_stub(router.admin_address)
    for metadata in ((), tuple(DATA.items())):
        error = _rpc_error(lambda m=metadata: admin.ListInstances(
            apb.ListInstancesRequest(), timeout=10, metadata=m))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "auth.admin_tokens_file" in (error.details() or "")
    assert len(admin.ListInstances(apb.ListInstancesRequest(), timeout=10,
                                   metadata=tuple(ADMIN.items())).instances) == 2
    # A reload replaces the tokens in place.
    config = dataclasses.replace(router.router.config, auth=AuthConfig(
        data_tokens=frozenset({"data-2"}), admin_tokens=frozenset({"admin-2"})))
    loop_thread.run(_reload_auth(router, config))
    _refused(lambda: _infer(router.address, DATA), "UNAUTHENTICATED")
    assert _infer(router.address, {"authorization": "Bearer data-2"}) == [1.0, 2.0]
    error = _rpc_error(lambda: admin.ListInstances(apb.ListInstancesRequest(), timeout=10,
                                                   metadata=tuple(ADMIN.items())))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    admin.ListInstances(apb.ListInstancesRequest(), timeout=10,
                        metadata=(("authorization", "Bearer admin-2"),))


async def _reload_auth(router: RouterHandle, config: Any) -> None:
    router.router.reload_auth(config)


def test_the_routers_token_is_not_forwarded(loop_thread: LoopThread,
                                             recording_triton: RecordingTriton) -> None:
    config, instances = make_config([recording_triton.address], auth=TOKENS)
    router = start_router(loop_thread, config, instances)
    try:
        with grpc.insecure_channel(router.address) as channel:
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            request = pb.ModelInferRequest(model_name="identity").SerializeToString()
            infer(request, timeout=10, metadata=(*DATA.items(), ("x-trace", "t1")))
            load = channel.unary_unary("/inference.GRPCInferenceService/ModelReady")
            load(pb.ModelReadyRequest(name="identity").SerializeToString(), timeout=10,
                 metadata=tuple(DATA.items()))
        seen = [m for _, m, _ in recording_triton.calls]
        forwarded = [m for m in seen if "x-trace" in m]
        assert forwarded and "authorization" not in forwarded[0]
        assert all("authorization" not in m for m in seen)
        router.wait_idle()
    finally:
        router.stop()


def test_sighup_rereads_the_token_files(tmp_path: Path, worker_addresses: list[str]) -> None:
    """`tritonmesh serve` as deployed: token files from the config, reloaded on SIGHUP."""
    tokens = tmp_path / "data-tokens"
    tokens.write_text("first\n")
    config = tmp_path / "endpoint.yaml"
    config.write_text("listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nmetrics_listen: null\n"
                      "auth: {data_tokens_file: data-tokens}\nvariants:\n"
                      f"  - name: AllTraffic\n    instances: {worker_addresses[:1]!r}\n")
    tritonmesh = str(Path(sys.executable).parent / "tritonmesh")
    process = subprocess.Popen([tritonmesh, "serve", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        address = ""
        for line in process.stdout:
            if "serving Triton's gRPC protocol on" in line:
                address = line.split()[-1]
                break
        assert address, "no banner"
        assert _infer(address, {"authorization": "Bearer first"}) == [1.0, 2.0]
        tokens.write_text("second\n")
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while True:  # the reload runs on the router's loop, after the signal
            try:
                _infer(address, {"authorization": "Bearer first"})
            except InferenceServerException as exc:
                assert exc.status() == "StatusCode.UNAUTHENTICATED", exc
                break
            assert time.monotonic() < deadline, "the reload did not apply"
            time.sleep(0.1)
        assert _infer(address, {"authorization": "Bearer second"}) == [1.0, 2.0]
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)
    assert process.returncode == 0


# -- AddInstance ----------------------------------------------------------------------------


def test_add_instance_refuses_what_it_must_not_dial(make_router: Any, loop_thread: LoopThread,
                                                    recording_triton: RecordingTriton,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    router = make_router(workers=1)
    admin = admin_stub(router.admin_address)
    opened: list[Any] = []
    real_connect = Variant.connect

    def counting_connect(variant: Variant, address: str) -> Any:
        upstream = real_connect(variant, address)
        opened.append(upstream)
        return upstream
    monkeypatch.setattr(Variant, "connect", counting_connect)
    before = [(i.address, i.state) for i in router.instances()]

    def refused(address: str, code: grpc.StatusCode, needle: str, weight: float = 0.0) -> None:
        error = _rpc_error(lambda: admin.AddInstance(apb.AddInstanceRequest(
            variant="AllTraffic", address=address, weight=weight), timeout=30))
        assert error.code() == code, error
        assert needle in (error.details() or ""), error.details()

    # Refused before any channel is opened.
    for target in ("unix:/tmp/triton.sock", "unix:/tmp/triton.sock:8001",
                   "dns:///localhost:8001", "unix-abstract:x", "ipv4:127.0.0.1:8001"):
        refused(target, grpc.StatusCode.INVALID_ARGUMENT, "over TCP (no unix: or other schemes)")
    refused("192.0.2.7:8001", grpc.StatusCode.PERMISSION_DENIED,
            "192.0.2.7 outside instance_networks (127.0.0.0/8, ::1/128)")
    refused(recording_triton.address, grpc.StatusCode.INVALID_ARGUMENT, "weight must be a finite",
            weight=math.nan)
    refused(recording_triton.address, grpc.StatusCode.INVALID_ARGUMENT, "weight must be a finite",
            weight=math.inf)
    refused(recording_triton.address, grpc.StatusCode.INVALID_ARGUMENT, "weight must be a finite",
            weight=-1.0)
    refused(router.instances()[0].address, grpc.StatusCode.ALREADY_EXISTS, "already in variant")
    assert opened == []
    # Nothing answers there: probed, refused, its channel closed.
    (nobody,) = free_ports(1)
    refused(f"127.0.0.1:{nobody}", grpc.StatusCode.UNAVAILABLE,
            f"no ready Triton at 127.0.0.1:{nobody}")
    assert len(opened) == 1
    state = opened[0].channel.get_state()
    assert state == grpc.ChannelConnectivity.SHUTDOWN
    assert [(i.address, i.state) for i in router.instances()] == before
    # An allowed address that answers as Triton does joins; by name too.
    loopback = admin.AddInstance(apb.AddInstanceRequest(
        variant="AllTraffic", address=recording_triton.address.replace("127.0.0.1", "localhost")),
        timeout=30)
    assert loopback.state == "ACTIVE" and loopback.healthy
    admin.RemoveInstance(apb.RemoveInstanceRequest(variant="AllTraffic",
                                                   address=loopback.address), timeout=30)


def test_add_instance_outside_the_allowed_networks(loop_thread: LoopThread,
                                                   worker_addresses: list[str],
                                                   recording_triton: RecordingTriton) -> None:
    import ipaddress

    config, instances = make_config(worker_addresses[:1])
    config = dataclasses.replace(config,
                                 instance_networks=(ipaddress.ip_network("10.0.0.0/8"),))
    router = start_router(loop_thread, config, instances)
    try:
        # The fake answers ServerReady; its address is what keeps it out.
        fake = recording_triton.address
        for address in (fake, fake.replace("127.0.0.1", "localhost")):
            error = _rpc_error(lambda a=address: admin_stub(router.admin_address).AddInstance(
                apb.AddInstanceRequest(variant="AllTraffic", address=a), timeout=30))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "outside instance_networks (10.0.0.0/8)" in (error.details() or "")
        assert "localhost resolves to" in (error.details() or "")
        assert not recording_triton.calls
        assert [i.address for i in router.instances()] == worker_addresses[:1]
    finally:
        router.stop()


def test_add_instance_probes_the_variants_models(make_router: Any,
                                                 worker_addresses: list[str]) -> None:
    router = make_router(workers=1, models=["identity", "not_in_the_repository"])
    error = _rpc_error(lambda: admin_stub(router.admin_address).AddInstance(apb.AddInstanceRequest(
        variant="AllTraffic", address=worker_addresses[1]), timeout=30))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (f"model 'not_in_the_repository' is not ready on {worker_addresses[1]}"
            in (error.details() or ""))
    assert [i.address for i in router.instances()] == worker_addresses[:1]


def test_remove_instance_drains_to_the_end_when_its_caller_gives_up(
        make_router: Any, worker_addresses: list[str]) -> None:
    router = make_router(workers=2)
    leaving = router.instances()[1]
    admin = admin_stub(router.admin_address)

    def generate() -> int:
        with grpcclient.InferenceServerClient(router.address) as client:
            result = client.infer("generate_unary", generate_inputs(1000), client_timeout=120)
            return len(result.as_numpy("TOKENS"))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        work = [pool.submit(generate) for _ in range(2)]
        deadline = time.monotonic() + 30
        while leaving.outstanding == 0:  # a long request runs on the leaving instance
            assert time.monotonic() < deadline
            time.sleep(0.005)
        error = _rpc_error(lambda: admin.RemoveInstance(apb.RemoveInstanceRequest(
            variant="AllTraffic", address=leaving.address, drain_timeout_s=120), timeout=0.3))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert leaving.state == "DRAINING"
        assert [f.result(timeout=120) for f in work] == [1000, 1000]
    # The request finished; the drain went on without its caller and removed the instance.
    deadline = time.monotonic() + 30
    while leaving.state != "REMOVED":
        assert time.monotonic() < deadline, f"left {leaving.state}"
        time.sleep(0.01)
    added = admin.AddInstance(apb.AddInstanceRequest(variant="AllTraffic",
                                                     address=leaving.address), timeout=30)
    assert added.state == "ACTIVE"


def test_remove_instance_refuses_a_bad_drain_timeout(make_router: Any) -> None:
    router = make_router(workers=1)
    for timeout in (math.nan, math.inf, -1.0):
        error = _rpc_error(lambda t=timeout: admin_stub(router.admin_address).RemoveInstance(
            apb.RemoveInstanceRequest(variant="AllTraffic",
                                      address=router.instances()[0].address,
                                      drain_timeout_s=t), timeout=10))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "drain_timeout_s must be a finite number" in (error.details() or "")
    assert router.instances()[0].state == "ACTIVE"


# -- TLS and tokens -------------------------------------------------------------------------


def test_tls_and_tokens_on_both_listeners(loop_thread: LoopThread, worker_addresses: list[str],
                                          tmp_path: Path, request: pytest.FixtureRequest,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The deployment docs/security.md shows: TLS and data tokens on the data port, the
    admin API on a Unix socket with the same TLS and an admin token."""
    from test_tls import _server_tls
    from tritonmesh import cli

    certs: Path = request.getfixturevalue("pki")

    config, instances = make_config(worker_addresses[:1], auth=TOKENS)
    socket_path = tmp_path / "admin.sock"
    router = start_router(loop_thread, dataclasses.replace(
        config, tls=_server_tls(certs), admin_listen=f"unix:{socket_path}"), instances)
    (tmp_path / "admin-tokens").write_text("# operators\nadmin-1\n")
    try:
        with grpcclient.InferenceServerClient(router.address, ssl=True,
                                              root_certificates=str(certs / "ca.pem")) as client:
            _refused(lambda: client.is_server_ready(), "UNAUTHENTICATED")
            assert client.is_server_ready(headers=DATA)
        status = ["status", "--address", router.admin_address, "--ca-file", str(certs / "ca.pem"),
                  "--server-name", "localhost", "--timeout", "10"]
        assert cli.main([*status, "--token-file", str(tmp_path / "admin-tokens")]) == 0
        assert worker_addresses[0] in capsys.readouterr().out
        assert cli.main(status) == 1
        assert "auth.admin_tokens_file" in capsys.readouterr().err
        plaintext = [*status[:3], "--token-file", str(tmp_path / "admin-tokens"), "--timeout", "5"]
        assert cli.main(plaintext) == 1
        # A reload renews the admin listener's certificates too (a port of its own).
        renewed = dataclasses.replace(router.router.config, tls=ServerTLS(
            (certs / "renewed.pem").read_bytes(), (certs / "renewed.key").read_bytes()))
        loop_thread.run(_reload_auth(router, renewed))
        assert cli.main([*status[:3], "--token-file", str(tmp_path / "admin-tokens"),
                         "--ca-file", str(certs / "rogue-ca.pem"), "--server-name",
                         "127.0.0.1", "--timeout", "10"]) == 0
        router.wait_idle()
    finally:
        router.stop()
