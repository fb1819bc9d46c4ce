"""Smoke tests of the OCI images (scripts/build-images): their configs as
both archives carry them, the operator image printing the CRDs and working
(handlers, rl decisions, an AdapterSet check) with no torch in it, and the
worker image preparing its model into a volume and answering over gRPC, or
using a volume prepared already, mounted read-only. Each image runs under
runc as it would in a pod (tests/images/oci_images.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from oci_images import (
    VERSION,
    Mount,
    UnpackedImage,
    archive,
    container,
    image_config,
    reference,
    require_archives,
    run,
)
from test_without_torch import ADAPTER_SPEC, SCRIPT, check_report

from elasticfleet.worker.adapters.store import AdapterStore
from elasticfleet.worker.adapters.weights import AdapterWeights
from elasticfleet.worker.model.prepare import MODEL_NAME
from elasticfleet.worker.serving.client import WorkerClient, generate_request
from elasticfleet.worker.serving.process import WorkerProcess

pytestmark = pytest.mark.images

USER = "65532:65532"
CACHE = "/var/cache/elasticfleet"
# Where the worker writes its ready file (a writable mount, as a pod would give it).
READY = "/run/elasticfleet"
COMMANDS = {"operator": ["operator", "run"], "worker": ["worker", "--host", "0.0.0.0"]}


def _unpacked(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UnpackedImage]:
    require_archives(image)
    where = tmp_path_factory.mktemp(image)
    yield UnpackedImage.unpack(image, where)
    # About a gigabyte: not left for pytest's kept temporary directories.
    shutil.rmtree(where)


@pytest.fixture(scope="module")
def operator_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UnpackedImage]:
    yield from _unpacked("operator", tmp_path_factory)


@pytest.fixture(scope="module")
def worker_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UnpackedImage]:
    yield from _unpacked("worker", tmp_path_factory)


@pytest.mark.parametrize("kind", ["oci", "docker"])
@pytest.mark.parametrize("image", ["operator", "worker"])
def test_the_archives_carry_the_image_config(image: str, kind: str) -> None:
    require_archives(image)
    config = image_config(image, kind)
    assert config["User"] == USER
    assert config["Entrypoint"] == ["elasticfleet"]
    assert config["Cmd"] == COMMANDS[image]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == f"elasticfleet-{image}"
    assert labels["org.opencontainers.image.version"] == VERSION
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    assert labels["org.opencontainers.image.revision"] == head.stdout.strip()
    assert not re.search(r"//[^/]*@", labels.get("org.opencontainers.image.source", ""))


@pytest.mark.parametrize("image", ["operator", "worker"])
def test_the_docker_archive_names_the_image(image: str) -> None:
    """`docker load` and `kind load image-archive` tag what they load by this."""
    require_archives(image)
    with tarfile.open(archive(image, "docker")) as tar:
        manifest = tar.extractfile("manifest.json")
        assert manifest is not None
        text = manifest.read().decode()
    assert f'"docker.io/library/{reference(image)}"' in text


def test_the_worker_image_adds_one_layer_to_the_operator_image() -> None:
    """The operator image (Debian, the venv, the operator's packages; no
    torch) is the worker's base; the worker adds torch, its other packages
    and the GGUF in one layer."""
    require_archives("operator")
    require_archives("worker")
    layers = {}
    for image in ("operator", "worker"):
        inspect = ["skopeo", "inspect", f"oci-archive:{archive(image, 'oci')}"]
        done = subprocess.run(inspect, capture_output=True, text=True, check=True)
        layers[image] = json.loads(done.stdout)["Layers"]
    assert len(layers["worker"]) == len(layers["operator"]) + 1
    assert layers["worker"][:-1] == layers["operator"]


def test_the_operator_image_prints_the_crds(operator_image: UnpackedImage, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTICFLEET_")}
    host = subprocess.run(
        [sys.executable, "-m", "elasticfleet.cli", "operator", "crds"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    done = run(operator_image.bundle(tmp_path / "crds", ["operator", "crds"]))
    assert done.returncode == 0, done.stderr
    assert done.stdout == host.stdout


def test_the_operator_image_runs_the_operator_command(
    operator_image: UnpackedImage, tmp_path: Path
) -> None:
    done = run(operator_image.bundle(tmp_path / "help", ["operator", "run", "--help"]))
    assert done.returncode == 0, done.stderr
    assert "--peering" in done.stdout


def test_the_operator_image_works_without_torch(
    operator_image: UnpackedImage,
    tmp_path: Path,
    store: AdapterStore,
    redis_url: str,
    make_adapter: Callable[..., AdapterWeights],
) -> None:
    """tests/operator/without_torch.py, run by the image's Python: torch is
    not installed, and the handlers load, the rl policy decides as it does
    on the host and an AdapterSet check reads the host's Valkey."""
    store.publish(make_adapter(name="demo"))
    script = Mount(SCRIPT.parent, "/checks")
    args = [f"/checks/{SCRIPT.name}", redis_url, "demo", json.dumps(ADAPTER_SPEC)]
    python = "/opt/elasticfleet/bin/python"
    done = run(operator_image.bundle(tmp_path / "check", args, [script], entrypoint=[python]))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert not report["torch_installed"]
    check_report(report)


def test_the_worker_image_prepares_its_model_into_a_volume_and_serves(
    worker_image: UnpackedImage, tmp_path: Path
) -> None:
    """A first start on an empty writable volume (a pod's emptyDir): the
    worker prepares SmolLM2 from the image's GGUF into it, then serves."""
    cache, ready = tmp_path / "cache", tmp_path / "ready"
    for folder in (cache, ready):
        folder.mkdir()
        os.chown(folder, worker_image.uid, worker_image.uid)
    args = ["worker", "--host", "127.0.0.1", "--port", "0", "--threads", "1"]
    bundle = worker_image.bundle(
        tmp_path / "bundle",
        [*args, "--ready-file", f"{READY}/worker.json"],
        [Mount(cache, CACHE, read_only=False), Mount(ready, READY, read_only=False)],
    )
    log = tmp_path / "worker.log"
    with log.open("wb") as sink, container(bundle, subprocess.DEVNULL, sink) as process:
        worker = WorkerProcess.attach(process, log, ready / "worker.json")
        with grpc.insecure_channel(worker.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        request = generate_request(
            "What is the capital of France?", chat_template=True, max_new_tokens=8
        )
        with WorkerClient(worker.address) as client:
            answer = client.complete(request, timeout=60)
        assert "Paris" in answer.text, answer
        assert worker.stop() == 0
    manifest = cache / "models" / MODEL_NAME / "manifest.json"
    assert manifest.stat().st_uid == worker_image.uid


@pytest.mark.real_model
def test_the_worker_image_uses_a_prepared_read_only_volume(
    worker_image: UnpackedImage, real_model_dir: Path, tmp_path: Path
) -> None:
    """A volume prepared elsewhere (here: the host's cache) is verified and
    used as it is; nothing is written to it."""
    cache_root = real_model_dir.parent.parent
    bundle = worker_image.bundle(
        tmp_path / "bundle", ["model", "prepare", "--no-progress"], [Mount(cache_root, CACHE)]
    )
    done = run(bundle)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{CACHE}/models/{MODEL_NAME}"
