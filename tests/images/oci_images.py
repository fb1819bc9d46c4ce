"""The images scripts/build-images writes to dist/, run the way a container
runtime runs them.

An archive is unpacked by umoci into an OCI runtime bundle, whose
config.json umoci derives from the image's config (user, environment,
working directory, entrypoint and command), and runc runs it. Each run gets
its own small bundle over one shared, read-only root file system, on the
host's network namespace, so a server in the image that listens on
127.0.0.1 is reached from the test. `"terminal": false` because the tests
read the output through pipes.

Where the images cannot be built or run (not root, or the Debian tools
missing: a developer's machine), the tests that need them skip, saying why;
where they can, a missing image is a failure, so a CI run whose image build
broke cannot pass.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from elasticfleet.worker.serving.process import stop_process

DIST = Path(__file__).resolve().parents[2] / "dist"
VERSION = importlib.metadata.version("elasticfleet")
TOOLS = ("umoci", "skopeo", "runc")


def archive(image: str, kind: str) -> Path:
    """dist/elasticfleet-IMAGE-VERSION.KIND.tar, KIND oci or docker."""
    return DIST / f"elasticfleet-{image}-{VERSION}.{kind}.tar"


def reference(image: str) -> str:
    """The name and tag the archives give the image."""
    return f"elasticfleet-{image}:{VERSION}"


def require_archives(image: str) -> None:
    """Skip where images cannot be built or run here; fail if they could be
    but were not built."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        why = f"{', '.join(missing)} missing" if missing else "not root"
        pytest.skip(f"the OCI images cannot be built or run here ({why}; scripts/setup as root)")
    for kind in ("oci", "docker"):
        if not archive(image, kind).is_file():
            pytest.fail(f"{archive(image, kind)} is missing: run bash scripts/build-images")


def image_config(image: str, kind: str) -> dict[str, Any]:
    """The image's OCI config (user, entrypoint, labels...) read from its archive."""
    done = subprocess.run(
        ["skopeo", "inspect", "--config", f"{kind}-archive:{archive(image, kind)}"],
        capture_output=True,
        text=True,
        check=True,
    )
    config: dict[str, Any] = json.loads(done.stdout)["config"]
    return config


@dataclass(frozen=True)
class Mount:
    """A host directory bound into the container."""

    source: Path
    destination: str
    read_only: bool = True


@dataclass
class UnpackedImage:
    """An image unpacked once; `bundle` makes a bundle per run over it."""

    rootfs: Path
    config: dict[str, Any]  # the runtime config umoci derived from the image
    entrypoint: list[str]

    @classmethod
    def unpack(cls, image: str, where: Path) -> UnpackedImage:
        layout = where / "layout"
        layout.mkdir()
        subprocess.run(["tar", "-xf", str(archive(image, "oci")), "-C", str(layout)], check=True)
        bundle = where / "unpacked"
        subprocess.run(
            ["umoci", "unpack", "--image", f"{layout}:{reference(image)}", str(bundle)],
            capture_output=True,
            check=True,
        )
        shutil.rmtree(layout)
        config = json.loads((bundle / "config.json").read_text())
        return cls(bundle / "rootfs", config, image_config(image, "oci")["Entrypoint"])

    @property
    def uid(self) -> int:
        """The user the image runs as."""
        uid: int = self.config["process"]["user"]["uid"]
        return uid

    def bundle(
        self,
        where: Path,
        args: Sequence[str],
        mounts: Sequence[Mount] = (),
        *,
        entrypoint: Sequence[str] | None = None,
    ) -> Path:
        """A bundle in `where` that runs ENTRYPOINT ARGS as the image says
        (user, environment, working directory; `entrypoint` replaces the
        image's, as a pod's `command` does), on the host's network, with the
        root file system read-only but for a tmpfs /tmp, and `mounts` over
        the image's own."""
        config = copy.deepcopy(self.config)
        config["root"] = {"path": str(self.rootfs), "readonly": True}
        config["process"]["terminal"] = False
        config["process"]["args"] = [*(entrypoint or self.entrypoint), *args]
        linux = config["linux"]
        linux["namespaces"] = [n for n in linux["namespaces"] if n["type"] != "network"]
        replaced = {m.destination for m in mounts}
        config["mounts"] = [m for m in config["mounts"] if m["destination"] not in replaced] + [
            # The one writable place a read-only root needs (as a pod would
            # mount an emptyDir): torch picks its cache directory under the
            # temporary directory when the worker builds its model.
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["mode=1777"]},
            *(
                {
                    "destination": m.destination,
                    "type": "bind",
                    "source": str(m.source),
                    "options": ["rbind", "ro" if m.read_only else "rw"],
                }
                for m in mounts
            ),
        ]
        where.mkdir(parents=True)
        (where / "config.json").write_text(json.dumps(config))
        return where


@contextlib.contextmanager
def container(
    bundle: Path, stdout: int | IO[bytes], stderr: int | IO[bytes]
) -> Iterator[subprocess.Popen[bytes]]:
    """`runc run` of `bundle` in the foreground (runc passes signals on to
    the container's process); stopped, and the container deleted, on exit."""
    name = f"elasticfleet-test-{uuid.uuid4().hex[:12]}"
    process = subprocess.Popen(
        ["runc", "run", "--bundle", str(bundle), name],
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
    )
    try:
        yield process
    finally:
        stop_process(process)
        # A runc that had to be killed leaves its container behind.
        subprocess.run(["runc", "delete", "--force", name], capture_output=True)


def run(bundle: Path, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `bundle` to completion; its exit status and output."""
    with container(bundle, subprocess.PIPE, subprocess.PIPE) as process:
        out, err = process.communicate(timeout=timeout_s)
    return subprocess.CompletedProcess(process.args, process.returncode, out.decode(), err.decode())
