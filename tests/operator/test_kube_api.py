"""The operator's own API client (operator/kube.py) fails every way as
KubeError, so the handlers that catch it (a timer's status write, a
Secret read, creating children) handle a dead connection as they handle
an error status; a status write to an object that is gone is no error."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import kopf
import pytest
import yaml
from kube_faults import Fault
from test_operator_kopf import EXAMPLE
from valkey_server import free_port

from elasticfleet.operator.kube import KubeApi, KubeError, custom_object_path

if TYPE_CHECKING:
    from kube_emulator import EmulatedCluster

# Fixture: cluster (the emulated API, $KUBECONFIG pointing at it).
pytest_plugins = ["kube_emulator"]


async def write(info: kopf.ConnectionInfo, path: str) -> None:
    api = KubeApi(info)
    try:
        await api.patch_status(path, {"observedGeneration": 1})
    finally:
        await api.close()


def test_no_answer_is_a_kube_error() -> None:
    info = kopf.ConnectionInfo(server=f"https://127.0.0.1:{free_port()}", insecure=True)
    with pytest.raises(KubeError) as raised:
        asyncio.run(write(info, custom_object_path("elasticfleets", "ns", "f")))
    assert raised.value.status == 0 and "no answer from the API server" in str(raised.value)


def test_status_writes_answer_as_the_server_does(cluster: EmulatedCluster) -> None:
    info = kopf.ConnectionInfo(server=cluster.url, insecure=True, token="admin-token")
    path = custom_object_path("elasticfleets", "ns", "gone")
    asyncio.run(write(info, path))  # 404: nothing to write, no error
    cluster.emulator.inject(Fault(500, "patch", "elasticfleets", "status"))
    fleet = yaml.safe_load(EXAMPLE.read_text())
    fleet["metadata"]["name"] = "gone"
    cluster.call("POST", "/apis/elasticfleet.io/v1alpha1/namespaces/ns/elasticfleets", fleet)
    with pytest.raises(KubeError, match="HTTP 500: Internal error occurred") as raised:
        asyncio.run(write(info, path))
    assert raised.value.status == 500
    asyncio.run(write(info, path))  # the fault spent: written
    (stored,) = cluster.objects("elasticfleet.io/v1alpha1/elasticfleets", "ns")
    assert stored["status"]["observedGeneration"] == 1
