"""The real kopf operator (KopfRunner) against the Kubernetes API emulator
(kube_emulator.py), with a worker answering over real gRPC on 127.0.0.1.

The test plays kubelet: when the operator has created the worker
Deployment, it creates the worker pod and marks it ready with the fake
worker's address. Then it sees the fleet's AdapterSet loaded; squeezes the
worker's memory and sees a smaller plan pushed, status written and an Event
posted; relaxes it and sees the blocks restored; scales the fleet and sees
the Deployment follow; restarts the operator and sees nothing duplicated or
pushed again; takes the worker down and sees Degraded, then recovery;
deletes the fleet and sees the finalizer released.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc.aio
import pytest
import yaml
from fake_fleet import GIB, FakeWorker, fake_worker_service
from kopf.testing import KopfRunner
from kube_faults import Fault
from waiting import wait_for

from elasticfleet.agent.profile import DEFAULT_PROFILE, ModelProfile
from elasticfleet.worker.adapters.store import AdapterManifest, AdapterStore
from elasticfleet.worker.adapters.weights import AdapterWeights
from elasticfleet.worker.model.plan import PruningPlan

if TYPE_CHECKING:
    from kube_emulator import EmulatedCluster

PROFILE = ModelProfile.load(DEFAULT_PROFILE)
EXAMPLE = Path(__file__).resolve().parents[2] / "operator" / "examples" / "elasticfleet.yaml"
FLEETS = "/apis/elasticfleet.io/v1alpha1/namespaces/ns/elasticfleets"
ADAPTER_SETS = "/apis/elasticfleet.io/v1alpha1/namespaces/ns/adaptersets"

# Fixture: cluster (the emulated API, $KUBECONFIG pointing at it).
pytest_plugins = ["kube_emulator"]


def _condition(fleet: dict[str, Any], kind: str) -> dict[str, Any]:
    for condition in fleet.get("status", {}).get("conditions", []):
        if condition["type"] == kind:
            return dict(condition)
    return {}


def operator() -> KopfRunner:
    args = ["run", "--standalone", "--all-namespaces", "-m", "elasticfleet.operator.handlers"]
    return KopfRunner(args, timeout=60)


def serve_fake_worker(cluster: EmulatedCluster, worker: FakeWorker) -> tuple[grpc.aio.Server, int]:
    """`worker` over real gRPC on the emulator's loop; the server and its port."""

    async def serve() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(handlers=[fake_worker_service(worker)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    return cluster.run(serve())


def example_fleet(port: int) -> dict[str, Any]:
    """The example fleet, one replica on `port`, greedy, ticking every second."""
    fleet: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    fleet["spec"]["replicas"] = 1
    fleet["spec"]["worker"].update(port=port, metricsPort=port + 1 if port < 65535 else 1)
    fleet["spec"]["memoryPolicy"].update(policy="greedy", planIntervalSeconds=1)
    fleet["spec"]["memoryPolicy"].pop("qualityFloor")
    fleet["spec"]["redis"]["url"] = "redis://127.0.0.1:1/0"  # nothing listens there
    return fleet


def run_pod(cluster: EmulatedCluster, deployment: dict[str, Any]) -> None:
    """Play kubelet: the Deployment's pod runs and is ready at 127.0.0.1."""
    template = deployment["spec"]["template"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "smollm2-worker-0", "labels": template["metadata"]["labels"]},
        "spec": {**template["spec"], "nodeName": "node-a"},
    }
    cluster.call("POST", "/api/v1/namespaces/ns/pods", pod)
    ready = {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}
    cluster.call("PATCH", "/api/v1/namespaces/ns/pods/smollm2-worker-0/status", {"status": ready})


def test_operator_plans_a_fleet(cluster: EmulatedCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ELASTICFLEET_REDIS_URL", raising=False)
    worker = FakeWorker(PROFILE, others_bytes=int(3.2 * GIB))
    server, port = serve_fake_worker(cluster, worker)
    fleet = example_fleet(port)

    def fleet_object() -> dict[str, Any]:
        (found,) = cluster.objects("elasticfleet.io/v1alpha1/elasticfleets", "ns") or [{}]
        return found

    try:
        with operator() as runner:
            adapter_set = yaml.safe_load((EXAMPLE.parent / "adapterset.yaml").read_text())
            cluster.call("POST", ADAPTER_SETS, adapter_set)
            cluster.call("POST", FLEETS, copy.deepcopy(fleet))

            # The children, owned by the fleet.
            (deployment,) = wait_for(
                "the Deployment", lambda: cluster.objects("apps/v1/deployments")
            )
            (service,) = cluster.objects("v1/services")
            uid = fleet_object()["metadata"]["uid"]
            for child in (deployment, service):
                assert child["metadata"]["ownerReferences"][0]["uid"] == uid
            assert "elasticfleet.io/finalizer" in fleet_object()["metadata"]["finalizers"]

            # Play kubelet: the worker pod runs and is ready at the worker's address.
            run_pod(cluster, deployment)

            # Squeezed: a smaller plan is pushed, reported in status, and an Event says so.
            dense = PruningPlan.dense(PROFILE.config.num_hidden_layers)
            wait_for("a pushed plan", lambda: worker.plan != dense)
            status = wait_for(
                "plan status",
                lambda: (
                    fleet_object().get("status", {}).get("lastPlans") and fleet_object()["status"]
                ),
            )
            (entry,) = status["workers"]
            assert entry["pod"] == "smollm2-worker-0" and entry["node"] == "node-a"
            assert entry["plan"]["id"] == worker.plan_id
            assert status["readyReplicas"] == 1
            # The /scale subresource's selector: the worker pods' labels.
            assert status["selector"] == (
                "app.kubernetes.io/component=worker,elasticfleet.io/fleet=smollm2"
            )
            # The fleet's AdapterSet is loaded with the heads it names.
            assert ("load", "tasks", "", "code", "qa", "definitions") in worker.adapter_calls
            assert entry["adapters"] == [{"name": "tasks", "version": "2", "bytes": 4096}]

            # The AdapterSet is checked in the fleet's store, which is down.
            def adapter_condition() -> dict[str, Any]:
                (adapters,) = cluster.objects("elasticfleet.io/v1alpha1/adaptersets")
                return _condition(adapters, "Ready")

            checked = wait_for("the AdapterSet checked", adapter_condition)
            assert (checked["status"], checked["reason"]) == ("False", "StoreUnavailable")
            assert checked["message"].startswith("the store of fleet smollm2: ")
            assert _condition(fleet_object(), "Available")["status"] == "True"
            events = wait_for(
                "a PlanChanged Event",
                lambda: [
                    e for e in cluster.objects("v1/events") if e.get("reason") == "PlanChanged"
                ],
            )
            assert "smollm2-worker-0" in events[0]["message"]

            # Relaxed: every block comes back.
            worker.others_bytes = 0
            dense = PruningPlan.dense(PROFILE.config.num_hidden_layers)
            wait_for("the dense plan", lambda: worker.plan == dense)

            # Scaled: the Deployment follows the spec.
            cluster.call("PATCH", f"{FLEETS}/smollm2", {"spec": {"replicas": 2}})
            wait_for(
                "the scaled Deployment",
                lambda: cluster.objects("apps/v1/deployments")[0]["spec"]["replicas"] == 2,
            )
            wait_for(
                "Progressing", lambda: _condition(fleet_object(), "Progressing")["status"] == "True"
            )
        assert runner.exit_code == 0, runner.output

        # A restarted operator resumes: no second child, no plan pushed again.
        pushes, asked = len(worker.applied), worker.stats_calls
        with operator() as runner:
            wait_for("a tick of the new operator", lambda: worker.stats_calls >= asked + 2)
            assert len(worker.applied) == pushes
            assert len(cluster.objects("apps/v1/deployments")) == 1
            assert len(cluster.objects("v1/services")) == 1

            # Down: Degraded, then recovery.
            worker.down = True
            wait_for(
                "Degraded",
                lambda: _condition(fleet_object(), "Degraded").get("reason") == "WorkerUnreachable",
            )
            worker.down = False
            wait_for(
                "recovery", lambda: _condition(fleet_object(), "Degraded").get("status") == "False"
            )

            # Deletion: the handler runs and the finalizer is released.
            cluster.call("DELETE", f"{FLEETS}/smollm2")
            wait_for("the fleet to go", lambda: not fleet_object())
        assert runner.exit_code == 0, runner.output
    finally:
        cluster.run(server.stop(None))


def test_a_refused_status_write_does_not_stop_the_control_loop(
    cluster: EmulatedCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 409 Conflict (or a 500 past kopf's retries) on the status write of
    a tick once ended the fleet's timer for good: kopf applies a timer's
    patch outside the handler, and a failure there stops the timer. The
    loop writes its status itself now, so the next tick goes on."""
    monkeypatch.delenv("ELASTICFLEET_REDIS_URL", raising=False)
    worker = FakeWorker(PROFILE, others_bytes=int(3.2 * GIB))
    server, port = serve_fake_worker(cluster, worker)

    def last_plan() -> str:
        (found,) = cluster.objects("elasticfleet.io/v1alpha1/elasticfleets", "ns")
        plans = found.get("status", {}).get("lastPlans", [])
        return str(plans[-1]["plan"]["id"]) if plans else ""

    try:
        with operator() as runner:
            cluster.call("POST", FLEETS, example_fleet(port))
            (deployment,) = wait_for(
                "the Deployment", lambda: cluster.objects("apps/v1/deployments")
            )
            run_pod(cluster, deployment)
            squeezed = wait_for("a smaller plan in status", last_plan)
            conflict = cluster.emulator.inject(Fault(409, "patch", "elasticfleets", "status"))
            wait_for("the refused write", lambda: conflict.fired)
            worker.others_bytes = 0  # relaxed: the next ticks must restore the blocks
            wait_for("a later tick's plan in status", lambda: last_plan() not in ("", squeezed))
        assert runner.exit_code == 0, runner.output
    finally:
        cluster.run(server.stop(None))


def test_a_bad_spec_is_reported(cluster: EmulatedCluster) -> None:
    fleet = yaml.safe_load(EXAMPLE.read_text())
    fleet["spec"]["model"]["name"] = "Llama-2-7b"
    with operator() as runner:
        cluster.call("POST", FLEETS, fleet)

        def degraded() -> dict[str, Any]:
            (found,) = cluster.objects("elasticfleet.io/v1alpha1/elasticfleets")
            return _condition(found, "Degraded")

        condition = wait_for("Degraded", degraded)
        assert (condition["status"], condition["reason"]) == ("True", "InvalidSpec")
        assert "no block profile for model 'Llama-2-7b'" in condition["message"]
        assert cluster.objects("apps/v1/deployments") == []
    assert runner.exit_code == 0, runner.output


def published(redis_url: str, weights: AdapterWeights) -> tuple[AdapterManifest, dict[str, Any]]:
    """`weights` published to the store, and an AdapterSet that describes them."""
    store = AdapterStore.from_url(redis_url)
    manifest = store.publish(weights)
    store.close()
    spec = manifest.spec
    adapter_set = {
        "apiVersion": "elasticfleet.io/v1alpha1",
        "kind": "AdapterSet",
        "metadata": {"name": spec.name},
        "spec": {
            "baseModel": spec.base_model,
            "tasks": list(spec.tasks),
            "rank": spec.rank,
            "modules": list(spec.modules),
        },
    }
    return manifest, adapter_set


def test_adapter_set_status_comes_from_the_store(
    cluster: EmulatedCluster,
    redis_url: str,
    make_adapter: Callable[..., AdapterWeights],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manifest, adapter_set = published(redis_url, make_adapter("demo", ("code", "qa"), router=False))
    monkeypatch.setenv("ELASTICFLEET_REDIS_URL", redis_url)
    with operator() as runner:
        cluster.call("POST", ADAPTER_SETS, adapter_set)

        def status() -> dict[str, Any]:
            (found,) = cluster.objects("elasticfleet.io/v1alpha1/adaptersets")
            return dict(found.get("status", {}))

        ready = wait_for("a checked AdapterSet", lambda: status().get("ready") and status())
        assert ready["version"] == str(manifest.version)
        assert ready["sizeBytes"] == manifest.total_bytes and len(ready["digest"]) == 64
    assert runner.exit_code == 0, runner.output


def test_an_adapter_set_is_checked_in_its_fleets_store(
    cluster: EmulatedCluster,
    redis_url: str,
    make_adapter: Callable[..., AdapterWeights],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manifest, adapter_set = published(
        redis_url, make_adapter("tasks", ("code", "qa"), router=False)
    )
    monkeypatch.delenv("ELASTICFLEET_REDIS_URL", raising=False)  # the operator has no store
    fleet = yaml.safe_load(EXAMPLE.read_text())
    # The fleet keeps its Redis URL in a Secret, as a password-bearing one would be.
    fleet["spec"]["redis"] = {"urlSecretRef": {"name": "redis", "key": "url"}}
    secret_url = "localhost:6379?password=s3cret"  # no scheme, and a secret to keep
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "redis"},
        "data": {"url": base64.b64encode(secret_url.encode()).decode()},
    }

    def status() -> dict[str, Any]:
        (found,) = cluster.objects("elasticfleet.io/v1alpha1/adaptersets")
        return dict(found.get("status", {}))

    def ready_condition() -> dict[str, Any]:
        return _condition({"status": status()}, "Ready")

    def checked(reason: str, touch: dict[str, Any] | None = None) -> str:
        """Touch the spec (a check runs at once), wait for `reason`, return the message."""
        if touch is not None:
            cluster.call("PATCH", f"{ADAPTER_SETS}/tasks", {"spec": touch})
        wait_for(reason, lambda: ready_condition().get("reason") == reason)
        return str(ready_condition()["message"])

    with operator() as runner:
        # No fleet serves it, and the operator has no store of its own.
        cluster.call("POST", ADAPTER_SETS, adapter_set)
        assert "no ElasticFleet serves it yet" in checked("NoStore")
        # A fleet serves it, keeping its Redis URL in a Secret that is not there yet.
        cluster.call("POST", FLEETS, fleet)
        wait_for("the fleet's Deployment", lambda: cluster.objects("apps/v1/deployments"))
        message = checked("SecretUnavailable", {"alpha": 8})
        assert message.startswith("the store of fleet smollm2: ") and "redis" in message
        # The Secret's URL is malformed: said so, without repeating it.
        cluster.call("POST", "/api/v1/namespaces/ns/secrets", secret)
        message = checked("InvalidStore", {"tasks": ["code"]})
        assert message.startswith("the store of fleet smollm2: the URL in Secret redis (key url)")
        assert "s3cret" not in message and "localhost" not in message
        # Fixed: the set is found, in the fleet's store.
        fixed = {"data": {"url": base64.b64encode(redis_url.encode()).decode()}}
        cluster.call("PATCH", "/api/v1/namespaces/ns/secrets/redis", fixed)
        message = checked("Published", {"store": {"name": "tasks"}})
        assert message == f"the store of fleet smollm2: version {manifest.version} matches the spec"
        assert status()["ready"] is True and status()["version"] == str(manifest.version)
    assert runner.exit_code == 0, runner.output
