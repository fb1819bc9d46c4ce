"""The operator's RBAC is exactly what it uses, for both scopes: the rules
helm renders, expanded to (group, resource, verb), equal the ones this
table gives, with no wildcard and nothing else.

The table is the operator's use, checked against the code: kopf lists,
watches and patches the kinds it serves (finalizers, its annotations) and
writes their status through the subresource; operator/kube.py gets,
creates and merge-patches a fleet's Deployment or StatefulSet and Service;
the pod index lists and watches pods; operator/handlers.py reads Secrets;
the operator and kopf post Events; owner references with
blockOwnerDeletion need update on the owner's finalizers where the
OwnerReferencesPermissionEnforcement admission plugin runs; kopf watches
CRDs always, namespaces only when it serves named ones (clusterwide it does
not), and its peering object when peering.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from helm_chart import NAMESPACE, find, helm, one, render, requires_helm, template_args

pytestmark = requires_helm


@dataclass(frozen=True)
class Scenario:
    scope: str
    namespaces: tuple[str, ...]
    peering: bool

    def settings(self) -> list[str]:
        settings = [f"rbac.scope={self.scope}", f"peering.enabled={str(self.peering).lower()}"]
        return settings + [f"watchNamespaces[{i}]={ns}" for i, ns in enumerate(self.namespaces)]


def always(_: Scenario) -> bool:
    return True


# (API group, resources, verbs, granted in each served namespace or
# cluster-wide, when)
TABLE: list[tuple[str, tuple[str, ...], tuple[str, ...], str, Callable[[Scenario], bool]]] = [
    ("elasticfleet.io", ("elasticfleets", "adaptersets"), ("list", "watch", "patch"), "ns", always),
    ("elasticfleet.io", ("elasticfleets/status", "adaptersets/status"), ("patch",), "ns", always),
    ("elasticfleet.io", ("elasticfleets/finalizers",), ("update",), "ns", always),
    ("apps", ("deployments", "statefulsets"), ("get", "create", "patch"), "ns", always),
    ("", ("services",), ("get", "create", "patch"), "ns", always),
    ("", ("pods",), ("list", "watch"), "ns", always),
    ("", ("secrets",), ("get",), "ns", always),
    ("", ("events",), ("create",), "ns", always),
    (
        "kopf.dev",
        ("kopfpeerings",),
        ("list", "watch", "patch"),
        "ns",
        lambda s: s.peering and bool(s.namespaces),
    ),
    ("apiextensions.k8s.io", ("customresourcedefinitions",), ("list", "watch"), "cluster", always),
    ("", ("namespaces",), ("list", "watch"), "cluster", lambda s: bool(s.namespaces)),
    (
        "kopf.dev",
        ("clusterkopfpeerings",),
        ("list", "watch", "patch"),
        "cluster",
        lambda s: s.peering and not s.namespaces,
    ),
]

Grant = tuple[str, str, str]


def expected(scenario: Scenario, where: str) -> set[Grant]:
    return {
        (group, resource, verb)
        for group, resources, verbs, place, applies in TABLE
        if place == where and applies(scenario)
        for resource in resources
        for verb in verbs
    }


def grants(role: dict[str, Any]) -> set[Grant]:
    found = set()
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no resourceNames & co.
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb), rule
                    found.add((group, resource, verb))
    return found


SCENARIOS = [
    Scenario("cluster", (), False),
    Scenario("cluster", (), True),
    Scenario("cluster", ("team-a", "team-b"), True),
    Scenario("namespaced", ("team-a", "team-b"), False),
    Scenario("namespaced", ("team-a", "team-b"), True),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=str)
def test_rules_are_exactly_the_table(scenario: Scenario) -> None:
    documents = render(*scenario.settings())
    account = one(documents, "ServiceAccount")["metadata"]["name"]
    deployment = one(documents, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account
    subject = [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]

    cluster_role = one(documents, "ClusterRole")
    binding = one(documents, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": cluster_role["metadata"]["name"],
    }
    assert binding["subjects"] == subject
    roles = find(documents, "Role")
    if scenario.scope == "cluster":
        assert grants(cluster_role) == expected(scenario, "ns") | expected(scenario, "cluster")
        assert roles == [] and find(documents, "RoleBinding") == []
        return
    assert grants(cluster_role) == expected(scenario, "cluster")
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(scenario.namespaces)
    for role in roles:
        assert grants(role) == expected(scenario, "ns")
        (role_binding,) = [
            b
            for b in find(documents, "RoleBinding")
            if b["metadata"]["namespace"] == role["metadata"]["namespace"]
        ]
        assert role_binding["roleRef"]["name"] == role["metadata"]["name"]
        assert role_binding["roleRef"]["kind"] == "Role"
        assert role_binding["subjects"] == subject


def test_namespaced_rbac_needs_the_namespaces() -> None:
    done = helm(*template_args(settings=["rbac.scope=namespaced"]), check=False)
    assert done.returncode != 0
    assert "rbac.scope=namespaced needs watchNamespaces" in done.stderr


def test_no_rbac_when_it_is_managed_elsewhere() -> None:
    documents = render("rbac.create=false")
    kinds = {d["kind"] for d in documents}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
