"""AdapterSet status from the adapter store, on a real Valkey server (the
session's, from tests/conftest.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from elasticfleet.operator import handlers
from elasticfleet.operator.adapters import (
    AdapterCheck,
    StoreOpener,
    adapter_status,
    check_adapter_set,
    check_in_stores,
    store_name,
)
from elasticfleet.operator.spec import SecretUnavailable
from elasticfleet.worker.adapters.store import AdapterStore
from elasticfleet.worker.adapters.weights import AdapterWeights

MakeAdapter = Callable[..., AdapterWeights]
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def adapter_set_spec(**changes: Any) -> dict[str, Any]:
    """An AdapterSet spec matching conftest's make_adapter() (every module, rank 4,
    alpha 8, router), with `changes`."""
    spec: dict[str, Any] = {
        "baseModel": "tiny-llama",
        "tasks": ["code", "qa"],
        "rank": 4,
        "alpha": 8,
        "modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "router": True,
    }
    return spec | changes


def test_a_published_adapter_is_ready(store: AdapterStore, make_adapter: MakeAdapter) -> None:
    first = store.publish(make_adapter(name="demo", seed=1))
    second = store.publish(make_adapter(name="demo", seed=2))
    check = check_adapter_set(store, "demo", adapter_set_spec())
    assert check.ready and check.manifest == second
    status = adapter_status(check, [], now=NOW, generation=3)
    assert status.ready is True and status.version == str(second.version)
    assert status.size_bytes == second.total_bytes > 0
    assert status.digest is not None and len(status.digest) == 64
    (ready,) = status.conditions
    assert (ready.type, ready.status, ready.reason) == ("Ready", "True", "Published")
    assert ready.observed_generation == 3
    # A pinned version is checked as it is, under the store name the spec gives.
    pinned = adapter_set_spec(store={"name": "demo", "version": str(first.version)})
    assert check_adapter_set(store, "renamed", pinned).manifest == first
    assert store_name("renamed", pinned) == "demo"


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"baseModel": "SmolLM2-135M-Instruct"}, "base model is 'tiny-llama'"),
        ({"rank": 8}, "rank is 4, spec says 8"),
        ({"alpha": 16}, "alpha is 8, spec says 16"),
        ({"modules": ["q_proj"]}, "modules are q_proj, k_proj"),
        ({"tasks": ["code", "poetry"]}, "no head for task(s) poetry"),
    ],
)
def test_a_spec_that_does_not_match_is_not_ready(
    store: AdapterStore, make_adapter: MakeAdapter, changes: dict[str, Any], problem: str
) -> None:
    store.publish(make_adapter(name="demo"))
    check = check_adapter_set(store, "demo", adapter_set_spec(**changes))
    assert not check.ready and check.reason == "SpecMismatch"
    assert problem in check.message


def test_router_is_required_only_when_asked(store: AdapterStore, make_adapter: MakeAdapter) -> None:
    store.publish(make_adapter(name="plain", router=False))
    assert check_adapter_set(store, "plain", adapter_set_spec(router=False)).ready
    assert "has no router" in check_adapter_set(store, "plain", adapter_set_spec()).message


def test_an_unpublished_adapter_says_how_to_publish(store: AdapterStore) -> None:
    check = check_adapter_set(store, "missing", adapter_set_spec())
    assert (check.ready, check.reason) == (False, "NotFound")
    assert "elasticfleet adapters push" in check.message
    status = adapter_status(check, [], now=NOW, generation=1)
    assert status.version is None and status.ready is False
    # The patch leaves the version found by the last check that found one.
    assert "version" not in status.to_dict()


def test_a_store_outage_is_a_failed_check() -> None:
    store = AdapterStore.from_url("redis://127.0.0.1:1/0", connect_timeout_s=0.2, retries=0)
    check = check_adapter_set(store, "demo", adapter_set_spec())
    store.close()
    assert (check.ready, check.reason, check.manifest) == (False, "StoreUnavailable", None)
    assert "127.0.0.1:1" in check.message


def test_the_verdict_over_several_stores_names_the_first_failure(
    store: AdapterStore, make_adapter: MakeAdapter
) -> None:
    published = store.publish(make_adapter(name="demo"))

    async def found() -> AdapterStore:
        return store

    async def secret_missing() -> AdapterStore:
        raise SecretUnavailable("Secret redis has no url yet")

    async def malformed() -> AdapterStore:
        raise ValueError("the URL in Secret redis (key url): it has no scheme")

    async def none() -> None:
        return None

    def verdict(*stores: tuple[str, StoreOpener]) -> AdapterCheck:
        return asyncio.run(check_in_stores("demo", adapter_set_spec(), stores))

    ready = verdict(("the store of fleet a", found))
    assert ready.ready and ready.manifest == published
    assert ready.message == f"the store of fleet a: version {published.version} matches the spec"
    failed = verdict(("the store of fleet a", found), ("the store of fleet b", secret_missing))
    assert (failed.ready, failed.reason) == (False, "SecretUnavailable")
    assert failed.message == "the store of fleet b: Secret redis has no url yet"
    assert verdict(("x", malformed)).reason == "InvalidStore"
    unconfigured = verdict(("the operator's store", none))
    assert unconfigured.reason == "NoStore" and "no ElasticFleet serves it yet" in (
        unconfigured.message
    )


def test_the_operator_reuses_a_store_and_closes_idle_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[AdapterStore] = []
    monkeypatch.setattr(AdapterStore, "close", lambda store: closed.append(store))
    monkeypatch.setattr(handlers._Stores, "opened", {})
    first = handlers._Stores.get("redis://127.0.0.1:1/0", None, "a:")
    assert handlers._Stores.get("redis://127.0.0.1:1/0", None, "a:") is first
    # A rotated password is another store; the old one goes once idle.
    second = handlers._Stores.get("redis://127.0.0.1:1/0", "new", "a:")
    assert second is not first
    handlers._Stores.sweep()
    assert closed == []  # both used just now
    monkeypatch.setattr(handlers, "IDLE_STORE_S", -1.0)
    handlers._Stores.sweep()
    assert closed == [first, second] and handlers._Stores.opened == {}
