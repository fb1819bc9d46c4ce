"""Verified cache directories outside the repository.

The prepared model and the offline corpus are both derived artefacts, built
once per machine into the user's cache and checked before use. They share one
layout: a directory of files plus a `manifest.json` listing each file's size
and sha256, written last, built in a temporary sibling and renamed into
place under a lock. This module holds the pieces of that layout they share.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"

#: Builds the error raised for a bad file: (path, problem) -> exception.
Corrupt = Callable[[Path, str], Exception]


def default_cache_root() -> Path:
    """$ELASTICFLEET_CACHE, else $XDG_CACHE_HOME/elasticfleet, else ~/.cache/elasticfleet."""
    if explicit := os.environ.get("ELASTICFLEET_CACHE"):
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says to ignore an empty or relative value.
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "elasticfleet"
    return Path.home() / ".cache" / "elasticfleet"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Serialise builders sharing a cache (say, workers on one node's hostPath)."""
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_manifest(
    path: Path, *, format_version: int, files: Collection[str], corrupt: Corrupt
) -> dict[str, Any]:
    """The manifest of directory `path`, checked to be of `format_version` and
    to list at least `files`."""
    manifest_path = path / MANIFEST
    try:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise corrupt(manifest_path, "missing") from None
    except (OSError, ValueError) as exc:
        raise corrupt(manifest_path, f"unreadable ({exc})") from exc
    found = manifest.get("format_version") if isinstance(manifest, dict) else None
    if found != format_version:
        raise corrupt(manifest_path, f"format {found!r}, this version writes {format_version}")
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not set(files) <= set(listed):
        raise corrupt(manifest_path, f"does not list all of {', '.join(files)}")
    return manifest


def verify_files(
    path: Path,
    manifest: dict[str, Any],
    *,
    deep: bool,
    corrupt: Corrupt,
    size_only: Collection[str] = (),
) -> None:
    """Check every file the manifest lists exists with its recorded size and,
    if `deep`, its sha256 (except the files in `size_only`, whose reader
    checks what it reads)."""
    for name, entry in manifest["files"].items():
        target = path / name
        if Path(name).name != name or not isinstance(entry, dict):
            raise corrupt(path / MANIFEST, f"bad entry {name!r}")
        try:
            size = target.stat().st_size
        except FileNotFoundError:
            raise corrupt(target, "missing") from None
        if size != entry.get("size"):
            raise corrupt(target, f"{size} bytes, the manifest says {entry.get('size')}")
        if deep and name not in size_only:
            found = sha256_file(target)
            if found != entry.get("sha256"):
                raise corrupt(
                    target, f"sha256 {found}, the manifest says {entry.get('sha256')!s:.64}"
                )


def rebuild(
    target: Path,
    write: Callable[[Path], None],
    verify: Callable[[Path], object],
    current: Callable[[], bool],
) -> Path:
    """Build the directory `target` atomically and return it.

    Under a lock beside it: if `current()` says another builder finished while
    we waited, do nothing; otherwise remove directories left by interrupted
    runs, `write` into a temporary sibling, `verify` it there, and only then
    swap it into place. A failure leaves any previous `target` untouched."""
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with locked(parent / f".{target.name}.lock"):
        if current():
            return target
        for stale in parent.glob(f".{target.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", suffix=".tmp", dir=parent))
        try:
            write(staging)
            verify(staging)
            if target.exists():
                old = Path(
                    tempfile.mkdtemp(prefix=f".{target.name}.old-", suffix=".tmp", dir=parent)
                )
                target.rename(old / target.name)
                staging.rename(target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                staging.rename(target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target
