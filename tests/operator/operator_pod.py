"""The operator's pod as a kubelet runs it from the Helm chart's Deployment:
`OperatorPod` starts `elasticfleet operator run` as a process with the
container's own command, arguments and environment (its ConfigMap, Secrets
and the pod's name and namespace resolved as a kubelet resolves them) and
the identity of the pod's ServiceAccount, then probes its liveness endpoint
as the Deployment's probe says and marks the pod Ready.

Where it must differ from a node:
- identity: a kubelet mounts a token from the TokenRequest API into the pod,
  where kopf finds it; here the token (from the same API, for the
  ServiceAccount the pod spec names, which must exist) goes into a
  kubeconfig that $KUBECONFIG names, the only other way kopf logs in;
- network: a pod has an interface of its own; here there is only the
  host's, so what the pod would serve on every interface (0.0.0.0 in the
  liveness URL) is served on 127.0.0.1, and the Prometheus port is left
  out (`operator run --metrics-port` listens on every interface, and the
  tests listen on loopback only; tests/chart checks the setting itself);
- `elasticfleet` is this Python's; nothing of the test's own ELASTICFLEET_*
  settings reaches the process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tiny_fleet import container_env
from waiting import wait_for

from elasticfleet.worker.serving.process import stop_process

if TYPE_CHECKING:
    from kube_emulator import EmulatedCluster

ELASTICFLEET = str(Path(sys.executable).with_name("elasticfleet"))
START_TIMEOUT_S = 90


class OperatorPod:
    """The pod of `deployment` (the chart's operator), from `with` to its end."""

    def __init__(self, cluster: EmulatedCluster, deployment: dict[str, Any], folder: Path) -> None:
        self.cluster = cluster
        self.namespace = deployment["metadata"]["namespace"]
        self.name = f"{deployment['metadata']['name']}-0"
        self.template = deployment["spec"]["template"]
        (self.container,) = self.template["spec"]["containers"]
        self.folder = folder
        self.log = folder / f"{self.name}.log"
        self.liveness = self._probe_url()

    def __enter__(self) -> OperatorPod:
        self.folder.mkdir(parents=True, exist_ok=True)
        pods = f"/api/v1/namespaces/{self.namespace}/pods"
        metadata = {"name": self.name, "labels": self.template["metadata"]["labels"]}
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata}
        self.cluster.call("POST", pods, {**pod, "spec": self.template["spec"]})
        executable, *command = self.container["command"]
        assert executable == "elasticfleet", self.container["command"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTICFLEET_")}
        resolved = container_env(self.cluster, self.namespace, self.name, self.container)
        resolved.pop("ELASTICFLEET_METRICS_PORT", None)
        env.update({k: v.replace("0.0.0.0", "127.0.0.1") for k, v in resolved.items()})
        env["KUBECONFIG"] = str(self._kubeconfig())
        with self.log.open("w") as sink:
            self.process = subprocess.Popen(
                [ELASTICFLEET, *command, *self.container["args"]],
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for("the operator's liveness endpoint", self._alive, START_TIMEOUT_S, 0.5)
        except BaseException:
            self.stop()
            raise
        ready = {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}
        self.cluster.call("PATCH", f"{pods}/{self.name}/status", {"status": ready})
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> int:
        """SIGTERM (SIGKILL if it lingers), as a kubelet stops a container."""
        return stop_process(self.process)

    def _kubeconfig(self) -> Path:
        """A kubeconfig with a token of the pod's ServiceAccount."""
        account = self.template["spec"]["serviceAccountName"]
        path = self.folder / f"{self.name}.kubeconfig"
        token = self.cluster.service_account_token(self.namespace, account)
        self.cluster.write_kubeconfig(path, token)
        return path

    def _probe_url(self) -> str:
        """The URL of the container's liveness probe (its port by name)."""
        probe = self.container["livenessProbe"]["httpGet"]
        ports = {p["name"]: p["containerPort"] for p in self.container["ports"]}
        port = ports.get(probe["port"], probe["port"])
        return f"http://127.0.0.1:{port}{probe['path']}"

    def _alive(self) -> bool:
        return alive(self.process, self.log, self.liveness)


def alive(process: subprocess.Popen[bytes], log: Path, liveness: str) -> bool:
    """Whether an operator process answers its liveness URL (one that has
    exited fails the test with its log)."""
    assert process.poll() is None, log.read_text()
    try:
        with urllib.request.urlopen(liveness, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError):
        return False
