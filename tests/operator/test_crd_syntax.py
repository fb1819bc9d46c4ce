"""What the CRDs admit in the strings and numbers a spec hands on, checked
against tables of what Kubernetes, the kubelet, the adapter store and the
worker accept, and against ports of their parsers (k8s_rules.py). Each
table row is refused by the API server (crd_check) exactly when it is
refused by the operator (FleetSpec.parse), so no fleet is admitted and
then stuck, or stored and then refused."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from crd_check import validation_errors
from k8s_rules import (
    is_config_map_key,
    is_dns1035_label,
    is_dns1123_subdomain,
    is_image_reference,
    is_qualified_name,
    is_resource_quantity,
    parses_as_quantity,
)

from elasticfleet.operator.build import build_children, owner_reference, worker_name
from elasticfleet.operator.crds import adapter_crd, fleet_crd
from elasticfleet.operator.spec import FleetSpec, SpecError
from elasticfleet.operator.syntax import QUANTITY, matches
from elasticfleet.worker.adapters.format import AdapterFormatError, AdapterSpec
from elasticfleet.worker.adapters.names import is_valid_name

EXAMPLES = Path(__file__).resolve().parents[2] / "operator" / "examples"
UID = "5e1f0c3a-8d5e-4b7a-9a43-0f1f4c2d9b11"
HEX64 = "0123456789abcdef" * 4


def _example(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    return loaded


def _verdicts(fleet: dict[str, Any]) -> tuple[list[str], str | None]:
    """(the API server's errors, the operator's SpecError or None)."""
    errors = validation_errors(fleet_crd(), fleet)
    try:
        FleetSpec.parse(fleet["metadata"]["name"], "ml", copy.deepcopy(fleet["spec"]))
    except SpecError as error:
        return errors, str(error)
    return errors, None


def _admitted(fleet: dict[str, Any]) -> bool:
    """Whether the API server admits `fleet`; the operator must agree."""
    errors, refused = _verdicts(fleet)
    assert (errors == []) == (refused is None), (errors, refused)
    return not errors


# -- quantities ------------------------------------------------------------------

# Kubernetes' documentation ("Resource Management for Pods and Containers";
# the Quantity reference; the grammar in k8s.io/apimachinery's quantity.go):
# CPU in cores or millicores (0.1 == 100m), memory as a plain integer, a
# fixed-point number, a power-of-ten suffix (E P T G M k) or a power-of-two
# one (Ei Pi Ti Gi Mi Ki), or an exponent; 128974848, 129e6, 129M,
# 128974848000m and 123Mi are all about the same memory. Also n and u
# (nano, micro), a sign, "5." and ".5" (the grammar's <digits>. and
# .<digits>). Suffixes are case-sensitive: 400m of memory is 0.4 bytes.
QUANTITIES_ACCEPTED = [
    "0", "1", "2", "0.1", "100m", "500m", "1.5", "400m", "128974848", "129e6", "129M",
    "128974848000m", "123Mi", "16Gi", "6Gi", "1Ki", "1Ti", "1Pi", "1Ei", "1k", "1G", "1T",
    "1P", "1E", "1n", "1u", "1e3", "1E3", "1e-3", "1e+3", "1E-9", "+1", "-1", "-0.5Gi", ".5",
    "5.", "1.Gi", "00012", "12345678901234567890", "1.2345", "8Ei",
    "1e999999999999999999",
]  # fmt: skip
QUANTITIES_REFUSED = [
    "", "1.2.3Gi", "1..0", "1,000", "1_000", "0x10", "--1", "+-1", "1K", "1KI", "1ki", "1mi",
    "1Gb", "1GB", "1MB", "1b", "1B", "1e", "1E+", "1ee3", "1e3Mi", "1Mi3", "1Ei3", "1e1.5",
    "1e9999999999999999999", "Infinity", "NaN", "1 Gi", "\u0663", "\uff11", "1\u00a0Gi",
    # The Go parser reads a number without digits as zero ("Gi", ".", "-"),
    # or refuses it (its slow path: "Pi", "e-10"); the grammar has none.
    "Gi", "Pi", ".", "-", "+", "e3", "e-10", "k",
    # The API server trims spaces around a quantity it reads; the CRD does not.
    " 1", "1 ", "1\n",
]  # fmt: skip


@pytest.mark.parametrize("value", QUANTITIES_ACCEPTED)
def test_quantities_kubernetes_accepts_are_admitted(value: str) -> None:
    assert parses_as_quantity(value) and matches(QUANTITY, value)
    fleet = _example("elasticfleet.yaml")
    fleet["spec"]["worker"]["resources"]["memory"] = value
    # Requests and limits must not be negative (the CRD refuses any '-').
    assert _admitted(fleet) == (not value.startswith("-"))
    assert is_resource_quantity(value) or value.startswith("-")


@pytest.mark.parametrize("value", QUANTITIES_REFUSED)
def test_quantities_kubernetes_refuses_are_refused(value: str) -> None:
    assert not matches(QUANTITY, value)
    trimmed = value.strip(" \n")
    assert not parses_as_quantity(value) or trimmed != value
    fleet = _example("elasticfleet.yaml")
    fleet["spec"]["worker"]["resources"]["cpu"] = value
    errors, refused = _verdicts(fleet)
    assert errors and refused and "a Kubernetes quantity" in refused


# -- image references ------------------------------------------------------------

IMAGES_ACCEPTED = [
    "elasticfleet-worker:0.1.0",
    "ubuntu",
    "library/ubuntu:22.04",
    "docker.io/library/ubuntu",
    "registry.example.com/team/worker:0.1.0-rc.1_b7",
    "localhost:5000/worker",
    "localhost/worker",
    "[::1]:5000/worker:tag",
    "10.0.0.1:5000/a/b",
    "Registry.Example.com/team/worker",  # a domain may be uppercase
    "Foo/bar",  # an uppercase first component is a domain
    "a__b/c",
    "a--b.c_d",
    f"worker@sha256:{HEX64}",
    f"worker:0.1@sha256:{HEX64}",
    f"worker@sha512:{HEX64 * 2}",
    f"worker@sha384:{HEX64}{HEX64[:32]}",
    "a" * 237,
]
IMAGES_REFUSED = [
    "",
    "foo bar",
    " worker",
    "worker ",
    "worker\n",
    "Worker",  # the repository is lowercase
    "team/Worker",
    "worker:",
    ":tag",
    "worker:tag with space",
    f"worker:{'t' * 129}",
    "-worker",
    "worker-",
    "a..b",
    "a_-b",
    "a/-b",
    "/worker",
    "worker/",
    "a//b",
    "worker:tag:tag",
    "http://registry/worker",
    "registry:port/worker",
    "worker@sha256:abc",
    f"worker@sha256:{HEX64.upper()}",  # go-digest wants lowercase hex
    f"worker@sha256:{HEX64[:63]}",
    f"worker@md5:{HEX64[:32]}",
    HEX64,  # an image ID, not a reference
    "a" * 238,  # docker.io/library/ + it is over 255 characters
    "wörker",
]


@pytest.mark.parametrize("image", IMAGES_ACCEPTED)
def test_images_the_kubelet_pulls_are_admitted(image: str) -> None:
    assert is_image_reference(image)
    fleet = _example("elasticfleet.yaml")
    fleet["spec"]["worker"]["image"] = image
    assert _admitted(fleet)


@pytest.mark.parametrize("image", IMAGES_REFUSED)
def test_images_the_kubelet_refuses_are_refused(image: str) -> None:
    assert not is_image_reference(image)
    fleet = _example("elasticfleet.yaml")
    fleet["spec"]["worker"]["image"] = image
    errors, refused = _verdicts(fleet)
    assert errors and refused and "spec.worker.image" in refused


# -- fleet names -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "workload", "admitted"),
    [
        ("smollm2", "Deployment", True),
        ("a", "Deployment", True),
        ("a" * 56, "Deployment", True),
        ("a" * 57, "Deployment", False),  # a-...-worker is 64 characters
        ("a" * 45, "StatefulSet", True),
        ("a" * 46, "StatefulSet", False),  # the revision-hash label would be 64
        ("1fleet", "Deployment", False),  # a Service name starts with a letter
        ("my.fleet", "Deployment", False),  # nor holds a '.'
        ("fleet-", "Deployment", False),
    ],
)
def test_a_fleet_name_is_admitted_only_if_its_children_can_be_named(
    name: str, workload: str, admitted: bool
) -> None:
    fleet = _example("elasticfleet.yaml")
    fleet["metadata"]["name"] = name
    fleet["spec"]["workload"] = workload
    errors, refused = _verdicts(fleet)
    assert (errors == []) == (refused is None) == admitted, (errors, refused)
    if not admitted:
        assert refused is not None and "rename the fleet" in refused
        return
    spec = FleetSpec.parse(name, "ml", fleet["spec"])
    service, workload_object = build_children(spec, owner_reference(name, UID))
    assert is_dns1035_label(service["metadata"]["name"])
    assert is_dns1123_subdomain(workload_object["metadata"]["name"])
    if workload == "StatefulSet":  # controller-revision-hash: <name>-<10 characters>
        assert len(f"{worker_name(spec)}-0123456789") <= 63


# -- adapter names: the CRD and the store, both ways -------------------------------


def _store_accepts(name: str, tasks: tuple[str, ...] = ("qa",), rank: int = 8) -> bool:
    try:
        AdapterSpec(name, "SmolLM2-135M-Instruct", 1, rank, 16.0, ("q_proj",), tasks)
    except AdapterFormatError:
        return False
    return True


def _adapter_set(name: str, spec_changes: dict[str, Any]) -> dict[str, Any]:
    adapter_set = _example("adapterset.yaml")
    adapter_set["metadata"]["name"] = name
    del adapter_set["spec"]["store"]
    adapter_set["spec"].update(spec_changes)
    return adapter_set


NAMES = [
    "tasks",
    "qa",
    "my_adapter",  # the store allows '_', which no Kubernetes name holds
    "my-adapter",
    "a" * 63,
    "a" * 64,
    "my.adapter",  # a Kubernetes name, not a store name
    "Tasks",
    "tasks\n",
    "-tasks",
    "tasks-",
    "_tasks",
    "",
    "t\u00e4sks",
]


@pytest.mark.parametrize("name", NAMES)
def test_adapter_and_task_names_mean_the_same_to_the_crd_and_the_store(name: str) -> None:
    store = _store_accepts(name)
    assert store == is_valid_name(name) == _store_accepts("a", (name,))
    # spec.store.name and every task: exactly the store's names.
    named = _adapter_set("any", {"store": {"name": name}})
    assert (validation_errors(adapter_crd(), named) == []) == store
    tasked = _adapter_set("any", {"tasks": [name]})
    assert (validation_errors(adapter_crd(), tasked) == []) == store
    # Without spec.store.name, metadata.name is the store's name: a
    # Kubernetes name (else the API server refuses it) that the store takes.
    bare = _adapter_set(name, {})
    admitted = validation_errors(adapter_crd(), bare) == []
    assert admitted == (store and is_dns1123_subdomain(name))


def test_a_dotted_adapter_set_name_needs_its_store_name() -> None:
    bare = _adapter_set("team.tasks", {})
    assert validation_errors(adapter_crd(), bare) == [
        "<root>: without spec.store.name, metadata.name is the adapter's name in the store, "
        "which must be 1-63 lowercase letters, digits, '-' or '_' (no '.'): set "
        "spec.store.name or rename the AdapterSet"
    ]
    dotted = _adapter_set("team.tasks", {"store": {"name": "team.tasks"}})
    assert validation_errors(adapter_crd(), dotted)
    assert not validation_errors(
        adapter_crd(), _adapter_set("team.tasks", {"store": {"name": "tasks"}})
    )
    # A fleet can name it: a fleet's adapters are AdapterSet names.
    fleet = _example("elasticfleet.yaml")
    fleet["spec"]["adapters"] = [{"name": "team.tasks"}]
    assert _admitted(fleet)


@pytest.mark.parametrize(
    ("version", "admitted"),
    [
        *[("", True), ("1", True), ("007", True), ("9" * 18, True)],
        *[("0", False), ("00", False), ("9" * 19, False), ("-1", False), ("1.0", False)],
        *[("\u0661", False), ("1\n", False)],
    ],
)
def test_a_pinned_version_is_one_a_worker_loads(version: str, admitted: bool) -> None:
    adapter_set = _adapter_set("tasks", {"store": {"version": version}})
    assert (validation_errors(adapter_crd(), adapter_set) == []) == admitted


def test_an_adapter_set_may_describe_any_rank_the_store_holds() -> None:
    for rank, admitted in ((4096, True), (4097, False)):
        adapter_set = _adapter_set("tasks", {"rank": rank, "alpha": 2.0 * rank})
        assert (validation_errors(adapter_crd(), adapter_set) == []) == admitted
        assert _store_accepts("tasks", rank=rank) == admitted


# -- everything else a fleet spec hands on -------------------------------------------

SECRET = {"name": "redis", "key": "url"}


def _set(path: str, value: Any) -> dict[str, Any]:
    fleet = _example("elasticfleet.yaml")
    *parents, last = path.split(".")
    node = fleet["spec"]
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return fleet


@pytest.mark.parametrize(
    ("path", "value", "admitted"),
    [
        ("worker.threads", 1024, True),
        ("worker.threads", 1025, False),
        ("worker.threads", 10**12, False),
        ("memoryPolicy.budget", {"bytes": 2**63 - 1}, True),
        ("memoryPolicy.budget", {"bytes": 2**63}, False),  # past int64 and the worker's uint64
        ("memoryPolicy.headroomBytes", 2**63 - 1, True),
        ("memoryPolicy.headroomBytes", 2**63, False),
        ("model.path", "/models/smollm2", True),
        ("model.path", "models/smollm2", True),
        ("model.path", "-models", False),  # the worker's parser would take it for a flag
        ("model.path", "/models\x00", False),  # no NUL crosses exec
        ("worker.nodeSelector", {"nvidia.com/gpu.present": "true"}, True),
        ("worker.nodeSelector", {"kubernetes.io/os": ""}, True),
        ("worker.nodeSelector", {"gpu": "a b"}, False),
        ("worker.nodeSelector", {"a/b/c": "x"}, False),
        ("worker.nodeSelector", {f"{'a' * 254}/x": "x"}, False),
        ("worker.nodeSelector", {"-gpu": "x"}, False),
        ("tls.secretName", "workers-tls", True),
        ("tls.secretName", "Workers_TLS", False),
        ("auth.tokenSecretRef", {"name": "token", "key": ".token"}, True),
        ("auth.tokenSecretRef", {"name": "token", "key": "..token"}, False),
        ("auth.tokenSecretRef", {"name": "", "key": "token"}, False),
        ("redis.url", "rediss://ef@redis.ml.svc:6380/2", True),
        ("redis.url", "redis://:secret@redis:6379", False),  # a password belongs in a Secret
        ("redis.url", "redis://redis:99999", False),
        ("redis.url", "redis://redis:0", False),
        ("redis.url", "redis://redis/0?ssl_cert_reqs=none", False),
        ("redis.url", "redis://red is", False),
        ("redis.prefix", "team-a:ef:", True),
        ("redis.prefix", "ef: ", False),  # workers strip it: they would use another prefix
        ("redis.prefix", "", False),
        ("adapters", [{"name": "tasks"}, {"name": "tasks"}], False),
    ],
)
def test_what_a_fleet_hands_on_is_admitted_only_if_it_works(
    path: str, value: Any, admitted: bool
) -> None:
    fleet = _set(path, value)
    assert _admitted(fleet) == admitted
    if not admitted:
        return
    spec = FleetSpec.parse("f", "ml", fleet["spec"])
    for child in build_children(spec, owner_reference("f", UID)):
        pod = child["spec"].get("template", {}).get("spec", {})
        for key, label in pod.get("nodeSelector", {}).items():
            assert is_qualified_name(key) and label == label.strip()
        for container in pod.get("containers", []):
            for env in container["env"]:
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert is_dns1123_subdomain(ref["name"]) and is_config_map_key(ref["key"])
