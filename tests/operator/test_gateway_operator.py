"""The real kopf operator deploys a fleet's gateway when spec.gateway.enabled
is set, against the Kubernetes API emulator (which refuses what the chart's
RBAC does not grant and any status its CRD schema does not allow): a
Deployment and a Service owned by the fleet, the gateway's address in the
status; disabling it scales the gateway to zero and removes the address."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from kopf.testing import KopfRunner
from waiting import wait_for

from elasticfleet.operator.build import FLEET_LABEL

if TYPE_CHECKING:
    from kube_emulator import EmulatedCluster

from test_operator_kopf import EXAMPLE, FLEETS, operator

pytest_plugins = ["kube_emulator"]


def _named(cluster: EmulatedCluster, kind: str, name: str) -> dict[str, Any] | None:
    found = [o for o in cluster.objects(kind) if o["metadata"]["name"] == name]
    return found[0] if found else None


def test_the_operator_deploys_and_retires_the_gateway(
    cluster: EmulatedCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ELASTICFLEET_REDIS_URL", raising=False)
    fleet = yaml.safe_load(EXAMPLE.read_text())
    del fleet["spec"]["adapters"]
    fleet["spec"]["gateway"] = {"enabled": True}
    runner: KopfRunner
    with operator() as runner:
        cluster.call("POST", FLEETS, copy.deepcopy(fleet))
        deployment = wait_for(
            "the gateway Deployment",
            lambda: _named(cluster, "apps/v1/deployments", "smollm2-gateway"),
        )
        service = _named(cluster, "v1/services", "smollm2-gateway")
        assert service is not None
        (stored,) = cluster.objects("elasticfleet.io/v1alpha1/elasticfleets")
        for child in (deployment, service):
            assert child["metadata"]["ownerReferences"][0]["uid"] == stored["metadata"]["uid"]
            assert child["metadata"]["labels"][FLEET_LABEL] == "smollm2"
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["command"][:2] == ["elasticfleet", "gateway"]

        def gateway_status() -> dict[str, Any] | None:
            (found,) = cluster.objects("elasticfleet.io/v1alpha1/elasticfleets")
            status: dict[str, Any] | None = found.get("status", {}).get("gateway")
            return status

        assert wait_for("the gateway's address", gateway_status) == {
            "url": "http://smollm2-gateway.ns.svc:8080",
            "grpcAddress": "smollm2-gateway.ns.svc:50052",
        }

        cluster.call("PATCH", f"{FLEETS}/smollm2", {"spec": {"gateway": {"enabled": False}}})
        wait_for(
            "the gateway scaled to zero",
            lambda: (
                (_named(cluster, "apps/v1/deployments", "smollm2-gateway") or {})["spec"][
                    "replicas"
                ]
                == 0
            ),
        )
        wait_for("the address removed", lambda: gateway_status() is None)
        assert _named(cluster, "apps/v1/deployments", "smollm2-worker") is not None
    assert runner.exit_code == 0, runner.output
