"""deploy/: the Kubernetes manifests against Kubernetes' own schemas (offline, strict), and
against tritonmesh itself: the router's ConfigMap is a valid config, its discovery name is
the Triton Service's SRV name, its probes and commands are ones the CLI accepts, and the
autoscaler's metric is one the router exports.

What cannot run here: no Kubernetes API server and no container engine, so the manifests
are not applied and the image is not built (docs/kubernetes.md says so too).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from harness import LoopThread, make_config, start_router
from tritonmesh.balancer import Balancer, Variant
from tritonmesh.cli import build_parser
from tritonmesh.config import VariantConfig, parse_config
from tritonmesh.metrics import BalancerCollector
from tritonmesh.workers.launcher import free_ports

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
# The oldest Kubernetes still supported upstream when this was written, and the newest schema.
VERSIONS = ("1.31.0", kubernetes_validate.latest_version())


def _documents() -> list[dict[str, Any]]:
    docs = []
    for path in MANIFESTS:
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def test_there_are_manifests() -> None:
    kinds = {d["kind"] for d in _documents()}
    assert {"Namespace", "StatefulSet", "Service", "Deployment", "ConfigMap",
            "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_kubernetes(version: str) -> None:
    for doc in _documents():
        kubernetes_validate.validate(doc, version, strict=True)


def _router_config() -> Any:
    return parse_config(yaml.safe_load(_one("ConfigMap", "tritonmesh")["data"]["tritonmesh.yaml"]))


def test_the_router_config_is_valid_and_discovers_the_triton_service() -> None:
    config = _router_config()
    service = _one("Service", "triton")
    assert service["spec"]["clusterIP"] == "None"  # headless: one record per pod
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    namespace = service["metadata"]["namespace"]
    (variant,) = config.variants
    assert variant.discovery is not None
    match = re.fullmatch(r"_(\w+)\._tcp\.(\w+)\.(\w+)\.svc\.cluster\.local", variant.discovery.dns)
    assert match is not None, variant.discovery.dns
    assert match.groups() == ("grpc", "triton", namespace)
    assert ports["grpc"]["protocol"] == "TCP"
    selector = service["spec"]["selector"]
    triton = _one("StatefulSet", "triton")
    assert triton["spec"]["template"]["metadata"]["labels"].items() >= selector.items()


def _container(kind: str, name: str) -> dict[str, Any]:
    (container,) = _one(kind, name)["spec"]["template"]["spec"]["containers"]
    return container


def test_router_probes_and_commands_match_the_cli_and_the_config() -> None:
    config = _router_config()
    port = int(config.listen.rpartition(":")[2])
    deployment = _one("Deployment", "tritonmesh")
    pod = deployment["spec"]["template"]["spec"]
    container = _container("Deployment", "tritonmesh")
    args = build_parser().parse_args(container["args"])
    assert args.command == "serve"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(Path(args.config).parent) in mounts
    assert container["readinessProbe"]["grpc"]["port"] == port
    live = build_parser().parse_args(container["livenessProbe"]["exec"]["command"][1:])
    assert (live.command, live.what) == ("probe", "live")
    assert live.address.endswith(f":{port}")
    # SIGTERM comes after preStop; the drain must end before the kubelet's SIGKILL.
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + config.shutdown_grace_s
    pdb = _one("PodDisruptionBudget", "tritonmesh")
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]


def test_the_image_runs_the_config_the_manifests_mount() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    entry = re.search(r'^ENTRYPOINT (\[.*\])$', dockerfile, re.M)
    cmd = re.search(r'^CMD (\[.*\])$', dockerfile, re.M)
    assert entry is not None and cmd is not None
    assert yaml.safe_load(entry.group(1)) == ["tritonmesh"]
    args = build_parser().parse_args(yaml.safe_load(cmd.group(1)))
    container = _container("Deployment", "tritonmesh")
    assert args.config == build_parser().parse_args(container["args"]).config


def test_the_autoscaler_reads_a_metric_the_router_exports() -> None:
    hpa = _one("HorizontalPodAutoscaler", "triton")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "triton"
    (metric,) = hpa["spec"]["metrics"]
    name = metric["external"]["metric"]["name"]
    variant = metric["external"]["metric"]["selector"]["matchLabels"]["variant"]
    config = _router_config()
    assert variant in {v.name for v in config.variants}
    balancer = Balancer([Variant(VariantConfig(variant, instances=("127.0.0.1:1",)))])
    families = {f.name: f for f in BalancerCollector(balancer).collect()}
    assert name in families
    assert [s.labels for s in families[name].samples] == [{"variant": variant}]
    rules = yaml.safe_load(_one("ConfigMap", "tritonmesh-prometheus-adapter-rules")["data"][
        "rules.yaml"])
    assert rules["externalRules"][0]["name"]["as"] == name


def _probe(what: str, address: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tritonmesh.cli", "probe", what, "--address",
                           address], capture_output=True, text=True, timeout=60)


def test_probe_live_and_ready_against_a_real_router(loop_thread: LoopThread) -> None:
    """Live whatever its instances do; ready only with a ready instance (none answers here)."""
    nowhere = f"127.0.0.1:{free_ports(1)[0]}"
    config, instances = make_config([nowhere])
    handle = start_router(loop_thread, config, instances)
    try:
        live = _probe("live", handle.address)
        assert live.returncode == 0, live.stderr
        ready = _probe("ready", handle.address)
        assert ready.returncode == 1
        assert "not ready" in ready.stderr
    finally:
        handle.stop()
    gone = _probe("live", handle.address)
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr, shlex.join(gone.args)
