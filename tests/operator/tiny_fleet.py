"""Real worker processes for the operator's tests: `Kubelet` plays the
ReplicaSet controller and kubelet with them, on a simulated device that
`squeeze` fills. The tiny model they serve and its block profile come from
the `tiny_worker_model` and `tiny_profiles` fixtures (tests/conftest.py).
"""

from __future__ import annotations

import base64
import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from elasticfleet.operator.build import GRPC_PORT_NAME
from elasticfleet.worker.serving.process import WorkerProcess
from elasticfleet.worker.serving.telemetry import write_simulated_device

if TYPE_CHECKING:
    from kube_emulator import EmulatedCluster

DEVICE_BYTES = 8 * 2**20


def squeeze(device: Path, others_bytes: int) -> None:
    """Other processes now hold `others_bytes` of a simulated device."""
    write_simulated_device(device, DEVICE_BYTES, others_bytes)


def object_data(
    cluster: EmulatedCluster, resource: str, namespace: str, name: str
) -> dict[str, bytes]:
    """The data of Secret or ConfigMap `name` ('v1/secrets' or 'v1/configmaps')."""
    (found,) = [o for o in cluster.objects(resource, namespace) if o["metadata"]["name"] == name]
    if resource == "v1/secrets":
        return {key: base64.b64decode(value) for key, value in found.get("data", {}).items()}
    return {key: str(value).encode() for key, value in found.get("data", {}).items()}


def container_env(
    cluster: EmulatedCluster, namespace: str, pod: str, container: dict[str, Any]
) -> dict[str, str]:
    """The environment a kubelet gives `container` of pod `pod`: its
    envFrom ConfigMaps and Secrets, then its env (values, and references to
    keys of Secrets and ConfigMaps and to the pod's name and namespace)."""
    kinds = {"secretKeyRef": "v1/secrets", "configMapKeyRef": "v1/configmaps"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef") or source["secretRef"]
        resource = "v1/configmaps" if "configMapRef" in source else "v1/secrets"
        data = object_data(cluster, resource, namespace, ref["name"])
        env.update({key: value.decode() for key, value in data.items()})
    fields = {"metadata.name": pod, "metadata.namespace": namespace}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ((kind, ref),) = item["valueFrom"].items()
        if kind == "fieldRef":
            env[item["name"]] = fields[ref["fieldPath"]]
        else:
            data = object_data(cluster, kinds[kind], namespace, ref["name"])
            env[item["name"]] = data[ref["key"]].decode()
    return env


def _set_flag(args: list[str], flag: str, value: str) -> None:
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]


class Kubelet:
    """Runs the worker pods of the Deployments the operator creates, as
    real `elasticfleet worker` processes started from the Deployment's own
    container command and environment, and creates their pods, Ready.

    Where it must differ from a node:
    - every worker shares 127.0.0.1, so each listens on a free port and its
      pod declares that port as the container's `grpc` port (the operator
      reaches a pod at the port it declares); metrics go to free ports too;
    - the device is simulated: each worker reads its memory from a file of
      its own (`--simulated-device`), which `squeeze` rewrites;
    - `elasticfleet` is this Python's, the model cache a temporary folder;
      variables from Secrets, ConfigMaps and the pod's fields
      (`container_env`) and Secret volumes are read from the emulated
      cluster (a volume as a folder of the pod's, its mount path rewritten
      in the arguments).

    `kill` ends a worker with SIGKILL, as a crash does; its pod stays Ready
    (the window before a readiness probe notices) until `restart` brings the
    container back on the same port.
    """

    def __init__(self, cluster: EmulatedCluster, folder: Path, namespace: str = "ns") -> None:
        self.cluster = cluster
        self.folder = folder
        self.namespace = namespace
        self.workers: dict[str, WorkerProcess] = {}
        self.commands: dict[str, list[str]] = {}
        self.envs: dict[str, dict[str, str]] = {}
        self.secret_volumes: dict[str, list[dict[str, Any]]] = {}

    def __enter__(self) -> Kubelet:
        return self

    def __exit__(self, *_: object) -> None:
        with contextlib.ExitStack() as killing:
            for worker in self.workers.values():
                killing.callback(worker.kill)

    def device(self, pod: str) -> Path:
        return self.folder / f"{pod}.device.json"

    def sync(self, deployment: dict[str, Any]) -> list[str]:
        """Run `spec.replicas` pods for `deployment` (creating the missing
        ones, deleting the extra ones); returns the pod names."""
        name = deployment["metadata"]["name"]
        wanted = [f"{name}-{index}" for index in range(deployment["spec"]["replicas"])]
        for pod in wanted:
            if pod not in self.workers:
                self._create(pod, deployment["spec"]["template"])
        for pod in [p for p in self.workers if p.startswith(f"{name}-") and p not in wanted]:
            self.workers.pop(pod).stop()
            self.cluster.call("DELETE", f"/api/v1/namespaces/{self.namespace}/pods/{pod}")
        return wanted

    def kill(self, pod: str) -> None:
        self.workers[pod].kill()

    def restart(self, pod: str) -> None:
        """Start the pod's container again, where it listened before."""
        port = str(self.workers[pod].port)
        command = self.commands[pod]
        _set_flag(command, "--port", port)
        self.workers[pod] = self._start(pod, command, self.envs[pod])

    def _create(self, pod: str, template: dict[str, Any]) -> None:
        (container,) = template["spec"]["containers"]
        executable, subcommand, *args = container["command"]
        assert (executable, subcommand) == ("elasticfleet", "worker"), container["command"]
        for flag, value in (
            ("--host", "127.0.0.1"),
            ("--port", "0"),
            ("--metrics-port", "0"),
            ("--threads", "1"),
            ("--simulated-device", str(self.device(pod))),
        ):
            _set_flag(args, flag, value)
        # Only what the container declares: nothing of the test's own settings.
        env = {name: "" for name in os.environ if name.startswith("ELASTICFLEET_")}
        env.update(container_env(self.cluster, self.namespace, pod, container))
        self._mount_secrets(pod, template["spec"], container, args)
        env["ELASTICFLEET_CACHE"] = str(self.folder / "cache")
        squeeze(self.device(pod), 0)
        worker = self._start(pod, args, env)
        self.commands[pod], self.envs[pod] = args, env
        self.workers[pod] = worker
        ports = [
            {**port, "containerPort": worker.port} if port["name"] == GRPC_PORT_NAME else port
            for port in container.get("ports", [])
        ]
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod, "labels": template["metadata"]["labels"]},
            "spec": {
                **template["spec"],
                "nodeName": "node-a",
                "containers": [{**container, "ports": ports}],
            },
        }
        pods = f"/api/v1/namespaces/{self.namespace}/pods"
        self.cluster.call("POST", pods, body)
        ready = {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}
        self.cluster.call("PATCH", f"{pods}/{pod}/status", {"status": ready})

    def _start(self, pod: str, args: list[str], env: dict[str, str]) -> WorkerProcess:
        return WorkerProcess.start(args, self.folder / f"{pod}.log", env=env)

    def _mount_secrets(
        self, pod: str, spec: dict[str, Any], container: dict[str, Any], args: list[str]
    ) -> None:
        """Write each Secret volume the container mounts into a folder of the
        pod's, and point the arguments under its mount path there."""
        mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
        volumes = [v for v in spec.get("volumes", []) if "secret" in v and v["name"] in mounts]
        self.secret_volumes[pod] = volumes
        self._write_secrets(pod)
        for volume in volumes:
            folder, mount = self.folder / pod / volume["name"], mounts[volume["name"]]
            args[:] = [f"{folder}{a[len(mount) :]}" if a.startswith(mount) else a for a in args]

    def _write_secrets(self, pod: str) -> None:
        for volume in self.secret_volumes[pod]:
            folder = self.folder / pod / volume["name"]
            folder.mkdir(parents=True, exist_ok=True)
            name = volume["secret"]["secretName"]
            data = object_data(self.cluster, "v1/secrets", self.namespace, name)
            # `items` maps chosen keys to paths, as the kubelet does; else every key.
            items = volume["secret"].get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                # Replaced whole, as the kubelet swaps a volume's files.
                part = folder / f".{item['path']}.part"
                part.write_bytes(data[item["key"]])
                os.replace(part, folder / item["path"])

    def refresh_secrets(self) -> None:
        """What the kubelet's sync does to a changed Secret: rewrite the files
        of every pod's Secret volumes (environment variables never change)."""
        for pod in self.secret_volumes:
            self._write_secrets(pod)
