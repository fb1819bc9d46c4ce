"""The CRDs: complete schemas, and the examples and bad specs validated the
way an API server would (see crd_check.py)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from crd_check import openapi_schema, schema_nodes, validation_errors

from elasticfleet.cli import main
from elasticfleet.operator import syntax
from elasticfleet.operator.crds import (
    RULES,
    adapter_crd,
    all_crds,
    fleet_crd,
    peering_crds,
    render_crds,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "operator" / "examples"


def _example(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    return loaded


def _crd_for(obj: dict[str, Any]) -> dict[str, Any]:
    return {"ElasticFleet": fleet_crd(), "AdapterSet": adapter_crd()}[obj["kind"]]


@pytest.mark.parametrize("crd", all_crds(), ids=lambda crd: crd["spec"]["names"]["kind"])
def test_every_node_is_described_and_typed(crd: dict[str, Any]) -> None:
    for path, node in schema_nodes(openapi_schema(crd)):
        assert node.get("description", "").strip(), f"{path} has no description"
        assert "type" in node, f"{path} has no type"
        assert "x-kubernetes-preserve-unknown-fields" not in node, path


def _spec_nodes(crd: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    nodes = schema_nodes(openapi_schema(crd))
    return [(path, node) for path, node in nodes if not path.startswith(".status")]


@pytest.mark.parametrize("crd", all_crds(), ids=lambda crd: crd["spec"]["names"]["kind"])
def test_every_spec_value_is_bounded(crd: dict[str, Any]) -> None:
    """Numbers have a minimum and a maximum (threads: 10**12 crashed the
    worker) and strings a length bound, so nothing a spec hands on is
    unbounded. The one exception, alpha, is bounded as the store bounds it:
    positive and finite (JSON has no infinity)."""
    for path, node in _spec_nodes(crd):
        if node["type"] in ("integer", "number") and path != ".spec.alpha":
            assert {"minimum", "maximum"} <= set(node), path
        if node["type"] == "string" and path not in (".apiVersion", ".kind"):
            assert "maxLength" in node or "enum" in node, path
        if node["type"] == "object" and "additionalProperties" in node:
            assert "maxProperties" in node, path


def test_every_schema_pattern_is_named_in_words() -> None:
    """schema_check's messages say what a value must be, not a regex."""
    for crd in all_crds():
        for path, node in _spec_nodes(crd):
            for holder in (node, node.get("items"), node.get("additionalProperties")):
                if isinstance(holder, dict) and "pattern" in holder:
                    assert holder["pattern"] in syntax.PATTERN_NAMES, path


@pytest.mark.parametrize("crd", all_crds(), ids=lambda crd: crd["spec"]["names"]["kind"])
def test_every_rule_has_its_python_twin(crd: dict[str, Any]) -> None:
    """FleetSpec.parse runs the Python twin of each CEL rule (crds.RULES);
    a rule without one would be enforced by the API server only."""
    for path, node in schema_nodes(openapi_schema(crd)):
        for rule in node.get("x-kubernetes-validations", []):
            if "oldSelf" not in rule["rule"]:
                assert rule["rule"] in RULES, path
                assert RULES[rule["rule"]].message == rule["message"], path


@pytest.mark.parametrize("crd", all_crds(), ids=lambda crd: crd["spec"]["names"]["kind"])
def test_crd_shape(crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{spec['names']['plural']}.elasticfleet.io"
    assert spec["names"]["shortNames"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert {"observedGeneration", "conditions"} <= set(status)
    # Every printer column reads a field the schema defines.
    paths = {path for path, _ in schema_nodes(openapi_schema(crd))}
    for column in version["additionalPrinterColumns"]:
        field = column["jsonPath"].split("[")[0]
        assert field.startswith(".metadata") or field in paths, column


@pytest.mark.parametrize("crd", all_crds(), ids=lambda crd: crd["spec"]["names"]["kind"])
def test_crd_is_a_valid_kubernetes_object(crd: dict[str, Any]) -> None:
    # The CustomResourceDefinition kind's own schema (Kubernetes 1.35), strict:
    # a misspelt field such as `additionalPrinterColumn` would fail here.
    kubernetes_validate.validate(crd, "1.35", strict=True)


def test_render_is_two_yaml_documents() -> None:
    documents = list(yaml.safe_load_all(render_crds()))
    assert documents == all_crds()
    assert [d["spec"]["names"]["kind"] for d in documents] == ["ElasticFleet", "AdapterSet"]


def test_cli_prints_the_crds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["operator", "crds"]) == 0
    assert list(yaml.safe_load_all(capsys.readouterr().out)) == all_crds()


@pytest.mark.parametrize("crd", peering_crds(), ids=lambda crd: crd["spec"]["names"]["kind"])
def test_peering_crds_are_valid_kubernetes_objects(crd: dict[str, Any]) -> None:
    kubernetes_validate.validate(crd, "1.35", strict=True)
    assert crd["spec"]["group"] == "kopf.dev"


def test_cli_prints_the_peering_objects(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["operator", "crds", "--peering", "ef"]) == 0
    documents = list(yaml.safe_load_all(capsys.readouterr().out))
    assert documents[:4] == all_crds() + peering_crds()
    assert documents[4:] == [
        {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "ef"}}
    ]
    # An operator serving named namespaces meets its peers in each of them.
    assert (
        main(["operator", "crds", "--peering", "ef", "--namespace", "a", "--namespace", "b"]) == 0
    )
    peerings = list(yaml.safe_load_all(capsys.readouterr().out))[4:]
    assert [(p["kind"], p["metadata"]["namespace"]) for p in peerings] == [
        ("KopfPeering", "a"),
        ("KopfPeering", "b"),
    ]


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_examples_are_valid(name: str) -> None:
    obj = _example(name)
    assert validation_errors(_crd_for(obj), obj) == []


def _fleet(**spec_changes: Any) -> dict[str, Any]:
    obj = _example("elasticfleet.yaml")
    obj["spec"].update(spec_changes)
    return obj


def _policy(**changes: Any) -> dict[str, Any]:
    obj = _example("elasticfleet.yaml")
    obj["spec"]["memoryPolicy"].update(changes)
    return obj


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (_policy(budget={"fraction": 0.5, "bytes": 10}), "exactly one of budget.fraction"),
        (_policy(budget={}), "exactly one of budget.fraction"),
        (_policy(budget={"fraction": 0}), "less than or equal to the minimum"),
        (_policy(budget={"fraction": 1.5}), "greater than the maximum"),
        (_policy(staticRatio=0.3), "staticRatio applies only to policy static"),
        (_policy(policy="magic"), "is not one of"),
        (_policy(planIntervalSeconds=0), "less than the minimum"),
        (_policy(qualityFloor={"maxPerplexityRatio": 0.5}), "less than the minimum"),
        (_fleet(replicas=1001), "greater than the maximum"),
        (_fleet(redis=None), "None is not of type 'object'"),
        (_fleet(redis={"url": "http://x"}), "does not match"),
        (
            _fleet(redis={"url": "redis://a", "urlSecretRef": {"name": "r", "key": "url"}}),
            "exactly one of redis.url",
        ),
        (_fleet(workload="Pod"), "is not one of"),
    ],
)
def test_bad_fleet_specs_are_refused(obj: dict[str, Any], expected: str) -> None:
    errors = validation_errors(fleet_crd(), obj)
    assert any(expected in error for error in errors), errors


def test_adapters_without_redis_are_left_to_the_operator() -> None:
    # The API server cannot know whether the operator has a default store
    # for the fleet's namespace: FleetSpec.parse decides (test_builders.py).
    obj = _example("elasticfleet.yaml")
    del obj["spec"]["redis"]
    assert validation_errors(fleet_crd(), obj) == []


def test_a_fleet_can_be_scaled_by_an_autoscaler() -> None:
    """/scale maps to spec.replicas and the status the operator writes,
    which has the workers' selector (handlers.KopfSink writes it)."""
    (version,) = fleet_crd()["spec"]["versions"]
    scale = version["subresources"]["scale"]
    assert scale == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    paths = {path for path, _ in schema_nodes(openapi_schema(fleet_crd()))}
    assert {".spec.replicas", ".status.replicas", ".status.selector"} <= paths
    (adapters,) = adapter_crd()["spec"]["versions"]
    assert adapters["subresources"] == {"status": {}}


def test_worker_ports_must_differ() -> None:
    obj = _example("elasticfleet.yaml")
    obj["spec"]["worker"]["metricsPort"] = 50051
    assert validation_errors(fleet_crd(), obj) == [".spec.worker: port and metricsPort must differ"]


def test_static_ratio_with_static_policy_is_valid() -> None:
    assert validation_errors(fleet_crd(), _policy(policy="static", staticRatio=0.3)) == []


def test_defaults_are_applied_before_rules() -> None:
    # policy defaults to rl, so a staticRatio without a policy is refused.
    obj = _example("elasticfleet.yaml")
    del obj["spec"]["memoryPolicy"]["policy"]
    obj["spec"]["memoryPolicy"]["staticRatio"] = 0.2
    assert validation_errors(fleet_crd(), obj) == [
        ".spec.memoryPolicy: staticRatio applies only to policy static"
    ]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda spec: spec["model"].update(name="other"), ".spec.model: model is immutable"),
        (lambda spec: spec.update(workload="StatefulSet"), ".spec.workload: workload is"),
    ],
)
def test_immutable_fleet_fields(change: Any, expected: str) -> None:
    old = _example("elasticfleet.yaml")
    new = copy.deepcopy(old)
    change(new["spec"])
    errors = validation_errors(fleet_crd(), new, old)
    assert len(errors) == 1 and errors[0].startswith(expected), errors
    # Scaling and policy changes are updates the server accepts.
    scaled = copy.deepcopy(old)
    scaled["spec"]["replicas"] = 5
    scaled["spec"]["memoryPolicy"]["policy"] = "greedy"
    assert validation_errors(fleet_crd(), scaled, old) == []


def test_immutable_adapter_fields() -> None:
    old = _example("adapterset.yaml")
    new = copy.deepcopy(old)
    new["spec"]["rank"] = 16
    new["spec"]["modules"] = ["q_proj"]
    assert validation_errors(adapter_crd(), new, old) == [
        ".spec.rank: rank is immutable",
        ".spec.modules: modules is immutable",
    ]
    grown = copy.deepcopy(old)
    grown["spec"]["tasks"].append("prose")
    assert validation_errors(adapter_crd(), grown, old) == []


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"modules": ["qkv"]}, "is not one of"),
        ({"tasks": []}, "should be non-empty"),
        ({"tasks": ["Code"]}, "does not match"),
        ({"rank": 0}, "less than the minimum"),
        ({"alpha": 0}, "less than or equal to the minimum"),
    ],
)
def test_bad_adapter_specs_are_refused(changes: dict[str, Any], expected: str) -> None:
    obj = _example("adapterset.yaml")
    obj["spec"].update(changes)
    errors = validation_errors(adapter_crd(), obj)
    assert any(expected in error for error in errors), errors
