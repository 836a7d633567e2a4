"""TLS on both sides of the router, with certificates made by openssl for each run.

The router's own port (plain and mutual TLS) is driven by unmodified tritonclient; the
upstream side is checked against a real Triton started with ``--grpc-use-ssl-mutual``.
Both run on each data path (the ``data_path`` fixture): the grpc.aio server's TLS and the
native port's (the event loop's ssl).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import queue
import re
import signal
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from harness import LoopThread, RouterHandle, generate_inputs, make_config, start_router
from test_processes import Endpoint, _logged_by_every_router, _write_config
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException
from tritonmesh import cli
from tritonmesh._pb import tritonmesh_admin_pb2 as apb
from tritonmesh._pb import tritonmesh_admin_pb2_grpc as apb_grpc
from tritonmesh.config import (
    ConfigError,
    EndpointConfig,
    RoutingStrategy,
    ServerTLS,
    UpstreamTLS,
    VariantConfig,
    load_config,
)
from tritonmesh.workers.launcher import Probe, WorkerPool


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True,
                   timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with a server certificate (127.0.0.1, localhost), one for Triton that names
    only localhost, and a client certificate; and a second CA, trusted by nobody, with a
    client certificate and a server certificate of its own (what a renewal may bring)."""
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "rogue-ca"):
        _openssl(d, "req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
                 "-days", "2", "-subj", f"/CN=tritonmesh test {ca}")

    def leaf(name: str, ca: str, extensions: str) -> None:
        (d / f"{name}.ext").write_text(extensions)
        _openssl(d, "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}")
        _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem",
                 "-CAkey", f"{ca}.key", "-CAcreateserial", "-out", f"{name}.pem",
                 "-days", "2", "-extfile", f"{name}.ext")

    leaf("server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                         "extendedKeyUsage=serverAuth\n")
    leaf("triton", "ca", "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n")
    leaf("client", "ca", "extendedKeyUsage=clientAuth\n")
    leaf("rogue-client", "rogue-ca", "extendedKeyUsage=clientAuth\n")
    leaf("renewed", "rogue-ca", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    return d


def _server_tls(pki: Path, *, mutual: bool = False) -> ServerTLS:
    return ServerTLS((pki / "server.pem").read_bytes(), (pki / "server.key").read_bytes(),
                     (pki / "ca.pem").read_bytes() if mutual else None)


def _tls_router(loop_thread: LoopThread, addresses: list[str], tls: ServerTLS) -> RouterHandle:
    config, instances = make_config(addresses)
    return start_router(loop_thread, dataclasses.replace(config, tls=tls), instances)


def _client(address: str, pki: Path, *, ssl: bool = True, cert: str | None = None,
            ca: str = "ca") -> grpcclient.InferenceServerClient:
    if not ssl:
        return grpcclient.InferenceServerClient(address)
    return grpcclient.InferenceServerClient(
        address, ssl=True, root_certificates=str(pki / f"{ca}.pem"),
        private_key=None if cert is None else str(pki / f"{cert}.key"),
        certificate_chain=None if cert is None else str(pki / f"{cert}.pem"))


def _serves(client: grpcclient.InferenceServerClient) -> None:
    """A unary inference and a streamed generation, both answered in full."""
    x = grpcclient.InferInput("INPUT0", [4], "FP32")
    x.set_data_from_numpy(np.arange(4, dtype=np.float32))
    out = client.infer("identity", [x], client_timeout=30).as_numpy("OUTPUT0")
    assert out is not None and out.tolist() == [0.0, 1.0, 2.0, 3.0]
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("generate", generate_inputs(5))
        tokens = []
        for _ in range(5):
            result, error = results.get(timeout=30)
            assert error is None, error
            tokens.append(int(result.as_numpy("TOKEN")[0]))
        assert tokens == [0, 1, 2, 3, 4]
    finally:
        client.stop_stream()


def _grpcio_serves(address: str, pki: Path) -> None:
    """grpcio's own secure channel: a ModelInfer (served natively on that data path) and
    a relayed RPC."""
    credentials = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
    with grpc.secure_channel(address, credentials) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="identity", raw_input_contents=[
            np.arange(4, dtype=np.float32).tobytes()])
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[4])
        answer = stub.ModelInfer(request, timeout=30)
        assert np.frombuffer(answer.raw_output_contents[0], np.float32).tolist() == \
            [0.0, 1.0, 2.0, 3.0]
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live


def _other_protocols_are_closed(address: str, pki: Path) -> None:
    """A TLS client that does not choose h2 by ALPN (none offered, or only HTTP/1.1) is
    closed right after its handshake, never left waiting."""
    host, _, port = address.rpartition(":")
    for offered in ([], ["http/1.1"]):
        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        if offered:
            context.set_alpn_protocols(offered)
        with socket.create_connection((host, int(port)), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:
            assert tls.selected_alpn_protocol() is None
            tls.sendall(b"GET / HTTP/1.1\r\nHost: router\r\n\r\n")
            try:
                assert tls.recv(1024) == b""
            except (ssl.SSLError, ConnectionResetError):
                pass  # closed without TLS's own goodbye


def _refused(client: grpcclient.InferenceServerClient) -> str:
    with pytest.raises(InferenceServerException) as caught:
        client.is_server_ready(client_timeout=10)
    assert caught.value.status() == "StatusCode.UNAVAILABLE", caught.value
    return str(caught.value)


# -- configuration -----------------------------------------------------------------------


def _write(directory: Path, text: str) -> Path:
    path = directory / "endpoint.yaml"
    path.write_text("variants:\n  - name: AllTraffic\n    instances: ['127.0.0.1:9']\n" + text)
    return path


def test_the_config_reads_certificates_relative_to_itself(pki: Path) -> None:
    config = load_config(_write(pki, "tls:\n  cert_file: server.pem\n  key_file: server.key\n"
                                     "  client_ca_file: ca.pem\n"))
    assert config.tls == _server_tls(pki, mutual=True)
    assert b"PRIVATE" not in repr(config).encode()  # keys stay out of logs and tracebacks
    variant = load_config(_write(pki, "")).variants[0]
    assert variant.upstream_tls is None
    text = ("variants:\n  - name: Remote\n    instances: ['127.0.0.1:9']\n"
            "    upstream_tls:\n      ca_file: ca.pem\n      cert_file: client.pem\n"
            "      key_file: client.key\n      server_name: localhost\n")
    (pki / "upstream.yaml").write_text(text)
    upstream = load_config(pki / "upstream.yaml").variants[0].upstream_tls
    assert upstream == UpstreamTLS((pki / "ca.pem").read_bytes(),
                                   (pki / "client.pem").read_bytes(),
                                   (pki / "client.key").read_bytes(), "localhost")
    plain = text.split("    upstream_tls:")[0]
    (pki / "system.yaml").write_text(plain + "    upstream_tls: true\n")
    assert load_config(pki / "system.yaml").variants[0].upstream_tls == UpstreamTLS()
    (pki / "off.yaml").write_text(plain + "    upstream_tls: false\n")
    assert load_config(pki / "off.yaml").variants[0].upstream_tls is None
    assert b"PRIVATE" not in repr(upstream).encode()


@pytest.mark.parametrize(("tls", "message"), [
    ("tls:\n  cert_file: missing.pem\n  key_file: server.key\n",
     "tls.cert_file: cannot read"),
    ("tls:\n  cert_file: server.pem\n", "tls.key_file: required with cert_file"),
    ("tls:\n  client_ca_file: ca.pem\n", "tls.cert_file: required"),
    ("tls:\n  cert_file: server.key\n  key_file: server.key\n",
     "tls.cert_file: " + "{pki}/server.key holds no PEM certificate"),
    ("tls:\n  cert_file: server.pem\n  key_file: client.key\n",
     "tls.key_file: does not match tls.cert_file"),
    ("tls:\n  cert_file: server.pem\n  key_file: server.key\n  verify: true\n",
     "tls.verify: unknown key"),
    ("tls:\n  cert_file: server.pem\n  key_file: encrypted.key\n",
     "tls.key_file: {pki}/encrypted.key is encrypted"),
])
def test_bad_tls_settings_name_the_key(pki: Path, tls: str, message: str) -> None:
    if not (pki / "encrypted.key").exists():
        _openssl(pki, "pkey", "-in", "server.key", "-aes256", "-passout", "pass:secret",
                 "-out", "encrypted.key")
    with pytest.raises(ConfigError, match="^" + re.escape(str(pki))) as caught:
        load_config(_write(pki, tls))
    assert message.format(pki=pki) in str(caught.value)


def test_sagemaker_json_keeps_tritonmesh_tls(pki: Path) -> None:
    (pki / "sagemaker.json").write_text(json.dumps({
        "EndpointConfigName": "llm",
        "ProductionVariants": [{"VariantName": "AllTraffic", "InitialInstanceCount": 1}],
        "tls": {"cert_file": "server.pem", "key_file": "server.key"},
    }))
    assert load_config(pki / "sagemaker.json").tls == _server_tls(pki)


def test_upstream_tls_is_refused_for_local_workers(pki: Path) -> None:
    (pki / "local.yaml").write_text("variants:\n  - name: Local\n    local_workers: 2\n"
                                    "    upstream_tls:\n      ca_file: ca.pem\n")
    with pytest.raises(ConfigError, match=r"variants\[0\]\.upstream_tls: local workers serve "
                                          "plaintext"):
        load_config(pki / "local.yaml")


# -- the router's own port ---------------------------------------------------------------


@pytest.mark.triton
def test_tritonclient_reaches_a_tls_router_and_plaintext_is_refused(
        loop_thread: LoopThread, worker_addresses: list[str], pki: Path,
        capsys: pytest.CaptureFixture[str], data_path: str) -> None:
    router = _tls_router(loop_thread, worker_addresses, _server_tls(pki))
    try:
        with _client(router.address, pki) as client:
            assert client.is_server_ready()
            _serves(client)
        with _client(router.address, pki, ssl=False) as client:
            _refused(client)
        _grpcio_serves(router.address, pki)
        _other_protocols_are_closed(router.address, pki)
        # The admin listener takes the same TLS: `tritonmesh status` speaks it when told to.
        assert cli.main(["status", "--address", router.admin_address,
                         "--ca-file", str(pki / "ca.pem")]) == 0
        assert worker_addresses[0] in capsys.readouterr().out
        assert cli.main(["status", "--address", router.admin_address, "--timeout", "5"]) == 1
        # --server-name is the name verified: one not in the certificate is refused.
        assert cli.main(["status", "--address", router.admin_address, "--ca-file",
                         str(pki / "ca.pem"), "--server-name", "elsewhere.example",
                         "--timeout", "5"]) == 1
        router.wait_idle()
    finally:
        router.stop()


@pytest.mark.triton
def test_mutual_tls_admits_only_certificates_its_ca_signed(
        loop_thread: LoopThread, worker_addresses: list[str], pki: Path,
        data_path: str) -> None:
    router = _tls_router(loop_thread, worker_addresses, _server_tls(pki, mutual=True))
    try:
        with _client(router.address, pki) as client:
            _refused(client)  # no certificate
        with _client(router.address, pki, cert="rogue-client") as client:
            _refused(client)  # signed by a CA the router does not trust
        with _client(router.address, pki, cert="client") as client:
            _serves(client)
        router.wait_idle()
    finally:
        router.stop()


@pytest.mark.triton
def test_a_reload_replaces_the_certificates_for_new_connections(
        loop_thread: LoopThread, worker_addresses: list[str], pki: Path,
        caplog: pytest.LogCaptureFixture, data_path: str) -> None:
    from tritonmesh.endpoint import _reload

    router = _tls_router(loop_thread, worker_addresses[:1], _server_tls(pki))
    path = pki / "reload.yaml"
    # The endpoint's name is read at start: the file keeps the running one ("test").
    head = ("endpoint: test\nlisten: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n"
            "metrics_listen: null\n"
            "variants:\n  - name: AllTraffic\n"
            f"    instances: ['{worker_addresses[0]}']\ntls:\n")
    running = [router.router.config]
    try:
        with _client(router.address, pki) as before, \
                caplog.at_level(logging.INFO, logger="tritonmesh"):
            assert before.is_server_ready()
            # A renewed certificate, from another CA even: new connections get it, and a
            # connection already open keeps serving.
            path.write_text(head + "  cert_file: renewed.pem\n  key_file: renewed.key\n")
            loop_thread.run(_reload(router.router, path, running))
            assert "new certificates" in caplog.text
            with _client(router.address, pki) as client:
                _refused(client)
            with _client(router.address, pki, ca="rogue-ca") as client:
                _serves(client)
            _serves(before)
            # A key that does not match its certificate: the running ones stay.
            path.write_text(head + "  cert_file: server.pem\n  key_file: renewed.key\n")
            loop_thread.run(_reload(router.router, path, running))
            assert "keeping the running configuration" in caplog.text
            with _client(router.address, pki, ca="rogue-ca") as client:
                _serves(client)
            # Client certificates cannot be turned on without a restart: a warning, and
            # the running settings stay.
            path.write_text(head + "  cert_file: server.pem\n  key_file: server.key\n"
                                   "  client_ca_file: ca.pem\n")
            loop_thread.run(_reload(router.router, path, running))
            assert "takes a restart" in caplog.text
            with _client(router.address, pki, ca="rogue-ca") as client:
                _serves(client)
        router.wait_idle()
    finally:
        router.stop()


@pytest.mark.triton
def test_a_reload_moves_mutual_tls_to_a_new_client_ca(
        loop_thread: LoopThread, worker_addresses: list[str], pki: Path,
        data_path: str) -> None:
    """A client CA rotation: first a bundle of the old and the new CA (both kinds of
    client certificates admitted), then the new CA alone."""
    from tritonmesh.endpoint import _reload

    router = _tls_router(loop_thread, worker_addresses[:1], _server_tls(pki, mutual=True))
    (pki / "both-cas.pem").write_bytes((pki / "ca.pem").read_bytes()
                                       + (pki / "rogue-ca.pem").read_bytes())
    path = pki / "rotate.yaml"
    running = [router.router.config]

    def reload(client_ca: str) -> None:
        path.write_text("endpoint: test\nlisten: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n"
                        "metrics_listen: null\nvariants:\n  - name: AllTraffic\n"
                        f"    instances: ['{worker_addresses[0]}']\n"
                        "tls:\n  cert_file: server.pem\n  key_file: server.key\n"
                        f"  client_ca_file: {client_ca}\n")
        loop_thread.run(_reload(router.router, path, running))

    try:
        with _client(router.address, pki, cert="rogue-client") as client:
            _refused(client)
        reload("both-cas.pem")
        for cert in ("client", "rogue-client"):
            with _client(router.address, pki, cert=cert) as client:
                _serves(client)
        reload("rogue-ca.pem")
        with _client(router.address, pki, cert="client") as client:
            _refused(client)
        with _client(router.address, pki, cert="rogue-client") as client:
            _serves(client)
        router.wait_idle()
    finally:
        router.stop()


def _presented(address: str, pki: Path, connections: int) -> set[str]:
    """The names in the certificates the port presents to ``connections`` new TLS
    connections (SO_REUSEPORT spreads them over the router processes)."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(cadata=(pki / "ca.pem").read_text()
                                         + (pki / "rogue-ca.pem").read_text())
    context.set_alpn_protocols(["h2"])
    names = set()
    for _ in range(connections):
        with socket.create_connection((host, int(port)), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:
            subject = dict(field for rdn in tls.getpeercert()["subject"] for field in rdn)
            names.add(subject["commonName"])
    return names


@pytest.mark.triton
def test_a_reload_renews_the_certificates_of_every_router_process(
        tmp_path: Path, worker_addresses: list[str], pki: Path, data_path: str) -> None:
    config = _write_config(tmp_path / "c.json", worker_addresses[:1], 2)
    data = json.loads(config.read_text())

    def write(cert: str) -> None:
        config.write_text(json.dumps({**data, "tls": {"cert_file": str(pki / f"{cert}.pem"),
                                                      "key_file": str(pki / f"{cert}.key")}}))

    write("server")
    endpoint = Endpoint(config, 2)
    try:
        endpoint.serves(data_path)
        address = endpoint.running.address
        assert _presented(address, pki, 16) == {"server"}
        with _client(address, pki) as before:
            _serves(before)
            write("renewed")
            endpoint.running.process.send_signal(signal.SIGHUP)
            _logged_by_every_router(endpoint.running, "reload: new certificates", 2,
                                    "tritonmesh")
            assert _presented(address, pki, 16) == {"renewed"}
            with _client(address, pki, ca="rogue-ca") as client:
                _serves(client)
            _serves(before)  # an open connection keeps its certificate
        endpoint.quiescent()
    finally:
        endpoint.close()


# -- the channels to Triton --------------------------------------------------------------


def _fronting(loop_thread: LoopThread, instance: str, upstream_tls: UpstreamTLS
              ) -> RouterHandle:
    """A plaintext router whose one instance is reached over ``upstream_tls``."""
    config = EndpointConfig(
        name="front", listen="127.0.0.1:0", metrics_listen=None, admin_listen="127.0.0.1:0",
        shutdown_grace_s=1.0,
        variants=(VariantConfig("AllTraffic", routing_strategy=RoutingStrategy.RANDOM,
                                instances=(instance,), upstream_tls=upstream_tls),))
    return start_router(loop_thread, config, {"AllTraffic": [instance]})


def _unavailable_through(front: RouterHandle) -> None:
    with grpcclient.InferenceServerClient(front.address) as client:
        x = grpcclient.InferInput("INPUT0", [1], "FP32")
        x.set_data_from_numpy(np.zeros(1, dtype=np.float32))
        with pytest.raises(InferenceServerException) as caught:
            client.infer("identity", [x], client_timeout=10)
        assert caught.value.status() == "StatusCode.UNAVAILABLE", caught.value


def test_an_upstream_that_does_not_choose_h2_is_unavailable(
        loop_thread: LoopThread, pki: Path, data_path: str) -> None:
    """A TLS server that offers only HTTP/1.1 by ALPN is not taken for a Triton: the
    request fails UNAVAILABLE instead of hanging."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki / "server.pem", pki / "server.key")
    context.set_alpn_protocols(["http/1.1"])

    async def listen() -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(
            asyncio.Protocol, "127.0.0.1", 0, ssl=context)

    server = loop_thread.run(listen())
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    upstream = UpstreamTLS((pki / "ca.pem").read_bytes())
    front = _fronting(loop_thread, address, upstream)
    try:
        _unavailable_through(front)
        native = front.router.native
        if native is not None:  # why: the connection counts as one that could not be made
            with pytest.raises(OSError, match="its TLS server did not choose ALPN h2"):
                loop_thread.run(native.pool.connect(address, upstream))
        front.wait_idle()
    finally:
        front.stop()
        loop_thread.run(_closed(server))


async def _closed(server: asyncio.Server) -> None:
    server.close()
    await server.wait_closed()


@pytest.mark.triton
def test_upstream_tls_reaches_a_triton_that_demands_client_certificates(
        loop_thread: LoopThread, pki: Path, data_path: str) -> None:
    ca, cert, key = ((pki / f).read_bytes() for f in ("ca.pem", "client.pem", "client.key"))
    pool = WorkerPool(1, extra_args=[
        "--grpc-use-ssl-mutual=true", f"--grpc-server-cert={pki / 'triton.pem'}",
        f"--grpc-server-key={pki / 'triton.key'}", f"--grpc-root-cert={pki / 'ca.pem'}",
    ], probe=Probe(grpc.ssl_channel_credentials(ca, key, cert), "localhost"))
    loop_thread.run(pool.start(), timeout=180)
    (address,) = pool.addresses
    fronts: list[RouterHandle] = []
    try:
        with grpcclient.InferenceServerClient(address) as direct:
            _refused(direct)  # Triton itself takes no plaintext
        # Triton's certificate names localhost only: the router verifies that name.
        named = _fronting(loop_thread, address, UpstreamTLS(ca, cert, key, "localhost"))
        fronts.append(named)
        unnamed = _fronting(loop_thread, address, UpstreamTLS(ca, cert, key))
        fronts.append(unnamed)
        anonymous = _fronting(loop_thread, address, UpstreamTLS(ca, server_name="localhost"))
        fronts.append(anonymous)
        with _client(named.address, pki, ssl=False) as client:
            _serves(client)
            # Server-wide RPCs (fanned out by the router) take the same channel.
            models = {m.name for m in client.get_model_repository_index().models}
            assert models == {"generate", "generate_unary", "identity"}
        # 127.0.0.1 is not in Triton's certificate; no client certificate. Both fail with
        # UNAVAILABLE instead of hanging (the instance stays in: health checks fail open
        # for a variant's last instance).
        _unavailable_through(unnamed)
        _unavailable_through(anonymous)
        # An instance that joins later gets TLS too: through the admin API, and through a
        # SIGHUP reload (update_instances).
        with grpc.insecure_channel(named.admin_address) as channel:
            admin = apb_grpc.AdminStub(channel)
            assert admin.RemoveInstance(apb.RemoveInstanceRequest(
                variant="AllTraffic", address=address), timeout=30).drained
            admin.AddInstance(apb.AddInstanceRequest(variant="AllTraffic", address=address),
                              timeout=10)
        with _client(named.address, pki, ssl=False) as client:
            _serves(client)
        assert loop_thread.run(named.router.update_instances({"AllTraffic": []})) == (0, 1)
        assert loop_thread.run(named.router.update_instances({"AllTraffic": [address]})) \
            == (1, 0)
        with _client(named.address, pki, ssl=False) as client:
            _serves(client)
        for front in fronts:
            front.wait_idle()
    finally:
        for front in fronts:
            front.stop()
        loop_thread.run(pool.stop(grace=5.0), timeout=60)
