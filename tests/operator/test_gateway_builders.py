"""spec.gateway without a cluster: the CRD's schema and rules, the spec's
parse, and the pure builders of the gateway's Deployment and Service (they
pass Kubernetes' own schemas, run under the workers' pod security, select
only gateway pods, and their command line parses with the real CLI)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from crd_check import status_errors, validation_errors

from elasticfleet.cli import build_parser
from elasticfleet.operator.build import (
    CONTAINER_SECURITY,
    GATEWAY_TOKEN_DIR,
    POD_SECURITY,
    TOKEN_DIR,
    build_children,
    build_gateway,
    build_gateway_service,
    build_gateway_stopped,
    build_service,
    gateway_url,
    owner_reference,
    selector_labels,
)
from elasticfleet.operator.crds import fleet_crd
from elasticfleet.operator.spec import FleetSpec, SpecError
from elasticfleet.operator.status import FleetStatus, GatewayStatus

EXAMPLE = Path(__file__).resolve().parents[2] / "operator" / "examples" / "elasticfleet.yaml"
OWNER = owner_reference("smollm2", "5e1f0c3a-8d5e-4b7a-9a43-0f1f4c2d9b11")


def fleet(**gateway: Any) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    body["spec"]["gateway"] = {"enabled": True, **gateway}
    return body


def spec(body: dict[str, Any], name: str = "smollm2") -> FleetSpec:
    return FleetSpec.parse(name, "ml", body["spec"])


def test_the_crd_takes_a_gateway_and_refuses_clashing_ports() -> None:
    assert validation_errors(fleet_crd(), fleet()) == []
    assert validation_errors(fleet_crd(), fleet(port=9000, grpcPort=9000)) == [
        ".spec.gateway: port and grpcPort must differ"
    ]
    assert validation_errors(fleet_crd(), fleet(replicas=0))  # at least one pod


def test_the_spec_parses_the_gateway_with_its_defaults() -> None:
    parsed = spec(fleet()).gateway
    assert parsed is not None and (parsed.port, parsed.grpc_port, parsed.replicas) == (
        8080,
        50052,
        1,
    )
    assert parsed.image == spec(fleet()).worker.image and parsed.token_secret is None
    off = fleet()
    off["spec"]["gateway"]["enabled"] = False
    assert spec(off).gateway is None
    del off["spec"]["gateway"]
    assert spec(off).gateway is None
    spec(fleet(), name="f" * 55)
    with pytest.raises(SpecError, match="the gateway's Service is <name>-gateway"):
        spec(fleet(), name="f" * 56)
    with pytest.raises(SpecError, match="must differ"):
        spec(fleet(port=1, grpcPort=1))


def _secured() -> FleetSpec:
    body = fleet(tokenSecretRef={"name": "gw", "key": "token"}, image="gw:1", replicas=2)
    body["spec"]["tls"] = {"secretName": "tls"}
    body["spec"]["auth"] = {"tokenSecretRef": {"name": "workers", "key": "t"}}
    return spec(body)


def test_the_gateway_deployment_runs_like_a_worker_and_finds_workers_by_dns() -> None:
    secured = _secured()
    deployment = build_gateway(secured, OWNER)
    kubernetes_validate.validate(deployment, "1.35", strict=True)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"] == POD_SECURITY and not pod["automountServiceAccountToken"]
    assert container["securityContext"] == CONTAINER_SECURITY
    assert container["image"] == "gw:1" and deployment["spec"]["replicas"] == 2
    args = build_parser().parse_args(container["command"][1:])
    service = "smollm2-worker.ml.svc"
    assert args.workers_dns == f"{service}:50051" and args.worker_server_name_suffix == service
    assert args.model_name == "SmolLM2-135M-Instruct"
    assert str(args.worker_tls_ca) == "/etc/elasticfleet/tls/ca.crt"
    assert str(args.worker_token_file) == f"{TOKEN_DIR}/token"
    assert str(args.token_file) == f"{GATEWAY_TOKEN_DIR}/token"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {
        "tmp": "/tmp",
        "tls": "/etc/elasticfleet/tls",
        "token": TOKEN_DIR,
        "gateway-token": GATEWAY_TOKEN_DIR,
    }
    secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    assert secrets["gateway-token"] == {
        "secretName": "gw",
        "items": [{"key": "token", "path": "token"}],
    }
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"


def test_with_mutual_tls_the_gateway_presents_the_client_secrets_certificate() -> None:
    body = fleet()
    body["spec"]["tls"] = {"secretName": "tls", "clientSecretName": "client"}
    deployment = build_gateway(spec(body), OWNER)
    kubernetes_validate.validate(deployment, "1.35", strict=True)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = build_parser().parse_args(container["command"][1:])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert str(args.worker_tls_cert) == f"{mounts['client']}/tls.crt"
    assert str(args.worker_tls_key) == f"{mounts['client']}/tls.key"
    secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    assert secrets["client"] == {
        "secretName": "client",
        "items": [{"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}],
    }


def test_gateway_pods_are_never_selected_as_workers() -> None:
    secured = _secured()
    gateway_pods = build_gateway(secured, OWNER)["spec"]["template"]["metadata"]["labels"]
    workers = build_service(secured, OWNER)["spec"]["selector"]
    assert not workers.items() <= gateway_pods.items()
    assert selector_labels(secured, "gateway").items() <= gateway_pods.items()
    service = build_gateway_service(secured, OWNER)
    kubernetes_validate.validate(service, "1.35", strict=True)
    assert service["metadata"]["name"] == "smollm2-gateway"
    assert [p["port"] for p in service["spec"]["ports"]] == [8080, 50052]
    assert gateway_url(secured) == (
        "http://smollm2-gateway.ml.svc:8080",
        "smollm2-gateway.ml.svc:50052",
    )


def test_children_include_the_gateway_only_when_enabled() -> None:
    kinds = [(c["kind"], c["metadata"]["name"]) for c in build_children(_secured(), OWNER)]
    assert kinds[2:] == [("Service", "smollm2-gateway"), ("Deployment", "smollm2-gateway")]
    off = copy.deepcopy(fleet())
    off["spec"]["gateway"]["enabled"] = False
    assert len(build_children(spec(off), OWNER)) == 2
    stopped = build_gateway_stopped(spec(off))
    assert stopped["metadata"]["name"] == "smollm2-gateway" and stopped["spec"] == {"replicas": 0}


def test_the_gateway_status_fits_the_generated_schema() -> None:
    url, grpc_address = gateway_url(_secured())
    status = FleetStatus(gateway=GatewayStatus(url=url, grpc_address=grpc_address)).to_dict()
    assert status == {"gateway": {"url": url, "grpcAddress": grpc_address}}
    schema = fleet_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    assert status_errors(schema["status"], status) == []
    assert FleetStatus.from_dict(status).gateway == GatewayStatus(url, grpc_address)
