"""The emulated API server refuses what a real one refuses: requests without
a known token (401), requests RBAC does not grant a ServiceAccount (403,
counted), owner references the writer may not set, and custom resources
that break their CRD's schema or CEL rules (422 naming the field); and it
stores custom resources as the apiextensions server does (status only
through its subresource, unknown fields pruned, defaults filled in). It
answers injected faults (409, 410, 500) as a real server words them."""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from kube_auth import Attributes, service_account
from kube_faults import Fault

if TYPE_CHECKING:
    from kube_emulator import EmulatedCluster

# Fixture: cluster (the emulated API, $KUBECONFIG pointing at it).
pytest_plugins = ["kube_emulator"]

EXAMPLES = Path(__file__).resolve().parents[2] / "operator" / "examples"
RBAC = "/apis/rbac.authorization.k8s.io/v1"


def fleets(namespace: str) -> str:
    return f"/apis/elasticfleet.io/v1alpha1/namespaces/{namespace}/elasticfleets"


def example_fleet() -> dict[str, Any]:
    fleet: dict[str, Any] = yaml.safe_load((EXAMPLES / "elasticfleet.yaml").read_text())
    return fleet


def robot(cluster: EmulatedCluster, namespace: str = "a") -> str:
    """A ServiceAccount `robot` in `namespace` with no grants yet; its token."""
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "robot"}}
    cluster.call("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts", account)
    return cluster.service_account_token(namespace, "robot")


def grant(cluster: EmulatedCluster, rules: list[dict[str, Any]], namespace: str = "") -> None:
    """Bind `rules` to robot (of namespace a): a ClusterRole everywhere, or
    a Role in `namespace`."""
    kind, where = ("Role", f"/namespaces/{namespace}") if namespace else ("ClusterRole", "")
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": kind,
        "metadata": {"name": "robot"},
        "rules": rules,
    }
    cluster.call("POST", f"{RBAC}{where}/{kind.lower()}s", role)
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": f"{kind}Binding",
        "metadata": {"name": "robot"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": "robot"},
        "subjects": [{"kind": "ServiceAccount", "name": "robot", "namespace": "a"}],
    }
    cluster.call("POST", f"{RBAC}{where}/{kind.lower()}bindings", binding)


FLEET_RULES = [
    {"apiGroups": ["elasticfleet.io"], "resources": ["elasticfleets"], "verbs": ["get", "list"]}
]


def test_requests_need_a_known_token(cluster: EmulatedCluster) -> None:
    code, answer = cluster.request("GET", fleets("a"), token="forged")
    assert (code, answer["reason"], answer["kind"]) == (401, "Unauthorized", "Status")
    code, answer = cluster.request("POST", "/api/v1/namespaces/a/serviceaccounts/nobody/token", {})
    assert (code, answer["message"]) == (404, 'serviceaccounts "nobody" not found')


def test_rbac_grants_only_the_verbs_of_the_rules(cluster: EmulatedCluster) -> None:
    token = robot(cluster)
    grant(cluster, FLEET_RULES)
    cluster.call("POST", fleets("a"), example_fleet())
    assert cluster.request("GET", fleets("a"), token=token)[0] == 200  # list
    assert cluster.request("GET", f"{fleets('a')}/smollm2", token=token)[0] == 200  # get
    # Discovery is every authenticated user's.
    assert cluster.request("GET", "/apis/elasticfleet.io/v1alpha1", token=token)[0] == 200

    code, answer = cluster.request("GET", f"{fleets('a')}?watch=true", token=token)
    assert code == 403
    assert answer == {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "code": 403,
        "reason": "Forbidden",
        "message": "elasticfleets.elasticfleet.io is forbidden: User"
        ' "system:serviceaccount:a:robot" cannot watch resource "elasticfleets" in API group'
        ' "elasticfleet.io" in the namespace "a"',
        "details": {"group": "elasticfleet.io", "kind": "elasticfleets"},
    }
    patch = {"status": {"replicas": 1}}
    code, answer = cluster.request("PATCH", f"{fleets('a')}/smollm2/status", patch, token=token)
    assert code == 403
    assert 'cannot patch resource "elasticfleets/status"' in answer["message"]
    assert answer["message"].startswith('elasticfleets.elasticfleet.io "smollm2" is forbidden')
    code, answer = cluster.request("GET", "/api/v1/namespaces/a/secrets", token=token)
    assert code == 403 and 'in API group ""' in answer["message"]

    user = service_account("a", "robot")
    assert [d.attributes for d in cluster.emulator.denials(user)] == [
        Attributes("watch", fleets("a"), "elasticfleet.io", "elasticfleets", "", "a"),
        Attributes("patch", f"{fleets('a')}/smollm2/status", "elasticfleet.io", "elasticfleets",
                   "status", "a", "smollm2"),
        Attributes("list", "/api/v1/namespaces/a/secrets", "", "secrets", "", "a"),
    ]  # fmt: skip
    # The status subresource is granted by its own name.
    grant(cluster, [{"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["patch"]}], "a")
    assert cluster.request("PATCH", f"{fleets('a')}/smollm2/status", patch, token=token)[0] == 200


def test_a_role_grants_only_in_its_namespace(cluster: EmulatedCluster) -> None:
    token = robot(cluster)
    grant(cluster, FLEET_RULES, namespace="a")
    assert cluster.request("GET", fleets("a"), token=token)[0] == 200
    code, answer = cluster.request("GET", fleets("b"), token=token)
    assert code == 403 and 'in the namespace "b"' in answer["message"]
    # Nor at the cluster scope, which a list of every namespace is.
    all_fleets = "/apis/elasticfleet.io/v1alpha1/elasticfleets"
    code, answer = cluster.request("GET", all_fleets, token=token)
    assert code == 403 and answer["message"].endswith("at the cluster scope")


def test_block_owner_deletion_needs_the_owners_finalizers(cluster: EmulatedCluster) -> None:
    """OwnerReferencesPermissionEnforcement: what the chart's
    elasticfleets/finalizers grant is for."""
    token = robot(cluster)
    deployments = {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["create"]}
    grant(cluster, [deployments])
    fleet = cluster.call("POST", fleets("a"), example_fleet())
    owner = {
        "apiVersion": "elasticfleet.io/v1alpha1",
        "kind": "ElasticFleet",
        "name": "smollm2",
        "uid": fleet["metadata"]["uid"],
        "blockOwnerDeletion": True,
    }
    child = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "w", "ownerReferences": [owner]},
        "spec": {},
    }
    path = "/apis/apps/v1/namespaces/a/deployments"
    code, answer = cluster.request("POST", path, child, token=token)
    assert code == 403
    assert 'cannot update resource "elasticfleets/finalizers"' in answer["message"]
    grant(
        cluster,
        [{"apiGroups": ["elasticfleet.io"], "resources": ["elasticfleets/finalizers"],
          "verbs": ["update"]}],
        namespace="a",
    )  # fmt: skip
    assert cluster.request("POST", path, child, token=token)[0] == 201


def test_custom_resources_are_validated_on_every_write(cluster: EmulatedCluster) -> None:
    bad = example_fleet()
    bad["spec"]["replicas"] = -1
    code, answer = cluster.request("POST", fleets("a"), bad)
    assert (code, answer["reason"]) == (422, "Invalid")
    assert answer["message"].startswith('ElasticFleet.elasticfleet.io "smollm2" is invalid: ')
    assert [c["field"] for c in answer["details"]["causes"]] == ["spec.replicas"]

    cluster.call("POST", fleets("a"), example_fleet())
    fleet = f"{fleets('a')}/smollm2"
    # A CEL transition rule: the model is immutable.
    code, answer = cluster.request("PATCH", fleet, {"spec": {"model": {"name": "other"}}})
    assert code == 422
    assert answer["message"] == (
        'ElasticFleet.elasticfleet.io "smollm2" is invalid: spec.model: model is immutable'
    )
    # The status subresource is validated too, and counted as refused.
    code, answer = cluster.request("PATCH", f"{fleet}/status", {"status": {"replicas": "two"}})
    assert code == 422 and answer["details"]["causes"][0]["field"] == "status.replicas"
    assert len(cluster.emulator.refusals) == 3
    # A JSON patch is validated as the object it makes.
    scale = [{"op": "replace", "path": "/spec/replicas", "value": 5000}]
    assert cluster.request("PATCH", fleet, scale)[0] == 422
    assert cluster.call("GET", fleet)["spec"]["replicas"] == 2


def test_custom_resources_are_stored_as_the_server_stores_them(cluster: EmulatedCluster) -> None:
    body = example_fleet()
    body["spec"]["unknown"] = "dropped"
    body["status"] = {"replicas": 7}
    created = cluster.call("POST", fleets("a"), copy.deepcopy(body))
    assert "unknown" not in created["spec"]  # pruned
    assert created["spec"]["worker"]["port"] == 50051  # defaulted
    assert "status" not in created  # only the status subresource writes status
    assert created["metadata"]["generation"] == 1

    fleet = f"{fleets('a')}/smollm2"
    status = cluster.call("PATCH", f"{fleet}/status", {"status": {"replicas": 2}, "spec": {}})
    assert status["status"] == {"replicas": 2} and status["metadata"]["generation"] == 1
    # The main resource leaves status alone and a new spec is a new generation.
    patched = cluster.call("PATCH", fleet, {"spec": {"replicas": 3}, "status": {"replicas": 9}})
    assert patched["status"] == {"replicas": 2} and patched["metadata"]["generation"] == 2
    # Metadata alone (kopf's annotations) is no new generation.
    annotated = cluster.call("PATCH", fleet, {"metadata": {"annotations": {"a": "b"}}})
    assert annotated["metadata"]["generation"] == 2
    assert int(annotated["metadata"]["resourceVersion"]) > int(
        patched["metadata"]["resourceVersion"]
    )


def test_generated_names_are_unique(cluster: EmulatedCluster) -> None:
    """kopf posts its Events with generateName only."""
    event = {"apiVersion": "v1", "kind": "Event", "metadata": {"generateName": "kopf-event-"}}
    names = set()
    for _ in range(2):
        code, created = cluster.request("POST", "/api/v1/namespaces/a/events", event)
        assert code == 201 and created["metadata"]["name"].startswith("kopf-event-")
        names.add(created["metadata"]["name"])
    assert len(names) == len(cluster.objects("v1/events")) == 2


# -- faults on demand (kube_faults.py) ---------------------------------------------


def test_injected_faults_answer_like_a_real_server_and_store_nothing(
    cluster: EmulatedCluster,
) -> None:
    cluster.call("POST", fleets("a"), example_fleet())
    status = f"{fleets('a')}/smollm2/status"
    conflict = cluster.emulator.inject(Fault(409, "patch", "elasticfleets", "status"))
    broken = cluster.emulator.inject(Fault(500, "patch", "elasticfleets", "status", times=2))
    patch = {"status": {"observedGeneration": 1}}
    answers = [cluster.request("PATCH", status, patch) for _ in range(4)]
    assert [code for code, _ in answers] == [409, 500, 500, 200]
    (_, first), (_, second) = answers[:2]
    assert (first["kind"], first["reason"], first["code"]) == ("Status", "Conflict", 409)
    assert first["message"] == (
        'Operation cannot be fulfilled on elasticfleets.elasticfleet.io "smollm2": the object '
        "has been modified; please apply your changes to the latest version and try again"
    )
    assert second["reason"] == "InternalError"
    assert (conflict.fired, broken.fired) == (1, 2)
    # Only the write that was served changed the object.
    (fleet,) = cluster.objects("elasticfleet.io/v1alpha1/elasticfleets", "a")
    assert fleet["status"]["observedGeneration"] == 1
    # Another verb or subresource is not touched by a fault of a patch of status.
    cluster.emulator.inject(Fault(500, "patch", "elasticfleets", "status"))
    assert cluster.request("GET", fleets("a"))[0] == 200


def test_a_fault_can_match_on_the_body_and_hold_the_request(cluster: EmulatedCluster) -> None:
    cluster.call("POST", fleets("a"), example_fleet())
    status = f"{fleets('a')}/smollm2/status"
    held = cluster.emulator.inject(
        Fault(
            500,
            "patch",
            "elasticfleets",
            "status",
            when=lambda body: "replicas" in body["status"],
            held=True,
        )
    )
    assert cluster.request("PATCH", status, {"status": {"observedGeneration": 1}})[0] == 200
    answer: Future[tuple[int, Any]] = Future()
    thread = threading.Thread(
        target=lambda: answer.set_result(
            cluster.request("PATCH", status, {"status": {"replicas": 2}})
        )
    )
    thread.start()
    assert held.reached.wait(5)
    assert not answer.done()  # the client waits in its call
    held.release()
    thread.join(5)
    assert answer.result()[0] == 500
    (fleet,) = cluster.objects("elasticfleet.io/v1alpha1/elasticfleets", "a")
    assert "replicas" not in fleet["status"]


def _watch_events(cluster: EmulatedCluster, path: str, then: Callable[[], None]) -> list[Any]:
    """The events of a watch of `path` until it ends; `then` runs once it is open."""

    from kube_emulator import ADMIN_TOKEN  # imported by pytest as a plugin first

    async def watch() -> list[Any]:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        events = []
        async with cluster.emulator.request(
            "GET", f"{path}?watch=true", headers=headers
        ) as response:
            assert response.status == 200
            await asyncio.get_running_loop().run_in_executor(None, then)
            async for line in response.content:
                if line.strip():
                    events.append(json.loads(line))
        return events

    return cluster.run(watch())


def test_a_watch_ends_with_410_expired_when_told(cluster: EmulatedCluster) -> None:
    pods = "/api/v1/namespaces/a/pods"
    expired = cluster.emulator.inject(Fault(410, "watch", "pods"))
    (event,) = _watch_events(cluster, pods, lambda: None)
    assert event["type"] == "ERROR"
    assert (event["object"]["code"], event["object"]["reason"]) == (410, "Expired")
    assert event["object"]["message"].startswith("too old resource version: ")
    assert expired.fired == 1
    # A compaction ends the watches that are open; what came before arrives first.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {}}

    def change_then_compact() -> None:
        cluster.call("POST", pods, pod)
        cluster.run(cluster.emulator.expire_watches("v1/pods"))

    added, ended = _watch_events(cluster, pods, change_then_compact)
    assert (added["type"], added["object"]["metadata"]["name"]) == ("ADDED", "p")
    assert (ended["type"], ended["object"]["code"]) == ("ERROR", 410)
