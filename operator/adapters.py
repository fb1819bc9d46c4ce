"""AdapterSet status: is the adapter set its spec describes really in the store?

An AdapterSet object only describes an adapter; the weights live in Redis,
published by `elasticfleet adapters push`: in the store of every fleet that
serves it (spec.redis), or, for one no fleet serves yet, the operator's own
store when it has one (`check_in_stores` gives the verdict over them). Workers fetch what a fleet
names, so a typo or a stale spec would surface as load failures on every
worker. This check reads the version's manifest (no blobs) and compares it
with the spec: base model, rank, modules, router, and that every task the
spec names has a head. The result is the AdapterSet's status, with the
version, its manifest's sha256 digest and its size (status.AdapterSetStatus).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from elasticfleet.operator.conditions import set_condition
from elasticfleet.operator.spec import SecretUnavailable
from elasticfleet.operator.status import AdapterSetStatus, Condition
from elasticfleet.worker.adapters.store import (
    AdapterManifest,
    AdapterNotFound,
    AdapterStore,
    AdapterStoreError,
    StoreAuthError,
    StoreUnavailable,
)

# Opens a store to check in; None when there is none to open.
StoreOpener = Callable[[], Awaitable[AdapterStore | None]]
NO_STORE = (
    "no ElasticFleet serves it yet, and the operator has no store of its own "
    "(ELASTICFLEET_REDIS_URL) to check it in"
)


@dataclass(frozen=True)
class AdapterCheck:
    """What the store says about one AdapterSet."""

    ready: bool
    reason: str
    message: str
    manifest: AdapterManifest | None = None


def store_name(name: str, spec: Mapping[str, Any]) -> str:
    """The adapter's name in the store: spec.store.name, else the object's."""
    return str(spec.get("store", {}).get("name") or name)


def mismatches(spec: dict[str, Any], manifest: AdapterManifest) -> list[str]:
    """How the published version differs from what the spec says."""
    found = manifest.spec
    problems = []
    if spec["baseModel"] != found.base_model:
        problems.append(f"base model is {found.base_model!r}, spec says {spec['baseModel']!r}")
    if spec["rank"] != found.rank:
        problems.append(f"rank is {found.rank}, spec says {spec['rank']}")
    if "alpha" in spec and float(spec["alpha"]) != found.alpha:
        problems.append(f"alpha is {found.alpha:g}, spec says {spec['alpha']:g}")
    if set(spec["modules"]) != set(found.modules):
        problems.append(
            f"modules are {', '.join(found.modules)}, spec says {', '.join(spec['modules'])}"
        )
    if spec.get("router", False) and not found.router:
        problems.append("it has no router, spec says router: true")
    missing = [task for task in spec["tasks"] if task not in found.tasks]
    if missing:
        problems.append(
            f"no head for task(s) {', '.join(missing)} (it has {', '.join(found.tasks)})"
        )
    return problems


def check_adapter_set(store: AdapterStore, name: str, spec: dict[str, Any]) -> AdapterCheck:
    """Check AdapterSet `name` against `store` (an outage is a check that
    failed: the caller checks again later)."""
    adapter = store_name(name, spec)
    pinned = str(spec.get("store", {}).get("version", ""))
    try:
        manifest = store.manifest(adapter, int(pinned) if pinned else None)
    except AdapterNotFound as error:
        return AdapterCheck(
            False, "NotFound", f"{error}; publish it with `elasticfleet adapters push`"
        )
    except StoreUnavailable as error:
        return AdapterCheck(False, "StoreUnavailable", str(error))
    except StoreAuthError as error:
        return AdapterCheck(False, "StoreAuthFailed", str(error))
    except AdapterStoreError as error:  # an unreadable manifest
        return AdapterCheck(False, "StoreError", str(error))
    problems = mismatches(spec, manifest)
    if problems:
        return AdapterCheck(
            False, "SpecMismatch", f"version {manifest.version}: " + "; ".join(problems), manifest
        )
    return AdapterCheck(True, "Published", f"version {manifest.version} matches the spec", manifest)


async def check_in_stores(
    name: str, spec: dict[str, Any], stores: Sequence[tuple[str, StoreOpener]]
) -> AdapterCheck:
    """One verdict over the stores AdapterSet `name` is checked in (one per
    Redis its fleets use, else the operator's own), each named by its label:
    the first failure, else the first success. A store that cannot even be
    opened (a malformed URL, its Secret missing, none configured) is a
    failure that says so."""
    if not stores:
        return AdapterCheck(False, "NoStore", NO_STORE)
    checks = []
    for where, open_store in stores:
        try:
            store = await open_store()
        except ValueError as error:
            check = AdapterCheck(False, "InvalidStore", str(error))
        except SecretUnavailable as error:
            check = AdapterCheck(False, "SecretUnavailable", str(error))
        else:
            if store is None:
                check = AdapterCheck(False, "NoStore", NO_STORE)
            else:
                check = await asyncio.to_thread(check_adapter_set, store, name, spec)
        checks.append(
            AdapterCheck(check.ready, check.reason, f"{where}: {check.message}", check.manifest)
        )
    return next((check for check in checks if not check.ready), checks[0])


def adapter_status(
    check: AdapterCheck, conditions: Sequence[Condition], *, now: datetime, generation: int
) -> AdapterSetStatus:
    """The AdapterSet's status for a check."""
    ready = set_condition(
        conditions,
        "Ready",
        check.ready,
        check.reason,
        check.message,
        now=now,
        generation=generation,
    )
    status = AdapterSetStatus(observed_generation=generation, conditions=ready, ready=check.ready)
    manifest = check.manifest
    if manifest is None:
        return status
    return replace(
        status,
        version=str(manifest.version),
        digest=hashlib.sha256(manifest.to_json().encode()).hexdigest(),
        size_bytes=manifest.total_bytes,
    )
