"""The whole product on one machine: the real kopf operator (KopfRunner)
against the Kubernetes API emulator, real `elasticfleet worker` processes on
the tiny model, and a real Valkey holding the fleet's adapter set.

The test plays kubelet (tiny_fleet.Kubelet): when the operator has created
the worker Deployment, it starts one worker process per replica from the
Deployment's own command and environment and marks its pod ready at the
worker's address. The workers require the bearer token of the fleet's
Secret, which the operator reads and sends (the fleet is Degraded until the
Secret exists; its value ends in a newline, as from a file). Then: both workers load the
AdapterSet from Redis and serve a request with it; other processes squeeze one worker's device and
the operator pushes it a smaller plan, writes status and posts an Event,
while the other worker keeps every block; relaxed, the blocks come back; a
worker killed with SIGKILL marks the fleet Degraded, naming it, and its
restart recovers it; deleting the fleet releases the finalizer.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from certificates import CertificateAuthority
from conftest import TINY_MODEL
from test_operator_kopf import ADAPTER_SETS, FLEETS, _condition, operator
from tiny_fleet import DEVICE_BYTES, Kubelet, squeeze
from waiting import wait_for

from elasticfleet.worker.adapters.format import AdapterSpec
from elasticfleet.worker.adapters.layer import AdapterSet
from elasticfleet.worker.adapters.store import AdapterStore
from elasticfleet.worker.model.config import tiny_config
from elasticfleet.worker.serving.client import WorkerClient, generate_request
from elasticfleet.worker.serving.credentials import ClientTls
from elasticfleet.worker.serving.proto_gen import worker_pb2 as pb

if TYPE_CHECKING:
    from kube_emulator import EmulatedCluster

# Fixture: cluster (the emulated API, $KUBECONFIG pointing at it).
pytest_plugins = ["kube_emulator"]

BLOCKS = 2 * tiny_config().num_hidden_layers
TASKS = ("code", "qa")
TOKEN = "fleet-token-1"


def publish_adapter(redis_url: str) -> int:
    """An AsymLoRA set for the tiny model ("tasks": q and v, two heads) in
    the store; returns its version."""
    spec = AdapterSpec(
        name="tasks",
        base_model=TINY_MODEL,
        num_layers=tiny_config().num_hidden_layers,
        rank=4,
        alpha=8.0,
        modules=("q_proj", "v_proj"),
        tasks=TASKS,
        router=False,
    )
    store = AdapterStore.from_url(redis_url)
    try:
        return store.publish(AdapterSet.create(spec, tiny_config(), seed=5).weights()).version
    finally:
        store.close()


def fleet_body(model: Path, name: str, replicas: int, **spec: Any) -> dict[str, Any]:
    """An ElasticFleet as a user would write it (the API server adds the
    defaults; the operator applies them itself), with `spec` added."""
    return {
        "apiVersion": "elasticfleet.io/v1alpha1",
        "kind": "ElasticFleet",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": TINY_MODEL, "path": str(model)},
            "replicas": replicas,
            "worker": {"image": "ghcr.io/example/elasticfleet:test"},
            "memoryPolicy": {
                "policy": "greedy",
                "budget": {"fraction": 0.5},
                "headroomBytes": 0,
                "planIntervalSeconds": 1,
            },
            **spec,
        },
    }


def secret(name: str, data: dict[str, bytes], kind: str = "Opaque") -> dict[str, Any]:
    encoded = {key: base64.b64encode(value).decode() for key, value in data.items()}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "type": kind,
        "data": encoded,
    }


def fleet_object(cluster: EmulatedCluster) -> dict[str, Any]:
    (found,) = cluster.objects("elasticfleet.io/v1alpha1/elasticfleets", "ns") or [{}]
    return found


def worker_status(cluster: EmulatedCluster, pod: str) -> dict[str, Any]:
    entries = fleet_object(cluster).get("status", {}).get("workers", [])
    return next((dict(e) for e in entries if e["pod"] == pod), {})


def test_the_operator_runs_a_fleet_of_real_workers(
    cluster: EmulatedCluster,
    tiny_profiles: Path,
    tiny_worker_model: Path,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    version = publish_adapter(redis_url)
    # The operator has no store of its own: the AdapterSet is checked in the fleet's.
    monkeypatch.delenv("ELASTICFLEET_REDIS_URL", raising=False)
    adapter_set = {
        "apiVersion": "elasticfleet.io/v1alpha1",
        "kind": "AdapterSet",
        "metadata": {"name": "tasks"},
        "spec": {"baseModel": TINY_MODEL, "tasks": list(TASKS), "rank": 4, "alpha": 8,
                 "modules": ["q_proj", "v_proj"]},
    }  # fmt: skip

    def fleet() -> dict[str, Any]:
        return fleet_object(cluster)

    def loaded(pod: str) -> bool:
        return any(
            a["name"] == "tasks" and a["version"] == str(version) and a["bytes"] > 0
            for a in worker_status(cluster, pod).get("adapters", [])
        )

    tokens = [TOKEN]  # the one in force: the last

    def stats(address: str) -> pb.GetStatsResponse:
        with WorkerClient(address, token=tokens[-1]) as client:
            return client.get_stats(timeout=10)

    with Kubelet(cluster, tmp_path) as kubelet, operator() as runner:
        token_ref = {"name": "workers-token", "key": "token"}
        body = fleet_body(
            tiny_worker_model,
            "tiny",
            2,
            adapters=[{"name": "tasks"}],
            redis={"url": redis_url},
            auth={"tokenSecretRef": token_ref},
        )
        cluster.call("POST", FLEETS, body)
        (deployment,) = wait_for("the Deployment", lambda: cluster.objects("apps/v1/deployments"))
        # Until its token's Secret exists the fleet is Degraded, saying so.
        # (Read once: another handler's status patch may briefly replace the
        # conditions until the next tick writes them again.)
        missing = wait_for(
            "the missing Secret reported",
            lambda: (
                (c := _condition(fleet(), "Degraded")).get("reason") == "SecretUnavailable" and c
            ),
        )
        assert "Secret workers-token" in missing["message"]
        # As `kubectl create secret --from-file` makes it: with the file's last newline.
        token = secret("workers-token", {"token": f"{TOKEN}\n".encode()})
        cluster.call("POST", "/api/v1/namespaces/ns/secrets", token)
        cluster.call("POST", ADAPTER_SETS, adapter_set)
        first, second = kubelet.sync(deployment)
        addresses = {pod: kubelet.workers[pod].address for pod in (first, second)}

        # Both workers are reached at their pods' ports and load the adapter set.
        wait_for("both workers with the adapter", lambda: loaded(first) and loaded(second), 60)
        status = fleet()["status"]
        assert status["readyReplicas"] == 2
        wait_for("Available", lambda: _condition(fleet(), "Available").get("status") == "True")
        for pod in (first, second):
            entry = worker_status(cluster, pod)
            assert entry["address"] == addresses[pod] and entry["reachable"] is True
            assert entry["device"]["source"] == "simulated"
            assert entry["device"]["totalBytes"] == DEVICE_BYTES
            assert entry["budgetBytes"] == DEVICE_BYTES // 2  # half the simulated device

        def adapter_set_ready() -> dict[str, Any]:
            (found,) = cluster.objects("elasticfleet.io/v1alpha1/adaptersets")
            condition = _condition(found, "Ready")
            return condition if condition.get("status") == "True" else {}

        ready = wait_for("the AdapterSet checked in the fleet's store", adapter_set_ready)
        assert ready["message"] == f"the store of fleet tiny: version {version} matches the spec"
        # The workers require the fleet's token (which the operator sends).
        with WorkerClient(addresses[first]) as anonymous, pytest.raises(grpc.RpcError) as refused:
            anonymous.get_stats(timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with WorkerClient(addresses[first], token=TOKEN) as client:
            request = generate_request("hi", max_new_tokens=4, adapter="tasks", task="qa")
            request.ignore_eos = True
            result = client.complete(request, timeout=30)
        assert len(result.token_ids) == 4
        # A rotated token reaches the running workers through their mounted
        # Secret (the operator reads the Secret every tick).
        rotated = secret("workers-token", {"token": f"{TOKEN}-2\n".encode()})
        cluster.call("PATCH", "/api/v1/namespaces/ns/secrets/workers-token", rotated)
        kubelet.refresh_secrets()

        def answers(token: str) -> bool:
            with WorkerClient(addresses[first], token=token) as client:
                try:
                    client.get_stats(timeout=10)
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
                    return False
            return True

        wait_for("the rotated token in force", lambda: answers(f"{TOKEN}-2"), 30)
        assert not answers(TOKEN)
        tokens.append(f"{TOKEN}-2")
        assert kubelet.workers[first].process.poll() is None  # no restart

        # Squeezed: other processes take all but the worker's own memory.
        own = stats(addresses[first]).memory
        squeeze(kubelet.device(first), DEVICE_BYTES - own.weight_bytes - own.adapter_bytes)

        def shrunk() -> pb.GetStatsResponse | None:
            found = stats(addresses[first])
            return found if found.memory.weight_bytes < own.weight_bytes else None

        smaller = wait_for("a smaller plan on the squeezed worker", shrunk, 30)
        assert sum(smaller.keep_mask) < BLOCKS
        entry = wait_for(
            "the smaller plan in status",
            lambda: (
                worker_status(cluster, first).get("plan", {}).get("id") == smaller.plan_id
                and worker_status(cluster, first)
            ),
        )
        assert entry["weightBytes"] == smaller.memory.weight_bytes
        assert entry["plan"]["keptAttention"] + entry["plan"]["keptFFN"] == sum(smaller.keep_mask)
        assert any(p["pod"] == first for p in fleet()["status"]["lastPlans"])
        events = wait_for(
            "a PlanChanged Event",
            lambda: [e for e in cluster.objects("v1/events") if e.get("reason") == "PlanChanged"],
        )
        assert first in events[-1]["message"]
        assert sum(stats(addresses[second]).keep_mask) == BLOCKS  # the other is untouched

        # Relaxed: every block comes back.
        squeeze(kubelet.device(first), 0)
        wait_for("the dense plan", lambda: sum(stats(addresses[first]).keep_mask) == BLOCKS, 30)

        # A crashed worker: Degraded, naming it; its restart recovers the fleet.
        kubelet.kill(second)
        degraded = wait_for(
            "Degraded",
            lambda: (
                (c := _condition(fleet(), "Degraded")).get("reason") == "WorkerUnreachable" and c
            ),
        )
        assert second in degraded["message"] and first not in degraded["message"]
        assert worker_status(cluster, first)["reachable"] is True
        kubelet.restart(second)
        wait_for("recovery", lambda: _condition(fleet(), "Degraded").get("status") == "False", 30)
        wait_for("the restarted worker's adapter", lambda: loaded(second), 30)

        # Deletion: the finalizer is released.
        cluster.call("DELETE", f"{FLEETS}/tiny")
        wait_for("the fleet to go", lambda: not fleet())
    assert runner.exit_code == 0, runner.output


def test_the_operator_reaches_mutual_tls_workers_by_their_dns_name(
    cluster: EmulatedCluster, tiny_profiles: Path, tiny_worker_model: Path, tmp_path: Path
) -> None:
    """A mutual-TLS fleet, with Secrets as cert-manager writes them (tls.crt,
    tls.key, ca.crt): the worker serves the certificate of the fleet's TLS
    Secret, one for `*.secure-worker.ns.svc` (mounted by the kubelet the
    test plays), and requires client certificates from the CA of the client
    Secret (only its ca.crt is mounted). The operator reaches the worker by
    IP, verifies it as the pod's name under the headless Service, and
    presents the client Secret's certificate; a client without one, or with
    one from another CA, is refused."""
    ca, other = CertificateAuthority("fleet-ca"), CertificateAuthority("other-ca")
    cert, key = ca.issue("worker", dns=("*.secure-worker.ns.svc",))
    tls = secret(
        "workers-tls", {"tls.crt": cert, "tls.key": key, "ca.crt": ca.pem}, "kubernetes.io/tls"
    )
    client_cert, client_key = ca.issue("elasticfleet-operator")
    client = secret(
        "operator-tls",
        {"tls.crt": client_cert, "tls.key": client_key, "ca.crt": ca.pem},
        "kubernetes.io/tls",
    )
    spec = {"secretName": "workers-tls", "clientSecretName": "operator-tls"}
    body = fleet_body(tiny_worker_model, "secure", 1, tls=spec)
    with Kubelet(cluster, tmp_path) as kubelet, operator() as runner:
        for item in (tls, client):
            cluster.call("POST", "/api/v1/namespaces/ns/secrets", item)
        cluster.call("POST", FLEETS, body)
        (deployment,) = wait_for("the Deployment", lambda: cluster.objects("apps/v1/deployments"))
        (pod,) = kubelet.sync(deployment)
        address = kubelet.workers[pod].address
        # Only the client Secret's ca.crt reached the worker, never its key.
        mounted = tmp_path / pod / "client-ca"
        assert [p.name for p in mounted.iterdir()] == ["ca.crt"]
        entry = wait_for(
            "the worker planned over mutual TLS",
            lambda: worker_status(cluster, pod).get("plan") and worker_status(cluster, pod),
            60,
        )
        assert entry["reachable"] is True and entry["address"] == address
        name = "127-0-0-1.secure-worker.ns.svc"
        trusted = ClientTls(ca.pem, client_cert, client_key)
        with WorkerClient(address, tls=trusted, server_name=name) as good:
            assert good.get_stats(timeout=10).model == TINY_MODEL
        # TLS is really on, the name is really checked, and so is the client's certificate.
        stranger = ClientTls(ca.pem, *other.issue("stranger"))
        for refused in (
            WorkerClient(address),
            WorkerClient(address, tls=trusted, server_name="other.svc"),
            WorkerClient(address, tls=ClientTls(ca.pem), server_name=name),
            WorkerClient(address, tls=stranger, server_name=name),
        ):
            with refused, pytest.raises(grpc.RpcError) as raised:
                refused.get_stats(timeout=5)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert runner.exit_code == 0, runner.output
